"""Unlearning for image-to-image generators (Li, Hsu, Chen, Marculescu, ICLR 2024), and its baselines.

Only the encoder E of an encoder-decoder generator G = D(E(T(x))) is trained; E_0 is a frozen copy
of it and the decoder never changes. With T the masking (the same mask for student and teacher),
x_r retain images, x_f forget images and n an image of noise:

    L = E_{x_r} ||E(T(x_r)) - E_0(T(x_r))||^2  +  alpha E_{x_f, n} ||E(T(x_f)) - E_0(T(n))||^2     (ours)

n is Gaussian with the forget images' mean and standard deviation (over the batch), clamped to the
data range [0, 1] (``noise="uniform"``: uniform in [0, 1]; ``"constant"``: the mean everywhere).
Each squared error is averaged over tokens and feature dims per image, weighted per group
(``retain_alpha`` / ``alpha``) and averaged over the batch; every batch holds ``batch_size / 2``
retain and as many forget images (the smaller set is drawn with replacement across epochs).

Baselines (spec; the paper's section 5), all training the same encoder from the same start:
  max_loss        retain reconstruction loss - alpha * forget reconstruction loss;
  noisy_label     reconstruction loss, the forget images' targets replaced by the noise image n;
  retain_label    the forget images' targets replaced by the original generator's output for a
                  retain image of the batch;
  random_encoder  ours with the forget images' feature target replaced by Gaussian noise N(0, I).
The reference's random-encoder baseline weights its forget term by (1 + label), which puts the
noise target on the RETAIN images; here it is on the forget images, as the method intends.
Reconstruction loss = the MSE over the hidden pixels of the decoder's prediction (mae.py).
``retain_loss="pixels"`` swaps ours' retain term for that reconstruction loss (the baselines' retain
term): a diagnostic that separates the forget objective from what each method does to the retain set.

The optimiser is MAE/MAGE's: AdamW (0.9, 0.95), weight decay 0.05 on matrices only (not biases and
norms), lr = base_lr * batch / 256, linear warm-up then half-cycle cosine, gradients clipped at 3.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from flax import nnx

from research.core import config as config_lib
from research.core import optim
from research.models import mae
from research.models.mae import MaskConfig

METHODS = ("ours", "max_loss", "noisy_label", "retain_label", "random_encoder")
TARGET_METHODS = ("ours", "noisy_label")  # whose forget target is an image (reached_target)
NOISES = ("gaussian", "uniform", "constant")
RETAIN_LOSSES = ("features", "pixels")


@dataclasses.dataclass(frozen=True)
class GenerativeUnlearnConfig:
    """How the encoder is unlearned: the objective (``method``), its weights and the optimiser."""
    method: Literal[METHODS] = "ours"
    alpha: float = 0.2            # weight of the forget term (the reference's forget_alpha)
    retain_alpha: float = 1.0     # weight of the retain term
    noise: Literal[NOISES] = "gaussian"
    # ours / random_encoder: "features" = the paper's retain term ||E(T(x_r)) - E_0(T(x_r))||^2;
    # "pixels" = the baselines' reconstruction loss on x_r instead (a diagnostic, not the paper's).
    retain_loss: Literal[RETAIN_LOSSES] = "features"
    steps: int = 200
    batch_size: int = 64          # half retain, half forget
    base_lr: float = 1e-3         # lr = base_lr * batch_size / 256 (chosen on held-out test images)
    warmup_steps: int = 20
    weight_decay: float = 0.05
    b1: float = 0.9
    b2: float = 0.95
    grad_clip_norm: float = 3.0

    def __post_init__(self):
        config_lib.check_fields(self)
        config_lib.require(self, "alpha", self.alpha >= 0, "a float >= 0")
        config_lib.require(self, "retain_alpha", self.retain_alpha >= 0, "a float >= 0")
        config_lib.require(self, "steps", self.steps > 0, "a positive int")
        config_lib.require(self, "batch_size", self.batch_size >= 2 and self.batch_size % 2 == 0,
                           "an even int >= 2 (half retain, half forget)")
        config_lib.require(self, "base_lr", self.base_lr > 0, "a positive float")
        config_lib.require(self, "warmup_steps", 0 <= self.warmup_steps < self.steps, "an int in [0, steps)")

    @property
    def lr(self) -> float:
        return self.base_lr * self.batch_size / 256

    def optimizer(self) -> optax.GradientTransformation:
        return optim.make_optimizer(optim.OptimConfig(
            name="adamw", lr=self.lr, b1=self.b1, b2=self.b2, weight_decay=self.weight_decay, schedule="cosine",
            warmup_steps=self.warmup_steps, grad_clip_norm=self.grad_clip_norm), self.steps)


def noise_like(key: jax.Array, x: jax.Array, kind: str = "gaussian") -> jax.Array:
    """An image of noise per image of ``x`` (N, H, W, C) in [0, 1]: Gaussian with the batch's mean and
    std clamped to [0, 1], uniform in [0, 1], or the batch's mean everywhere."""
    if kind == "gaussian":
        return jnp.clip(jax.random.normal(key, x.shape) * jnp.std(x) + jnp.mean(x), 0.0, 1.0)
    if kind == "uniform":
        return jax.random.uniform(key, x.shape)
    if kind == "constant":
        return jnp.full_like(x, jnp.mean(x))
    raise ValueError(f"noise_like: kind {kind!r} is not one of {', '.join(NOISES)}")


