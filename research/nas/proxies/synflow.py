"""Synflow (Tanaka et al., NeurIPS 2020) as a NAS proxy: data-free synaptic flow.

    R = sum of the network's outputs on one all-ones input, every parameter replaced by |W|,
        BatchNorm switched off (identity);   Synflow = sum over layer weights |W * dR/dW|

Computed in float64 (the product of |W| over ~20 layers overflows float32). Call it inside
``jax.enable_x64(True)``; ``research.nas.proxies.score`` does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from research.nas.proxies._common import flat, is_kernel


def _bn_as_identity(model: nnx.Module) -> None:
    """Eval-mode BN with mean 0, var 1 - eps, scale 1, bias 0 is exactly the identity."""
    for _, module in nnx.iter_graph(model):
        if isinstance(module, nnx.BatchNorm):
            module.mean[...] = jnp.zeros_like(module.mean[...])
            module.var[...] = jnp.full_like(module.var[...], 1.0 - module.epsilon)
            if module.scale is not None:
                module.scale[...] = jnp.ones_like(module.scale[...])
            if module.bias is not None:
                module.bias[...] = jnp.zeros_like(module.bias[...])


def synflow(model: nnx.Module, batch: dict, key=None) -> jax.Array:
    if not jax.config.jax_enable_x64:
        raise RuntimeError("synflow runs in float64: call it inside jax.enable_x64(True)")
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), state), copy=True)
    _bn_as_identity(model)
    model.eval()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.tree.map(jnp.abs, params)
    ones = jnp.ones((1,) + tuple(batch["image"].shape[1:]), jnp.float64)

    def total_output(p):
        return jnp.sum(nnx.merge(graphdef, p, rest)(ones))

    weights, grads = flat(params), flat(jax.grad(total_output)(params))
    kernels = [path for path, v in nnx.to_flat_state(params) if is_kernel(path, v)]
    return sum((jnp.sum(weights[p] * jnp.abs(grads[p])) for p in kernels),
               jnp.zeros((), jnp.float64))
