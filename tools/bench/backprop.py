"""Backward cost of gradient filtering and LBP-WHT against exact backprop, at ImageNet resolution.

    python -m tools.bench.backprop [--batch 8] [--repeats 7] [--resolution 224] [--out FILE.json]

1. Measured (this machine): the backward pass of the last two MobileNetV2 (width 1.0) inverted
   residual blocks (``blocks[15:17]``, torchvision's ``features[16:18]``) at 224 x 224 input, exact vs gradient filtering R = 2 and R = 4 on all their convolutions; and of
   the linear layers of the last two ViT-tiny blocks (patch 16: a 14 x 14 token grid), exact vs
   LBP-WHT k = 2, 4, 6 (``blocks[10:12]``). Same weights, inputs and output gradients for every variant; the
   forward is compiled separately so the backward is timed alone (median of ``--repeats``).
   Reports seconds, speed-up (exact / ours), XLA's FLOP count of the backward program, the bytes
   the forward saved for it (residuals) and XLA's scratch memory.
2. Analytic, shaped like Table 2 of the gradient-filtering paper (per image, float32): backward
   FLOPs and activation memory of vanilla backprop of all conv layers, of the last two conv
   layers, and of gradient filtering of those layers, beside the paper's figures.
Timing needs no labels: inputs and output gradients are random.
"""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
from flax import nnx

from research.backprop.apply import enable_gradient_filter, enable_lbp_wht, select_layers, trace_layers
from research.backprop.cost import finetune_backward_cost
from research.backprop.measure import backward_profile
from research.models import build_model

# Gradient-filtering paper, Table 2 (ImageNet, MobileNetV2, last two layers): backward FLOPs and
# activation memory per image, vanilla and filtered (R = 2).
PAPER_MOBILENET_V2_LAST2 = {"vanilla": (113.7e6, 245 * 1024), "filtered R=2": (39.3e6, 80 * 1024)}


