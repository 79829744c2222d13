"""On-device image preprocessing: random crop with zero padding, horizontal flip, normalisation.

All functions are jit-able and take a PRNG key, so augmentation is reproducible from (seed, step)
and identical on one device and on a mesh (JAX's partitionable threefry).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp


def resize(images: jax.Array, shape: Sequence[int]) -> jax.Array:
    """(N, H, W, C) -> float32 (N, *shape) by bilinear interpolation; unchanged when already that shape."""
    if tuple(images.shape[1:]) == tuple(shape):
        return images
    return jax.image.resize(images.astype(jnp.float32), images.shape[:1] + tuple(shape), "bilinear")


def random_crop(images: jax.Array, rng: jax.Array, padding: int) -> jax.Array:
    """Pads (N, H, W, C) by `padding` zeros each side and crops a random H x W window per image."""
    if padding == 0:
        return images
    n, h, w, c = images.shape
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    ky, kx = jax.random.split(rng)
    dy = jax.random.randint(ky, (n,), 0, 2 * padding + 1)
    dx = jax.random.randint(kx, (n,), 0, 2 * padding + 1)
    crop = lambda image, y, x: jax.lax.dynamic_slice(image, (y, x, 0), (h, w, c))
    return jax.vmap(crop)(padded, dy, dx)


def random_flip(images: jax.Array, rng: jax.Array) -> jax.Array:
    """Mirrors each image left-right with probability 1/2."""
    flip = jax.random.bernoulli(rng, 0.5, (images.shape[0],))
    return jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float], dtype=jnp.float32) -> jax.Array:
    """uint8 (N, H, W, C) -> (x / 255 - mean) / std per channel, as `dtype`."""
    x = images.astype(jnp.float32) / 255.0
    return ((x - jnp.asarray(mean)) / jnp.asarray(std)).astype(dtype)


def make_preprocess(mean, std, crop_padding: int = 0, flip: bool = False,
                    dtype=jnp.float32) -> Callable[[jax.Array, jax.Array, bool], jax.Array]:
    """preprocess(images uint8, rng, train) -> normalised float images; augments only in training."""
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    def preprocess(images, rng, train):
        if train:
            k_crop, k_flip = jax.random.split(rng)
            images = random_crop(images, k_crop, crop_padding)
            if flip:
                images = random_flip(images, k_flip)
        return normalize(images, mean, std, dtype)

    return preprocess
