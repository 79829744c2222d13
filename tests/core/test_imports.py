"""Importing the library changes no global JAX or Flax setting."""
import os
import subprocess
import sys

# A bare environment, so that nothing the test process set leaks in; XLA_FLAGS only makes the
# compiler faster (tests/conftest.py) and changes no setting the probes read.
BARE = {"JAX_PLATFORMS": "cpu", "PATH": "", "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}

PROBE = r"""
import jax
from flax import nnx
from jax._src import core

def settings():
    return (core.Tracer.sharding, core.Tracer.device, nnx.using_eager_sharding(),
            {k: getattr(jax.config, k) for k in ("jax_enable_x64", "jax_default_matmul_precision",
                                                  "jax_platforms", "jax_num_cpu_devices")})

before = settings()
import research, research.models, research.core.cli, research.core.train, research.attention.mla  # noqa: E401
import research.unlearning.ntk_scrub, research.nas.nb201, research.adapters.lora  # noqa: E401
after = settings()
assert before == after, (before, after)
print("unchanged")
"""


def test_importing_the_library_changes_no_global_jax_or_nnx_setting():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300,
                         env=BARE, cwd=".")
    assert out.returncode == 0 and out.stdout.strip() == "unchanged", out.stderr[-2000:]


def test_models_build_outside_a_mesh_without_a_global_switch():
    out = subprocess.run([sys.executable, "-c", (
        "from flax import nnx\n"
        "from research.models import build_model\n"
        "from research.models.llama import Llama, LlamaConfig\n"
        "assert nnx.using_eager_sharding()\n"
        "build_model('resnet20', num_classes=10, input_shape=(8, 8, 3), rngs=nnx.Rngs(0))\n"
        "Llama(LlamaConfig(vocab_size=32, dim=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,"
        " mlp_dim=32), rngs=nnx.Rngs(0))\n")], capture_output=True, text=True, timeout=300,
        env=BARE, cwd=".")
    assert out.returncode == 0, out.stderr[-2000:]


def test_the_library_imports_one_way():
    """No two files import each other, even through others (lazy and type-only imports count), and
    no sub-packages do either (tools/import_circles.py)."""
    from tools import import_circles

    files, packages, _ = import_circles.report("research")
    assert files == []
    assert [frozenset(group) for group in packages] == list(import_circles.ALLOWED)
