"""Rotary position embedding (Su et al. 2021, "RoFormer") in Hugging Face Llama's layout.

A head of D dims holds D/2 frequency pairs; pair i is the dims (i, i + D/2) ("rotate half"), with
inverse frequency inv_freq[i] = theta^(-2i/D). At position p the pair is rotated by p * inv_freq[i]:

    x'[i]       = x[i] cos(p w_i) - x[i + D/2] sin(p w_i)
    x'[i + D/2] = x[i + D/2] cos(p w_i) + x[i] sin(p w_i)

Llama 3's ``llama3`` scaling (Meta, "The Llama 3 Herd of Models", 2024) divides the frequencies of
long wavelengths by ``factor``, keeps short ones, and interpolates in between.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np


@dataclass(frozen=True)
class Llama3RopeScaling:
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


def inverse_frequencies(head_dim: int, theta: float, scaling: Llama3RopeScaling | None = None) -> np.ndarray:
    """(head_dim / 2,) float64 inverse frequencies, with Llama-3 scaling applied when given."""
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling is None:
        return inv_freq
    wavelength = 2 * math.pi / inv_freq
    low_wavelength = scaling.original_max_position / scaling.low_freq_factor
    high_wavelength = scaling.original_max_position / scaling.high_freq_factor
    smooth = ((scaling.original_max_position / wavelength - scaling.low_freq_factor)
              / (scaling.high_freq_factor - scaling.low_freq_factor))
    interpolated = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    return np.where(wavelength > low_wavelength, inv_freq / scaling.factor,
                    np.where(wavelength < high_wavelength, inv_freq, interpolated))


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotates the pairs (i, i + D/2) of every head of x.

    x (B, T, H, D); positions (B, T) int; inv_freq (D/2,) for all heads, or (G, D/2) with H % G == 0
    where query head h uses row h // (H / G) (MLA keeps different pairs per former KV head).
    Computed in float32, returned in x's dtype.
    """
    num_heads = x.shape[2]
    inv_freq = jnp.asarray(inv_freq, jnp.float32)
    if inv_freq.ndim == 1:
        inv_freq = inv_freq[None]
    inv_freq = jnp.repeat(inv_freq, num_heads // inv_freq.shape[0], axis=0)  # (H, D/2)
    angles = positions.astype(jnp.float32)[:, :, None, None] * inv_freq  # (B, T, H, D/2)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
