"""Held-out evaluation of a language model on token windows: perplexity and top-1 agreement.

windows (N, T + 1) int: inputs are window[:, :-1], labels window[:, 1:]. Perplexity is
exp(total NLL / total tokens) over all windows; agreement is the fraction of positions where the
model's argmax equals a reference model's (e.g. the teacher's). ``lm_metrics_by_source`` does the
same per source of a mix of held-out texts and reports their unweighted means.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.distill.kd import language_model_metrics


@functools.partial(jax.jit, static_argnames="graphdef")
def _sums(graphdef, state, inputs, labels, reference_top1):
    logits, _ = nnx.merge(graphdef, state)(inputs)
    sums = language_model_metrics(logits, labels, jnp.ones(labels.shape))
    sums["agree"] = jnp.sum((jnp.argmax(logits, -1) == reference_top1).astype(jnp.float32))
    return sums


@functools.partial(jax.jit, static_argnames="graphdef")
def _top1(graphdef, state, inputs):
    logits, _ = nnx.merge(graphdef, state)(inputs)
    return jnp.argmax(logits, -1)


def _batches(windows: np.ndarray, batch_size: int):
    for start in range(0, len(windows), batch_size):
        yield windows[start:start + batch_size]


def top1_predictions(model: nnx.Module, windows: np.ndarray, batch_size: int) -> np.ndarray:
    """(N, T) argmax next-token predictions of ``model``."""
    graphdef, state = nnx.split(model)
    return np.concatenate([np.asarray(_top1(graphdef, state, jnp.asarray(w[:, :-1])))
                           for w in _batches(windows, batch_size)])


def lm_metrics(model: nnx.Module, windows: np.ndarray, batch_size: int,
               reference_top1: np.ndarray | None = None) -> dict[str, float]:
    """{"ppl", "nll", "tokens"} and, given a reference's (N, T) predictions, "top1_agreement"."""
    graphdef, state = nnx.split(model)
    reference = np.full(windows[:, 1:].shape, -1) if reference_top1 is None else reference_top1
    total = None
    for start in range(0, len(windows), batch_size):
        w = windows[start:start + batch_size]
        sums = _sums(graphdef, state, jnp.asarray(w[:, :-1]), jnp.asarray(w[:, 1:]),
                     jnp.asarray(reference[start:start + batch_size]))
        total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    total = {k: float(v) for k, v in jax.device_get(total).items()}
    out = {"nll": total["nll"] / total["count"], "tokens": int(total["count"])}
    out["ppl"] = float(np.exp(out["nll"]))
    if reference_top1 is not None:
        out["top1_agreement"] = total["agree"] / total["count"]
    return out


def lm_metrics_by_source(model: nnx.Module, heldout: Mapping[str, np.ndarray], batch_size: int,
                         reference_top1: Mapping[str, np.ndarray] | None = None) -> dict:
    """``lm_metrics`` per held-out source and their unweighted means:
    {"ppl": mean_s ppl_s, "top1_agreement": mean_s agreement_s (given references), "sources": {s: ...}}."""
    per = {name: lm_metrics(model, windows, batch_size, None if reference_top1 is None else reference_top1[name])
           for name, windows in heldout.items()}
    out = {"ppl": float(np.mean([m["ppl"] for m in per.values()])), "sources": per}
    if reference_top1 is not None:
        out["top1_agreement"] = float(np.mean([m["top1_agreement"] for m in per.values()]))
    return out
