"""Visual Prompt Tuning (Jia et al., ECCV 2022, "Visual Prompt Tuning").

P learnable prompt tokens are inserted after the patch embedding of a frozen ViT (the paper's VPT equations):

  shallow:  [x_1, Z_1, E_1] = L_1([x_0, P, E_0]),      [x_i, Z_i, E_i] = L_i([x_{i-1}, Z_{i-1}, E_{i-1}])
  deep:     [x_i, _,  E_i] = L_i([x_{i-1}, P_{i-1}, E_{i-1}])   for i = 1..depth

with x the class token, E the patch tokens and Z the prompt outputs of a block. Deep prompting gives
every block its own P prompts, which replace the previous block's prompt outputs. The token count is
T = 1 + P + HW/p^2. Only the prompts (``prompt_filter``) and usually the head
(``prompt_and_head_filter``) are trained; the backbone stays frozen.

The wrapped ViT keeps its parameter names under ``vit/...``; the classifier is ``vit/head`` (the
``head`` property refers to it without adding a second path to the state).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from research.models.vit import ViT


class PromptParam(nnx.Param):
    """A visual prompt: a Param (trained by the framework's train state) selectable by type."""


def _in_head(path, value) -> bool:
    # Same rule as research.models.filters.head: any attribute named "head" on the path.
    return "head" in path


def prompt_filter():
    """NNX filter of the prompt parameters."""
    return PromptParam


def prompt_and_head_filter():
    """NNX filter of the prompts plus the classifier head (``vit/head``)."""
    return nnx.Any(PromptParam, nnx.All(nnx.Param, _in_head))


class PromptedViT(nnx.Module):
    """A frozen ViT with P prompt tokens. Input (N, H, W, C) -> logits (N, classes) float32.

    Prompts have shape (1, P, D) (shallow) or (depth, 1, P, D) (deep; index i is the input of block i).
    Default init, as the VPT reference: uniform in [-v, v] with v = sqrt(6 / (C p^2 + D)), the
    xavier-uniform bound between a flattened patch (C p^2 values; the paper writes 3 p^2 for RGB) and
    the embedding width D. ``init_std`` instead draws from a normal with that standard deviation.
    ``dropout`` is applied to the prompts only, as the reference does; the ViT's own dropout is reused
    for the class and patch tokens.

    ``vit`` is wrapped, not copied: its parameters are shared with the caller's model.
    """

    def __init__(self, vit: ViT, num_prompts: int, *, deep: bool = False, rngs: nnx.Rngs,
                 init_std: float | None = None, dropout: float = 0.0):
        if not isinstance(vit, ViT):
            raise TypeError(f"PromptedViT wraps a research.models.vit.ViT, got {type(vit).__name__}")
        if isinstance(num_prompts, bool) or not isinstance(num_prompts, int) or num_prompts < 1:
            raise ValueError(f"num_prompts must be a positive integer, got {num_prompts!r}")
        if init_std is not None and init_std <= 0:
            raise ValueError(f"init_std must be positive, got {init_std!r}")
        self.vit = vit
        self.num_prompts = num_prompts
        self.deep = deep
        patch_h, patch_w, channels, dim = vit.patch_embed.kernel.shape
        shape = (len(vit.blocks), 1, num_prompts, dim) if deep else (1, num_prompts, dim)
        if init_std is None:
            bound = math.sqrt(6.0 / (channels * patch_h * patch_w + dim))
            value = jax.random.uniform(rngs.params(), shape, jnp.float32, -bound, bound)
        else:
            value = init_std * jax.random.normal(rngs.params(), shape, jnp.float32)
        sharding = (None,) * (len(shape) - 1) + ("embed",)
        # Metadata only (as the ViT's own params): the mesh placement happens later, by logical names.
        self.prompts = PromptParam(value, out_sharding=sharding, eager_sharding=False)
        # No RNG state when off, so the model state stays just parameters.
        self.prompt_dropout = nnx.Dropout(dropout, rngs=rngs if dropout > 0 else None)

    @property
    def head(self) -> nnx.Linear:
        """The ViT's classifier; its parameters live at ``vit/head`` only."""
        return self.vit.head

    def _prompts(self, index: int, n: int, dtype) -> jax.Array:
        """Prompts of block ``index`` (shallow: the only set) broadcast to (N, P, D)."""
        p = self.prompts[index] if self.deep else self.prompts[...]
        return self.prompt_dropout(jnp.broadcast_to(p.astype(dtype), (n,) + p.shape[1:]))

    def __call__(self, x: jax.Array) -> jax.Array:
        vit, num = self.vit, self.num_prompts
        x = vit.patch_embed(x.astype(vit.dtype))  # (N, H/p, W/p, D)
        n, _, _, d = x.shape
        x = x.reshape(n, -1, d)
        cls = jnp.broadcast_to(vit.cls_token[...].astype(x.dtype), (n, 1, d))
        # Position embeddings belong to the class and patch tokens; prompts have no position.
        x = jnp.concatenate([cls, x], axis=1) + vit.pos_embed[...].astype(x.dtype)
        x = vit.dropout(x)
        x = jnp.concatenate([x[:, :1], self._prompts(0, n, x.dtype), x[:, 1:]], axis=1)  # (N, T, D)
        for i, block in enumerate(vit.blocks):
            if self.deep and i > 0:
                # Deep VPT: this block's prompts replace the previous block's prompt outputs.
                x = jnp.concatenate([x[:, :1], self._prompts(i, n, x.dtype), x[:, 1 + num:]], axis=1)
            x = block(x)
        x = vit.norm(x)
        return vit.head(x[:, 0]).astype(jnp.float32)


def add_prompts(vit: ViT, num_prompts: int, *, deep: bool = False, rngs: nnx.Rngs,
                init_std: float | None = None, dropout: float = 0.0) -> PromptedViT:
    """``PromptedViT(vit, num_prompts, ...)``: VPT-shallow, or VPT-deep with ``deep=True``."""
    return PromptedViT(vit, num_prompts, deep=deep, rngs=rngs, init_std=init_std, dropout=dropout)
