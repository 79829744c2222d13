"""TIPS graph scores: TAS by power iteration equals its degree closed form; TPS by hand."""
import numpy as np
import pytest

from research.anytime import graph


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
@pytest.mark.parametrize("coupling", [1.0, 0.3])
def test_tas_by_power_iteration_equals_the_degree_closed_form(kind, coupling):
    rng = np.random.default_rng(0)
    subnets = np.stack([graph.network_adjacency(rng.choice(graph.VARIANTS, size=5), kind) for _ in range(4)])
    power = graph.tas(subnets, coupling, method="power")
    degree = graph.tas(subnets, coupling, method="degree")
    assert power.sum() == pytest.approx(1.0) and degree.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(power, degree, atol=1e-8)
    # The coupling matters: the closed form is not just the summed degree.
    assert not np.allclose(degree, graph.tas(subnets, 0.0, method="degree"))


def test_tps_of_a_three_block_path_by_hand():
    """Three full basic blocks, T = 1: nodes 0..9. Degrees (self-loops on 0 and 9 count once):
    0: 3, 1: 2, 2: 2, 3: 4, 4: 2, 5: 2, 6: 4, 7: 2, 8: 2, 9: 3; total 26. The path conv, skip,
    conv visits 0 1 2 3 | 6 | 7 8 9."""
    a = graph.network_adjacency(["full", "full", "full"])
    np.testing.assert_array_equal(a.sum(0), [3, 2, 2, 4, 2, 2, 4, 2, 2, 3])
    scores = graph.tas(a[None], method="power")
    routes = ["conv", "skip", "conv"]
    assert graph.path_nodes(routes) == [0, 1, 2, 3, 6, 7, 8, 9]
    assert graph.tps(scores, routes) == pytest.approx(22 / 26, abs=1e-9)
    assert graph.tps(scores, routes, mode="product") == pytest.approx(3 * 2 * 2 * 4 * 4 * 2 * 2 * 3 / 26 ** 8, rel=1e-6)
    assert graph.path_nodes(["skip", "skip", "skip"]) == [0, 3, 6, 9]


def test_block_variants_hold_the_chain_the_skip_or_both():
    full, skip, conv = (graph.block_adjacency(v) for v in ("full", "skip", "conv"))
    assert full.sum() == 2 * 4 and skip.sum() == 2 and conv.sum() == 2 * 3
    np.testing.assert_array_equal(full, skip + conv)
    assert graph.block_adjacency("full", "bottleneck").shape == (5, 5)


@pytest.mark.parametrize("call, message", [
    (lambda: graph.network_adjacency(["full", "wide"]), "variants must be a non-empty sequence of full, skip, conv"),
    (lambda: graph.block_adjacency("full", "ibn"), "unknown block kind 'ibn'"),
    (lambda: graph.path_nodes(["full"]), "routes must be a non-empty sequence of skip, conv"),
    (lambda: graph.tas(graph.network_adjacency(["full"])[None], method="eig"), "unknown method 'eig'"),
    (lambda: graph.tps(np.ones(4), ["conv"], mode="max"), "unknown mode 'max'"),
])
def test_bad_arguments_name_what_is_allowed(call, message):
    with pytest.raises(ValueError, match=message):
        call()
