"""Llama-family decoder (Touvron et al. 2023; Llama 3, 2024) in Flax NNX, with scanned layers.

    tokens (B, T) -> embed -> L x [x + attn(rms(x)); x + swiglu(rms(x))] -> rms -> logits (B, T, V)

RMSNorm, RoPE in Hugging Face's "rotate half" layout (with Llama-3 scaling), grouped-query
attention, SwiGLU MLP, tied or untied embeddings. Layers of one kind and shape are stacked on a
leading axis and run by ``jax.lax.scan`` (one compiled layer body however deep the model); a
hybrid model whose layers differ (GQA and MLA, or MLA layers of other ranks) holds a list of such
``segments``, each scanned.

Attention layers share one interface, so MLA (``research.attention.mla``) drops in:
``attn(x, positions, cache, ops) -> (y, cache)`` and ``attn.init_cache(batch, length, dtype)``.
The KV cache is a pytree of arrays with a leading layer axis per segment; slot s of the cache holds
position s, so per-sequence lengths need no extra bookkeeping (see ``research.attention.ops``).

Parameter paths (L_s = layers of segment s): ``embed/embedding`` (V, D);
``segments/s/attn_norm/scale`` (L_s, D); ``segments/s/attn/{q,k,v,o}/kernel`` (L_s, D, H, Dh),
(L_s, D, K, Dh), (L_s, D, K, Dh), (L_s, H, Dh, D), whose head axes a ``model`` mesh axis splits
(see research.attention.layers); ``segments/s/mlp_norm/scale``;
``segments/s/mlp/{gate,up,down}/kernel`` (L_s, D, F), (L_s, D, F), (L_s, F, D); ``norm/scale`` (D,);
``lm_head/kernel`` (D, V) when the embeddings are untied.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from research.attention.gqa import GQAttention
from research.attention.layers import RMSNorm, linear
from research.attention.ops import ATTENTION_IMPLS, attention_ops
from research.attention.rope import Llama3RopeScaling, inverse_frequencies
from research.core.mesh import logical

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_init = nnx.initializers.normal(0.02)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a Llama-family model. Defaults are SmolLM2-135M's."""
    vocab_size: int = 49152
    dim: int = 576
    num_layers: int = 30
    num_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int = 64
    mlp_dim: int = 1536
    rms_eps: float = 1e-5
    rope_theta: float = 100000.0
    rope_scaling: Llama3RopeScaling | None = None
    tie_embeddings: bool = True
    dtype: str = "float32"        # computation dtype; parameters stay float32
    attention_impl: str = "xla"   # research.attention.ops.ATTENTION_IMPLS

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of: {', '.join(DTYPES)}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention_impl {self.attention_impl!r}; choose one of: {', '.join(ATTENTION_IMPLS)}")

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    def inv_freq(self):
        return inverse_frequencies(self.head_dim, self.rope_theta, self.rope_scaling)


