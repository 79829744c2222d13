"""Layer-wise reconstruction of upcycled attention layers, before end-to-end distillation.

Each MLA layer l of the student is fitted, alone, to the attention output of the teacher's layer
l on the teacher's own inputs (calibration windows):

    min_theta  sum ||MLA_theta(X_l) - GQA_l(X_l)||^2 / sum ||GQA_l(X_l)||^2,    X_l = RMSNorm(h_l)

where h_l is the teacher's residual stream entering layer l (``inputs="teacher"``: the layers
are independent). With ``inputs="student"`` the layers are fitted in order, each on the student's
own residual stream h^S_l (through the layers already fitted before it), to the output that puts
the student's residual back on the teacher's after attention:

    min  sum ||MLA(RMSNorm(h^S_l)) - (h_l + GQA_l(X_l) - h^S_l)||^2 / sum ||...||^2

so that each layer also absorbs what the layers before it got wrong (where it can). Only one
layer's parameters are trained at a time, so the cost is a few hundred small steps per layer (no
vocabulary projection, no model-depth backward pass). Adam runs ``steps`` local steps on minibatches of the fitting windows; the error is
measured on held-out calibration windows before training and every ``eval_every`` steps, and the
parameters with the lowest held-out error are kept: the layer's held-out error never increases.
(The same local objective as GPTQ-style layer-wise compression, here with gradient steps because
the attention output is nonlinear in the MLA weights.)
"""
from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from research.attention.ops import attention_ops
from research.upcycling.upcycle import layer_io
from research.core import config as config_lib

if TYPE_CHECKING:
    from research.models.llama import Llama


@dataclasses.dataclass(frozen=True)
class ReconstructConfig:
    """Local fitting of each MLA layer (the ``reconstruct`` section of configs/x_ecomla.py)."""
    steps: int = 0                 # Adam steps per MLA layer; 0 = no reconstruction
    lr: float = 3e-4               # peak learning rate (cosine decay over ``steps``)
    windows: int = 64              # calibration windows (training windows, seq_len tokens each)
    heldout_windows: int = 8       # of those, kept out of fitting to measure the error
    batch_windows: int = 8         # windows per step
    trainable: Literal["kv", "attention"] = "attention"   # kv: W_kva and W_kvb only
    inputs: Literal["teacher", "student"] = "teacher"     # student: in order, correcting earlier layers
    eval_every: int = 50

    def __post_init__(self):
        config_lib.check_fields(self)
        config_lib.require(self, "steps", self.steps >= 0, "an int >= 0 (0 = none)")
        config_lib.require(self, "lr", self.lr > 0, "> 0")
        config_lib.require(self, "heldout_windows", 1 <= self.heldout_windows < self.windows,
                           f"an int in [1, windows={self.windows})")
        config_lib.require(self, "batch_windows", self.batch_windows >= 1, "a positive int")
        config_lib.require(self, "eval_every", self.eval_every >= 1, "a positive int")


def _layer_runner(segment, ops, positions):
    """f(j, h) -> (layer j of the stacked ``segment`` applied to h, its normed attention input)."""
    graphdef, state = nnx.split(segment)

    @jax.jit
    def run(layer_state, h):
        layer = nnx.merge(graphdef, layer_state)
        return layer(h, positions, None, ops)[0], layer.attn_norm(h)

    return lambda j, h: run(jax.tree.map(lambda v: v[j], nnx.state(segment)), h)


def _trainable(cfg: ReconstructConfig):
    if cfg.trainable == "kv":
        return lambda path, value: isinstance(value, nnx.Param) and path[0] in ("kv_a", "kv_b")
    return nnx.Param


