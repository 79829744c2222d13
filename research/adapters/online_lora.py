"""Online-LoRA (Wei et al., WACV 2025, "Online-LoRA: Task-free Online Continual Learning via Low Rank
Adaptation").

A pre-trained ViT learns a non-stationary stream once, with no task boundaries. LoRA adapters on the
q and v projections of every block are split into a frozen accumulated part and a trainable current
part; the classifier head is trained throughout:

    W = W_0 + sum_{t < T} (alpha/r) B_t A_t   (frozen, merged into the base kernel)
          + (alpha/r) B_T A_T                 (trainable, theta = {A_T, B_T})

Every step minimises (one Adam step on theta and the head)

    L(theta) = mean_{(x, y) in batch} CE(x, y) + sum_{e in hard buffer} mean_{(x, y) in e} CE(x, y)
               + (lambda / 2) sum_i Omega_i (theta_i - theta*_i)^2

where the hard buffer holds the entries of highest loss seen recently: ``buffer="samples"`` (the
paper's 4 samples: one entry, their mean loss) or ``"batches"`` (the official code's 4 whole
batches: each batch's mean loss, summed). theta* is the adapter right after the last consolidation
(``penalty="anchored"``): the penalty measures the adapter's change since then, so a fresh adapter
starts at zero penalty; ``penalty="theta"`` is the reference's Omega theta^2, which pulls a freshly
re-initialised A toward zero at once (fix 2 below). A loss-plateau detector
(``PlateauDetector``) watches the batch loss; at a plateau (``OnlineLoRA.consolidate``):

    G       = sum_{x in buffer} (d NLL(yhat(x) | x) / d theta)^2,  yhat(x) = argmax_c f(x)_c   (empirical Fisher)
    Omega  <- G / n + (1 - 1/n) Omega                              (n = plateaus so far: the mean of the G's)
    W      <- W + (alpha/r) B_T A_T,   A_T <- random,   B_T <- 0,   fresh Adam state for theta

so the model's function does not change at a consolidation and the new adapter starts as a no-op.

Fixes of the public reference code (the paper's intent; ``OnlineLoraConfig`` keeps switches for 1 and 2):
  1. the product B A is merged, not the factors separately (summed factors give cross terms
     (B_0 + B_1)(A_0 + A_1) != B_0 A_0 + B_1 A_1);
  2. the new adapter starts with A random and B zero (both zero make both gradients exactly zero);
  3. buffer entries are individual samples, not whole batches;
  4. pseudo-labels are the argmax of each sample's logits, not of the flattened B x C logits;
  5. the model trains in train mode after a consolidation (the importance pass runs in eval mode).
Both hard buffers are offered (``buffer``). The official Si-Blurry code orders the buffer's losses
[current, h_1..h_4] but its inputs [h_1..h_4, current], so its buffer is chosen by losses shifted by
one entry; here losses and inputs are concatenated in the same order.

Layout. Our Linear kernels are (in, out), so B A reads ``A @ B`` here: A (in, r), B (r, out), and
``LoraLayer.delta`` gives (alpha/r) A @ B in the kernel's shape (any Linear / Conv / Einsum target).

State. As in ``research.core.train`` the model lives as a graph definition plus states: ``adapter``
(the current A, B), ``head``, ``frozen`` (all other params, merged adapters included) and ``rest``
(RNG counters, ...). Device work is jitted at that boundary; the plateau logic is Python.
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from research.adapters.lora import LoraLayer, LoraSpec, add_lora, lora_filter
from research.core import config as config_lib
from research.models import filters

ADAPTER = "current"  # name of the trainable adapter on each target layer

__all__ = ["ADAPTER", "HardBuffer", "OnlineLoRA", "OnlineLoraConfig", "PlateauDetector", "as_batch", "batched",
           "calibrate_plateau_thresholds", "entry_means_sum", "evaluate_accuracy", "evaluate_task", "ewc_penalty",
           "fisher_importance", "masked_mean", "ncm_accuracy", "plateau_steps", "pseudo_labels", "train_mode"]


@dataclass(frozen=True)
class OnlineLoraConfig:
    """Hyper-parameters (paper / reference defaults).

    rank, alpha     LoRA rank and scale; alpha = rank gives scale alpha/r = 1, i.e. the paper's
                    unscaled W_0 + sum_t B_t A_t.
    targets         regex over layer paths: q and v of every block of our ViT.
    lora_dropout    dropout on the adapter input (0 in the paper).
    lr              Adam learning rate for the adapter and the head (reference scripts also use 2e-4, 3e-4).
    reg_lambda      lambda of the (lambda/2) sum Omega theta^2 penalty.
    buffer, buffer_size   the hard buffer's entries: "samples" (paper: 4 samples) or "batches" (the
                    official code: 4 whole batches, their mean losses summed); buffer_size entries.
    penalty         "anchored": Omega (theta - theta*)^2 with theta* the adapter after the last
                    consolidation; "theta": the reference's Omega theta^2.
    window, mean_threshold, var_threshold   the plateau detector (thresholds are per data set).
    first_plateau_needs_peak   False: the start of the stream counts as a peak (see PlateauDetector).
    train_head      train the classifier head (not regularised) alongside the adapter.
    freeze_batch_stats  BatchNorm (if any, e.g. EfficientNet-Lite) normalises with its pre-trained
                    running statistics in training too: batches of a few classes would skew them.
    merge_factors_separately   reference bug 1: keep sums of the factors and merge (sum B)(sum A).
    reset_a_to_zero            reference bug 2: the new adapter starts with A = B = 0 (it cannot learn
                               from gradients; with ``reset_adam`` only Adam's old momentum moves it).
    reset_adam      a fresh Adam state for the new adapter at each consolidation (the head's Adam state
                    carries on). False keeps the adapter's moments, as the reference's single optimizer.
    """
    rank: int = 4
    alpha: float = 4.0
    targets: str = r"attn/(q|v)$"
    lora_dropout: float = 0.0
    lr: float = 1e-4
    reg_lambda: float = 2000.0
    buffer: Literal["samples", "batches"] = "samples"
    buffer_size: int = 4
    penalty: Literal["anchored", "theta"] = "anchored"
    window: int = 5
    mean_threshold: float = 6.0
    var_threshold: float = 0.1
    first_plateau_needs_peak: bool = False
    train_head: bool = True
    freeze_batch_stats: bool = True
    merge_factors_separately: bool = False
    reset_a_to_zero: bool = False
    reset_adam: bool = True

    def __post_init__(self):
        config_lib.check_fields(self)
        for name in ("rank", "buffer_size", "window"):
            config_lib.require(self, name, getattr(self, name) >= 1, "an int >= 1")
        config_lib.require(self, "lr", self.lr > 0, "a positive float")
        config_lib.require(self, "reg_lambda", self.reg_lambda >= 0, "a float >= 0")
        config_lib.require(self, "lora_dropout", 0 <= self.lora_dropout < 1, "a float in [0, 1)")


# ---------------------------------------------------------------------------------------------
# Loss-plateau detection (Python: one float per step).

class PlateauDetector:
    """Flags a loss plateau that follows a loss peak (task-free boundary detection).

    ``update(loss)`` keeps the last ``window`` losses. Once the window is full it computes their
    mean m and population variance v (``np.var``), then:
      - peak:     m > last_m + sqrt(last_v)  sets the peak flag,
      - plateau:  m < mean_threshold and v < var_threshold and the peak flag is set
                  -> last_m, last_v <- m, v; returns True and clears the flag.
    So a peak is a rise of the loss well above the level of the last plateau (as in Aljundi et al.,
    CVPR 2019, "Task-Free Continual Learning", and the Online-LoRA reference); before the first
    plateau the level is that of the first full window. With a perfectly flat plateau (last_v = 0)
    any rise of the mean above it counts as a peak.

    ``start_with_peak=True`` (default) sets the flag at the start: the beginning of the stream is
    treated as a distribution shift, so the first plateau consolidates without a visible peak
    (training from a pre-trained model starts high anyway). False requires a peak for every plateau.
    """

    def __init__(self, window: int = 5, mean_threshold: float = 6.0, var_threshold: float = 0.1,
                 start_with_peak: bool = True):
        self.window = window
        self.mean_threshold = mean_threshold
        self.var_threshold = var_threshold
        self.losses: deque[float] = deque(maxlen=window)
        self.last_mean: float | None = None
        self.last_var: float | None = None
        self.peak = start_with_peak

    def update(self, loss: float) -> bool:
        self.losses.append(float(loss))
        if len(self.losses) < self.window:
            return False
        mean, var = float(np.mean(self.losses)), float(np.var(self.losses))
        if self.last_mean is None:
            self.last_mean, self.last_var = mean, var
        elif mean > self.last_mean + math.sqrt(self.last_var):
            self.peak = True
        if self.peak and mean < self.mean_threshold and var < self.var_threshold:
            self.peak = False
            self.last_mean, self.last_var = mean, var
            return True
        return False


def plateau_steps(losses, window: int, mean_threshold: float, var_threshold: float,
                  start_with_peak: bool = True) -> list[int]:
    """Indices of the steps at which a ``PlateauDetector`` with these settings fires on ``losses``."""
    detector = PlateauDetector(window, mean_threshold, var_threshold, start_with_peak)
    return [i for i, loss in enumerate(losses) if detector.update(loss)]


def calibrate_plateau_thresholds(losses, segments, *, window: int = 5, start_with_peak: bool = True,
                                 quantiles: int = 20) -> tuple[float, float, list[int]]:
    """(mean_threshold, var_threshold, firing steps) that make the detector fire once per task on a
    recorded loss trace: the reference's thresholds are per data set, and ours follow the loss scale.

    losses (S,): the loss the detector watches at each step of a pass (batch + hard-buffer CE);
    segments (S,): the task segment of each step's batch (non-decreasing). The candidates are the
    ``quantiles``-quantiles of the trace's own window means and variances; each pair is replayed on the
    trace (``plateau_steps``) and scored by

        score = #segments with at least one plateau - #plateaus beyond the first in a segment,

    so the best pair fires once in as many tasks as it can. Ties go to the pair in the middle of the
    tied set (sorted by variance, then mean), away from the edges where a slightly different trace
    would change the count. Replaying is exact for the trace; a run with the new thresholds
    consolidates at other steps, and so sees a slightly different trace.
    """
    losses = np.asarray(losses, np.float64)
    segments = np.asarray(segments)
    if losses.ndim != 1 or losses.shape != segments.shape or len(losses) < window:
        raise ValueError(f"need one loss and one segment per step (at least {window} steps), got shapes "
                         f"{losses.shape} and {segments.shape}")
    if np.any(np.diff(segments) < 0):
        raise ValueError("segments must be non-decreasing along the stream")
    windows = np.lib.stride_tricks.sliding_window_view(losses, window)
    levels = np.linspace(0.0, 1.0, quantiles + 1)[1:]  # the top quantile lets every window through
    # Thresholds are strict (m < threshold): nudge each candidate up so the quantile's own window passes.
    means = np.unique(np.nextafter(np.quantile(windows.mean(axis=1), levels), np.inf))
    variances = np.unique(np.nextafter(np.quantile(windows.var(axis=1), levels), np.inf))
    n_segments = len(np.unique(segments))
    scored = []
    for v in variances:
        for m in means:
            fires = plateau_steps(losses, window, m, v, start_with_peak)
            per_segment = np.bincount(np.searchsorted(np.unique(segments), segments[fires]), minlength=n_segments)
            score = int(np.sum(per_segment > 0) - np.sum(np.maximum(per_segment - 1, 0)))
            scored.append((score, float(v), float(m), fires))
    best = max(s[0] for s in scored)
    tied = [s for s in scored if s[0] == best]
    _, v, m, fires = tied[len(tied) // 2]
    return m, v, fires


# ---------------------------------------------------------------------------------------------
# Hard buffer: the highest-loss individual samples.

@jax.jit
def _keep_hardest(kept, kept_losses, kept_valid, new, new_losses, new_valid):
    """The K = len(kept_losses) highest-loss valid entries of kept + new, highest first. ``kept`` and
    ``new`` are tuples of arrays with the entries on axis 0."""
    valid = jnp.concatenate([kept_valid, new_valid])
    losses = jnp.concatenate([kept_losses, new_losses.astype(kept_losses.dtype)])
    _, keep = jax.lax.top_k(jnp.where(valid, losses, -jnp.inf), kept_losses.shape[0])  # invalid fill what is left
    arrays = tuple(jnp.concatenate([a, b.astype(a.dtype)])[keep] for a, b in zip(kept, new, strict=True))
    return arrays, losses[keep], valid[keep]


class HardBuffer:
    """The ``size`` entries of highest loss among the buffer and the latest batch: individual
    samples (``unit="samples"``, bug 3 of the reference) or whole batches (``"batches"``, the
    official code; a batch's loss is its mean over its unpadded rows).

    Arrays have a fixed shape (``size`` entries, ``valid`` marks the filled ones) so a jitted step
    that takes the buffer compiles once; they are allocated like the first batch: samples hold
    images (size, H, W, C) and labels (size,), batches images (size, N, H, W, C), labels and row
    masks (size, N). The stored losses are those of the last ``update``: the train step refreshes
    them with the same forward pass as the batch's, so old and new entries compete under the same
    parameters.
    """

    def __init__(self, size: int, unit: Literal["samples", "batches"] = "samples"):
        if unit not in ("samples", "batches"):
            raise ValueError(f"hard buffer unit must be 'samples' or 'batches', got {unit!r}")
        self.size, self.unit = size, unit
        self.images = self.labels = self.losses = self.valid = self.masks = None

    def __len__(self) -> int:
        """Filled entries (samples or batches)."""
        return 0 if self.valid is None else int(jnp.sum(self.valid))

    def allocate_like(self, images: jax.Array, labels: jax.Array) -> None:
        if self.images is None:
            entry = images.shape[1:] if self.unit == "samples" else images.shape
            rows = () if self.unit == "samples" else labels.shape
            self.images = jnp.zeros((self.size,) + entry, images.dtype)
            self.labels = jnp.zeros((self.size,) + rows, labels.dtype)
            self.masks = jnp.zeros((self.size,) + rows, jnp.float32)
            self.losses = jnp.zeros((self.size,), jnp.float32)
            self.valid = jnp.zeros((self.size,), bool)

    def update(self, images, labels, losses, buffer_losses=None, mask=None) -> None:
        """images (N, H, W, C), labels (N,), per-row losses (N,); ``buffer_losses`` (rows of
        ``arrays()``) replaces the stored losses of the current entries first (e.g. recomputed with
        the current parameters); rows with ``mask`` (N,) == 0 (padding of a last batch) never count."""
        images, labels, losses = jnp.asarray(images), jnp.asarray(labels), jnp.asarray(losses, jnp.float32)
        self.allocate_like(images, labels)
        mask = jnp.ones(losses.shape, jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
        if self.unit == "samples":
            stored = self.losses if buffer_losses is None else jnp.asarray(buffer_losses, jnp.float32)
            (self.images, self.labels, self.masks), self.losses, self.valid = _keep_hardest(
                (self.images, self.labels, self.masks), stored, self.valid, (images, labels, mask), losses, mask > 0)
            return
        stored = self.losses
        if buffer_losses is not None:  # each batch's mean over its own rows
            rows = jnp.asarray(buffer_losses, jnp.float32).reshape(self.masks.shape)
            stored = jnp.sum(rows * self.masks, 1) / jnp.maximum(jnp.sum(self.masks, 1), 1.0)
        mean = jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)
        (self.images, self.labels, self.masks), self.losses, self.valid = _keep_hardest(
            (self.images, self.labels, self.masks), stored, self.valid,
            (images[None], labels[None], mask[None]), mean[None], jnp.any(mask > 0)[None])

    def arrays(self) -> dict[str, jax.Array]:
        """Rows for a jitted function: "images" (M, H, W, C), "labels" (M,), "valid" (M,) and
        "weights" (M, E), row m's weight in entry e's mean loss (0 or 1). M = size samples, or
        size x N rows of size batches."""
        if self.unit == "samples":
            return {"images": self.images, "labels": self.labels, "valid": self.valid,
                    "weights": self.valid.astype(jnp.float32)[:, None]}
        k, n = self.labels.shape
        row_valid = (self.masks > 0) & self.valid[:, None]
        entry = jnp.repeat(jnp.arange(k), n)
        return {"images": self.images.reshape((k * n,) + self.images.shape[2:]), "labels": self.labels.reshape(-1),
                "valid": row_valid.reshape(-1),
                "weights": jax.nn.one_hot(entry, k, dtype=jnp.float32) * row_valid.reshape(-1, 1)}


# ---------------------------------------------------------------------------------------------
# Pure pieces of the loss and the importance.

def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """sum(values * mask) / sum(mask) over (N,) arrays; 0 when the mask is empty."""
    mask = mask.astype(jnp.float32)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def pseudo_labels(logits: jax.Array) -> jax.Array:
    """(N, C) -> (N,): each sample's own argmax (bug 4: not an argmax over the flattened N x C)."""
    return jnp.argmax(logits, axis=-1)


def ewc_penalty(adapter, omega, reg_lambda, anchor=None) -> jax.Array:
    """(lambda / 2) sum_i Omega_i (theta_i - anchor_i)^2 over matching trees (anchor None: 0); its
    gradient is lambda Omega (theta - anchor)."""
    if anchor is not None:
        adapter = jax.tree.map(jnp.subtract, adapter, anchor)
    terms = jax.tree.leaves(jax.tree.map(lambda o, t: jnp.sum(o * jnp.square(t)), omega, adapter))
    return 0.5 * reg_lambda * sum(terms, jnp.zeros((), jnp.float32))


def entry_means_sum(losses: jax.Array, weights: jax.Array) -> jax.Array:
    """sum_e (sum_m weights[m, e] losses[m]) / max(sum_m weights[m, e], 1): each hard-buffer entry's
    mean loss, summed (one entry of samples: their mean; batches: the sum of the batch means)."""
    return jnp.sum((losses @ weights) / jnp.maximum(jnp.sum(weights, 0), 1.0))


def fisher_importance(logits_fn: Callable, theta, images: jax.Array, valid: jax.Array):
    """Empirical Fisher G = sum_i valid_i (d NLL(yhat_i | x_i) / d theta)^2, same tree as theta.

    ``logits_fn(theta, x)`` maps (n, H, W, C) to (n, C). Gradients are per sample (vmap over
    single-sample batches, so G is a sum of squares, not the square of a sum) and the pseudo-label
    yhat_i = argmax_c f(x_i)_c is each sample's own.
    """
    def sample_grad(x):
        def nll(t):
            logits = logits_fn(t, x[None]).astype(jnp.float32)  # (1, C)
            label = jax.lax.stop_gradient(pseudo_labels(logits))
            return -jnp.take_along_axis(jax.nn.log_softmax(logits), label[:, None], axis=-1)[0, 0]
        return jax.grad(nll)(theta)

    grads = jax.vmap(sample_grad)(images)  # leaves (n, *shape)
    weights = valid.astype(jnp.float32)
    return jax.tree.map(lambda g: jnp.tensordot(weights, jnp.square(g), axes=1), grads)


def default_preprocess(images: jax.Array) -> jax.Array:
    """Integer images -> float32 in [0, 1]; float images are only cast."""
    if jnp.issubdtype(images.dtype, jnp.integer):
        return images.astype(jnp.float32) / 255.0
    return images.astype(jnp.float32)


# The jitted functions take the graph definitions and ``preprocess`` as static arguments, so every
# OnlineLoRA over the same architecture shares one compilation; lr and lambda are traced scalars.

def _loss(graphdef, preprocess, trainable, frozen, rest, omega, anchor, batch, buffer, reg_lambda):
    """Total loss and its parts; per-sample CE of batch + buffer rows from one forward pass."""
    images = jnp.concatenate([batch["images"], buffer["images"].astype(batch["images"].dtype)])
    labels = jnp.concatenate([batch["labels"], buffer["labels"].astype(batch["labels"].dtype)])
    # copy=True: fresh Variables in this trace, so state updates (RNG counters) can be read back.
    model = nnx.merge(graphdef, trainable["adapter"], trainable["head"], frozen, rest, copy=True)
    losses = optax.softmax_cross_entropy_with_integer_labels(model(preprocess(images)).astype(jnp.float32), labels)
    n = batch["labels"].shape[0]
    batch_loss = masked_mean(losses[:n], batch["mask"])
    buffer_loss = entry_means_sum(losses[n:], buffer["weights"])  # 0 while empty
    reg = ewc_penalty(trainable["adapter"], omega, reg_lambda, anchor)
    parts = {"loss": batch_loss + buffer_loss + reg, "batch_loss": batch_loss, "buffer_loss": buffer_loss,
             "reg": reg}
    return parts["loss"], (parts, losses, nnx.state(model, nnx.Not(nnx.Param)))


@partial(jax.jit, static_argnums=(0, 1))
def _gradients(graphdef, preprocess, trainable, frozen, rest, omega, anchor, batch, buffer, reg_lambda):
    return jax.grad(lambda t: _loss(graphdef, preprocess, t, frozen, rest, omega, anchor, batch, buffer,
                                    reg_lambda)[0])(trainable)


@partial(jax.jit, static_argnums=(0, 1))
def _train_step(graphdef, preprocess, trainable, frozen, rest, opt_state, omega, anchor, batch, buffer, lr,
                reg_lambda):
    """One Adam step on {"adapter", "head"} (separate Adam states, so the adapter's can be reset)."""
    grad_fn = jax.value_and_grad(_loss, argnums=2, has_aux=True)
    (_, (parts, losses, rest)), grads = grad_fn(graphdef, preprocess, trainable, frozen, rest, omega, anchor,
                                                batch, buffer, reg_lambda)
    tx = optax.adam(lr)
    new_trainable, new_opt_state = {}, {}
    for key in ("adapter", "head"):
        updates, new_opt_state[key] = tx.update(grads[key], opt_state[key], trainable[key])
        new_trainable[key] = optax.apply_updates(trainable[key], updates)
    n = batch["labels"].shape[0]
    return new_trainable, rest, new_opt_state, parts, losses[:n], losses[n:]


@partial(jax.jit, static_argnums=(0, 1))
def _predict(graphdef, preprocess, adapter, head, frozen, rest, images):
    return nnx.merge(graphdef, adapter, head, frozen, rest, copy=True)(preprocess(images)).astype(jnp.float32)


@partial(jax.jit, static_argnums=(0, 1))
def _embed(graphdef, preprocess, adapter, head, frozen, rest, images):
    model = nnx.merge(graphdef, adapter, head, frozen, rest, copy=True)
    return model.embedding(preprocess(images)).astype(jnp.float32)


@partial(jax.jit, static_argnums=(0, 1))
def _importance(graphdef, preprocess, adapter, head, frozen, rest, images, valid):
    def logits_fn(theta, x):
        return nnx.merge(graphdef, theta, head, frozen, rest, copy=True)(preprocess(x))
    return fisher_importance(logits_fn, adapter, images, valid)


# ---------------------------------------------------------------------------------------------

def _target_layers(model: nnx.Module) -> list[tuple[tuple, LoraLayer]]:
    return [(tuple(p), n) for p, n in nnx.iter_graph(model) if isinstance(n, LoraLayer) and ADAPTER in n.lora]


class OnlineLoRA:
    """Online-LoRA learner over an NNX classifier (a ViT whose q / v projections match ``targets``).

    ``model`` is changed in place (adapter ``"current"`` added on the targets) and then held as states:
    ``adapter`` (trainable A, B), ``head`` (trainable head; empty when ``train_head=False``),
    ``frozen`` (every other param: base kernels with the merged adapters), ``rest`` (non-params),
    ``opt_state`` ({"adapter", "head"} Adam states), ``omega`` (importance, the tree of ``adapter``,
    zeros at start), ``anchor`` (theta*: the adapter after the last consolidation; None with
    ``penalty="theta"``), ``n_plateaus``, ``buffer`` (HardBuffer) and ``detector`` (PlateauDetector).
    ``model`` gives a module (train mode) built from the current states.

    ``preprocess(images) -> float inputs`` runs on the device (default: integer images / 255). Batches
    are dicts with "images" (N, H, W, C) and "labels" (N,) int.
    """

    def __init__(self, model: nnx.Module, config: OnlineLoraConfig = OnlineLoraConfig(), *, rngs: nnx.Rngs,
                 preprocess: Callable[[jax.Array], jax.Array] = default_preprocess):
        self.config = config
        self.preprocess = preprocess
        add_lora(model, LoraSpec(config.targets, rank=config.rank, alpha=config.alpha, dropout=config.lora_dropout),
                 name=ADAPTER, rngs=rngs)
        self._key = rngs.params()  # new A factors at each consolidation
        head = filters.head(model) if config.train_head else nnx.Nothing
        self._filters = (lora_filter(ADAPTER), head, nnx.Param, ...)
        model.eval()
        self._eval_def = nnx.graphdef(model)
        train_mode(model, config.freeze_batch_stats)
        self._train_def, self.adapter, self.head, self.frozen, self.rest = nnx.split(model, *self._filters)
        self._tx = optax.adam(config.lr)  # states only: the step rebuilds adam with a traced lr
        self.opt_state = {"adapter": self._tx.init(self.adapter), "head": self._tx.init(self.head)}
        self.omega = jax.tree.map(jnp.zeros_like, self.adapter)
        self.anchor = self._anchor()
        self.n_plateaus = 0
        self.buffer = HardBuffer(config.buffer_size, config.buffer)
        self.detector = PlateauDetector(config.window, config.mean_threshold, config.var_threshold,
                                        start_with_peak=not config.first_plateau_needs_peak)
        if config.merge_factors_separately:  # reference behaviour: W = W_0 + (sum A)(sum B)
            self._w0 = {p: layer.base.kernel.get_value() for p, layer in _target_layers(model)}
            self._factor_sums: dict[tuple, tuple[jax.Array, jax.Array]] = {}

    def _anchor(self):
        return jax.tree.map(jnp.copy, self.adapter) if self.config.penalty == "anchored" else None

    @property
    def model(self) -> nnx.Module:
        """A module in train mode built from (a copy of) the current states; edits do not flow back."""
        return nnx.merge(self._train_def, self.adapter, self.head, self.frozen, self.rest, copy=True)

    def _batch(self, batch) -> dict[str, jax.Array]:
        batch = as_batch(batch)
        self.buffer.allocate_like(batch["images"], batch["labels"])
        return batch

    def step(self, batch) -> dict:
        """One update on batch + hard buffer + penalty, then the buffer and the detector; consolidates
        at a plateau. Returns floats "loss", "batch_loss", "buffer_loss", "reg" (before the update),
        "plateau" (bool) and "n_plateaus"."""
        batch = self._batch(batch)
        trainable = {"adapter": self.adapter, "head": self.head}
        trainable, self.rest, self.opt_state, parts, losses, buffer_losses = _train_step(
            self._train_def, self.preprocess, trainable, self.frozen, self.rest, self.opt_state, self.omega,
            self.anchor, batch, self.buffer.arrays(), jnp.float32(self.config.lr), jnp.float32(self.config.reg_lambda))
        self.adapter, self.head = trainable["adapter"], trainable["head"]
        self.buffer.update(batch["images"], batch["labels"], losses, buffer_losses, batch["mask"])
        metrics = {k: float(v) for k, v in parts.items()}
        # The data loss (batch + buffer CE) as in the reference; the penalty is left out: it jumps when
        # Omega changes.
        metrics["plateau"] = self.detector.update(metrics["batch_loss"] + metrics["buffer_loss"])
        if metrics["plateau"]:
            self.consolidate()
        metrics["n_plateaus"] = self.n_plateaus
        return metrics

    def gradients(self, batch) -> dict:
        """d loss / d {"adapter", "head"} for ``batch`` with the current buffer and Omega (no update)."""
        batch = self._batch(batch)
        return _gradients(self._train_def, self.preprocess, {"adapter": self.adapter, "head": self.head},
                          self.frozen, self.rest, self.omega, self.anchor, batch, self.buffer.arrays(),
                          jnp.float32(self.config.reg_lambda))

    def importance(self):
        """Empirical Fisher G of the current adapter over the hard buffer's rows (eval mode), tree of ``adapter``."""
        if not len(self.buffer):
            return jax.tree.map(jnp.zeros_like, self.adapter)
        rows = self.buffer.arrays()
        return _importance(self._eval_def, self.preprocess, self.adapter, self.head, self.frozen, self.rest,
                           rows["images"], rows["valid"])

    def consolidate(self) -> None:
        """At a plateau: Omega <- G/n + (1 - 1/n) Omega, merge (alpha/r) B A into the frozen kernels,
        start a new adapter (A random, B zero) with a fresh Adam state, and anchor the penalty there.
        The model's outputs do not change."""
        g = self.importance()
        self.n_plateaus += 1
        n = self.n_plateaus
        self.omega = jax.tree.map(lambda o, gi: gi / n + (1.0 - 1.0 / n) * o, self.omega, g)
        self._merge_adapter()
        self.anchor = self._anchor()
        if self.config.reset_adam:
            self.opt_state = dict(self.opt_state, adapter=self._tx.init(self.adapter))

    def _merge_adapter(self) -> None:
        # Edit values on a module built from the states, then split it back: the graph (and hence
        # every jitted function) stays the same; the train-mode graph definition is reused.
        model = self.model
        for path, layer in _target_layers(model):
            adapter, kernel = layer.lora[ADAPTER], layer.base.kernel
            a, b = adapter.a.get_value(), adapter.b.get_value()
            w = kernel.get_value()
            if self.config.merge_factors_separately:
                sum_a, sum_b = self._factor_sums.get(path, (jnp.zeros_like(a), jnp.zeros_like(b)))
                self._factor_sums[path] = sum_a, sum_b = sum_a + a, sum_b + b
                adapter.a.set_value(sum_a)
                adapter.b.set_value(sum_b)
                new_w = self._w0[path].astype(jnp.float32) + layer.delta(ADAPTER)  # cross terms included
            else:
                new_w = w.astype(jnp.float32) + layer.delta(ADAPTER)
            kernel.set_value(new_w.astype(w.dtype))
            self._key, key = jax.random.split(self._key)
            adapter.a.set_value(jnp.zeros_like(a) if self.config.reset_a_to_zero else _init_a(key, a))
            adapter.b.set_value(jnp.zeros_like(b))
        graphdef, self.adapter, self.head, self.frozen, self.rest = nnx.split(model, *self._filters)
        if graphdef != self._train_def:
            raise RuntimeError("merging an Online-LoRA adapter changed the model's graph")

    def predict(self, images) -> jax.Array:
        """Logits (N, C) of the eval-mode model."""
        return _predict(self._eval_def, self.preprocess, self.adapter, self.head, self.frozen, self.rest,
                        jnp.asarray(images))

    def embed(self, images) -> jax.Array:
        """The head's input (N, D) of the eval-mode model (the model's ``embedding``)."""
        return _embed(self._eval_def, self.preprocess, self.adapter, self.head, self.frozen, self.rest,
                      jnp.asarray(images))

    def evaluate(self, images, labels, batch_size: int = 256) -> float:
        """Top-1 accuracy of the eval-mode model over (N, H, W, C) images and (N,) labels."""
        return evaluate_accuracy(self.predict, images, labels, batch_size)


def as_batch(batch) -> dict[str, jax.Array]:
    """{"images" (N, H, W, C), "labels" (N,) int32, "mask" (N,) float32} on the device; a batch
    without "mask" (e.g. not padded) counts every row."""
    images, labels = jnp.asarray(batch["images"]), jnp.asarray(batch["labels"], jnp.int32)
    mask = batch.get("mask")
    mask = jnp.ones(labels.shape, jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
    return {"images": images, "labels": labels, "mask": mask}


def _logits(predict: Callable[[np.ndarray], jax.Array], images, batch_size: int):
    """Yields (start, logits (m, C) numpy) over array-like images (N, H, W, C); the last batch is
    padded to ``batch_size`` so that one compilation serves every batch."""
    for start in range(0, len(images), batch_size):
        x = np.asarray(images[start:start + batch_size])
        m = len(x)
        if m < batch_size:
            x = np.concatenate([x, np.zeros((batch_size - m,) + x.shape[1:], x.dtype)])
        yield start, np.asarray(predict(x))[:m]


def evaluate_accuracy(predict: Callable[[np.ndarray], jax.Array], images, labels, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``predict(images) -> logits`` over array-likes (N, H, W, C) and (N,)."""
    return evaluate_task(predict, images, labels, None, batch_size)[0]


def batched(fn: Callable[[np.ndarray], jax.Array], images, batch_size: int = 256) -> np.ndarray:
    """``fn`` over array-like images in batches (the last padded, one compilation), concatenated."""
    return np.concatenate([out for _, out in _logits(fn, images, batch_size)])


def ncm_accuracy(train_features, train_labels, test_features, test_labels) -> float:
    """Nearest-class-mean accuracy with cosine similarity: each test feature (M, D) takes the class
    whose mean of L2-normalised training features (N, D) is closest in angle. On a continual
    learner's final features, with every class's training images, it bounds what a head calibrated
    across tasks could read from those features."""
    def unit(x):
        x = np.asarray(x, np.float64)
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    train_labels = np.asarray(train_labels)
    classes = np.unique(train_labels)
    means = unit(np.stack([unit(train_features)[train_labels == c].mean(0) for c in classes]))
    predicted = classes[np.argmax(unit(test_features) @ means.T, -1)]
    return float(np.mean(predicted == np.asarray(test_labels)))


def evaluate_task(predict: Callable[[np.ndarray], jax.Array], images, labels, classes, batch_size: int = 256
                  ) -> tuple[float, float]:
    """(class-incremental, task-incremental) top-1 accuracy from one pass of ``predict``: the argmax
    over every class, and over ``classes`` only (the task's own; the task is given at test time).
    ``classes`` None gives the first figure twice."""
    labels = np.asarray(labels)
    allowed = None if classes is None else np.asarray(sorted(int(c) for c in classes))
    correct = correct_task = 0
    for start, logits in _logits(predict, images, batch_size):
        truth = labels[start:start + len(logits)]
        correct += int(np.sum(np.argmax(logits, -1) == truth))
        if allowed is not None:
            correct_task += int(np.sum(allowed[np.argmax(logits[:, allowed], -1)] == truth))
    n = max(len(labels), 1)
    return correct / n, (correct if allowed is None else correct_task) / n


def train_mode(model: nnx.Module, freeze_batch_stats: bool) -> None:
    """Dropout on; BatchNorm on batch statistics unless ``freeze_batch_stats`` (then it keeps its
    running averages, as in eval mode, and they are not updated)."""
    model.train()
    if freeze_batch_stats:
        model.set_attributes(use_running_average=True, raise_if_not_found=False)


def _init_a(key: jax.Array, like: jax.Array) -> jax.Array:
    """A fresh A (*in_dims, r), drawn as in ``LoraAdapter``: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    init = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=tuple(range(like.ndim - 1)),
                                             out_axis=-1)
    return init(key, like.shape, like.dtype)
