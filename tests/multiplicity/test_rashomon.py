"""Rashomon sets hold only models within eps, for dropout, re-training and AWP alike."""
import numpy as np
import pytest
from flax import nnx

from research.models.mlp import MLP
from research.multiplicity import baselines, rashomon
from research.multiplicity.baselines import AWPConfig
from research.multiplicity.rashomon import RashomonConfig

EPSILONS = (0.0, 0.02, 0.1)


def _loss(probs, labels):
    return -np.mean(np.log(np.take_along_axis(probs, labels[:, None], -1)[:, 0]))


@pytest.fixture(scope="module")
def explored():
    model = MLP(5, (12,), num_classes=3, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 5)).astype(np.float32), rng.integers(0, 3, 30)
    config = RashomonConfig(max_rate=0.3, num_rates=3, models_per_rate=10, epsilons=EPSILONS, models_per_chunk=5,
                            ensemble_size=4, num_ensembles=3)
    return model, x, y, config, rashomon.explore(model, x, y, config)


def test_every_model_of_a_dropout_set_is_within_eps_and_the_reference_is_first(explored):
    model, x, y, config, e = explored
    assert e.probs.shape == (30, 30, 3) and list(np.unique(e.rates)) == pytest.approx([0.1, 0.2, 0.3])
    for eps in EPSILONS:
        members = e.set_probs(eps)
        np.testing.assert_array_equal(members[0], e.reference_probs)
        assert all(_loss(p, y) <= e.reference_loss + eps + 1e-5 for p in members)
        assert len(members) == 1 + np.sum(e.losses <= e.reference_loss + eps)
    assert len(e.set_probs(0.1)) >= len(e.set_probs(0.0))  # sets grow with eps


def test_awp_keeps_each_target_inside_the_set_and_moves_toward_its_class(explored):
    model, x, y, config, e = explored
    awp = baselines.awp_set(model, x, y, [0, 1], e.reference_probs, e.reference_loss, EPSILONS,
                            AWPConfig(steps=6, step_size=0.02, targets_per_chunk=4))
    assert awp.models_explored == 6 and awp.losses.shape == (36,)
    for eps in EPSILONS:
        members = awp.set_probs(eps)
        assert members.shape == (7, 30, 3)
        assert all(_loss(p, y) <= e.reference_loss + eps + 1e-5 for p in members)
    # With a loose eps every target moves: model (i, c) raises class c's probability at point i.
    loose = baselines.awp_set(model, x, y, [0], e.reference_probs, e.reference_loss, (10.0,),
                              AWPConfig(steps=3, step_size=0.02)).set_probs(10.0)
    for c in range(3):
        assert loose[1 + c][0, c] > e.reference_probs[0, c]


def test_retrained_models_enter_the_set_only_within_eps(explored):
    _, x, y, config, e = explored

    def train(seed):
        return MLP(5, (12,), num_classes=3, rngs=nnx.Rngs(seed)), 1.5

    retrained = baselines.retrained_set(train, [1, 2, 3], x, y, e.reference_probs, e.reference_loss, EPSILONS)
    assert retrained.models_explored == 3 and retrained.seconds >= 4.5
    for eps in EPSILONS:
        kept = retrained.set_probs(eps)
        assert len(kept) == 1 + np.sum(retrained.losses <= e.reference_loss + eps)


def test_an_ensemble_of_one_repeated_model_is_that_model_and_selection_picks_the_lowest_loss():
    probs = np.random.default_rng(0).dirichlet(np.ones(3), size=(1, 8))
    repeated = np.repeat(probs, 5, 0)
    np.testing.assert_allclose(rashomon.ensemble_set(repeated, 3, 2), np.repeat(probs, 2, 0), atol=1e-12)
    many = np.random.default_rng(1).dirichlet(np.ones(3), size=(6, 8))
    losses = np.array([3.0, 2.0, 0.5, 1.0, 4.0, 5.0])
    np.testing.assert_array_equal(rashomon.selection_set(many, losses, 6, 2), np.stack([many[2]] * 2))


def test_mitigation_reports_single_models_ensembles_and_selections_per_eps(explored):
    *_, config, e = explored
    out = rashomon.mitigation_by_eps(e, config)
    assert set(out) == {"single", "ensemble", "selection"}
    assert [r["eps"] for r in out["ensemble"]] == list(EPSILONS)
    assert all(r["num_models"] == 3 for rows in out.values() for r in rows)


@pytest.mark.parametrize("field, value, message", [
    ("max_rate", 1.0, "max_rate"), ("max_rate", 0.0, "max_rate"), ("epsilons", (-0.1,), "epsilons"), ("num_rates", 0, "num_rates")])
def test_bad_rashomon_settings_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        RashomonConfig(**{field: value})
