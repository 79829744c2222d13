"""Online-LoRA: one test per fixed reference bug (merge of B A, re-init of the new adapter, a buffer of
samples, per-sample pseudo-labels, train mode after consolidation), the plateau detector, the running
average of Omega, and what a step trains."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research.adapters.lora import lora_filter
from research.adapters.online_lora import (ADAPTER, HardBuffer, OnlineLoRA, OnlineLoraConfig, PlateauDetector,
                                           calibrate_plateau_thresholds, entry_means_sum, evaluate_task,
                                           fisher_importance, ncm_accuracy, plateau_steps, pseudo_labels)
from research.models import build_model

SHAPE, CLASSES = (8, 8, 1), 4
TARGETS = [f"blocks/0/attn/{m}" for m in "qv"]


def tiny_vit(dropout=0.0):
    return build_model("vit_tiny", num_classes=CLASSES, input_shape=SHAPE, rngs=nnx.Rngs(0), depth=1, dropout=dropout)


def learner(dropout=0.0, **config) -> OnlineLoRA:
    # Large steps, so adapters move visibly in a few updates; no automatic plateau (CE is never < 0)
    # unless a test sets thresholds: those tests call consolidate() themselves.
    config = {"lr": 1e-2, "mean_threshold": 0.0, **config}
    return OnlineLoRA(tiny_vit(dropout), OnlineLoraConfig(**config), rngs=nnx.Rngs(1))


def batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return {"images": rng.integers(0, 256, (n, *SHAPE), dtype=np.uint8),
            "labels": rng.integers(0, CLASSES, n).astype(np.int32)}


def flat(state) -> dict[str, np.ndarray]:
    return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def factors(ol: OnlineLoRA) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    a = flat(ol.adapter)
    return {t: (a[f"{t}/lora/{ADAPTER}/a"], a[f"{t}/lora/{ADAPTER}/b"]) for t in TARGETS}


def kernels(ol: OnlineLoRA) -> dict[str, np.ndarray]:
    f = flat(ol.frozen)
    return {t: f[f"{t}/base/kernel"].astype(np.float64) for t in TARGETS}


def train(ol: OnlineLoRA, steps=3, seed=0):
    for i in range(steps):
        ol.step(batch(seed=seed + i))


# --- bug 1: merge the product B A -------------------------------------------------------------------

def test_consolidate_merges_the_product_ba_without_cross_terms():
    ol = learner()
    scale = ol.config.alpha / ol.config.rank
    w0, x = kernels(ol), batch(16, seed=9)["images"]
    merged = {t: w0[t].copy() for t in TARGETS}
    for t_round in range(2):
        train(ol, seed=10 * t_round)
        ab = factors(ol)
        assert all(np.abs(b).max() > 1e-3 for _, b in ab.values())
        before = np.asarray(ol.predict(x))
        ol.consolidate()
        np.testing.assert_allclose(ol.predict(x), before, rtol=0, atol=1e-5)  # the function is unchanged
        for t in TARGETS:
            a, b = (v.astype(np.float64) for v in ab[t])
            merged[t] += scale * a @ b  # kernel (in, out): W0 + sum_t scale A_t B_t
            np.testing.assert_allclose(kernels(ol)[t], merged[t], rtol=0, atol=1e-5, err_msg=t)
        if t_round == 0:
            first = ab
    for t in TARGETS:  # the cross terms a summed-factor merge would add are far above the tolerance
        (a0, b0), (a1, b1) = first[t], ab[t]
        assert np.abs(scale * (a0 @ b1 + a1 @ b0)).max() > 1e-3


def test_reference_switch_merges_summed_factors():
    ol = learner(merge_factors_separately=True)
    w0 = kernels(ol)
    train(ol)
    first = factors(ol)
    ol.consolidate()
    train(ol, seed=10)
    second = factors(ol)
    ol.consolidate()
    for t in TARGETS:
        sum_a, sum_b = (first[t][i].astype(np.float64) + second[t][i] for i in (0, 1))
        np.testing.assert_allclose(kernels(ol)[t], w0[t] + sum_a @ sum_b, rtol=0, atol=1e-5)


# --- bug 2: the new adapter starts with A random, B zero ---------------------------------------------

def test_new_adapter_has_random_a_zero_b_and_b_gets_gradients():
    ol = learner()
    train(ol)
    old = factors(ol)
    ol.consolidate()
    grads = flat(ol.gradients(batch(seed=5))["adapter"])
    for t, (a, b) in factors(ol).items():
        assert np.abs(a).std() > 1e-2 and not np.allclose(a, old[t][0])  # a fresh random draw
        np.testing.assert_array_equal(b, 0.0)
        assert np.abs(grads[f"{t}/lora/{ADAPTER}/b"]).max() > 1e-6, t

    reference = learner(reset_a_to_zero=True)  # the reference's reset: no gradient at all
    train(reference)
    reference.consolidate()
    grads = flat(reference.gradients(batch(seed=5))["adapter"])
    assert all(np.abs(g).max() == 0 for g in grads.values())


# --- bug 3: the buffer holds the hardest individual samples ------------------------------------------

def test_hard_buffer_keeps_the_highest_loss_individual_samples():
    buffer = HardBuffer(4)
    images = np.arange(6 * 8 * 8 * 1, dtype=np.float32).reshape(6, *SHAPE)
    buffer.update(images, np.arange(6), np.array([0.1, 5.0, 0.3, 2.0, 4.0, 0.2]))
    assert len(buffer) == 4 and buffer.images.shape == (4, *SHAPE)
    np.testing.assert_array_equal(buffer.labels, [1, 4, 3, 2])  # by loss, highest first
    np.testing.assert_array_equal(buffer.images, images[[1, 4, 3, 2]])
    # Refreshed buffer losses compete with the new batch: 5.0 -> 0.05 drops out, 4.0 stays.
    buffer.update(images[:2] + 1000, np.array([10, 11]), np.array([3.0, 0.0]),
                  buffer_losses=np.array([0.05, 4.0, 2.0, 0.3]))
    np.testing.assert_array_equal(buffer.labels, [4, 10, 3, 2])
    np.testing.assert_allclose(buffer.losses, [4.0, 3.0, 2.0, 0.3])

    small = HardBuffer(4)  # fewer samples than slots: the rest stays invalid
    small.update(images[:2], np.arange(2), np.array([1.0, 2.0]))
    assert len(small) == 2 and small.valid.tolist() == [True, True, False, False]


def test_hard_buffer_of_batches_keeps_the_whole_batches_of_highest_mean_loss():
    buffer = HardBuffer(2, unit="batches")
    images = np.arange(6 * 2 * 8 * 8, dtype=np.float32).reshape(6, 2, *SHAPE)
    # Batch 0: mean 1.0; batch 1: 3.0 over its one unpadded row (the padded row's 100 never counts).
    buffer.update(images[0], np.array([0, 1]), np.array([0.5, 1.5]))
    buffer.update(images[1], np.array([2, 3]), np.array([3.0, 100.0]), mask=np.array([1.0, 0.0]))
    np.testing.assert_allclose(buffer.losses, [3.0, 1.0])
    np.testing.assert_array_equal(buffer.images, images[[1, 0]])
    buffer.update(images[2], np.array([4, 5]), np.array([2.0, 2.0]))  # mean 2.0 displaces batch 0
    np.testing.assert_array_equal(buffer.labels, [[2, 3], [4, 5]])
    # Refreshed row losses become per-batch means over unpadded rows: batch 1 -> 0.5, batch 2 -> 2.5.
    buffer.update(images[3], np.array([6, 7]), np.array([1.0, 1.0]),
                  buffer_losses=np.array([0.5, 999.0, 2.0, 3.0]))
    np.testing.assert_allclose(buffer.losses, [2.5, 1.0])
    rows = buffer.arrays()
    assert rows["images"].shape == (4, *SHAPE) and rows["weights"].shape == (4, 2)
    np.testing.assert_array_equal(rows["weights"], [[1, 0], [1, 0], [0, 1], [0, 1]])
    # The buffer term: each batch's mean, summed (not one mean over all rows).
    assert float(entry_means_sum(jnp.array([1.0, 3.0, 10.0, 20.0]), rows["weights"])) == pytest.approx(2.0 + 15.0)


def test_a_step_adds_the_sum_of_the_buffer_batches_mean_losses():
    ol = learner(buffer="batches", buffer_size=2)
    first = batch(8, seed=3)
    ol.step(first)
    assert len(ol.buffer) == 1 and ol.buffer.images.shape == (2, 8, *SHAPE)
    logits = np.asarray(ol.predict(first["images"]), np.float64)  # the parameters the next step sees
    expected = -float(np.mean(np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), first["labels"][:, None], -1)))
    assert ol.step(batch(8, seed=4))["buffer_loss"] == pytest.approx(expected, rel=1e-4)
    assert len(ol.buffer) == 2
    ol.consolidate()  # the importance runs over every row of the buffered batches
    assert any(np.abs(o).max() > 0 for o in flat(ol.omega).values())


def test_step_fills_the_buffer_with_the_batch_samples_of_highest_loss():
    ol = learner()
    data = batch(8, seed=3)
    logits = np.asarray(ol.predict(data["images"]), np.float64)  # no dropout: train loss = eval loss
    losses = -np.take_along_axis(jax.nn.log_softmax(logits), data["labels"][:, None], -1)[:, 0]
    ol.step(data)
    hardest = np.argsort(-losses)[:4]
    assert ol.buffer.images.shape == (4, *SHAPE)
    np.testing.assert_array_equal(ol.buffer.images, data["images"][hardest])
    np.testing.assert_allclose(ol.buffer.losses, losses[hardest], rtol=1e-4)


# --- bug 4: per-sample pseudo-labels and per-sample gradients ----------------------------------------

def test_pseudo_labels_are_per_sample():
    logits = jnp.array([[0.0, 5.0, 1.0], [9.0, 0.0, 0.0]])
    assert int(jnp.argmax(logits)) % 3 == 0  # the flattened argmax would label every sample 0
    np.testing.assert_array_equal(pseudo_labels(logits), [1, 0])


def test_importance_is_the_per_sample_fisher_with_per_sample_pseudo_labels():
    ol = learner()
    train(ol)  # B != 0, so A has gradients too
    x = jax.random.uniform(jax.random.key(0), (32, *SHAPE))
    predicted = np.asarray(jnp.argmax(ol.predict(x), -1))
    picked = [int(np.flatnonzero(predicted == c)[0]) for c in np.unique(predicted)][:3]
    picked += [i for i in range(32) if i not in picked][: 4 - len(picked)]
    assert len(set(predicted[picked])) > 1, "need samples with different predictions"
    ol.buffer = HardBuffer(4)
    ol.buffer.update(x[np.array(picked)], np.zeros(4, np.int32), np.arange(4.0, 0.0, -1.0))
    images = ol.buffer.images

    model = ol.model
    model.eval()
    graphdef, theta, others = nnx.split(model, lora_filter(ADAPTER), ...)

    def logits_fn(t, xs):
        return nnx.merge(graphdef, t, others, copy=True)(xs)

    def nll(t, image, label):
        return -jax.nn.log_softmax(logits_fn(t, image[None])[0])[label]

    grad = jax.jit(jax.grad(nll))  # compiled once: op by op, the two loops below took most of a minute
    labels = np.asarray(jnp.argmax(logits_fn(theta, images), -1))
    expected = jax.tree.map(jnp.zeros_like, theta)
    for image, label in zip(images, labels, strict=True):  # a loop of plain jax.grad, one sample each
        g = grad(theta, image, int(label))
        expected = jax.tree.map(lambda e, gi: e + gi ** 2, expected, g)
    got = ol.importance()
    for (path, e), g in zip(flat(expected).items(), flat(got).values(), strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-9, err_msg=path)

    # The reference's one label for all (flattened argmax) gives a different importance.
    one_label = int(jnp.argmax(logits_fn(theta, images))) % CLASSES
    wrong = jax.tree.map(jnp.zeros_like, theta)
    for image in images:
        g = grad(theta, image, one_label)
        wrong = jax.tree.map(lambda e, gi: e + gi ** 2, wrong, g)
    assert max(np.abs(w - e).max() / np.abs(e).max() for w, e in zip(flat(wrong).values(), flat(expected).values(),
                                                                       strict=True)) > 1e-2
    # Invalid buffer slots do not count.
    fisher = jax.jit(fisher_importance, static_argnums=0)
    half = fisher(logits_fn, theta, images, jnp.array([True, True, False, False]))
    first_two = fisher(logits_fn, theta, images[:2], jnp.ones(2, bool))
    for h, f in zip(jax.tree.leaves(half), jax.tree.leaves(first_two), strict=True):
        np.testing.assert_allclose(h, f, rtol=1e-4, atol=1e-12)  # batch shapes differ: float32 summation order


# --- bug 5: train mode after consolidation -----------------------------------------------------------

def test_model_trains_in_train_mode_after_consolidation():
    ol = learner(dropout=0.5)
    train(ol)
    first = ol.importance()  # eval mode: deterministic although dropout is on
    for f, s in zip(jax.tree.leaves(first), jax.tree.leaves(ol.importance()), strict=True):
        np.testing.assert_array_equal(f, s)
    ol.consolidate()
    dropouts = [m for _, m in nnx.iter_graph(ol.model) if isinstance(m, nnx.Dropout)]
    assert dropouts and all(not m.deterministic for m in dropouts)
    data = batch(seed=4)
    logits = np.asarray(ol.predict(data["images"]), np.float64)
    eval_loss = np.mean(-np.take_along_axis(jax.nn.log_softmax(logits), data["labels"][:, None], -1))
    assert abs(ol.step(data)["batch_loss"] - eval_loss) > 1e-3  # dropout active in the training forward


# --- plateau detection ----------------------------------------------------------------------------

def test_plateau_detector_fires_after_a_peak_then_a_low_flat_stretch():
    detector = PlateauDetector(window=5, mean_threshold=6.0, var_threshold=0.1, start_with_peak=False)
    losses = [8.0] * 6 + [12.0] * 3 + [1.0] * 10
    fired = [i for i, loss in enumerate(losses) if detector.update(loss)]
    assert fired == [13]  # the first full window of 1.0s (mean 1 < 6, var 0 < 0.1), once
    assert not detector.peak


def test_plateau_detector_needs_a_peak():
    detector = PlateauDetector(window=5, start_with_peak=False)
    assert not any(detector.update(1.0) for _ in range(20))  # low and flat, but no peak
    detector = PlateauDetector(window=5, start_with_peak=True)  # the start of the stream counts as one
    assert [i for i in range(20) if detector.update(1.0)] == [4]
    detector = PlateauDetector(window=3, start_with_peak=True)
    noisy = [1.0, 3.0, 1.0, 3.0, 1.0, 3.0, 1.0]  # a peak flagged, low mean, but var above the threshold
    assert not any(detector.update(v) for v in noisy)


def test_plateau_level_is_kept_until_the_next_plateau():
    detector = PlateauDetector(window=3, mean_threshold=10.0, var_threshold=1e-4, start_with_peak=True)
    assert [i for i, v in enumerate([1.0, 1.0, 1.0]) if detector.update(v)] == [2]
    assert (detector.last_mean, detector.last_var) == (1.0, 0.0)
    # a slow drift upwards: each window is only a little above the previous one, but the loss leaves
    # the plateau's level, which is what counts; then a new low, flat stretch is the next plateau
    drift = [1.05 + 0.02 * k for k in range(8)]
    assert not any(detector.update(v) for v in drift) and detector.peak
    assert detector.last_mean == 1.0
    fired = [i for i, v in enumerate([0.5] * 4) if detector.update(v)]
    assert fired == [2] and detector.last_mean == 0.5


def task_loss_trace(tasks=5, steps=20, scale=1.0, offset=0.0, seed=0):
    """Each task: a loss that jumps and decays to a noisy floor (what a new task does to the CE)."""
    rng = np.random.default_rng(seed)
    losses = [offset + scale * (2.0 * np.exp(-i / 3) + 0.3 + 0.05 * rng.standard_normal())
              for _ in range(tasks) for i in range(steps)]
    return np.asarray(losses), np.repeat(np.arange(tasks), steps)


def test_calibrated_thresholds_fire_once_per_task_where_the_reference_ones_never_fire():
    losses, segments = task_loss_trace(scale=4.0, offset=6.0)  # a loss scale the reference's 6.0 / 0.1 miss
    assert plateau_steps(losses, 5, 6.0, 0.1) == []
    mean_t, var_t, fires = calibrate_plateau_thresholds(losses, segments, window=5)
    assert plateau_steps(losses, 5, mean_t, var_t) == fires  # the returned steps are the detector's own
    assert sorted(segments[fires]) == [0, 1, 2, 3, 4]
    # each fires after its task's loss has settled: past the decay, not at the jump
    assert all(f % 20 >= 5 for f in fires)
    # the same trace on another scale calibrates to the same steps
    assert calibrate_plateau_thresholds(losses / 4.0 - 1.5, segments, window=5)[2] == fires


def test_calibration_checks_the_trace():
    losses, segments = task_loss_trace()
    with pytest.raises(ValueError, match="one loss and one segment per step"):
        calibrate_plateau_thresholds(losses, segments[:-1])
    with pytest.raises(ValueError, match="non-decreasing"):
        calibrate_plateau_thresholds(losses, segments[::-1])


def test_step_consolidates_when_the_detector_fires():
    ol = learner(window=2, mean_threshold=100.0, var_threshold=100.0)
    metrics = [ol.step(batch(seed=i)) for i in range(2)]
    ol.detector.mean_threshold = -1.0  # no further plateau: the third step trains the new adapter
    metrics.append(ol.step(batch(seed=2)))
    assert [m["plateau"] for m in metrics] == [False, True, False]
    assert ol.n_plateaus == 1 and metrics[-1]["n_plateaus"] == 1
    for _, b in factors(ol).values():
        assert np.abs(b).max() > 0  # the new adapter has trained one step since


# --- Omega, the loss, what a step trains -----------------------------------------------------------

def test_omega_is_the_running_average_of_the_importances():
    ol = learner()
    importances = []
    for n in range(1, 4):
        train(ol, steps=2, seed=10 * n)
        importances.append(ol.importance())
        ol.consolidate()
        assert ol.n_plateaus == n
        mean = jax.tree.map(lambda *gs: sum(gs) / len(gs), *importances)
        for path, o in flat(ol.omega).items():
            np.testing.assert_allclose(o, flat(mean)[path], rtol=1e-5, atol=1e-12, err_msg=path)
    assert any(np.abs(g).max() > 0 for g in flat(importances[0]).values())


def test_reference_regulariser_gradient_is_lambda_omega_theta():
    ol = learner(penalty="theta")
    train(ol, steps=2)
    data = batch(seed=7)
    plain = flat(ol.gradients(data)["adapter"])
    keys = iter(jax.random.split(jax.random.key(3), 8))
    ol.omega = jax.tree.map(lambda t: jax.random.uniform(next(keys), t.shape), ol.adapter)
    regularised = flat(ol.gradients(data)["adapter"])
    omega, theta = flat(ol.omega), flat(ol.adapter)
    for path, g in regularised.items():
        expected = ol.config.reg_lambda * omega[path] * theta[path]
        np.testing.assert_allclose(g - plain[path], expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max(),
                                   err_msg=path)


def test_anchored_regulariser_gradient_is_lambda_omega_times_the_change_since_consolidation():
    ol = learner()
    train(ol, steps=2)
    ol.consolidate()
    train(ol, steps=2, seed=20)
    data = batch(seed=7)
    omega, theta, anchor = flat(ol.omega), flat(ol.adapter), flat(ol.anchor)
    plain = flat(learner_gradients_without_penalty(ol, data))
    for path, g in flat(ol.gradients(data)["adapter"]).items():
        expected = ol.config.reg_lambda * omega[path] * (theta[path] - anchor[path])
        np.testing.assert_allclose(g - plain[path], expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max() + 1e-9,
                                   err_msg=path)


def learner_gradients_without_penalty(ol, data):
    omega = ol.omega
    ol.omega = jax.tree.map(jnp.zeros_like, omega)
    try:
        return ol.gradients(data)["adapter"]
    finally:
        ol.omega = omega


def test_a_freshly_consolidated_adapter_has_zero_penalty_and_still_learns():
    ol = learner()
    train(ol, steps=3)
    ol.consolidate()
    assert any(np.abs(o).max() > 0 for o in flat(ol.omega).values())
    for path, a in flat(ol.anchor).items():
        np.testing.assert_array_equal(a, flat(ol.adapter)[path])  # theta* = the fresh adapter
    data = batch(seed=9)
    assert ol.step(data)["reg"] == 0.0  # the penalty before this step's update
    grads = flat(ol.gradients(data)["adapter"])
    assert all(np.abs(g).max() > 1e-6 for p, g in grads.items() if p.endswith("/b"))

    reference = learner(penalty="theta")  # Omega theta^2 acts on the fresh random A at once
    train(reference, steps=3)
    reference.consolidate()
    assert reference.step(data)["reg"] > 0.0


def test_step_lowers_the_loss_on_a_repeated_batch():
    ol = learner(lr=1e-3)
    data = batch(seed=2)
    losses = [ol.step(data)["batch_loss"] for _ in range(8)]
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize("train_head", [True, False])
def test_step_changes_only_adapter_and_head_params(train_head):
    ol = learner(train_head=train_head)
    before = flat(nnx.state(ol.model, nnx.Param))
    ol.step(batch())
    after = flat(nnx.state(ol.model, nnx.Param))
    assert set(after) == set(before)
    for k, v in after.items():
        changes = ("/lora/" in k and k.endswith("/b")) or (train_head and k.startswith("head/"))
        if changes:
            assert np.abs(v - before[k]).max() > 0, k
        elif "/lora/" not in k:
            np.testing.assert_array_equal(v, before[k], err_msg=k)  # base weights, bitwise


def test_evaluate_is_the_accuracy_of_predict():
    ol = learner()
    data = batch(10, seed=6)
    predicted = np.asarray(jnp.argmax(ol.predict(data["images"]), -1))
    assert ol.evaluate(data["images"], data["labels"], batch_size=4) == pytest.approx(
        np.mean(predicted == data["labels"]))


def test_task_incremental_accuracy_takes_the_argmax_over_the_tasks_own_classes():
    logits = np.array([[0.0, 9.0, 3.0, 2.0],    # label 2: wrong over all classes, right over {2, 3}
                       [0.0, 0.0, 1.0, 5.0],    # label 3: right both ways
                       [7.0, 0.0, 1.0, 2.0]],   # label 3: wrong over all, right over {2, 3}
                      np.float32)
    predict = lambda x: jnp.asarray(logits[x[:, 0, 0, 0].astype(int)])  # noqa: E731
    images = np.arange(3).reshape(3, 1, 1, 1)  # batch 2: the last batch is padded
    cil, til = evaluate_task(predict, images, np.array([2, 3, 3]), (3, 2), batch_size=2)
    assert cil == pytest.approx(1 / 3) and til == pytest.approx(1.0)
    assert evaluate_task(predict, images, np.array([2, 3, 3]), None, batch_size=2) == (cil, cil)


def test_nearest_class_mean_uses_the_angle_to_each_class_mean():
    train = np.array([[1.0, 0.0], [3.0, 0.2], [0.0, 1.0], [0.1, 5.0]])
    labels = np.array([7, 7, 9, 9])
    # (10, 9) is nearer class 9's mean (0.05, 3) than class 7's (2, 0.1) in distance, but at a
    # smaller angle to class 7's mean of unit vectors: the cosine rule says 7.
    test = np.array([[10.0, 9.0], [1.0, 2.0], [-1.0, 0.1]])
    assert ncm_accuracy(train, labels, test, np.array([7, 9, 9])) == 1.0
    assert ncm_accuracy(train, labels, test, np.array([9, 9, 9])) == pytest.approx(2 / 3)
    assert ncm_accuracy(train, labels, train, labels) == 1.0


def test_learners_embed_the_heads_input():
    ol = learner()
    train(ol, steps=1)
    x = batch(seed=4)["images"]
    head = ol.model.head
    np.testing.assert_allclose(np.asarray(head(ol.embed(x))), np.asarray(ol.predict(x)), rtol=1e-4, atol=1e-5)
