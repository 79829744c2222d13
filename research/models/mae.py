"""A masked-autoencoder image generator for inpainting and outpainting (MAE / MAGE style).

Images (N, H, W, C) in [0, 1] are cut into P x P patches, T = (H/P)(W/P) tokens. A token mask
m (N, T) bool (True = hidden) chooses what the generator must fill in. The ENCODER E embeds every
patch, replaces the hidden ones by a learned mask token (as MAGE and BEiT, so the encoder sees T
tokens whatever the mask), adds a position embedding and runs pre-LN transformer blocks:

    z = E(T(x)) = encoder(x, m)                      (N, T, D)

The DECODER (a lighter transformer) maps z to pixel patches, and the generated image keeps the
visible pixels:  G(x, m) = m * decoder(z) + (1 - m) * x  (m broadcast over each patch's pixels).
The two halves are the submodules ``encoder`` and ``decoder``, so "train only the encoder" is the
filter ``ENCODER`` (generative unlearning updates E alone).

Masks (``make_masks``): ``center`` hides the central box of ``center_fraction`` of the area (25%:
the central 4 x 4 of 8 x 8 tokens), ``outpaint`` hides a border ``border`` tokens wide, ``random``
hides a ratio drawn uniformly from [ratio_min, ratio_max] of the tokens; training draws a kind per
image. The reconstruction loss is the mean squared error over the hidden pixels (MAE's loss).
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.core import config as config_lib
from research.models.vit import EncoderBlock, dense, layer_norm

_embed_init = nnx.initializers.normal(0.02)
ENCODER = nnx.PathContains("encoder")
DECODER = nnx.PathContains("decoder")
MASK_KINDS = ("center", "outpaint", "random")


@dataclasses.dataclass(frozen=True)
class MAEConfig:
    """Sizes of the generator: patch, encoder and decoder widths and depths."""
    patch_size: int = 4
    dim: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_dim: int = 512
    decoder_dim: int = 128
    decoder_depth: int = 2

    def __post_init__(self):
        config_lib.check_fields(self)
        for key in ("patch_size", "dim", "depth", "num_heads", "mlp_dim", "decoder_dim", "decoder_depth"):
            config_lib.require(self, key, getattr(self, key) > 0, "a positive int")
        config_lib.require(self, "num_heads", self.dim % self.num_heads == 0 and self.decoder_dim % self.num_heads == 0,
                           f"a divisor of dim ({self.dim}) and decoder_dim ({self.decoder_dim})")


@dataclasses.dataclass(frozen=True)
class MaskConfig:
    """Which masks training draws (one kind per image, uniformly) and their sizes."""
    kinds: tuple[Literal[MASK_KINDS], ...] = MASK_KINDS
    center_fraction: float = 0.25   # center: area of the hidden central box
    border: int = 2                 # outpaint: width in tokens of the hidden border
    ratio_min: float = 0.25         # random: the hidden fraction is uniform in [ratio_min, ratio_max]
    ratio_max: float = 0.75

    def __post_init__(self):
        config_lib.check_fields(self)
        config_lib.require(self, "kinds", len(self.kinds) > 0 and set(self.kinds) <= set(MASK_KINDS),
                           f"a non-empty tuple of {', '.join(MASK_KINDS)}")
        config_lib.require(self, "center_fraction", 0 < self.center_fraction < 1, "a float in (0, 1)")
        config_lib.require(self, "border", self.border >= 1, "an int >= 1")
        config_lib.require(self, "ratio_min", 0 < self.ratio_min <= self.ratio_max, "a float in (0, ratio_max]")
        config_lib.require(self, "ratio_max", self.ratio_max < 1, "a float < 1")


def center_mask(grid: tuple[int, int], fraction: float = 0.25) -> np.ndarray:
    """(T,) bool: the central box of about ``fraction`` of the token grid (gh, gw) hidden."""
    gh, gw = grid
    bh, bw = max(1, round(gh * fraction ** 0.5)), max(1, round(gw * fraction ** 0.5))
    m = np.zeros(grid, bool)
    m[(gh - bh) // 2:(gh - bh) // 2 + bh, (gw - bw) // 2:(gw - bw) // 2 + bw] = True
    return m.reshape(-1)


def border_mask(grid: tuple[int, int], border: int) -> np.ndarray:
    """(T,) bool: every token within ``border`` of the edge hidden (outpainting)."""
    m = np.ones(grid, bool)
    m[border:grid[0] - border, border:grid[1] - border] = False
    return m.reshape(-1)


def random_mask(key: jax.Array, n: int, num_tokens: int, ratio_min: float, ratio_max: float) -> jax.Array:
    """(n, T) bool: per image, a uniform ratio in [ratio_min, ratio_max] of random tokens hidden
    (at least one)."""
    k_ratio, k_order = jax.random.split(key)
    ratio = jax.random.uniform(k_ratio, (n, 1), minval=ratio_min, maxval=ratio_max)
    count = jnp.maximum(jnp.round(ratio * num_tokens), 1)
    rank = jnp.argsort(jnp.argsort(jax.random.uniform(k_order, (n, num_tokens)), axis=1), axis=1)
    return rank < count


def make_masks(key: jax.Array, n: int, grid: tuple[int, int], config: MaskConfig) -> jax.Array:
    """(n, T) bool masks: for each image a kind of ``config.kinds`` drawn uniformly, then its mask."""
    k_kind, k_random = jax.random.split(key)
    num_tokens = grid[0] * grid[1]
    table = {"center": jnp.asarray(center_mask(grid, config.center_fraction)),
             "outpaint": jnp.asarray(border_mask(grid, config.border))}
    options = [jnp.broadcast_to(table[k], (n, num_tokens)) if k in table
               else random_mask(k_random, n, num_tokens, config.ratio_min, config.ratio_max) for k in config.kinds]
    choice = jax.random.randint(k_kind, (n,), 0, len(options))
    return jnp.stack(options)[choice, jnp.arange(n)]


def fixed_mask(kind: str, n: int, grid: tuple[int, int], config: MaskConfig) -> jax.Array:
    """(n, T) bool: the same ``center`` or ``outpaint`` mask for n images (evaluation)."""
    if kind == "center":
        mask = center_mask(grid, config.center_fraction)
    elif kind == "outpaint":
        mask = border_mask(grid, config.border)
    else:
        raise ValueError(f"fixed_mask: kind {kind!r} is not one of center, outpaint")
    return jnp.broadcast_to(jnp.asarray(mask), (n, mask.size))


def patchify(x: jax.Array, p: int) -> jax.Array:
    """(N, H, W, C) -> (N, T, P*P*C), tokens in row-major order."""
    n, h, w, c = x.shape
    x = x.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: jax.Array, p: int, shape: tuple[int, int, int]) -> jax.Array:
    """(N, T, P*P*C) -> (N, H, W, C) for images of ``shape`` = (H, W, C)."""
    h, w, c = shape
    n = tokens.shape[0]
    x = tokens.reshape(n, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, h, w, c)


def hidden_box(mask: np.ndarray, grid: tuple[int, int], patch_size: int) -> tuple[slice, slice]:
    """Pixel rows and columns of the bounding box of the hidden tokens of one (T,) mask: for the
    centre mask on an 8 x 8 grid of 4 x 4 patches, rows and columns 8:24."""
    rows, cols = np.nonzero(np.asarray(mask).reshape(grid))
    if rows.size == 0:
        raise ValueError("hidden_box: the mask hides no token")
    return (slice(int(rows.min()) * patch_size, (int(rows.max()) + 1) * patch_size),
            slice(int(cols.min()) * patch_size, (int(cols.max()) + 1) * patch_size))


def pixel_mask(mask: jax.Array, patch_size: int, image_shape: tuple[int, int, int]) -> jax.Array:
    """(N, T) token mask -> (N, H, W, 1) float32, 1 on the pixels of hidden patches."""
    p = patch_size
    return unpatchify(jnp.repeat(mask[..., None].astype(jnp.float32), p * p, axis=-1), p, tuple(image_shape[:2]) + (1,))


def masked_view(images, pixel_mask):
    """What the generator is shown, for figures: hidden pixels grey (0.5). images (N, H, W, C) in
    [0, 1], pixel_mask (N, H, W, 1); numpy or jax arrays."""
    return pixel_mask * 0.5 + (1 - pixel_mask) * images


class Transformer(nnx.Module):
    """Position embedding, pre-LN blocks, final LayerNorm: (N, T, D) -> (N, T, D)."""

    def __init__(self, num_tokens: int, dim: int, depth: int, num_heads: int, mlp_dim: int, *, rngs: nnx.Rngs):
        self.pos_embed = nnx.Param(_embed_init(rngs.params(), (1, num_tokens, dim), jnp.float32))
        self.blocks = nnx.List([EncoderBlock(dim, num_heads, mlp_dim, 0.0, dtype=jnp.float32, rngs=rngs)
                                for _ in range(depth)])
        self.norm = layer_norm(dim, dtype=jnp.float32, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.pos_embed[...]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class MaskedEncoder(nnx.Module):
    """E: images (N, H, W, C) in [0, 1] and masks (N, T) -> token features (N, T, D)."""

    def __init__(self, image_shape: tuple[int, int, int], c: MAEConfig, *, rngs: nnx.Rngs):
        p = c.patch_size
        self.patch_size = p
        self.embed = dense(p * p * image_shape[2], c.dim, (None, "embed"), dtype=jnp.float32, rngs=rngs)
        self.mask_token = nnx.Param(_embed_init(rngs.params(), (1, 1, c.dim), jnp.float32))
        num_tokens = (image_shape[0] // p) * (image_shape[1] // p)
        self.body = Transformer(num_tokens, c.dim, c.depth, c.num_heads, c.mlp_dim, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        tokens = self.embed(patchify(2.0 * x - 1.0, self.patch_size))  # pixels to [-1, 1]
        tokens = jnp.where(mask[..., None], self.mask_token[...], tokens)
        return self.body(tokens)


class PixelDecoder(nnx.Module):
    """Token features (N, T, D) -> pixel patches (N, T, P*P*C), in the [0, 1] range of the images."""

    def __init__(self, image_shape: tuple[int, int, int], c: MAEConfig, *, rngs: nnx.Rngs):
        p = c.patch_size
        num_tokens = (image_shape[0] // p) * (image_shape[1] // p)
        self.proj = dense(c.dim, c.decoder_dim, ("embed", None), dtype=jnp.float32, rngs=rngs)
        self.body = Transformer(num_tokens, c.decoder_dim, c.decoder_depth, c.num_heads, 2 * c.decoder_dim, rngs=rngs)
        self.out = dense(c.decoder_dim, p * p * image_shape[2], (None, None), dtype=jnp.float32, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        return 0.5 * self.out(self.body(self.proj(z))) + 0.5


class MaskedAutoencoder(nnx.Module):
    """G(x, m) = m * decoder(encoder(x, m)) + (1 - m) * x. Images (N, H, W, C) in [0, 1], H and W
    divisible by the patch size; masks (N, T) bool, True = hidden."""

    def __init__(self, image_shape: tuple[int, int, int], config: MAEConfig = MAEConfig(), *, rngs: nnx.Rngs):
        h, w, _ = image_shape
        p = config.patch_size
        if h % p or w % p:
            raise ValueError(f"MaskedAutoencoder: image {h}x{w} is not divisible by patch_size {p}")
        self.image_shape = tuple(image_shape)
        self.grid = (h // p, w // p)
        self.patch_size = p
        self.encoder = MaskedEncoder(self.image_shape, config, rngs=rngs)
        self.decoder = PixelDecoder(self.image_shape, config, rngs=rngs)

    def encode(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """E(T(x)): (N, T, D)."""
        return self.encoder(x, mask)

    def decode(self, z: jax.Array) -> jax.Array:
        """The decoder's prediction of every pixel, (N, H, W, C) (not composited)."""
        return unpatchify(self.decoder(z), self.patch_size, self.image_shape)

    def pixel_mask(self, mask: jax.Array) -> jax.Array:
        """(N, T) token mask -> (N, H, W, 1) float pixel mask."""
        return pixel_mask(mask, self.patch_size, self.image_shape)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        hidden = self.pixel_mask(mask)
        return hidden * self.decode(self.encode(x, mask)) + (1.0 - hidden) * x


def hidden_mse(prediction: jax.Array, target: jax.Array, pixel_mask: jax.Array) -> jax.Array:
    """(N,) mean squared error over each image's hidden pixels: prediction, target (N, H, W, C),
    pixel_mask (N, H, W, 1)."""
    se = jnp.sum((prediction - target) ** 2 * pixel_mask, axis=(1, 2, 3))
    return se / jnp.maximum(jnp.sum(pixel_mask, axis=(1, 2, 3)) * prediction.shape[-1], 1.0)


def reconstruction_loss(model: MaskedAutoencoder, images: jax.Array, mask: jax.Array) -> jax.Array:
    """(N,) MAE loss: the hidden pixels' MSE of the decoder's prediction against the images."""
    return hidden_mse(model.decode(model.encode(images, mask)), images, model.pixel_mask(mask))


def build(image_shape: tuple[int, int, int], config: MAEConfig, seed: int = 0) -> MaskedAutoencoder:
    return MaskedAutoencoder(tuple(image_shape), config, rngs=nnx.Rngs(seed))

