"""The XLA references of GQA and MLA attention, prefill and decode: every kernel equals one of these.

Positions, not lengths, say what a query may see: the key in cache slot s has position
``kv_positions[b, s]`` (default: s), and a query at position p sees the keys with position <= p.
That one rule covers causal prefill, decode into a right-padded cache and per-sequence lengths:
unwritten slots always lie beyond the query's position.

Shapes: B batch, T queries, S keys, H query heads, K key/value heads (H % K == 0), R RoPE-key
heads of MLA (1 = shared as in DeepSeek-V2, or one per former KV head), r latent rank.
``research.attention.ops`` puts these and the kernels (``research.kernels``) behind one dispatcher.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

_MASKED = -1e30  # finite, so that a fully masked row (a padded query) gives no NaN


def visible_keys(q_positions: jax.Array, kv_positions: jax.Array | None, num_keys: int) -> jax.Array:
    """(B, 1, T, S) boolean: key s is visible from query t."""
    if kv_positions is None:
        kv_positions = jnp.arange(num_keys, dtype=q_positions.dtype)[None]
    return (kv_positions[:, None, None, :] <= q_positions[:, None, :, None])


def _grouped_logits(q: jax.Array, k: jax.Array) -> jax.Array:
    """q (B, T, H, D), k (B, S, G, D) with H % G == 0 -> float32 logits (B, H, T, S).

    Query head h uses key head h // (H / G): the grouping of GQA (and of MLA's RoPE keys)."""
    b, t, h, d = q.shape
    g = k.shape[2]
    qg = q.reshape(b, t, g, h // g, d)
    logits = jnp.einsum("btgjd,bsgd->bgjts", qg, k, preferred_element_type=jnp.float32)
    return logits.reshape(b, h, t, k.shape[1])


def _softmax(logits: jax.Array, visible: jax.Array) -> jax.Array:
    return jax.nn.softmax(jnp.where(visible, logits, _MASKED), axis=-1)


def gqa_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array,
                  kv_positions: jax.Array | None = None, *, scale: float) -> jax.Array:
    """softmax(q k^T * scale + causal mask) v with grouped key/value heads.

    q (B, T, H, D), k (B, S, K, D), v (B, S, K, Dv), q_positions (B, T) -> (B, T, H, Dv) in v's dtype.
    Used for prefill (S = T) and for decode against a cache (S = cache length).
    """
    b, t, h, _ = q.shape
    weights = _softmax(_grouped_logits(q, k) * scale, visible_keys(q_positions, kv_positions, k.shape[1]))
    g = k.shape[2]
    w = weights.reshape(b, g, h // g, t, -1).astype(v.dtype)
    out = jnp.einsum("bgjts,bsgd->btgjd", w, v)
    return out.reshape(b, t, h, v.shape[-1])


def mla_attention(q_nope: jax.Array, q_pe: jax.Array, k_nope: jax.Array, k_pe: jax.Array,
                  v: jax.Array, q_positions: jax.Array, kv_positions: jax.Array | None = None,
                  *, scale: float) -> jax.Array:
    """MLA with keys and values expanded from the latent ("naive" path).

    score[h, t, s] = (q_nope[t, h] . k_nope[s, h] + q_pe[t, h] . k_pe[s, h // (H / R)]) * scale

    q_nope (B, T, H, dn), q_pe (B, T, H, dr), k_nope (B, S, H, dn), k_pe (B, S, R, dr),
    v (B, S, H, dv) -> (B, T, H, dv).
    """
    b, t, h, _ = q_nope.shape
    logits = jnp.einsum("bthd,bshd->bhts", q_nope, k_nope, preferred_element_type=jnp.float32)
    logits = logits + _grouped_logits(q_pe, k_pe)
    weights = _softmax(logits * scale, visible_keys(q_positions, kv_positions, k_nope.shape[1]))
    return jnp.einsum("bhts,bshd->bthd", weights.astype(v.dtype), v)


def mla_absorbed_attention(q_latent: jax.Array, q_pe: jax.Array, c_kv: jax.Array, k_pe: jax.Array,
                           q_positions: jax.Array, kv_positions: jax.Array | None = None,
                           *, scale: float) -> jax.Array:
    """MLA read straight from the latent cache ("absorbed" path), DeepSeek-V2 section 2.1.3.

    With q_latent[h] = q_nope[h] W_UK[h] (W_UK absorbed into the query):
    score[h, t, s] = (q_latent[t, h] . c_kv[s] + q_pe[t, h] . k_pe[s, h // (H / R)]) * scale and
    o_latent[t, h] = sum_s softmax(score)[h, t, s] c_kv[s]; the caller applies W_UV[h] after.

    q_latent (B, T, H, r), q_pe (B, T, H, dr), c_kv (B, S, r), k_pe (B, S, R, dr)
    -> o_latent (B, T, H, r).
    """
    logits = jnp.einsum("bthr,bsr->bhts", q_latent, c_kv, preferred_element_type=jnp.float32)
    logits = logits + _grouped_logits(q_pe, k_pe)
    weights = _softmax(logits * scale, visible_keys(q_positions, kv_positions, c_kv.shape[1]))
    return jnp.einsum("bhts,bsr->bthr", weights.astype(c_kv.dtype), c_kv)
