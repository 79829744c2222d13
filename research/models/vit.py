"""Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words").

Patch embedding (conv with kernel = stride = patch size) -> class token + learned position
embedding -> pre-LayerNorm blocks -> final LayerNorm -> ``head`` on the class token.

Attention uses separate ``q``, ``k``, ``v`` and ``out`` nnx.Linear layers with einsums over
explicit heads, so that adapters (e.g. LoRA) can wrap each projection. The blocks are the list
``model.blocks``.

Parameter counts for 10 classes on 32x32x3 with patch 4: vit_tiny 5,362,762, vit_small 21,342,346.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from research.models import taps
from research.core.mesh import HEAD_SHARDING, logical

# Xavier-uniform for linear layers and zero biases, as the original JAX implementation.
_dense_init = nnx.initializers.xavier_uniform()
_embed_init = nnx.initializers.normal(0.02)
LN_EPSILON = 1e-6


def dense(in_f: int, out_f: int, sharding: tuple, *, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(in_f, out_f, kernel_init=logical(_dense_init, sharding),
                      dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def layer_norm(dim: int, *, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(dim, epsilon=LN_EPSILON, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def _dropout(rate: float, rngs: nnx.Rngs) -> nnx.Dropout:
    # No RNG state at all when dropout is off, so the model state is just parameters.
    return nnx.Dropout(rate, rngs=rngs if rate > 0 else None)


class MultiHeadAttention(nnx.Module):
    """Self-attention. (N, T, D) -> (N, T, D), with D = num_heads * head_dim."""

    def __init__(self, dim: int, num_heads: int, *, dtype, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = dense(dim, dim, ("embed", "heads"), dtype=dtype, rngs=rngs)
        self.k = dense(dim, dim, ("embed", "heads"), dtype=dtype, rngs=rngs)
        self.v = dense(dim, dim, ("embed", "heads"), dtype=dtype, rngs=rngs)
        self.out = dense(dim, dim, ("heads", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        n, t, d = x.shape
        h = self.num_heads
        q, k, v = (proj(x).reshape(n, t, h, d // h) for proj in (self.q, self.k, self.v))
        logits = jnp.einsum("nqhc,nkhc->nhqk", q, k) * (d // h) ** -0.5  # (N, h, T, T)
        # Softmax in float32: normalising in bf16 loses precision for long rows.
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        y = jnp.einsum("nhqk,nkhc->nqhc", weights, v).reshape(n, t, d)
        return self.out(y)


class MLPBlock(nnx.Module):
    """Linear -> GELU -> dropout -> Linear. (N, T, D) -> (N, T, D)."""

    def __init__(self, dim: int, mlp_dim: int, dropout: float, *, dtype, rngs: nnx.Rngs):
        self.fc1 = dense(dim, mlp_dim, ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.fc2 = dense(mlp_dim, dim, ("mlp", "embed"), dtype=dtype, rngs=rngs)
        self.dropout = _dropout(dropout, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        # Exact (erf) GELU, as the PyTorch/Hugging Face ViTs, so their weights carry over.
        return self.fc2(self.dropout(taps.gelu(self.fc1(x), approximate=False)))


class EncoderBlock(nnx.Module):
    """Pre-LN transformer block: x + drop(attn(ln1(x))), then x + drop(mlp(ln2(x)))."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, dropout: float, *, dtype,
                 rngs: nnx.Rngs):
        self.ln1 = layer_norm(dim, dtype=dtype, rngs=rngs)
        self.attn = MultiHeadAttention(dim, num_heads, dtype=dtype, rngs=rngs)
        self.ln2 = layer_norm(dim, dtype=dtype, rngs=rngs)
        self.dropout = _dropout(dropout, rngs)
        self.mlp = MLPBlock(dim, mlp_dim, dropout, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.dropout(self.attn(self.ln1(x)))
        return x + self.dropout(self.mlp(self.ln2(x)))


class ViT(nnx.Module):
    """Input (N, H, W, C) with H, W divisible by ``patch_size``; output (N, classes) float32."""

    def __init__(self, *, num_classes: int, input_shape: tuple[int, int, int], patch_size: int,
                 dim: int, depth: int, num_heads: int, mlp_dim: int, rngs: nnx.Rngs,
                 dropout: float = 0.0, dtype=jnp.float32):
        height, width, channels = input_shape
        if height % patch_size or width % patch_size:
            raise ValueError(f"input {height}x{width} is not divisible by patch_size {patch_size}")
        num_tokens = (height // patch_size) * (width // patch_size) + 1  # + class token
        self.dtype = dtype
        self.patch_embed = nnx.Conv(
            channels, dim, (patch_size, patch_size), strides=patch_size, padding="VALID",
            kernel_init=logical(_dense_init, (None, None, None, "embed")),
            dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
        )
        self.cls_token = nnx.Param(jnp.zeros((1, 1, dim), jnp.float32))
        self.pos_embed = nnx.Param(_embed_init(rngs.params(), (1, num_tokens, dim), jnp.float32))
        self.dropout = _dropout(dropout, rngs)
        self.blocks = nnx.List([
            EncoderBlock(dim, num_heads, mlp_dim, dropout, dtype=dtype, rngs=rngs)
            for _ in range(depth)
        ])
        self.norm = layer_norm(dim, dtype=dtype, rngs=rngs)
        self.head = dense(dim, num_classes, HEAD_SHARDING, dtype=dtype, rngs=rngs)

    def features(self, x: jax.Array) -> jax.Array:
        """Token features after the final norm, (N, T, D); the class token is first."""
        x = self.patch_embed(x.astype(self.dtype))  # (N, H/p, W/p, D)
        n, _, _, d = x.shape
        x = x.reshape(n, -1, d)
        cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (n, 1, d))
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...].astype(x.dtype)  # (N, T, D)
        x = self.dropout(x)
        for block in self.blocks:  # a Python loop: simplest graph, compiles fast enough for 12
            x = block(x)
        return self.norm(x)

    def embedding(self, x: jax.Array) -> jax.Array:
        """The head's input: the class token's features (N, D)."""
        return self.features(x)[:, 0]

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.embedding(x)).astype(jnp.float32)