def _layer_fitter(graphdef, cfg: ReconstructConfig, ops):
    """fit(params, rest, x, y, rng) -> (best params, held-out error before, after) for the attention
    layers of one segment: params (trained) and rest (fixed) of a layer's state, x, y (N, T, D).
    The step and the error are jitted once here, with the layer's weights as arguments, so every
    layer of the segment reuses one compiled program."""
    tx = optax.adam(optax.cosine_decay_schedule(cfg.lr, cfg.steps))

    def error(p, rest, xb, yb):
        positions = jnp.broadcast_to(jnp.arange(xb.shape[1]), xb.shape[:2])
        out, _ = nnx.merge(graphdef, p, rest)(xb, positions, None, ops)
        return jnp.sum((out.astype(jnp.float32) - yb) ** 2) / jnp.sum(yb ** 2)

    @jax.jit
    def step(p, rest, opt_state, xb, yb):
        loss, grads = jax.value_and_grad(error)(p, rest, xb, yb)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    heldout = jax.jit(error)

    def fit(params, rest, x, y, rng: np.random.Generator):
        fit_x, fit_y = x[:-cfg.heldout_windows], y[:-cfg.heldout_windows]
        val_x, val_y = jnp.asarray(x[-cfg.heldout_windows:]), jnp.asarray(y[-cfg.heldout_windows:])
        best, best_error = params, float(heldout(params, rest, val_x, val_y))
        before = best_error
        opt_state = tx.init(params)
        n = len(fit_x)
        for i in range(cfg.steps):
            rows = rng.choice(n, min(cfg.batch_windows, n), replace=False)
            params, opt_state, _ = step(params, rest, opt_state, jnp.asarray(fit_x[rows]), jnp.asarray(fit_y[rows]))
            if (i + 1) % cfg.eval_every == 0 or i + 1 == cfg.steps:
                e = float(heldout(params, rest, val_x, val_y))
                if e < best_error:  # keep the best: the held-out error never increases
                    best, best_error = params, e
        return best, before, best_error

    return fit


def reconstruct_layers(teacher: Llama, student: Llama, tokens: np.ndarray, cfg: ReconstructConfig, *,
                       seed: int = 0, progress: bool = True) -> dict:
    """Fits every MLA layer of ``student`` (in place) to ``teacher``'s attention outputs.

    tokens (cfg.windows, T) int: calibration windows (the last ``heldout_windows`` only measure).
    GQA layers of a hybrid student are left as they are. Returns a report with per-layer held-out
    relative errors before and after ("error_before", "error_after"; None for GQA layers) and the
    seconds spent."""
    if len(tokens) != cfg.windows:
        raise ValueError(f"reconstruct: expected {cfg.windows} calibration windows, got {len(tokens)}")
    start = time.perf_counter()
    inputs, outputs, residuals = layer_io(teacher, np.asarray(tokens))
    ops = attention_ops(student.config.attention_impl)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    sequential = cfg.inputs == "student"
    h = student.embed(jnp.asarray(tokens)) if sequential else None   # the student's residual stream
    rng = np.random.default_rng(seed)
    before, after = [None] * len(student.layer_kinds), [None] * len(student.layer_kinds)
    first = 0
    bar = tqdm(total=student.layer_kinds.count("mla"), desc="reconstruct", unit="layer", disable=not progress,
               dynamic_ncols=True)
    for segment, size in zip(student.segments, student.segment_sizes()):
        mla = student.layer_kinds[first] == "mla"
        run = _layer_runner(segment, ops, positions) if sequential else None
        fit = _layer_fitter(nnx.graphdef(segment.attn), cfg, ops) if mla else None
        for j in range(size):
            layer = first + j
            if mla:
                x, y = inputs[layer], outputs[layer]
                if sequential:
                    x = np.asarray(run(j, h)[1], np.float32)
                    y = residuals[layer] + outputs[layer] - np.asarray(h, np.float32)
                _, params, rest = nnx.split(segment.attn, _trainable(cfg), ...)
                p, r = (jax.tree.map(lambda v: v[j], s) for s in (params, rest))
                p, before[layer], after[layer] = fit(p, r, x, y, rng)
                nnx.update(segment.attn, jax.tree.map(lambda stacked, leaf: stacked.at[j].set(leaf), params, p))
                bar.update(1)
                bar.set_postfix(layer=layer, error=f"{before[layer]:.3f}->{after[layer]:.3f}", refresh=False)
            if sequential:
                h = run(j, h)[0]
        first += size
    bar.close()
    return {"error_before": before, "error_after": after, "seconds": time.perf_counter() - start}
