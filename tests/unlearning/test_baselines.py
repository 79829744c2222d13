"""Unlearning baselines on a tiny MLP problem: each method does what its update rule says."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research.data.pipeline import ImageArrays
from research.unlearning.baselines import (BASELINES, distill_kl, finetune, fisher_diagonal, fisher_forgetting,
                                           fisher_noise_std, gradient_ascent, l1_norm, l1_sparse, random_labels,
                                           random_wrong_labels, retrain, saliency_mask, salun, scrub, scrub_plan)
from research.unlearning.model import ForgetProblem, Unlearnable
from research.unlearning.recipe import TrainRecipe
from research.unlearning.train import cross_entropy, fit

NUM_CLASSES = 3
# The baselines' defaults were sized against this recipe (decay toward 0, cosine).
RECIPE = TrainRecipe(lr=0.05, epochs=15, batch_size=16, weight_decay=5e-4, decay_toward="zero", schedule="cosine")


class TinyMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, hidden: int = 16):
        self.hidden = nnx.Linear(64, hidden, rngs=rngs)
        self.head = nnx.Linear(hidden, NUM_CLASSES, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.hidden(x.reshape(x.shape[0], -1))))


class Linear(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.head = nnx.Linear(64, NUM_CLASSES, rngs=rngs)

    def __call__(self, x):
        return self.head(x.reshape(x.shape[0], -1))


def noisy_prototypes(rng, prototypes, n) -> ImageArrays:
    """n 8x8x1 uint8 images: a class prototype plus heavy noise, so the classes overlap a little."""
    labels = rng.integers(0, NUM_CLASSES, n).astype(np.int32)
    images = prototypes[labels] + rng.normal(0, 60, (n, 8, 8, 1))
    return ImageArrays(np.clip(images, 0, 255).astype(np.uint8), labels, ("a", "b", "c"))


def make_problem(module_cls, seed=0) -> ForgetProblem:
    rng = np.random.default_rng(seed)
    prototypes = 128 + rng.uniform(-40, 40, (NUM_CLASSES, 8, 8, 1))
    retain, forget, test = (noisy_prototypes(rng, prototypes, n) for n in (60, 20, 30))
    model = Unlearnable.from_model(module_cls(nnx.Rngs(seed)))
    trained = fit(model, ImageArrays(np.concatenate([retain.images, forget.images]),
                                     np.concatenate([retain.labels, forget.labels]), retain.label_names), RECIPE)
    return ForgetProblem(model.with_params(trained), model.params, retain, forget, test, RECIPE)


@pytest.fixture(scope="module")
def problem() -> ForgetProblem:
    return make_problem(TinyMLP)


def flat(params) -> np.ndarray:
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(params)])


def forget_ce(problem, params) -> float:
    return float(cross_entropy(problem.trained.logits(params, jnp.asarray(problem.forget.images)),
                               jnp.asarray(problem.forget.labels)))


def test_every_baseline_returns_the_subset_tree(problem):
    reference = problem.trained.params
    for name, method in BASELINES.items():
        out = method(problem, seed=1)
        assert jax.tree.structure(out) == jax.tree.structure(reference), name
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(reference)):
            assert a.shape == b.shape and a.dtype == b.dtype, name
        assert np.all(np.isfinite(flat(out))), name


def test_retrain_is_fit_from_init_on_the_retain_set(problem):
    expected = fit(problem.trained, problem.retain, RECIPE, params=problem.init_params, seed=2)
    np.testing.assert_array_equal(flat(retrain(problem, seed=2)), flat(expected))
    assert not np.allclose(flat(expected), flat(problem.trained.params))


def test_a_baseline_keeps_the_recipes_proximal_decay_anchored_at_w_init(problem):
    from research.unlearning.baselines import _sgd
    proximal = dataclasses.replace(problem, recipe=dataclasses.replace(RECIPE, weight_decay=0.1, decay_toward="init"))
    tx = _sgd(proximal, 10, lr=0.01, momentum=0.0, weight_decay=None, schedule="constant")
    w_d = problem.trained.params
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, w_d), tx.init(w_d), w_d)  # the run starts at w(D)
    np.testing.assert_allclose(flat(updates), -0.01 * 0.1 * (flat(w_d) - flat(problem.init_params)), rtol=1e-5, atol=1e-9)


def test_gradient_ascent_raises_the_forget_loss(problem):
    before = forget_ce(problem, problem.trained.params)
    after = forget_ce(problem, gradient_ascent(problem, epochs=5, lr=0.05))
    assert after > before + 0.5, (before, after)


def test_random_wrong_labels_are_uniform_over_the_other_classes():
    labels = jnp.asarray(np.arange(3000) % 5)
    wrong = np.asarray(random_wrong_labels(jax.random.PRNGKey(0), labels, 5))
    assert np.all(wrong != np.asarray(labels)) and wrong.min() >= 0 and wrong.max() < 5
    counts = np.bincount(wrong[np.asarray(labels) == 2], minlength=5)   # 600 draws over 4 classes
    assert counts[2] == 0 and np.all(np.abs(counts[[0, 1, 3, 4]] - 150) < 45), counts


def test_random_labels_raises_the_forget_loss_more_than_finetuning(problem):
    relabelled = forget_ce(problem, random_labels(problem, epochs=20, lr=0.05))
    finetuned = forget_ce(problem, finetune(problem, epochs=20 * 20 / 60, lr=0.05))  # as many retain batches
    assert relabelled > finetuned + 0.3, (relabelled, finetuned)


def test_salun_updates_exactly_the_salient_half(problem):
    mask = flat(saliency_mask(problem.trained, problem.forget, sparsity=0.5))
    assert set(np.unique(mask)) == {0.0, 1.0}
    assert mask.sum() == round(0.5 * mask.size)
    grad_size = np.abs(flat(jax.grad(lambda p: cross_entropy(
        problem.trained.logits(p, jnp.asarray(problem.forget.images)), jnp.asarray(problem.forget.labels)))(
        problem.trained.params)))
    assert grad_size[mask == 1].min() >= grad_size[mask == 0].max()

    before, after = flat(problem.trained.params), flat(salun(problem, epochs=3, lr=0.05))
    np.testing.assert_array_equal(after[mask == 0], before[mask == 0])
    assert np.mean(after[mask == 1] != before[mask == 1]) > 0.9


def test_fisher_diagonal_of_a_linear_softmax_model_has_its_closed_form():
    problem = make_problem(Linear)
    model, data = problem.trained, problem.retain
    x = data.images.reshape(len(data), -1).astype(np.float64) / 255.0          # (N, 64)
    p = np.asarray(jax.nn.softmax(model.predict(data.images)), np.float64)     # (N, C)
    onehot = np.eye(NUM_CLASSES)[data.labels]
    # d log p_c / d W[i, k] = x_i (delta_ck - p_k)  =>  sum_c p_c (...)^2 = x_i^2 p_k (1 - p_k)
    expected = {"expected": (x ** 2).T @ (p * (1 - p)) / len(data),
                "empirical": (x ** 2).T @ ((onehot - p) ** 2) / len(data)}
    expected_bias = {"expected": (p * (1 - p)).mean(0), "empirical": ((onehot - p) ** 2).mean(0)}
    for kind in ("expected", "empirical"):
        fisher = fisher_diagonal(model, data, kind=kind, batch_size=16)   # 60 samples: a padded last chunk
        np.testing.assert_allclose(np.asarray(fisher["head"]["kernel"][...]), expected[kind], rtol=2e-4, atol=1e-7)
        np.testing.assert_allclose(np.asarray(fisher["head"]["bias"][...]), expected_bias[kind], rtol=2e-4, atol=1e-7)


def test_fisher_noise_std_is_the_clipped_inverse_fisher():
    fisher = {"w": jnp.array([0.0, 1e-4, 1.0, 4.0])}
    std = fisher_noise_std(fisher, alpha=1e-6)
    expected = np.sqrt(1e-6 * np.minimum(1 / (np.array([0.0, 1e-4, 1.0, 4.0]) + 1e-8), 1e3))
    np.testing.assert_allclose(np.asarray(std["w"]), expected, rtol=1e-5)
    assert float(std["w"][0]) == pytest.approx(np.sqrt(1e-3), rel=1e-5)


def test_fisher_forgetting_adds_noise_with_the_fisher_std(problem):
    trained = flat(problem.trained.params)
    np.testing.assert_array_equal(flat(fisher_forgetting(problem, alpha=0.0)), trained)
    alpha = 1e-4
    std = flat(fisher_noise_std(fisher_diagonal(problem.trained, problem.retain), alpha))
    z = np.concatenate([(flat(fisher_forgetting(problem, alpha=alpha, seed=s)) - trained) / std for s in range(3)])
    assert abs(z.mean()) < 0.05 and abs(z.std() - 1.0) < 0.05, (z.mean(), z.std())
    assert np.all(np.abs(z) < 6)
    # the noise depends on D_r alone: another forget set gives the same weights, another retain set not
    other = ImageArrays(np.zeros_like(problem.forget.images), problem.forget.labels, problem.forget.label_names)
    same = fisher_forgetting(dataclasses.replace(problem, forget=other), alpha=alpha, seed=0)
    np.testing.assert_array_equal(flat(same), flat(fisher_forgetting(problem, alpha=alpha, seed=0)))
    changed = fisher_forgetting(dataclasses.replace(problem, retain=problem.forget), alpha=alpha, seed=0)
    assert not np.allclose(flat(changed), flat(same))
    # max_samples: the Fisher of a seeded subsample of D_r
    rows = np.sort(np.random.default_rng(5).choice(len(problem.retain), 20, replace=False))
    std_sub = flat(fisher_noise_std(fisher_diagonal(problem.trained, problem.retain.subset(rows)), alpha))
    z_sub = (flat(fisher_forgetting(problem, alpha=alpha, seed=5, max_samples=20)) - trained) / std_sub
    np.testing.assert_allclose(z_sub, (flat(fisher_forgetting(problem, alpha=alpha, seed=5)) - trained) / std,
                               rtol=1e-4, atol=1e-4)


def test_l1_sparse_with_a_large_alpha_shrinks_the_weights_more_than_finetuning(problem):
    l1_tuned = float(l1_norm(l1_sparse(problem, alpha=0.05, epochs=5, lr=0.05)))
    finetuned = float(l1_norm(finetune(problem, epochs=5, lr=0.05)))
    assert l1_tuned < 0.9 * finetuned, (l1_tuned, finetuned)


def test_scrub_plan_alternates_max_and_min_passes():
    assert scrub_plan(2, 3, max_epochs=1, min_epochs=2) == [
        ("max", 0), ("max", 1), ("min", 0), ("min", 1), ("min", 2), ("min", 3), ("min", 4), ("min", 5)]
    assert scrub_plan(1, 1, max_epochs=2, min_epochs=0) == [("max", 0), ("max", 1)]


def test_scrub_max_steps_push_the_student_away_from_the_teacher_on_the_forget_set(problem):
    images = jnp.asarray(problem.forget.images)
    teacher = problem.trained.logits(problem.trained.params, images)

    def kl_to_teacher(params):
        return float(distill_kl(problem.trained.logits(params, images), teacher, 1.0))
    kwargs = dict(min_epochs=3, lr=0.01, forget_batch_size=4, batch_size=16)
    with_max = kl_to_teacher(scrub(problem, max_epochs=3, **kwargs))
    without_max = kl_to_teacher(scrub(problem, max_epochs=0, **kwargs))
    assert with_max > 2 * without_max + 0.05, (with_max, without_max)
