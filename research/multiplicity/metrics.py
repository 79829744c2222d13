"""Predictive-multiplicity metrics over a set of models (Hsu, Li, Hu, Chen, ICLR 2024, Sec. 2;
Rashomon capacity from Hsu & Calmon, NeurIPS 2022).

Every function takes the set's softmax outputs ``probs`` (M, N, C): model m's h_m(x) for the N
evaluation points, and returns per-point values (N,) or a scalar; with y_m(x) = argmax h_m(x) and
y_0(x) the reference model's prediction:

    ambiguity        = (1/N) sum_x 1[exists m: y_m(x) != y_0(x)]
    discrepancy      = max_m (1/N) sum_x 1[y_m(x) != y_0(x)]
    VPR(x)           = max_m h_m(x)_y - min_m h_m(x)_y                       (y the true label)
    score variance   = Var_m h_m(x)_y
    capacity(x)      = 2^{C(x)},  C(x) = max_{p in simplex(M)} I(m; class) in bits,
                       the channel P(class | m) = h_m(x), by Blahut-Arimoto; in [1, #classes].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _check(probs: jax.Array) -> None:
    if probs.ndim != 3 or probs.shape[0] == 0:
        raise ValueError(f"probs must be (M >= 1 models, N points, C classes), got shape {probs.shape}")


def ambiguity(probs: jax.Array, reference_pred: jax.Array) -> float:
    """Fraction of points on which at least one model of the set disagrees with y_0. probs (M, N, C),
    reference_pred (N,) int."""
    _check(probs)
    flipped = jnp.argmax(probs, -1) != reference_pred[None]
    return float(jnp.mean(jnp.any(flipped, 0)))


def discrepancy(probs: jax.Array, reference_pred: jax.Array) -> float:
    """The largest fraction of points one model of the set flips against y_0."""
    _check(probs)
    flipped = jnp.argmax(probs, -1) != reference_pred[None]
    return float(jnp.max(jnp.mean(flipped, 1)))


def _true_class_scores(probs: jax.Array, labels: jax.Array) -> jax.Array:
    """h_m(x)_y: (M, N)."""
    return jnp.take_along_axis(probs, labels[None, :, None].astype(jnp.int32), -1)[..., 0]


def viable_prediction_range(probs: jax.Array, labels: jax.Array) -> jax.Array:
    """VPR(x) = max_m h_m(x)_y - min_m h_m(x)_y: (N,)."""
    _check(probs)
    scores = _true_class_scores(probs, labels)
    return scores.max(0) - scores.min(0)


def score_variance(probs: jax.Array, labels: jax.Array) -> jax.Array:
    """Var_m h_m(x)_y (population variance over the M models): (N,)."""
    _check(probs)
    return jnp.var(_true_class_scores(probs, labels), 0)


def _divergences(channel: np.ndarray, neg_entropy: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """D(P(.|m) || q) in nats per input m, q = sum_m prior_m P(.|m): (B, M), from the rows'
    sum_c W log W (``neg_entropy``, (B, M)) so that each step is two batched matrix products."""
    q = np.matmul(prior[:, None, :], channel)[:, 0]
    log_q = np.log(np.maximum(q, np.finfo(np.float64).tiny))
    return neg_entropy - np.matmul(channel, log_q[:, :, None])[..., 0]


def channel_capacity_bits(channel: np.ndarray, *, tol: float = 1e-12, max_iterations: int = 1000) -> np.ndarray:
    """Blahut-Arimoto in float64: the capacity in bits of channels (..., M, C) whose rows
    P(class | m) sum to 1. The prior over inputs is updated p_m <- p_m exp(D_m) / Z until no entry
    moves by more than ``tol`` (per channel) or ``max_iterations``; C = sum_m p_m D_m."""
    channel = np.asarray(channel, np.float64)
    if channel.ndim < 2:
        raise ValueError(f"channel must be (..., M inputs, C outputs), got shape {channel.shape}")
    lead = channel.shape[:-2]
    channel = channel.reshape((-1,) + channel.shape[-2:])
    neg_entropy = np.sum(channel * np.log(np.maximum(channel, np.finfo(np.float64).tiny)), -1)
    prior = np.full(channel.shape[:2], 1.0 / channel.shape[1])
    # Channels still moving; their arrays are re-sliced only when one converges.
    active, w, h, p = np.arange(len(channel)), channel, neg_entropy, prior.copy()
    for _ in range(max_iterations):
        d = _divergences(w, h, p)
        new = p * np.exp(d - d.max(-1, keepdims=True))
        new /= new.sum(-1, keepdims=True)
        moving = np.max(np.abs(new - p), -1) > tol
        p = new
        if not moving.all():
            prior[active] = p
            active, w, h, p = active[moving], w[moving], h[moving], p[moving]
            if active.size == 0:
                break
    prior[active] = p
    capacity = np.sum(prior * _divergences(channel, neg_entropy, prior), -1) / np.log(2.0)
    return np.maximum(capacity, 0.0).reshape(lead)


def rashomon_capacity(probs: jax.Array, *, tol: float = 1e-12, max_iterations: int = 1000) -> np.ndarray:
    """2^{capacity} of the channel m -> class at each point: (N,) in [1, C]."""
    _check(probs)
    capacity = channel_capacity_bits(np.swapaxes(np.asarray(probs), 0, 1), tol=tol, max_iterations=max_iterations)
    return np.clip(2.0 ** capacity, 1.0, probs.shape[-1])


METRICS = ("ambiguity", "discrepancy", "vpr", "score_variance", "rashomon_capacity")


def summarize(probs: jax.Array, labels: jax.Array, reference_pred: jax.Array) -> dict[str, float]:
    """Every metric above over one set, per-point ones averaged over the N points, plus the set's
    size and its models' mean accuracy."""
    probs, labels, reference_pred = jnp.asarray(probs), jnp.asarray(labels), jnp.asarray(reference_pred)
    return {
        "ambiguity": ambiguity(probs, reference_pred),
        "discrepancy": discrepancy(probs, reference_pred),
        "vpr": float(jnp.mean(viable_prediction_range(probs, labels))),
        "score_variance": float(jnp.mean(score_variance(probs, labels))),
        "rashomon_capacity": float(np.mean(rashomon_capacity(probs))),
        "num_models": int(probs.shape[0]),
        "accuracy": float(jnp.mean(jnp.argmax(probs, -1) == labels[None])),
    }
