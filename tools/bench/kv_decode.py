"""Decode latency and KV-cache size: GQA against MLA (naive and absorbed) on the same model.

    python -m tools.bench.kv_decode [--contexts 512,1024,2048,4096,8192] [--batch 8] [--repeats 5]
                                    [--kv-rank 56] [--rope-dim 4] [--layers 30] [--pallas] [--tiny]
                                    [--dtype float32|bfloat16] [--out FILE.json]

The GQA model has SmolLM2-135M's shape (random weights: latency does not depend on them); the MLA
model is its X-EcoMLA upcycling at the given rank (by default the 6.4x preset of configs/x_ecomla.py: r_kv 56 + a shared RoPE key of 4 dims, 15.6% of the KV cache). For each
context length S, one decode step of a batch whose cache holds S tokens is timed (median of
``--repeats``, after compilation), two ways:
  attention  the part of every layer that touches the cache: GQA's scores and values over
             (S, K, d_h) keys and values; MLA-naive's expansion of the latent cache through W_kvb
             and its attention; MLA-absorbed's query absorption, attention over (S, r_kv + d_r) and
             output projection through W_UV; summed over layers (one jitted program per variant);
  model      a whole decode step of the model (embedding to logits), with the cache update.
With ``--pallas`` a fourth variant, mla_absorbed_pallas, runs the absorbed path through the Pallas
decode kernel (``attention_impl="pallas"``; on a CPU in interpret mode, which says nothing of speed).
Ratios are GQA time / MLA time, measured in the same run. KV bytes per token count every layer
in the cache dtype, the model's ``--dtype`` (computation and cache; parameters stay float32).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.attention.mla import set_mla_decode
from research.attention.ops import attention_ops
from research.upcycling.upcycle import UpcycleConfig, upcycle_gqa_to_mla
from research.models.llama import Llama, LlamaConfig


def median_seconds(fn, repeats: int) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` calls, after one call that compiles."""
    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def random_cache(model: Llama, batch: int, length: int, seed: int = 0):
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    return jax.tree.map(lambda a: jax.random.normal(next(keys), a.shape, a.dtype), model.init_cache(batch, length))


def attention_step(model: Llama, kind: str, impl: str = "xla"):
    """f(attention params, cache, positions) -> (B, 1, H, d_v): the cache-touching part of a decode
    step in every layer, with queries made from a fixed random input (same work as in the model)."""
    ops = attention_ops(impl)
    segment = model.segments[0]
    if len(model.segments) != 1:
        raise ValueError("the attention benchmark expects one kind of layer (not a hybrid)")
    graphdef, state = nnx.split(segment.attn)

    def one_layer(layer_state, cache, positions, x):
        attn = nnx.merge(graphdef, layer_state)
        if kind == "gqa":
            return ops.gqa(attn.q(x), cache["k"], cache["v"], positions, scale=attn.head_dim ** -0.5)
        m = attn.mla
        q_nope, q_pe = attn.queries(x)
        if kind.startswith("mla_absorbed"):
            w_uk, w_uv = attn.up_projections()
            q_latent = jnp.einsum("bthn,rhn->bthr", q_nope, w_uk)
            o = ops.mla_absorbed(q_latent, q_pe, cache["c_kv"], cache["k_pe"], positions, scale=m.attention_scale())
            return jnp.einsum("bthr,rhv->bthv", o, w_uv)
        kv = attn.kv_b(cache["c_kv"])
        return ops.mla(q_nope, q_pe, kv[..., :m.nope_dim], cache["k_pe"], kv[..., m.nope_dim:], positions,
                       scale=m.attention_scale())

    @jax.jit
    def run(state, cache, positions, x):
        def body(total, layer):
            layer_state, layer_cache = layer
            return total + one_layer(layer_state, layer_cache, positions, x).sum(), None
        return jax.lax.scan(body, jnp.zeros(()), (state, cache))[0]

    return lambda cache, positions, x: run(state, cache, positions, x)


def model_step(model: Llama):
    """step(tokens, positions, cache) -> (logits, cache). On an accelerator the cache is donated, as a
    server would: otherwise the caller's cache, the step's input and its output are three copies
    (145 GB for GQA at S=32768, B=32 in float32, past an H200's 139 GiB). On the CPU it is not: with
    the per-layer cache scanned as xs -> ys, donation made XLA:CPU slower (3.2 s vs 1.2 s for GQA at
    S=8192, B=8)."""
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, donate_argnums=(3,) if jax.default_backend() != "cpu" else ())
    def run(state, tokens, positions, cache):
        return nnx.merge(graphdef, state)(tokens, positions, cache)

    return lambda tokens, positions, cache: run(state, tokens, positions, cache)


