"""Subnetwork table and samplers: uniform covers the table evenly, the budget rule only returns the
highest-TPS subnetwork of some budget, the softmax rule favours high TPS."""
import jax
import numpy as np
import pytest
from flax import nnx

from research.anytime import sampling, supernet
from research.core.config import FieldError
from research.models.resnet import ResNet


@pytest.fixture(scope="module")
def model():
    return ResNet(num_classes=3, in_channels=3, widths=(4, 8), blocks_per_stage=(2, 2), shortcut="A", rngs=nnx.Rngs(0))


def test_the_table_holds_every_width_and_gate_pattern(model):
    table = sampling.enumerate_subnets(model, (8, 8), sampling.SamplerConfig())
    assert len(table) == 4 * 2 ** 3  # 3 skippable blocks
    assert table.widths[table.largest] == 1.0 and table.gates[table.largest].all()
    assert table.widths[table.smallest] == 0.25 and table.gates[table.smallest].tolist() == [0, 0, 1, 0]
    i = table.index(0.5, [1, 0, 1, 1])
    assert table.flops[i] == supernet.flops(model, (8, 8), 0.5, [1, 0, 1, 1])
    # Sum-TPS grows with every computed block (it visits more nodes); width does not change it.
    assert table.tps[table.index(0.5, [1, 1, 1, 1])] > table.tps[i] == table.tps[table.index(1.0, [1, 0, 1, 1])]


def test_uniform_sampling_covers_the_table_evenly(model):
    table = sampling.enumerate_subnets(model, (8, 8), sampling.SamplerConfig())
    draws = np.asarray(sampling.make_sampler(table, sampling.SamplerConfig())(jax.random.key(0), 6400))
    counts = np.bincount(draws, minlength=len(table))
    assert counts.min() > 120 and counts.max() < 280  # 200 expected, sd 14


def test_the_budget_rule_returns_only_the_best_tps_subnetwork_of_some_budget(model):
    config = sampling.SamplerConfig(kind="tps", rule="budget", p_extra=1.0)
    table = sampling.enumerate_subnets(model, (8, 8), config)
    frontier = set()
    for budget in np.unique(table.flops):
        inside = np.flatnonzero(table.flops <= budget)
        frontier.add(int(inside[np.lexsort((table.flops[inside], table.tps[inside]))[-1]]))
    draws = set(np.asarray(sampling.make_sampler(table, config)(jax.random.key(1), 2000)).tolist())
    assert draws <= frontier and len(draws) >= 3
    mixed = np.asarray(sampling.make_sampler(table, sampling.SamplerConfig(kind="tps", p_extra=0.5))(
        jax.random.key(1), 2000))
    assert 0.4 < np.isin(mixed, sorted(frontier)).mean() < 0.75  # half from the frontier, half uniform


def test_the_softmax_rule_favours_high_tps(model):
    config = sampling.SamplerConfig(kind="tps", rule="softmax", beta=2.0)
    table = sampling.enumerate_subnets(model, (8, 8), config)
    draws = np.asarray(sampling.make_sampler(table, config)(jax.random.key(2), 4000))
    high = table.tps >= np.median(table.tps)
    assert np.isin(draws, np.flatnonzero(high)).mean() > 0.8


@pytest.mark.parametrize("field, value", [("p_extra", 1.5), ("widths", (0.5, 0.75)), ("kind", "greedy")])
def test_bad_sampler_settings_name_the_field(field, value):
    with pytest.raises(FieldError, match=field):
        sampling.SamplerConfig(**{field: value})
