"""Zero-shot search: evolution and random search on toy and real spaces with fake proxies, the
MobileNetV2-style macro space's analytic counts, latency costs, and the experiment end to end."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import zero_shot_search
from research.core.config import ConfigError, load_config
from research.nas import macro_space, nb201, search

GROUND_TRUTH = os.path.join(os.environ.get("RESEARCH_DATA_DIR", ""), "nasbench201",
                            "zc_nasbench201.json")
TARGET = (3, 1, 4, 1, 5, 9, 2, 6)


class DigitSpace:
    """Toy space: 8 digits; cost = their sum (either kind). The fake proxy below peaks at TARGET,
    whose cost is exactly the budget used, so the optimum is feasible and unique."""

    def sample(self, rng):
        return tuple(int(d) for d in rng.integers(10, size=len(TARGET)))

    def mutate(self, c, rng):
        i = rng.integers(len(c))
        return c[:i] + (int((c[i] + rng.integers(1, 10)) % 10),) + c[i + 1:]

    def cost(self, c, kind):
        return float(sum(c))

    def build(self, c, num_classes, seed):
        raise NotImplementedError

    def describe(self, c):
        return "".join(map(str, c))


def closeness(c):
    return -float(sum((a - b) ** 2 for a, b in zip(c, TARGET)))


def small_mobilenet(**kw):
    return macro_space.MobileNetSpace(width_multiplier=0.25, **kw)


def test_spaces_follow_the_protocol():
    for space in (DigitSpace(), search.NB201Space(), small_mobilenet()):
        assert isinstance(space, search.SearchSpace)


def test_searches_are_deterministic_given_a_seed():
    space = search.NB201Space(C=4, N=1)
    fake = lambda c: float(nb201.count_params(c, C=4, N=1) % 997)  # noqa: E731
    runs = [search.evolution_search(space, fake, kind="flops", budget=1.5, population=6,
                                    steps=40, seed=s) for s in (7, 7, 8)]
    assert runs[0].best == runs[1].best and runs[0].history == runs[1].history
    assert runs[0].history != runs[2].history
    rand = [search.random_search(space, fake, kind="flops", budget=1.5, evaluations=20, seed=7)
            for _ in range(2)]
    assert rand[0].best == rand[1].best and rand[0].history == rand[1].history
    assert rand[0].evaluations == 20


@pytest.mark.parametrize("space,kind,budget", [
    (search.NB201Space(C=4, N=1), "flops", 1.2), (search.NB201Space(), "params", 0.5),
    (small_mobilenet(), "flops", 6.0), (small_mobilenet(), "params", 0.1)])
def test_the_budget_is_always_respected(space, kind, budget):
    scored = []

    def fake(c):
        scored.append(c)
        return float(space.cost(c, "params"))  # rewards size: pushes against the budget

    evo = search.evolution_search(space, fake, kind=kind, budget=budget, population=5, steps=60,
                                  seed=0)
    rnd = search.random_search(space, fake, kind=kind, budget=budget,
                               evaluations=evo.evaluations, seed=0)
    assert scored and all(space.cost(c, kind) <= budget for c in scored)
    assert evo.cost <= budget and rnd.cost <= budget and evo.rejected > 0
    assert rnd.evaluations == evo.evaluations == len(evo.history)


def test_evolution_finds_the_known_optimum_of_a_toy_space():
    space = DigitSpace()
    evo = search.evolution_search(space, closeness, kind="flops", budget=sum(TARGET),
                                  population=16, steps=3000, seed=0)
    assert evo.best == TARGET and evo.score == 0.0
    rnd = search.random_search(space, closeness, kind="flops", budget=sum(TARGET),
                               evaluations=evo.evaluations, seed=0)
    assert rnd.score < evo.score  # 10^8 candidates: uniform draws do not hit it at this cost
    best = [b for _, b in evo.history]
    assert best == sorted(best) and [e for e, _ in evo.history] == list(range(1, len(best) + 1))


def test_an_impossible_budget_is_a_clear_error():
    with pytest.raises(ValueError, match=r"no candidate with flops <= 0.1 MFLOPs .*raise the"):
        search.evolution_search(search.NB201Space(), closeness, kind="flops", budget=0.1,
                                population=4, steps=4, max_tries=50)


def test_nb201_mutation_changes_one_edge_and_stays_in_the_list():
    rng = np.random.default_rng(0)
    full = search.NB201Space()
    cell = (3, 3, 4, 1, 3, 1)
    for _ in range(50):
        child = full.mutate(cell, rng)
        assert sum(a != b for a, b in zip(child, cell)) == 1
    listed = [cell, (3, 3, 4, 1, 3, 0), (2, 3, 4, 1, 3, 1), (0, 0, 0, 0, 0, 0)]
    space = search.NB201Space(cells=listed)
    assert {space.mutate(cell, rng) for _ in range(50)} == {listed[1], listed[2]}
    assert space.mutate((0,) * 6, rng) in listed[:3]  # no one-edge neighbour: another listed cell
    assert {space.sample(rng) for _ in range(100)} == set(listed)


def tiny_mobilenet(**kw):
    """Two stages of a few channels: compiles in about a second."""
    stages = (macro_space.StageChoices(2, (1, 2), (8, 16), (1, 3)),
              macro_space.StageChoices(2, (1,), (16, 24)))
    return macro_space.MobileNetSpace(stages=stages, width_multiplier=0.25, **kw)


def abstract(space, candidate):
    """The built network's shapes only (nothing initialised, nothing compiled)."""
    return nnx.eval_shape(lambda: space.build(candidate, space.num_classes, 0))


