"""Cost proxies: #Params (parameters the chosen network uses) and FLOPs of one forward pass of one
image (``model.flops()`` where the model defines it, NB201's convention; otherwise XLA's count)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from research.nas.proxies._common import active_weight


def params(model: nnx.Module, batch: dict | None = None, key=None) -> jax.Array:
    return sum((active_weight(model, path) * v.size
                for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))), jnp.zeros(()))


def flops(model: nnx.Module, batch: dict, key=None) -> jax.Array:
    if hasattr(model, "flops"):
        return jnp.asarray(model.flops(), jnp.float32)
    graphdef, state = nnx.split(model)
    one = jax.ShapeDtypeStruct((1,) + tuple(batch["image"].shape[1:]), jnp.float32)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)

    def forward(s, x):
        m = nnx.merge(graphdef, s)
        m.eval()
        return m(x)

    cost = jax.jit(forward).lower(shapes, one).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return jnp.asarray(cost.get("flops", 0.0), jnp.float32)
