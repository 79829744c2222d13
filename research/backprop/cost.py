"""Analytic backward cost of fine-tuning chosen layers: FLOPs and saved activations.

Counted as in the papers' tables: the matmuls of the chosen conv / linear layers only (weight
gradient, plus input gradient for every chosen layer but the first conv, whose input gradient
nothing needs), a multiply-add = 2 FLOPs, and activation memory = the layer inputs saved for the
weight gradients (float32). Elementwise layers between them (BatchNorm, activations) are not
counted; the XLA cost analysis in ``measure.backward_profile`` counts everything.
"""
from __future__ import annotations

from collections.abc import Sequence

from research.backprop.apply import LayerCall, token_grid
from research.backprop.gradient_filter import backward_cost
from research.backprop.lbp_wht import lbp_wht_cost

BYTES_PER_ELEMENT = 4  # float32


def layer_backward_cost(call: LayerCall, *, batch: int, patch_size: int | None = None, lbp_k: int | None = None,
                        num_prefix_tokens: int = 1, input_grad: bool = True) -> dict:
    """{"flops", "activation_bytes"} of one layer at ``batch``; ``patch_size`` / ``lbp_k`` None = exact."""
    if call.kind == "conv":
        x, y = (batch, *call.input_shape[1:]), (batch, *call.output_shape[1:])
        geometry = call.geometry(patch_size) if patch_size else None
        cost = backward_cost(x, call.kernel_shape, y, geometry, input_grad)
        return {"flops": cost["flops"], "activation_bytes": BYTES_PER_ELEMENT * cost["activation_elements"]}
    c_in, c_out = call.kernel_shape
    if len(call.input_shape) == 3 and lbp_k:
        tokens = call.input_shape[1]
        cost = lbp_wht_cost(token_grid(tokens, num_prefix_tokens), num_prefix_tokens, c_in, c_out, lbp_k, batch=batch)
        return {"flops": cost["lbp_flops"], "activation_bytes": cost["lbp_activation_bytes"]}
    rows = batch * (call.input_shape[1] if len(call.input_shape) == 3 else 1)
    return {"flops": 2 * rows * c_in * c_out * (2 if input_grad else 1),
            "activation_bytes": BYTES_PER_ELEMENT * rows * c_in}


def finetune_backward_cost(layers: Sequence[LayerCall], *, batch: int = 1, patch_size: int | None = None,
                           lbp_k: int | None = None, num_prefix_tokens: int = 1) -> dict:
    """Summed cost of the chosen ``layers`` (in execution order) for one backward pass.

    ``patch_size`` applies gradient filtering to the conv layers, ``lbp_k`` LBP-WHT to the linear
    layers over tokens; the others are exact.
    """
    total = {"flops": 0, "activation_bytes": 0}
    for i, call in enumerate(layers):
        cost = layer_backward_cost(call, batch=batch, patch_size=patch_size, lbp_k=lbp_k,
                                   num_prefix_tokens=num_prefix_tokens,
                                   input_grad=not (i == 0 and call.kind == "conv"))
        total = {key: total[key] + cost[key] for key in total}
    return total
