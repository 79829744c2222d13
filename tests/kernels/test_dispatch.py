"""attention_impl=auto runs, per device kind and decode shape, the implementation a committed
table measured fastest, and XLA wherever nothing was measured."""
import json

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from research.attention.ops import attention_ops, mla_absorbed_attention
from research.kernels import dispatch

H200 = "NVIDIA H200"
TABLE = {H200: [
    {"batch": 32, "context": 16384, "heads": 16, "kv_rank": 512, "ms": {"xla": 1.0, "triton": 0.5, "mosaic_gpu": 0.4}},
    {"batch": 1, "context": 1024, "heads": 16, "kv_rank": 512, "ms": {"xla": 0.01, "triton": 0.02}},
    {"batch": 8, "context": 4096, "heads": 16, "kv_rank": 512, "ms": {"xla": 0.2, "triton": 0.1, "mosaic_gpu": None}},
]}


def test_no_table_no_device_and_no_shape_mean_xla():
    assert dispatch.choose(H200, 32, 16384, 16, 512, table={}) == "xla"
    assert dispatch.choose("NVIDIA H100 80GB HBM3", 32, 16384, 16, 512, table=TABLE) == "xla"
    assert dispatch.choose(H200, 32, 16384, 128, 512, table=TABLE) == "xla"   # H 128 never measured
    assert dispatch.choose(H200, 32, 16384, 16, 56, table=TABLE) == "xla"     # nor r 56


def test_the_fastest_measured_implementation_is_chosen_at_the_nearest_cell():
    assert dispatch.choose(H200, 32, 16384, 16, 512, table=TABLE) == "mosaic_gpu"
    assert dispatch.choose(H200, 64, 32768, 16, 512, table=TABLE) == "mosaic_gpu"  # nearest: B 32, S 16k
    assert dispatch.choose(H200, 1, 512, 16, 512, table=TABLE) == "xla"           # the kernel lost there
    assert dispatch.choose(H200, 8, 4096, 16, 512, table=TABLE) == "triton"       # an unmeasured kernel is skipped
    assert dispatch.choose(H200, 32, 16384, 16, 512, table=TABLE, exclude=("mosaic_gpu",)) == "triton"
    table = {H200: [{**TABLE[H200][2], "triton_options": {"block_t": 16}}]}
    assert dispatch.choose_with_options(H200, 8, 4096, 16, 512, table=table) == ("triton", {"block_t": 16})


def test_auto_off_a_cpu_runs_the_measured_kernel_with_its_timed_launch(monkeypatch):
    """What mla_absorbed_auto calls on a GPU, per the table (the kernels replaced by recorders)."""
    from research.attention import ops

    kind = jax.devices()[0].device_kind
    launch = {"block_t": 16, "num_warps": 4, "num_stages": 3}
    row = lambda ms: {"batch": 2, "context": 4096, "heads": 16, "kv_rank": 512, "ms": ms, "triton_options": launch}
    calls = []
    record = lambda name: lambda *a, scale, **k: calls.append((name, a[2].shape[1], k)) or jnp.zeros(a[0].shape)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(ops, "mla_absorbed_pallas", record("triton"))
    monkeypatch.setattr(ops, "_mla_absorbed_mosaic_gpu", record("mosaic_gpu"))

    def decode(ms, context=4096):
        monkeypatch.setattr(dispatch, "load_table", lambda: {kind: [row(ms)]})
        q_lat, q_pe = jnp.zeros((2, 1, 16, 512), jnp.bfloat16), jnp.zeros((2, 1, 16, 64), jnp.bfloat16)
        c_kv, k_pe = jnp.zeros((2, context, 512), jnp.bfloat16), jnp.zeros((2, context, 1, 64), jnp.bfloat16)
        ops.mla_absorbed_auto(q_lat, q_pe, c_kv, k_pe, jnp.zeros((2, 1), jnp.int32), scale=0.1)
        return calls.pop() if calls else "xla"

    assert decode({"xla": 1.0, "triton": 0.5, "mosaic_gpu": 0.7}) == ("triton", 4096, {"launch": launch})
    assert decode({"xla": 1.0, "triton": 0.5, "mosaic_gpu": 0.4}) == ("mosaic_gpu", 4096, {})
    # S = 4000 is no multiple of the Mosaic kernel's 64-slot tile: the next fastest runs instead
    assert decode({"xla": 1.0, "triton": 0.5, "mosaic_gpu": 0.4}, context=4000) == ("triton", 4000, {"launch": launch})
    assert decode({"xla": 1.0, "triton": 1.5}) == "xla"


def test_a_malformed_table_fails_naming_the_file(tmp_path):
    path = tmp_path / "dispatch.json"
    path.write_text(json.dumps({"devices": {H200: [{"batch": 1}]}}))
    with pytest.raises(ValueError, match=f"{path}: not a dispatch table"):
        dispatch.load_table(str(path))
    assert dispatch.load_table(str(tmp_path / "absent.json")) == {}


def test_a_shape_the_mosaic_kernel_cannot_take_is_known_before_dispatch():
    from research.kernels.mla_decode_mgpu import unsupported_reason

    q_lat, q_pe = jnp.zeros((2, 16, 512), jnp.bfloat16), jnp.zeros((2, 16, 64), jnp.bfloat16)
    lengths = jnp.ones((2,), jnp.int32)
    cache = lambda s, dtype=jnp.bfloat16: (jnp.zeros((2, s, 512), dtype), jnp.zeros((2, s, 1, 64), dtype))
    assert unsupported_reason(q_lat, q_pe, *cache(4096), lengths) is None
    assert "multiple of the 64-slot tile, got 4000" in unsupported_reason(q_lat, q_pe, *cache(4000), lengths)
    assert "bfloat16 or float16" in unsupported_reason(q_lat, q_pe, *cache(4096, jnp.float32), lengths)


def test_auto_on_a_cpu_is_the_reference():
    if jax.default_backend() != "cpu":
        pytest.skip("the CPU's choice")
    k = jax.random.split(jax.random.key(0), 4)
    q_lat, q_pe = jax.random.normal(k[0], (2, 1, 4, 16)), jax.random.normal(k[1], (2, 1, 4, 8))
    c_kv, k_pe = jax.random.normal(k[2], (2, 32, 16)), jax.random.normal(k[3], (2, 32, 1, 8))
    positions = jnp.asarray([[3], [31]])
    got = attention_ops("auto").mla_absorbed(q_lat, q_pe, c_kv, k_pe, positions, scale=0.2)
    np.testing.assert_array_equal(got, mla_absorbed_attention(q_lat, q_pe, c_kv, k_pe, positions, scale=0.2))
