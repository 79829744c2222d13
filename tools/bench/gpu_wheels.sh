#!/usr/bin/env bash
# Wheels that the GPU machine (Python 3.12, jax 0.11.2 with CUDA 13, no network) lacks for
# tools/bench/gpu_check.py: ml_collections for the library, tokamax and its import-time
# dependencies for the prefill kernels (pydantic wants a newer typing-extensions than some images). About 38 MB, downloaded here into .whl/ (git-ignored
# through .git/info/exclude). On the GPU machine, with .whl carried along:
#   python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl \
#     && PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 python3 -m tools.bench.gpu_check --out gpu_check.json
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl \
  ml-collections "tokamax>=0.0.17" einshape qwix pydantic pydantic-core annotated-types typing-inspection \
  immutabledict tensorboardx xprof fire termcolor "typing-extensions>=4.16"
ls -la .whl