@nnx.jit(static_argnames=("method", "noise"))
def reached_target(model: mae.MaskedAutoencoder, x: jax.Array, mask: jax.Array, key: jax.Array, method: str,
                   noise: str = "gaussian") -> jax.Array:
    """What the generator would output for images x (N, H, W, C) in [0, 1] under masks (N, T) if a
    method's forget target were reached exactly, in [0, 1]: the visible pixels of x, and in the
    hidden ones, for ``ours`` the original generator's fill from E_0(T(n)) (the decoder of the
    feature target), for ``noisy_label`` the noise image n itself (the pixel target). ``model`` is
    the original generator; n = noise_like(key, x, noise). The ceiling of each objective's forget
    term under a metric, with nothing traded against the retain set."""
    n = noise_like(key, x, noise)
    hidden = model.pixel_mask(mask)
    if method == "ours":
        fill = model.decode(model.encode(n, mask))
    elif method == "noisy_label":
        fill = n
    else:
        raise ValueError(f"reached_target: method {method!r} is not one of {', '.join(TARGET_METHODS)}")
    return jnp.clip(hidden * fill + (1.0 - hidden) * x, 0.0, 1.0)


def _feature_se(z: jax.Array, target: jax.Array) -> jax.Array:
    """(N,) squared error averaged over tokens and dims."""
    return jnp.mean((z - target) ** 2, axis=(1, 2))


