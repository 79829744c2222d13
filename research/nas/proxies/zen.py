"""Zen-score (Lin et al., ICCV 2021): expressivity of the pre-pooling features under Gaussian
weights, corrected by the BatchNorm scales.

    Zen = log E_x || f(x) - f(x + a eps) ||_1  +  sum over BN layers of log sqrt(mean_c var_c)

f = ``model.features`` (pre-global-pooling features), every layer weight ~ N(0, 1), biases 0, BN
scale 1 and bias 0, training mode; x, eps ~ N(0, 1), a = 0.01; the L1 norm is summed over
a sample's features and averaged over the batch; var_c is the batch variance (biased) a BN layer
sees on the clean input. A BN layer of a switched-off operation (masked network) has weight 0.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
from flax import nnx

from research.nas.proxies._common import active_weight, is_kernel


def zen(model: nnx.Module, batch: dict, key=None, *, alpha: float = 0.01) -> jax.Array:
    if not hasattr(model, "features"):
        raise ValueError(f"zen needs model.features (pre-pooling features); "
                         f"{type(model).__name__} has none")
    key = jax.random.key(0) if key is None else key
    k_weights, k_x, k_eps = jax.random.split(key, 3)
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, state, copy=True)  # never touch the caller's model
    # One key per layer, from its path: a layer gets the same weights whatever else the network
    # holds (so a masked super-network and its cell network draw alike).
    flat_kernels = [(path, v) for path, v in nnx.to_flat_state(nnx.state(model, is_kernel))]
    nnx.update(model, nnx.from_flat_state([
        (path, jax.random.normal(jax.random.fold_in(k_weights, zlib.crc32(repr(path).encode())),
                                 v.shape, v.dtype)) for path, v in flat_kernels]))
    bns = []
    for path, module in nnx.iter_graph(model):
        if isinstance(module, nnx.Linear | nnx.Conv) and module.bias is not None:
            module.bias[...] = jnp.zeros_like(module.bias[...])
        if isinstance(module, nnx.BatchNorm):
            module.scale[...] = jnp.ones_like(module.scale[...])
            module.bias[...] = jnp.zeros_like(module.bias[...])
            module.momentum = 0.0  # the running variance becomes this batch's variance
            bns.append((path, module))
    model.train()
    x = jax.random.normal(k_x, batch["image"].shape, jnp.float32)
    eps = jax.random.normal(k_eps, batch["image"].shape, jnp.float32)
    graphdef, state = nnx.split(model)
    mixed = nnx.merge(graphdef, state, copy=True).features(x + alpha * eps)  # a copy: BN stats of clean x kept
    clean = model.features(x)
    expressivity = jnp.mean(jnp.sum(jnp.abs(clean - mixed).reshape(x.shape[0], -1), axis=1))
    bn_term = sum((active_weight(model, path) * jnp.log(jnp.sqrt(jnp.mean(m.var[...])))
                   for path, m in bns), jnp.zeros(()))
    return jnp.log(expressivity) + bn_term