def test_mobilenet_space_counts_equal_the_built_network():
    rng = np.random.default_rng(0)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    full, small = macro_space.MobileNetSpace(num_classes=100), small_mobilenet()
    for space, candidate in [(full, full.reference()), (small, small.sample(rng)),
                             (small, small.sample(rng))]:
        model = abstract(space, candidate)
        n = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
        assert n == round(space.cost(candidate, "params") * 1e6), space.describe(candidate)
        kernels = {(k, k) for _, _, _, k in candidate}
        assert {b.depthwise.conv.kernel_size for b in model.blocks} == kernels
    graphdef, state = nnx.split(model)
    logits, features = jax.eval_shape(
        lambda s, x: (nnx.merge(graphdef, s)(x), nnx.merge(graphdef, s).features(x)), state, x)
    assert logits.shape == (2, small.num_classes) and features.shape == (2, 4, 4, small.last)
    # MobileNetV2 itself is in the full space: its documented 2,236,682 parameters (10 classes).
    mbv2 = macro_space.MobileNetSpace()
    assert round(mbv2.cost(mbv2.reference(), "params") * 1e6) == 2_236_682
    # Multiply-adds against XLA's count of the compiled forward: 2 flops per multiply-add, plus
    # BN, activations and pooling (15% of this thin network).
    space = tiny_mobilenet()
    candidate = ((2, 16, 3, 5), (1, 24, 6, 7))
    graphdef, state = nnx.split(abstract(space, candidate))
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    cost = forward.lower(state, x.update(shape=(1, 32, 32, 3))).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    assert 1.0 < cost["flops"] / (2e6 * space.cost(candidate, "flops")) < 1.3


def test_mobilenet_mutation_changes_one_field_of_one_stage():
    space = macro_space.MobileNetSpace()
    rng = np.random.default_rng(1)
    parent = space.reference()
    for _ in range(30):
        child = space.mutate(parent, rng)
        diffs = [(s, f) for s in range(len(parent)) for f in range(4)
                 if child[s][f] != parent[s][f]]
        assert len(diffs) == 1
        s, f = diffs[0]
        assert child[s][f] in space.stages[s].options()[f]


def test_latency_cost_is_positive_and_cached():
    space = tiny_mobilenet(latency_runs=3)
    candidate = ((1, 8, 1, 3), (1, 16, 6, 3))
    first = space.cost(candidate, "latency")
    assert first > 0 and space.latency.measured == 1
    assert space.cost(candidate, "latency") == first and space.latency.measured == 1
    space.cost(((1, 8, 1, 7), (1, 16, 6, 3)), "latency")
    assert space.latency.measured == 2 and len(space.latency.cache) == 2


@pytest.mark.skipif(not os.path.exists(GROUND_TRUTH), reason="NB201 ground-truth file absent")
def test_smoke_preset_runs_end_to_end(tmp_path):
    # NASWOT instead of the preset's ZiCo: the same code path, without ZiCo's ~1 minute of
    # first-use compilation on a small CPU.
    config = load_config("configs/zero_shot_search.py:smoke", {"proxy": "naswot",
                                                               "num_images": 128})
    summary = zero_shot_search.main(config, str(tmp_path))
    assert {"config.json", "results.json", "results.md", "search.png"} <= set(os.listdir(tmp_path))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["methods"]) == {"evolution", "random"}
    evo, rnd = saved["methods"]["evolution"], saved["methods"]["random"]
    assert evo["evaluations"] == rnd["evaluations"] >= 1
    for r in (evo, rnd):
        assert r["cost"] <= config.budget and r["val_accuracy"] is not None and r["seconds"] > 0
        assert nb201.from_string(r["best"]) == tuple(r["candidate"])
    assert saved["oracle"]["val_accuracy"] >= max(evo["val_accuracy"], rnd["val_accuracy"])
    assert summary["methods"]["evolution"]["best"] == evo["best"]
    assert "| evolution |" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize("key,value", [("budget_kind", "energy"), ("space", "foo"),
                                       ("budget", -1.0), ("proxy", "magic"), ("num_images", 8)])
def test_a_bad_config_value_is_a_one_line_error_naming_the_key(tmp_path, key, value):
    config = load_config("configs/zero_shot_search.py:smoke", {key: value})
    with pytest.raises(ConfigError) as error:
        zero_shot_search.main(config, str(tmp_path))
    assert f"'{key}'" in str(error.value) and "\n" not in str(error.value)


def test_a_budget_nothing_fits_is_a_config_error(tmp_path, monkeypatch):
    from research.nas import benchmark

    monkeypatch.setattr(benchmark, "proxy_batch", lambda *a, **k: {})  # never reached data
    config = load_config("configs/zero_shot_search.py:smoke", {"space": "mobilenet",
                                                               "budget": 0.01})
    with pytest.raises(ConfigError, match=r"'budget' = 0.01: no candidate with flops <= 0.01"):
        zero_shot_search.main(config, str(tmp_path))