class SwiGLU(nnx.Module):
    """down(silu(gate(x)) * up(x)) (Shazeer 2020). (B, T, D) -> (B, T, D)."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        c = config
        self.gate = linear(c.dim, c.mlp_dim, ("embed", "mlp"), c.compute_dtype, rngs)
        self.up = linear(c.dim, c.mlp_dim, ("embed", "mlp"), c.compute_dtype, rngs)
        self.down = linear(c.mlp_dim, c.dim, ("mlp", "embed"), c.compute_dtype, rngs)

    def __call__(self, x):
        return self.down(nnx.silu(self.gate(x)) * self.up(x))


class DecoderLayer(nnx.Module):
    """Pre-norm block: x + attn(rms(x)), then x + mlp(rms(x))."""

    def __init__(self, config: LlamaConfig, attention: nnx.Module, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(config.dim, config.rms_eps)
        self.attn = attention
        self.mlp_norm = RMSNorm(config.dim, config.rms_eps)
        self.mlp = SwiGLU(config, rngs=rngs)

    def __call__(self, x, positions, cache, ops):
        h, cache = self.attn(self.attn_norm(x), positions, cache, ops)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), cache


AttentionFactory = Callable[[nnx.Rngs], nnx.Module]


def stacked_layers(config: LlamaConfig, make_attention: AttentionFactory, num_layers: int,
                   rngs: nnx.Rngs) -> DecoderLayer:
    """One DecoderLayer whose every parameter has a leading axis of num_layers (not sharded)."""
    keys = jax.random.split(rngs.params(), num_layers)

    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
    def make(key):
        layer_rngs = nnx.Rngs(params=key)
        return DecoderLayer(config, make_attention(layer_rngs), rngs=layer_rngs)

    return make(keys)


def scan_layers(layers: nnx.Module, x: jax.Array, positions: jax.Array, cache: Any, ops) -> tuple[jax.Array, Any]:
    """Runs stacked layers with lax.scan: x (B, T, D) -> (B, T, D), cache sliced per layer.

    With active dropout (adapter dropout in train mode) the layers' RNG counters come out of the
    scan and are written back, so the next call draws new masks; otherwise nothing is written
    (a model called inside another trace, as by ``generate``, must not be changed)."""
    graphdef, params, others = nnx.split(layers, nnx.Param, ...)
    drawing = any(isinstance(node, nnx.Dropout) and not node.deterministic and node.rate > 0
                  for _, node in nnx.iter_graph(layers))

    def body(h, layer):
        layer_params, layer_others, layer_cache = layer
        module = nnx.merge(graphdef, layer_params, layer_others)
        h, layer_cache = module(h, positions, layer_cache, ops)
        return h, (layer_cache, nnx.state(module, nnx.RngState) if drawing else None)

    x, (cache, rng_state) = jax.lax.scan(body, x, (params, others, cache))
    if drawing:
        nnx.update(layers, rng_state)
    return x, cache


class Llama(nnx.Module):
    """Decoder-only LM. tokens (B, T) int -> float32 logits (B, T, V) and the updated cache.

    ``segments`` lists stacked layers (see the module docstring); ``layer_kinds[i]`` names layer i's
    attention ("gqa" here; upcycling adds "mla"). A hybrid is built by passing its ``segments``
    (each from ``Llama.stacked_layers``) and ``layer_kinds`` to the constructor.
    """

    stacked_layers = staticmethod(stacked_layers)  # for code that holds a model, not this module

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, segments: Sequence[nnx.Module] | None = None,
                 layer_kinds: Sequence[str] | None = None):
        c = config
        self.config = c
        self.embed = nnx.Embed(c.vocab_size, c.dim, embedding_init=logical(_init, ("vocab", "embed")),
                               dtype=c.compute_dtype, param_dtype=jnp.float32, rngs=rngs)
        if segments is None:
            segments = [stacked_layers(c, lambda r: GQAttention(c, rngs=r), c.num_layers, rngs)]
            layer_kinds = ["gqa"] * c.num_layers
        self.segments = nnx.List(list(segments))
        self.layer_kinds = tuple(layer_kinds)
        self.norm = RMSNorm(c.dim, c.rms_eps)
        self.lm_head = None if c.tie_embeddings else linear(c.dim, c.vocab_size, ("embed", "vocab"), c.compute_dtype, rngs)

    def segment_sizes(self) -> list[int]:
        return [jax.tree.leaves(nnx.state(s, nnx.Param))[0].shape[0] for s in self.segments]

    def init_cache(self, batch: int, length: int, dtype=None) -> list[Any]:
        """Zero KV cache of ``length`` slots: per segment, the layer's cache with a leading layer axis."""
        dtype = dtype or self.config.compute_dtype
        caches = []
        for segment, size in zip(self.segments, self.segment_sizes()):
            one = segment.attn.init_cache(batch, length, dtype)
            caches.append(jax.tree.map(lambda a: jnp.broadcast_to(a, (size,) + a.shape), one))
        return caches

    def kv_values_per_token(self) -> int:
        """Cached numbers per token summed over all layers."""
        return sum(int(s.attn.cache_values_per_token()) * n for s, n in zip(self.segments, self.segment_sizes()))

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, cache: list | None = None,
                 *, return_hidden: bool = False):
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        ops = attention_ops(self.config.attention_impl)
        x = self.embed(tokens)
        new_cache = []
        for i, segment in enumerate(self.segments):
            x, seg_cache = scan_layers(segment, x, positions, None if cache is None else cache[i], ops)
            new_cache.append(seg_cache)
        x = self.norm(x)
        if return_hidden:
            return x
        logits = self.embed.attend(x) if self.lm_head is None else self.lm_head(x)
        return logits.astype(jnp.float32), (None if cache is None else new_cache)


def first_layers(model: Llama, num_layers: int) -> Llama:
    """A new Llama of ``model``'s first ``num_layers`` decoder layers (copies) and its own embeddings,
    final norm and head. Its logits are the full model's hidden state after layer ``num_layers``
    read out by the head: a smoke-size model with real weights and tokenizer, or the prefix of a
    layer-wise study. Raises ValueError unless 1 <= num_layers <= the model's layers."""
    total = sum(model.segment_sizes())
    if not 1 <= num_layers <= total:
        raise ValueError(f"num_layers must lie in [1, {total}] for this model, got {num_layers}")
    segments, left = [], num_layers
    for segment, size in zip(model.segments, model.segment_sizes()):
        if left == 0:
            break
        graphdef, state = nnx.split(segment)
        segments.append(nnx.merge(graphdef, jax.tree.map(lambda a, n=min(size, left): a[:n], state)))
        left -= min(size, left)
    small = Llama(dataclasses.replace(model.config, num_layers=num_layers), rngs=nnx.Rngs(0), segments=segments,
                  layer_kinds=model.layer_kinds[:num_layers])
    for name in ("embed", "norm", "lm_head"):
        if getattr(model, name) is not None:
            nnx.update(getattr(small, name), nnx.state(getattr(model, name)))
    return small
