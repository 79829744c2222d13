"""The training loop: resume, step, log, evaluate, checkpoint, with a progress bar.

The loop knows nothing of the task: it is handed a jitted step, a function that returns the host
batch of a given step (so resuming needs no iterator state), and an evaluation function.
Metric sums stay on the device between log steps, so the loop does not wait on every step.

A non-finite training loss, or a non-finite number in the state about to be checkpointed, stops
the run with `NonFiniteLossError` before anything of it is saved: the checkpoints on disk stay the
last good ones, and a rerun (with a lower learning rate, gradient clipping, other data) resumes
from them. SIGTERM (what a preempted cloud VM receives some seconds before it is stopped) ends the
run after the step in flight (several processes: at the step JAX's preemption sync agrees on): the
state is checkpointed and `Preempted` raised, which the command line turns into exit status 75
(EX_TEMPFAIL: run the same command again to resume).
"""
from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from research.core.checkpoint import Checkpointer
from research.core.config import ConfigError
from research.core.mesh import shard_batch
from research.core.records import MetricWriter
from research.core.train import LAST_FINITE_STEP, SKIPPED


class NonFiniteLossError(ConfigError):
    """Training produced a non-finite loss or state; the message is one line naming the steps."""


@jax.jit
def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _accumulate(window: dict, sums: dict) -> dict:
    """Metric sums over a log window: added, except the last finite step, which keeps its maximum."""
    return {k: (jnp.maximum if k == LAST_FINITE_STEP else jnp.add)(window[k], v) for k, v in sums.items()}


def _check_finite(window, state, first: int, last: int, saved: int | None, what: str) -> None:
    """A `NonFiniteLossError` when the loss summed since the last log (``window``; finite up to step
    ``first`` - 1) or the ``state`` holds a non-finite number; ``saved``: the last step on disk."""
    loss = float(window["loss"]) if window is not None and "loss" in window else 0.0
    if np.isfinite(loss) and (state is None or bool(_all_finite(state))):
        return
    where = f"the training loss was {loss} over steps {first}-{last}" if not np.isfinite(loss) else \
        f"the state after step {last} holds a non-finite number (the loss was finite)"
    kept = f"the last checkpoint, step {saved}, is kept and a rerun resumes from it" if saved else "nothing was saved"
    raise NonFiniteLossError(f"{where}; stopped before {what}: {kept}. Lower optim.lr, set optim.grad_clip_norm, "
                             f"or check the data")


class Preempted(Exception):
    """SIGTERM ended the run after ``step``; its state is checkpointed there."""

    def __init__(self, step: int, saved: bool):
        super().__init__(f"stopped by SIGTERM after step {step}; " + (
            "its checkpoint is saved: run the same command again to resume" if saved else "no checkpointer: not saved"))
        self.step, self.saved = step, saved