def unlearning_loss(config: GenerativeUnlearnConfig, graphdef, grid, mask_config: MaskConfig):
    """loss(encoder_params, frozen_encoder, rest, batch, key) -> scalar for ``config.method``.
    ``frozen_encoder``: E_0's parameters; ``rest``: the decoder's (never differentiated); ``batch``:
    retain and forget (n, H, W, C) float images in [0, 1], n each. All enter jit as arguments."""
    def loss(params, frozen_encoder, rest, batch, key):
        student = nnx.merge(graphdef, params, rest)
        teacher = nnx.merge(graphdef, frozen_encoder, rest)
        x_r, x_f = batch["retain"], batch["forget"]
        n = x_r.shape[0]
        k_mask, k_noise, k_target = jax.random.split(key, 3)
        masks = mae.make_masks(k_mask, 2 * n, grid, mask_config)  # the same mask for student and teacher
        m_r, m_f = masks[:n], masks[n:]
        noise = noise_like(k_noise, x_f, config.noise)
        if config.method in ("ours", "random_encoder"):
            if config.retain_loss == "features":
                retain = _feature_se(student.encode(x_r, m_r), jax.lax.stop_gradient(teacher.encode(x_r, m_r)))
            else:
                retain = mae.reconstruction_loss(student, x_r, m_r)
            z_f = student.encode(x_f, m_f)
            target = (teacher.encode(noise, m_f) if config.method == "ours"
                      else jax.random.normal(k_target, z_f.shape))
            forget = _feature_se(z_f, jax.lax.stop_gradient(target))
        else:
            retain = mae.reconstruction_loss(student, x_r, m_r)
            pred_f, hidden_f = student.decode(student.encode(x_f, m_f)), student.pixel_mask(m_f)
            if config.method == "max_loss":
                forget = -mae.hidden_mse(pred_f, x_f, hidden_f)
            elif config.method == "noisy_label":
                forget = mae.hidden_mse(pred_f, noise, hidden_f)
            else:  # retain_label: the original generator's output for the paired retain image
                target = jax.lax.stop_gradient(teacher.decode(teacher.encode(x_r, m_f)))
                forget = mae.hidden_mse(pred_f, target, hidden_f)
        return jnp.mean(config.retain_alpha * retain) + jnp.mean(config.alpha * forget)
    return loss


def paired_batches(retain: np.ndarray, forget: np.ndarray, half: int, seed: int):
    """next_batch(step) -> {"retain", "forget"} uint8 (half, H, W, C) each: seeded epochs of each set,
    reshuffled when it runs out (so the smaller one repeats)."""
    def rows(n, step, salt):
        per_epoch = max(n // half, 1)
        epoch, i = divmod(step, per_epoch)
        order = np.random.default_rng([seed, salt, epoch]).permutation(n)
        return order[i * half:(i + 1) * half] if n >= half else order[np.arange(half) % n]

    def next_batch(step: int) -> dict:
        return {"retain": retain[rows(len(retain), step, 0)], "forget": forget[rows(len(forget), step, 1)]}
    return next_batch


@dataclasses.dataclass
class UnlearnResult:
    model: mae.MaskedAutoencoder
    seconds: float
    final_loss: float


def unlearn(model: mae.MaskedAutoencoder, retain: np.ndarray, forget: np.ndarray, config: GenerativeUnlearnConfig,
            mask_config: MaskConfig, *, seed: int = 0, progress: bool = False, desc: str = "unlearn") -> UnlearnResult:
    """Trains a copy of ``model``'s encoder on uint8 image arrays ``retain`` and ``forget`` (N, H, W, C)
    with ``config``; the decoder and ``model`` itself are left unchanged. Returns the unlearned copy."""
    graphdef, params, rest = nnx.split(model, nnx.All(nnx.Param, mae.ENCODER), ...)
    frozen = jax.tree.map(jnp.array, params)  # E_0
    tx = config.optimizer()
    loss_fn = unlearning_loss(config, graphdef, model.grid, mask_config)

    @jax.jit
    def step(params, opt_state, batch, key):
        batch = {k: v.astype(jnp.float32) / 255.0 for k, v in batch.items()}
        value, grads = jax.value_and_grad(loss_fn)(params, frozen, rest, batch, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    next_batch = paired_batches(retain, forget, config.batch_size // 2, seed)
    key = jax.random.PRNGKey(seed)
    opt_state = tx.init(params)
    value = jnp.zeros(())
    start = time.perf_counter()
    for i in tqdm.trange(config.steps, disable=not progress, desc=desc, leave=False):
        params, opt_state, value = step(params, opt_state, next_batch(i), jax.random.fold_in(key, i))
    value = float(value)
    seconds = time.perf_counter() - start
    return UnlearnResult(nnx.merge(graphdef, params, rest), seconds, value)