def time_model_steps(step, tokens, positions, cache, repeats: int) -> float:
    """Median seconds of a decode step, feeding each step's cache to the next (after one compile step)."""
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        logits, cache = step(tokens, positions, cache)
        jax.block_until_ready(logits)
        if i:
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def measure(teacher: Llama, student: Llama, contexts, batch: int, repeats: int, pallas: bool = False) -> list[dict]:
    rows = []
    variants = {"gqa": teacher, "mla_naive": student, "mla_absorbed": student}
    if pallas:
        variants["mla_absorbed_pallas"] = student
    for context in contexts:
        positions = jnp.full((batch, 1), context - 1, jnp.int32)
        tokens = jnp.ones((batch, 1), jnp.int32)
        x = jax.random.normal(jax.random.key(1), (batch, 1, teacher.config.dim))
        row = {"context": context, "batch": batch}
        for name, model in variants.items():
            set_mla_decode(student, "naive" if name == "mla_naive" else "absorbed")
            impl = "pallas" if name.endswith("pallas") else "xla"
            model.config = dataclasses.replace(model.config, attention_impl=impl)
            cache = random_cache(model, batch, context)
            attention = attention_step(model, name, impl)
            step = model_step(model)
            row[f"{name}_attention_ms"] = 1e3 * median_seconds(lambda: attention(cache[0], positions, x), repeats)
            row[f"{name}_model_ms"] = 1e3 * time_model_steps(step, tokens, positions, cache, repeats)
            row[f"{name}_kv_bytes_per_token"] = jnp.dtype(model.config.compute_dtype).itemsize * model.kv_values_per_token()
        for part in ("attention", "model"):
            for name in list(variants)[1:]:
                row[f"{part}_speedup_{name}"] = row[f"gqa_{part}_ms"] / row[f"{name}_{part}_ms"]
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def format_row(row: dict) -> str:
    return (f"S={row['context']:5d} B={row['batch']}: attention GQA {row['gqa_attention_ms']:.2f} ms, "
            f"MLA-naive {row['mla_naive_attention_ms']:.2f} ms ({row['attention_speedup_mla_naive']:.2f}x), "
            f"MLA-absorbed {row['mla_absorbed_attention_ms']:.2f} ms ({row['attention_speedup_mla_absorbed']:.2f}x) | "
            f"model step GQA {row['gqa_model_ms']:.2f} ms, naive {row['mla_naive_model_ms']:.2f} ms "
            f"({row['model_speedup_mla_naive']:.2f}x), absorbed {row['mla_absorbed_model_ms']:.2f} ms "
            f"({row['model_speedup_mla_absorbed']:.2f}x)"
            + (f", absorbed-pallas {row['mla_absorbed_pallas_model_ms']:.2f} ms "
               f"({row['model_speedup_mla_absorbed_pallas']:.2f}x; attention {row['mla_absorbed_pallas_attention_ms']:.2f} ms)"
               if "mla_absorbed_pallas_model_ms" in row else "")
            + f" | KV bytes/token GQA {row['gqa_kv_bytes_per_token']}, MLA {row['mla_absorbed_kv_bytes_per_token']}")


def build_models(layers: int, kv_rank: int, rope_dim: int, config: LlamaConfig | None = None):
    config = dataclasses.replace(config or LlamaConfig(), num_layers=layers)
    teacher = Llama(config, rngs=nnx.Rngs(0))
    student, _ = upcycle_gqa_to_mla(teacher, UpcycleConfig(kv_rank=kv_rank, rope_dim=rope_dim, rope_mode="uniform"))
    return teacher, student


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", default="512,1024,2048,4096,8192")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kv-rank", type=int, default=56)
    parser.add_argument("--rope-dim", type=int, default=4)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--pallas", action="store_true", help="also time the absorbed path through the Pallas kernel")
    parser.add_argument("--tiny", action="store_true", help="a tiny model (dim 64, vocab 256): checks that the bench runs")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="computation and cache dtype")
    parser.add_argument("--out", default="")
    return parser


def main(argv=None) -> list[dict]:
    args = parser().parse_args(argv)
    config = dataclasses.replace(LlamaConfig(), dtype=args.dtype)
    if args.tiny:
        config = dataclasses.replace(config, vocab_size=256, dim=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=64)
    teacher, student = build_models(args.layers, args.kv_rank, args.rope_dim, config)
    print(f"{jax.devices()[0].device_kind}: {args.layers}-layer SmolLM2-shaped model in {args.dtype}, MLA r_kv={args.kv_rank}, "
          f"d_r={args.rope_dim}: KV {student.kv_values_per_token()} vs {teacher.kv_values_per_token()} values per token "
          f"({100 * student.kv_values_per_token() / teacher.kv_values_per_token():.1f}%)", flush=True)
    rows = measure(teacher, student, [int(c) for c in args.contexts.split(",")], args.batch, args.repeats, args.pallas)
    return write_rows(rows, args.out)


def write_rows(rows: list[dict], out: str) -> list[dict]:
    """Writes a benchmark's rows as JSON to ``out`` (if given) and returns them."""
    if out:
        with open(out, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
