"""Train/eval steps: accumulation, masking of uneven batches, parameter subsets, bf16, resume."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from research.core.checkpoint import Checkpointer, CheckpointMismatchError
from research.core.loop import fit, mean_metrics
from research.core.mesh import make_mesh, shard_batch
from research.core.records import MetricWriter
from research.core.train import (classification_loss, create_train_state, jit_eval_step, jit_train_step,
                                 make_eval_step, make_train_step, place_on_mesh)
from research.data import pipeline
from research.data.augment import make_preprocess
from research.models import build_model
from research.models.filters import param_filter

MESH = None


def mesh():
    global MESH
    MESH = MESH or make_mesh({"data": 1, "model": 1}, jax.devices()[:1])
    return MESH


def data(n=64, shape=(8, 8, 1), seed=0):
    rng = np.random.default_rng(seed)
    return pipeline.ImageArrays(rng.integers(0, 256, (n,) + shape, dtype=np.uint8),
                                rng.integers(0, 10, n).astype(np.int32), tuple(map(str, range(10))))


def setup(model_name="mlp", trainable="all", accum=1, dtype=jnp.float32, tx=None, seed=0):
    model = build_model(model_name, num_classes=10, input_shape=(8, 8, 1), rngs=nnx.Rngs(seed), dtype=dtype,
                        **({"hidden_sizes": (16,)} if model_name == "mlp" else {}))
    tx = tx or optax.sgd(0.1, momentum=0.9)
    defs, state = create_train_state(model, tx, param_filter(model, trainable), seed)
    state, shardings = place_on_mesh(state, mesh())
    train_loss, eval_loss = classification_loss(make_preprocess([0.5], [0.25], dtype=dtype))
    step = jit_train_step(make_train_step(defs, tx, train_loss, accum), shardings, mesh())
    evaluate = jit_eval_step(make_eval_step(defs, eval_loss), shardings, mesh())
    return state, step, evaluate


def test_gradient_accumulation_equals_one_big_batch():
    d = data()
    batch = pipeline.train_batch(d, 32, 0, 0)
    s1, step1, _ = setup(accum=1)
    s4, step4, _ = setup(accum=4)
    a, ma = step1(s1, shard_batch(batch, mesh()))
    b, mb = step4(s4, shard_batch(batch, mesh()))
    np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-5)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_eval_metrics_do_not_depend_on_batch_size_with_uneven_last_batch():
    d = data(n=53)
    state, _, evaluate = setup()
    results = []
    for batch_size in (7, 16, 53, 64):
        total = None
        for batch in pipeline.eval_batches(d, batch_size):
            sums = evaluate(state, shard_batch(batch, mesh()))
            total = sums if total is None else jax.tree.map(jnp.add, total, sums)
        assert float(total["count"]) == 53
        results.append(mean_metrics(jax.device_get(total)))
    for r in results[1:]:
        np.testing.assert_allclose(r["loss"], results[0]["loss"], rtol=1e-5)
        assert r["accuracy"] == results[0]["accuracy"]


def test_only_the_chosen_subset_changes():
    state, step, _ = setup("resnet20", trainable="head")
    before = jax.device_get(state)
    after, _ = step(state, shard_batch(pipeline.train_batch(data(), 32, 0, 0), mesh()))
    after = jax.device_get(after)
    head_paths = [p for p, _ in nnx.to_flat_state(before.params)]
    assert head_paths and all("head" in p for p in head_paths)
    for a, b in zip(jax.tree.leaves(before.params), jax.tree.leaves(after.params), strict=True):
        assert not np.allclose(a, b)
    for a, b in zip(jax.tree.leaves(before.frozen), jax.tree.leaves(after.frozen), strict=True):
        np.testing.assert_array_equal(a, b)
    # BatchNorm running statistics still update in train mode.
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(before.rest), jax.tree.leaves(after.rest), strict=True))


def test_bfloat16_compute_keeps_float32_params_and_tracks_float32_loss():
    state32, step32, _ = setup("resnet20")
    state16, step16, _ = setup("resnet20", dtype=jnp.bfloat16)
    batch = shard_batch(pipeline.train_batch(data(), 32, 0, 0), mesh())
    new16, m16 = step16(state16, batch)
    _, m32 = step32(state32, batch)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new16.params))
    assert np.isfinite(m16["loss"])
    np.testing.assert_allclose(m16["loss"], m32["loss"], rtol=0.05)


def _fit(workdir, total, stop_after=None, checkpoint_every=3):
    d = data()
    state, step, _ = setup("resnet20")
    ckpt = Checkpointer(workdir, checkpoint_every) if workdir else None
    state, train_metrics, _ = fit(state, step, lambda s: pipeline.train_batch(d, 16, 0, s), total, mesh=mesh(),
                                  writer=MetricWriter(None), checkpointer=ckpt, log_every=2, progress=False,
                                  stop_after=stop_after)
    if ckpt:
        ckpt.close()
    return jax.device_get(state)


def test_interrupted_and_resumed_run_equals_uninterrupted_run(tmp_path):
    straight = _fit(None, 7)
    first = _fit(str(tmp_path / "ckpt"), 7, stop_after=4)  # "killed" after 4 steps (checkpointed at 3 and 4)
    assert int(first.step) == 4
    resumed = _fit(str(tmp_path / "ckpt"), 7)  # a new process would start from a fresh state like this
    assert int(resumed.step) == 7
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)


def test_checkpoint_of_another_model_fails_with_the_array_and_shapes(tmp_path):
    state, _, _ = setup("mlp")
    ckpt = Checkpointer(str(tmp_path), 1)
    ckpt.save(0, state, force=True)
    ckpt.wait()
    other = create_train_state(build_model("mlp", num_classes=10, input_shape=(8, 8, 1), rngs=nnx.Rngs(0),
                                           hidden_sizes=(32,)), optax.sgd(0.1, momentum=0.9))[1]
    with pytest.raises(CheckpointMismatchError, match=r"array 'params/\S+' has shape \(\d+, \d+\), this run's model expects \(\d+, \d+\)"):
        ckpt.restore(other)


def test_time_budgets_call_back_at_each_mark_count_steps_only_and_end_the_run():
    import time

    import flax

    @flax.struct.dataclass
    class Counter:
        step: jax.Array

    def slow_step(state, batch):
        time.sleep(0.02)
        return Counter(state.step + 1), {"loss": jnp.float32(1.0), "count": jnp.float32(1.0)}

    calls = []

    def on_budget(state, step, seconds):
        calls.append((step, seconds, int(state.step)))
        time.sleep(1.0)  # an evaluation: longer than the gap between the marks, so were it counted
        #                  the second mark would fall on the very next step

    # The marks are 0.7 s apart (35 steps of 0.02 s) so that a step slowed by a loaded machine
    # cannot cross both at once.
    state, _, _ = fit(Counter(jnp.zeros((), jnp.int32)), slow_step, lambda s: {"x": np.zeros((8, 1), np.float32)},
                      1000, mesh=mesh(), writer=MetricWriter(None), log_every=5, progress=False,
                      time_budgets=(0.3, 1.0), on_budget=on_budget)
    assert len(calls) == 2, calls
    assert [c[0] for c in calls] == [c[2] for c in calls]                    # called with that step's state
    assert calls[0][1] >= 0.3 and calls[1][1] >= 1.0
    assert calls[1][0] - calls[0][0] >= 3                                    # the evaluation's 1 s did not count
    assert int(state.step) == calls[-1][0] < 1000                           # the last mark ends the run
    with pytest.raises(ValueError, match="time_budgets"):
        fit(state, slow_step, lambda s: {}, 10, mesh=mesh(), writer=MetricWriter(None), time_budgets=(2, 1))


def test_a_non_finite_loss_stops_the_run_before_it_is_saved_and_the_last_good_checkpoint_is_kept(tmp_path):
    import flax

    from research.core.loop import NonFiniteLossError

    @flax.struct.dataclass
    class Counter:
        step: jax.Array
        w: jax.Array

    def step_fn(state, batch):  # the loss turns NaN at step 5 (0-based step 4)
        loss = jnp.where(state.step == 4, jnp.nan, 1.0)
        return Counter(state.step + 1, state.w + loss), {"loss": loss, "count": jnp.float32(1.0)}

    ckpt = Checkpointer(str(tmp_path), 3)
    start = Counter(jnp.zeros((), jnp.int32), jnp.zeros(()))
    with pytest.raises(NonFiniteLossError, match=r"the training loss was nan over steps 4-6; stopped before saving: "
                                                 r"the last checkpoint, step 3, is kept"):
        fit(start, step_fn, lambda s: {}, 10, mesh=mesh(), writer=MetricWriter(None), checkpointer=ckpt, log_every=100,
            progress=False)
    ckpt.wait()
    assert ckpt.latest_step() == 3 and bool(jnp.isfinite(ckpt.restore(start).w))


def _damage(step_dir: str, how: str) -> None:
    """Damages a checkpoint step folder as a kill during a copy (every file truncated), a bad disk
    (bytes flipped in the largest file, the array data) or an interrupted metadata write would."""
    import os

    files = [os.path.join(root, name) for root, _, names in os.walk(step_dir) for name in names]
    if how == "truncated":
        for path in files:
            with open(path, "r+b") as f:
                f.truncate(max(os.path.getsize(path) // 2 - 1, 0))
    elif how == "flipped":
        path = max(files, key=os.path.getsize)
        data = bytearray(open(path, "rb").read())
        middle = len(data) // 2
        data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
        open(path, "wb").write(bytes(data))
    else:
        metadata = [path for path in files if os.path.basename(path) == "_METADATA"]
        assert metadata
        for path in metadata:
            open(path, "w").close()


@pytest.mark.parametrize("how", ["truncated", "flipped", "empty_metadata"])
def test_a_damaged_latest_checkpoint_is_moved_aside_a_killed_save_cleared_and_the_run_resumes_from_the_step_before(
        tmp_path, capsys, how):
    import os

    from research.core.checkpoint import CheckpointDamagedError

    directory = str(tmp_path / "ckpt")
    _fit(directory, 6)  # checkpoints at steps 3 (every 3) and 6 (the end); keep 2
    _damage(os.path.join(directory, "6"), how)
    os.makedirs(os.path.join(directory, "9.orbax-checkpoint-tmp-1765000000"))  # what a save killed half-way leaves
    resumed = _fit(directory, 7)
    assert int(resumed.step) == 7 and not [n for n in os.listdir(directory) if "tmp" in n]
    assert "checkpoint step 6" in capsys.readouterr().err and os.path.isdir(os.path.join(directory, "damaged-6"))
    straight = _fit(None, 7)  # steps 4-7 were trained again from step 3: the same weights as a run never stopped
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    if how != "truncated":
        return
    for step in [name for name in os.listdir(directory) if name.isdigit()]:  # only unreadable steps are left
        os.rename(os.path.join(directory, step), os.path.join(directory, f"elsewhere-{step}"))
    os.makedirs(os.path.join(directory, "9"))
    with pytest.raises(CheckpointDamagedError, match="no checkpoint under .* can be read"):
        _fit(directory, 10)


def test_sigterm_checkpoints_the_step_in_flight_and_the_rerun_resumes_there(tmp_path):
    import os
    import signal

    import flax

    from research.core.loop import Preempted

    @flax.struct.dataclass
    class Counter:
        step: jax.Array

    def step_fn(state, batch):
        if int(state.step) == 4:  # the VM is being preempted during step 5
            os.kill(os.getpid(), signal.SIGTERM)
        return Counter(state.step + 1), {"loss": jnp.float32(1.0), "count": jnp.float32(1.0)}

    def run():
        ckpt = Checkpointer(str(tmp_path), 100)  # no save is due before the end
        try:
            return fit(Counter(jnp.zeros((), jnp.int32)), step_fn, lambda s: {}, 20, mesh=mesh(),
                       writer=MetricWriter(None), checkpointer=ckpt, log_every=100, progress=False)[0]
        finally:
            ckpt.close()
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted, match="stopped by SIGTERM after step 5; its checkpoint is saved") as stopped:
        run()
    assert stopped.value.step == 5 and signal.getsignal(signal.SIGTERM) is before  # the loop's handler is gone
    assert int(run().step) == 20  # resumed at step 5 (no second SIGTERM: step 4 is not run again)


def _nan_setup():
    """A linear model whose loss is scaled by the batch's ``scale`` (NaN poisons a batch)."""
    model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
    tx = optax.adam(0.1)
    defs, state = create_train_state(model, tx)

    def loss_fn(m, batch, rng):
        loss = jnp.sum((m(batch["x"])[:, 0] - 1.0) ** 2) * batch["scale"][0]
        return loss, {"loss": loss, "count": jnp.float32(batch["x"].shape[0])}

    return state, jax.jit(make_train_step(defs, tx, loss_fn))


