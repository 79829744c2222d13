"""Online continual-learning baselines: what each variant trains, the reservoir's sampling law, the EWC++
importance and penalty, and that padded rows of a last batch change nothing (baselines and Online-LoRA)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research.adapters.online_baselines import (OnlineBaselineConfig, OnlineFinetune, ReservoirBuffer, _fisher,
                                                batch_fisher)
from research.adapters.online_lora import OnlineLoRA, OnlineLoraConfig, as_batch
from research.models import build_model

SHAPE, CLASSES = (8, 8, 1), 4


def tiny_vit():
    return build_model("vit_tiny", num_classes=CLASSES, input_shape=SHAPE, rngs=nnx.Rngs(0), depth=1)


def batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return {"images": rng.integers(0, 256, (n, *SHAPE), dtype=np.uint8),
            "labels": rng.integers(0, CLASSES, n).astype(np.int32)}


def flat(module) -> dict[str, np.ndarray]:
    state = nnx.state(module, nnx.Param)
    return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def changed_after_steps(config: OnlineBaselineConfig, steps=2) -> set[str]:
    learner = OnlineFinetune(tiny_vit(), config, rngs=nnx.Rngs(1))
    before = flat(learner.model)
    for i in range(steps):
        learner.step(batch(seed=i))
    after = flat(learner.model)
    return {k for k in before if not np.array_equal(before[k], after[k])}, set(before)


@pytest.mark.parametrize("trainable", ["all", "lora", "head"])
def test_each_variant_trains_exactly_its_parameters(trainable):
    changed, every = changed_after_steps(OnlineBaselineConfig(trainable=trainable, lr=1e-2))
    head = {k for k in every if k.startswith("head/")}
    adapters = {k for k in every if "/lora/" in k}
    assert head <= changed
    if trainable == "all":
        assert changed == every
    elif trainable == "lora":
        assert adapters and changed == head | adapters  # A and B of every adapter; no base weight
    else:
        assert changed == head


def test_reservoir_keeps_each_sample_with_equal_probability():
    size, n, trials = 10, 50, 400
    counts = np.zeros(n)
    for seed in range(trials):
        buffer = ReservoirBuffer(size, seed)
        for start in range(0, n, 7):  # batches of 7: the law must not depend on batching
            ids = np.arange(start, min(start + 7, n))
            buffer.add(ids[:, None].astype(np.int32), ids.astype(np.int32))
        assert len(buffer) == size and sorted(buffer.labels) == sorted(set(buffer.labels))
        np.testing.assert_array_equal(buffer.images[:, 0], buffer.labels)  # rows stay paired
        counts[buffer.labels] += 1
    expected = trials * size / n  # 80 per sample
    assert np.abs(counts - expected).max() < 5 * np.sqrt(expected)  # a biased reservoir (e.g. FIFO) fails this
    assert counts[:10].mean() < 1.5 * expected and counts[-10:].mean() < 1.5 * expected


def test_replay_draw_is_padded_with_zero_mask_until_the_buffer_fills():
    buffer = ReservoirBuffer(8, 0)
    like = batch(4)
    empty = buffer.draw(5, like)
    assert empty["images"].shape == (5, *SHAPE) and empty["mask"].sum() == 0
    buffer.add(like["images"][:3], like["labels"][:3])
    draw = buffer.draw(5, like)
    np.testing.assert_array_equal(draw["mask"], [1, 1, 1, 0, 0])
    assert sorted(map(bytes, draw["images"][:3])) == sorted(map(bytes, like["images"][:3]))


def test_batch_fisher_is_the_mean_of_per_sample_squared_gradients():
    key = jax.random.PRNGKey(0)
    params = {"w": jax.random.normal(key, (5, 3)), "b": jnp.zeros(3)}
    x, y = jax.random.normal(jax.random.PRNGKey(1), (6, 5)), jnp.array([0, 1, 2, 0, 1, 2])
    mask = jnp.array([1, 1, 1, 1, 0, 1.0])

    def loss_fn(p, xb, yb):
        logits = xb @ p["w"] + p["b"]
        return -jax.nn.log_softmax(logits)[0, yb[0]]

    fisher = batch_fisher(loss_fn, params, x, y, mask)
    grads = [jax.grad(loss_fn)(params, x[i:i + 1], y[i:i + 1]) for i in range(6) if mask[i]]
    for k in params:
        expected = np.mean([np.square(g[k]) for g in grads], axis=0)
        np.testing.assert_allclose(fisher[k], expected, rtol=1e-5, atol=1e-8)


def test_ewc_updates_importance_and_anchor_and_its_penalty_pulls_towards_the_anchor():
    config = OnlineBaselineConfig(trainable="head", lr=1e-2, ewc_lambda=10.0, ewc_alpha=0.5, ewc_every=2)
    learner = OnlineFinetune(tiny_vit(), config, rngs=nnx.Rngs(1))
    learner.step(batch(seed=0))
    assert learner.n_importance_updates == 0 and all(float(jnp.abs(o).max()) == 0
                                                     for o in jax.tree.leaves(learner.omega))
    second = batch(seed=1)
    metrics = learner.step(second)
    assert metrics["n_importance_updates"] == 1 and metrics["n_plateaus"] == 0
    assert learner.anchor is learner.params
    fisher = _fisher(learner._eval_def, learner.preprocess, learner.params, learner.frozen, learner.rest,
                     as_batch(second))
    for o, f in zip(jax.tree.leaves(learner.omega), jax.tree.leaves(fisher), strict=True):
        np.testing.assert_allclose(o, 0.5 * f, rtol=1e-6)
    assert sum(float(jnp.sum(o)) for o in jax.tree.leaves(learner.omega)) > 0
    # The penalty (lambda/2) sum Omega (theta - theta*)^2 is 0 at the anchor and grows as theta leaves it.
    anchor = learner.anchor
    assert learner.step(batch(seed=2))["reg"] == 0.0
    expected = 0.5 * 10.0 * sum(float(jnp.sum(o * jnp.square(p - a))) for o, p, a in zip(
        jax.tree.leaves(learner.omega), jax.tree.leaves(learner.params), jax.tree.leaves(anchor), strict=True))
    assert expected > 0
    assert learner.step(batch(seed=3))["reg"] == pytest.approx(expected, rel=1e-4)
    assert learner.n_importance_updates == 2


def padded(b, extra=3, seed=7):
    junk = batch(extra, seed)
    return {"images": np.concatenate([b["images"], junk["images"]]),
            "labels": np.concatenate([b["labels"], junk["labels"]]),
            "mask": np.concatenate([np.ones(len(b["labels"]), np.float32), np.zeros(extra, np.float32)])}


@pytest.mark.parametrize("make", [
    lambda: OnlineFinetune(tiny_vit(), OnlineBaselineConfig(lr=1e-2, replay_size=4, replay_batch=2),
                           rngs=nnx.Rngs(1)),
    lambda: OnlineLoRA(tiny_vit(), OnlineLoraConfig(lr=1e-2, mean_threshold=0.0, buffer_size=4), rngs=nnx.Rngs(1)),
], ids=["finetune_with_replay", "online_lora"])
def test_padded_rows_of_a_last_batch_change_nothing(make):
    plain, masked = make(), make()
    for i in range(3):
        b = batch(5, seed=i)
        m_plain, m_masked = plain.step(b), masked.step(padded(b))
        assert m_plain["loss"] == pytest.approx(m_masked["loss"], rel=1e-5)
    # Adam divides by sqrt(v): where a gradient is nearly 0, float32 summation-order noise (padded and
    # unpadded batches tile differently) becomes an update of up to lr. So compare the whole update:
    # junk rows leaking into the gradients would change it by O(1), not by the noise.
    initial = flat(make().model)
    for k, v in flat(plain.model).items():
        if k.endswith("attn/k/bias"):  # its gradient is exactly 0 (softmax shift): pure noise
            continue
        update, difference = v - initial[k], flat(masked.model)[k] - v
        assert np.linalg.norm(difference) <= 1e-2 * np.linalg.norm(update) + 1e-6, k
    buffer = getattr(masked, "buffer", None) or masked.replay
    junk = {bytes(x) for x in batch(3, 7)["images"]}
    assert not junk & {bytes(x) for x in np.asarray(buffer.images)[:len(buffer)]}


def test_bad_config_values_fail_with_the_field_name():
    with pytest.raises(ValueError, match="trainable"):
        OnlineBaselineConfig(trainable="bias")
    with pytest.raises(ValueError, match="ewc_alpha"):
        OnlineBaselineConfig(ewc_alpha=0.0)