_CONFIGS = {
    "vit_tiny": dict(dim=192, depth=12, num_heads=3, mlp_dim=768),
    "vit_small": dict(dim=384, depth=12, num_heads=6, mlp_dim=1536),
}


def _build(name: str, num_classes: int, input_shape, rngs, dtype, patch_size, dropout,
           depth) -> ViT:
    config = dict(_CONFIGS[name])
    if depth is not None:
        config["depth"] = depth
    if patch_size is None:
        patch_size = 4 if input_shape[0] <= 64 else 16
    return ViT(num_classes=num_classes, input_shape=tuple(input_shape), patch_size=patch_size,
               rngs=rngs, dropout=dropout, dtype=dtype, **config)


def vit_tiny(*, num_classes: int, input_shape: tuple[int, int, int], rngs: nnx.Rngs,
             dtype=jnp.float32, patch_size: int | None = None, dropout: float = 0.0,
             depth: int | None = None) -> ViT:
    """ViT-Ti: dim 192, 12 blocks, 3 heads, MLP 768. Patch 4 for inputs <= 64 px, else 16."""
    return _build("vit_tiny", num_classes, input_shape, rngs, dtype, patch_size, dropout, depth)


def vit_small(*, num_classes: int, input_shape: tuple[int, int, int], rngs: nnx.Rngs,
              dtype=jnp.float32, patch_size: int | None = None, dropout: float = 0.0,
              depth: int | None = None) -> ViT:
    """ViT-S: dim 384, 12 blocks, 6 heads, MLP 1536. Patch 4 for inputs <= 64 px, else 16."""
    return _build("vit_small", num_classes, input_shape, rngs, dtype, patch_size, dropout, depth)