class Tail(nnx.Module):
    """The chosen blocks of a model applied in order: (N, H, W, C) -> the last block's output."""

    def __init__(self, blocks):
        self.blocks = nnx.List(blocks)

    def __call__(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def profile_tail(model, block_ids, input_shape, repeats: int, seed: int = 0) -> dict:
    """Backward profile of ``model.blocks[block_ids]`` (eval mode) w.r.t. their kernels.

    The Tail shares the model's layers, so a method switched on in ``model`` applies here.
    """
    tail = Tail([model.blocks[i] for i in block_ids])
    tail.eval()
    x = jax.random.normal(jax.random.PRNGKey(seed), input_shape)
    cotangent = jax.random.normal(jax.random.PRNGKey(seed + 1), jax.eval_shape(tail, x).shape)
    graphdef, kernels, rest = nnx.split(tail, nnx.All(nnx.Param, lambda path, v: path[-1] == "kernel"), ...)

    def loss(kernels, x):
        return jnp.vdot(nnx.merge(graphdef, kernels, rest)(x), cotangent)
    return backward_profile(loss, kernels, x, repeats=repeats)


def measured_rows(model_name: str, shape, block_ids, kind: str, variants, batch: int, repeats: int) -> list[dict]:
    """One row per (variant name, method, setting): the same model, inputs and cotangent each time."""
    rows = []
    for name, setting in variants:
        model = build_model(model_name, num_classes=1000, input_shape=shape, rngs=nnx.Rngs(0))
        calls = trace_layers(model, shape)
        pattern = "^blocks/(" + "|".join(str(i) for i in block_ids) + ")/"
        chosen = select_layers(calls, kind, pattern=pattern)
        if setting and kind == "conv":
            enable_gradient_filter(model, chosen, setting)
        elif setting:
            enable_lbp_wht(model, chosen, setting)
        block_input = next(c for c in calls if c.path.startswith(f"blocks/{block_ids[0]}/")).input_shape
        profile = profile_tail(model, block_ids, (batch, *block_input[1:]), repeats)
        analytic = finetune_backward_cost(chosen, batch=batch, patch_size=setting if kind == "conv" else None,
                                          lbp_k=setting if kind == "linear" else None)
        rows.append({"layers": f"{model_name} blocks[{block_ids[0]}:{block_ids[-1] + 1}] ({len(chosen)} {kind})",
                     "variant": name, **profile, "analytic_flops": analytic["flops"],
                     "analytic_activation_bytes": analytic["activation_bytes"]})
    exact = rows[0]
    for row in rows:
        row["speedup"] = exact["seconds"] / row["seconds"]
        row["residual_saving"] = 1 - row["residual_bytes"] / exact["residual_bytes"]
        row["grad_temp_saving"] = 1 - row["grad_temp_bytes"] / exact["grad_temp_bytes"]
        row["analytic_activation_saving"] = 1 - row["analytic_activation_bytes"] / exact["analytic_activation_bytes"]
    return rows


def table2_rows(resolution: int) -> list[dict]:
    """Paper-style analytic rows for MobileNetV2 (per image)."""
    shape = (resolution, resolution, 3)
    calls = trace_layers(build_model("mobilenet_v2", num_classes=1000, input_shape=shape, rngs=nnx.Rngs(0)), shape)
    all_convs, last2 = select_layers(calls, "conv"), select_layers(calls, "conv", last_n=2)
    rows = [("vanilla BP, all layers", all_convs, None, None), ("vanilla BP, last 2 layers", last2, None, "vanilla"),
            ("gradient filter R=2, last 2 layers", last2, 2, "filtered R=2"),
            ("gradient filter R=4, last 2 layers", last2, 4, None)]
    out = []
    for name, layers, patch, paper_key in rows:
        cost = finetune_backward_cost(layers, batch=1, patch_size=patch)
        paper = PAPER_MOBILENET_V2_LAST2.get(paper_key) if resolution == 224 else None
        out.append({"rows": name, "mflops": cost["flops"] / 1e6, "activation_kb": cost["activation_bytes"] / 1024,
                    "paper_mflops": paper[0] / 1e6 if paper else None,
                    "paper_activation_kb": paper[1] / 1024 if paper else None})
    return out


def _markdown(rows: list[dict], columns: dict[str, str]) -> str:
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for key in columns:
            value = row[key]
            cells.append("-" if value is None else f"{value:,.3g}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--out", default="", help="also write the rows as JSON here")
    args = parser.parse_args()
    shape = (args.resolution, args.resolution, 3)
    measured = measured_rows("mobilenet_v2", shape, (15, 16), "conv",
                             [("exact", None), ("filter R=2", 2), ("filter R=4", 4)], args.batch, args.repeats)
    measured += measured_rows("vit_tiny", shape, (10, 11), "linear",
                              [("exact", None), ("LBP-WHT k=2", 2), ("LBP-WHT k=4", 4), ("LBP-WHT k=6", 6)],
                              args.batch, args.repeats)
    for row in measured:
        row["ms"] = 1e3 * row["seconds"]
        row["xla_mflops"] = row["flops"] / 1e6
        row["residual_kb"] = row["residual_bytes"] / 1024
        row["grad_temp_kb"] = row["grad_temp_bytes"] / 1024
        row["layer_input_kb"] = row["analytic_activation_bytes"] / 1024
    size = f"{args.resolution}x{args.resolution}"
    print(f"Backward pass, batch {args.batch}, {size} input, {jax.devices()[0].device_kind}, median of {args.repeats}")
    print(_markdown(measured, {"layers": "layers", "variant": "variant", "ms": "backward ms", "speedup": "speed-up",
                               "xla_mflops": "XLA MFLOPs", "layer_input_kb": "saved layer inputs KB",
                               "analytic_activation_saving": "layer-input saving", "residual_kb": "all residuals KB",
                               "grad_temp_kb": "fwd+bwd peak scratch KB", "grad_temp_saving": "peak saving"}))
    table = table2_rows(args.resolution)
    print(f"\nMobileNetV2 analytic backward cost per image (conv layers only, float32), {size}")
    print(_markdown(table, {"rows": "", "mflops": "backward MFLOPs", "activation_kb": "activation KB",
                            "paper_mflops": "paper MFLOPs", "paper_activation_kb": "paper KB"}))
    for row in measured:
        if row["variant"] != "exact":
            print(f"{row['layers']}, {row['variant']}: backward {row['speedup']:.1f}x faster than exact, "
                  f"saved layer inputs {100 * row['analytic_activation_saving']:.1f}% smaller, "
                  f"peak fwd+bwd scratch {100 * row['grad_temp_saving']:.1f}% smaller")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"measured": measured, "table2": table, "batch": args.batch, "resolution": args.resolution}, f,
                      indent=1)


if __name__ == "__main__":
    main()