@contextlib.contextmanager
def preemption_notice():
    """A function ``preempted(step) -> bool`` for the block: whether to checkpoint ``step`` and stop.

    One process: True once SIGTERM arrived (a handler that only sets a flag; the previous handler is
    restored after). Several processes: JAX's preemption sync point, which its coordination service
    raises on every process once any of them got SIGTERM, at the same step everywhere (a Python
    handler would replace JAX's own). Outside the main thread: never."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        def synced(step: int) -> bool:
            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except Exception:  # noqa: BLE001 - no preemption service (jax_enable_preemption_service off)
                return False
        yield synced
        return
    flag = [False]
    if threading.current_thread() is not threading.main_thread():
        yield lambda step: False
        return

    def handler(signum, frame):
        flag[0] = True
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield lambda step: flag[0]
    finally:
        signal.signal(signal.SIGTERM, previous)


def mean_metrics(sums: Mapping[str, float], prefix: str = "") -> dict[str, float]:
    """{"loss": s, "correct": c, "count": n, ...} -> {"loss": s/n, "accuracy": c/n, ...}."""
    sums = {k: float(v) for k, v in sums.items()}
    count = max(sums.get("count", 1.0), 1.0)
    out = {}
    for key, value in sums.items():
        if key == "count":
            continue
        name = "accuracy" if key == "correct" else key
        out[prefix + name] = value / count
    return out


def evaluate(eval_step: Callable, state, batches: Iterable[dict], mesh: Mesh, prefix: str = "") -> dict[str, float]:
    """Means of the metric sums of `eval_step(state, batch)` over `batches` (padding masked)."""
    total = None
    for batch in batches:
        sums = eval_step(state, shard_batch(batch, mesh))
        total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    return mean_metrics(jax.device_get(total), prefix)


def fit(state, train_step: Callable, next_batch: Callable[[int], dict], total_steps: int, *, mesh: Mesh,
        writer: MetricWriter, evaluate: Callable[[object], dict[str, float]] | None = None,
        checkpointer: Checkpointer | None = None, learning_rate: Callable[[int], float] | None = None,
        log_every: int = 50, eval_every: int = 0, progress: bool = True, stop_after: int | None = None,
        time_budgets: Sequence[float] = (), on_budget: Callable[[object, int, float], None] | None = None,
        max_skipped_steps: int = 10):
    """Trains from the latest checkpoint (or `state`) to `total_steps`.

    A step the train step skipped for a non-finite loss or gradient (``research.core.train``:
    the state is left as it was) is counted in ``train/skipped_steps``; once ``max_skipped_steps``
    steps in a row were skipped (read at log and checkpoint steps, so without a host sync per step)
    the run stops with `NonFiniteLossError`.

    `stop_after` ends the loop early after that many steps in this call (to simulate or schedule
    an interruption) after checkpointing. `time_budgets` (seconds, increasing) are marks on this
    call's training time, which counts the steps alone (each step is waited for; evaluation,
    checkpoints and callbacks do not count): at the first step that reaches each mark,
    `on_budget(state, step, seconds)` is called, and the loop ends (after checkpointing) at the
    last mark. Returns (state, last train metrics, last eval metrics).
    """
    budgets = list(time_budgets)
    if budgets != sorted(budgets) or any(b <= 0 for b in budgets):
        raise ValueError(f"time_budgets must be positive and increasing, got {budgets}")
    if checkpointer is not None and checkpointer.latest_step() is not None:
        state = checkpointer.restore(state)
    start = int(jax.device_get(state.step))
    end = total_steps if stop_after is None else min(total_steps, start + stop_after)
    saved = checkpointer.latest_step() if checkpointer is not None else None  # the last step on disk
    checked = start  # the loss is known finite up to this step
    train_metrics: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    window, window_start = None, time.perf_counter()
    train_seconds = 0.0
    skipped, last_finite = 0, start  # steps skipped so far; the last step that updated the state
    bar = tqdm(total=total_steps, initial=start, disable=not progress or jax.process_index() != 0,
               desc="train", unit="step", dynamic_ncols=True, mininterval=2.0)
    with preemption_notice() as preempted:
        for step in range(start, end):
            step_start = time.perf_counter()
            batch = shard_batch(next_batch(step), mesh)
            state, sums = train_step(state, batch)
            if budgets:
                jax.block_until_ready(sums)
                train_seconds += time.perf_counter() - step_start
            window = sums if window is None else _accumulate(window, sums)
            done = step + 1
            if budgets and train_seconds >= budgets[0]:
                while budgets and train_seconds >= budgets[0]:
                    budgets.pop(0)
                if on_budget is not None:
                    paused = time.perf_counter()
                    on_budget(state, done, train_seconds)
                    window_start += time.perf_counter() - paused  # the throughput figure counts steps only
                if not budgets:
                    end = done  # the last budget ends the run
            saving = checkpointer is not None and checkpointer.due(done, force=done == end)
            if done % log_every == 0 or done == end or saving:
                window = jax.device_get(window)
                if SKIPPED in window:  # read once: the window may go on to the next log step
                    skipped += int(window[SKIPPED])
                    last_finite = max(last_finite, int(window[LAST_FINITE_STEP]))
                    window = dict(window, **{SKIPPED: np.float32(0.0)})
                    if done - last_finite >= max_skipped_steps:
                        kept = f"the last checkpoint, step {saved}, is kept" if saved else "nothing was saved"
                        raise NonFiniteLossError(
                            f"steps {last_finite + 1}-{done} all had a non-finite loss or gradient and were skipped "
                            f"(the limit is {max_skipped_steps} in a row); {kept}. Lower optim.lr, set "
                            f"optim.grad_clip_norm, or check the data")
                _check_finite(window, state if saving else None, checked + 1, done, saved, "saving" if saving else
                              "logging")
                checked = done
            if done % log_every == 0 or done == end:
                train_metrics = mean_metrics({k: v for k, v in window.items() if k not in (SKIPPED, LAST_FINITE_STEP)},
                                             "train/")
                if skipped:
                    train_metrics["train/skipped_steps"] = float(skipped)
                seconds = time.perf_counter() - window_start
                train_metrics["train/examples_per_s"] = float(window["count"]) / max(seconds, 1e-9)
                if learning_rate is not None:
                    train_metrics["train/lr"] = float(learning_rate(step))
                writer.scalars(done, train_metrics)
                bar.set_postfix(loss=f"{train_metrics['train/loss']:.4f}", refresh=False)
                window, window_start = None, time.perf_counter()
            if evaluate is not None and ((eval_every and done % eval_every == 0) or done == total_steps):
                eval_metrics = evaluate(state)
                writer.scalars(done, eval_metrics)
                writer.flush()
            if saving and checkpointer.save(done, state, force=done == end):
                saved = done
            bar.update(1)
            if preempted(done) and done < end:  # SIGTERM: this step's state becomes the checkpoint, then stop
                if checkpointer is not None:
                    if saved != done:
                        window = jax.device_get(window) if window is not None else None
                        _check_finite(window, state, checked + 1, done, saved, "saving")
                        checkpointer.save(done, state, force=True)
                    checkpointer.wait()
                writer.flush()
                bar.close()
                raise Preempted(done, checkpointer is not None)
            if done == end:
                break
    bar.close()
    if evaluate is not None and start >= total_steps:  # resumed a finished run: report it again
        eval_metrics = evaluate(state)
    if checkpointer is not None:
        checkpointer.wait()
    writer.flush()
    return state, train_metrics, eval_metrics