def _batch(scale):
    return {"x": jnp.ones((4, 3)), "scale": jnp.full((4,), scale, jnp.float32)}


def test_a_non_finite_step_is_skipped_leaving_the_state_and_counting_one_skip():
    state, step = _nan_setup()
    after, sums = step(state, _batch(jnp.nan))
    assert int(after.step) == 1 and float(sums["skipped_steps"]) == 1.0 and float(sums["loss"]) == 0.0
    for a, b in zip(jax.tree.leaves((after.params, after.opt_state)), jax.tree.leaves((state.params, state.opt_state))):
        np.testing.assert_array_equal(a, b)
    again, sums = step(after, _batch(1.0))
    assert float(sums["skipped_steps"]) == 0.0 and float(sums["last_finite_step"]) == 2.0
    assert not np.array_equal(again.params["kernel"].value if hasattr(again.params["kernel"], "value")
                              else again.params["kernel"], after.params["kernel"])


def test_one_nan_batch_ends_finite_with_a_skip_count_of_one_and_a_nan_stream_stops_with_one_line(tmp_path):
    from research.core.loop import NonFiniteLossError

    state, step = _nan_setup()
    final, metrics, _ = fit(state, step, lambda s: _batch(jnp.nan if s == 2 else 1.0), 8, mesh=mesh(),
                            writer=MetricWriter(None), log_every=4, progress=False)
    assert metrics["train/skipped_steps"] == 1.0 and all(np.isfinite(x).all() for x in jax.tree.leaves(final))
    state, step = _nan_setup()
    ckpt = Checkpointer(str(tmp_path), 2)
    # Checkpoints of skipped steps hold the state of step 2 (finite): the last one, step 10, is kept.
    with pytest.raises(NonFiniteLossError, match=r"steps 3-12 all had a non-finite loss .* the last checkpoint, step 10, "
                                                 r"is kept"):
        fit(state, step, lambda s: _batch(jnp.nan if s >= 2 else 1.0), 100, mesh=mesh(), writer=MetricWriter(None),
            checkpointer=ckpt, log_every=4, progress=False, max_skipped_steps=10)
    ckpt.wait()
    restored = ckpt.restore(state)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored))
