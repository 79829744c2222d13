"""NB201 space: encodings, parameter and FLOP counts against the ground-truth file, and the masked
super-network against the cell network."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research.nas import nb201

GROUND_TRUTH = os.path.join(os.environ.get("RESEARCH_DATA_DIR", ""), "nasbench201",
                            "zc_nasbench201.json")
EXAMPLE = "|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|"


def test_string_and_index_round_trip():
    cell = nb201.from_string(EXAMPLE)
    assert cell == (3, 3, 4, 1, 3, 1)
    assert nb201.to_string(cell) == EXAMPLE
    assert nb201.to_index((0,) * 6) == 0 and nb201.to_index((4,) * 6) == nb201.NUM_CELLS - 1
    cells = nb201.all_cells()
    assert cells.shape == (15625, 6) and len({tuple(c) for c in cells}) == 15625
    for i in (0, 1, 777, 11791, 15624):
        assert nb201.to_index(nb201.from_index(i)) == i and tuple(cells[i]) == nb201.from_index(i)


def test_naslib_order():
    # NASLib lists edges 1<-0, 2<-0, 3<-0, 2<-1, 3<-1, 3<-2 with codes skip, none, 3x3, 1x1, pool.
    cell = nb201.from_naslib((1, 0, 1, 4, 0, 1))
    assert cell == (nb201.NONE, nb201.SKIP, nb201.POOL, nb201.NONE, nb201.SKIP, nb201.NONE)
    for c in nb201.all_cells()[::997]:
        assert nb201.from_naslib(nb201.to_naslib(c)) == tuple(c)


def test_bad_cells_are_rejected():
    with pytest.raises(ValueError, match="6 op indices"):
        nb201.check_cell((0, 1, 2))
    with pytest.raises(ValueError, match="not an NB201 cell string"):
        nb201.from_string("|conv~0|+|none~0|none~1|+|none~0|none~1|none~2|")
    with pytest.raises(ValueError, match="outside"):
        nb201.from_index(15625)


@pytest.mark.skipif(not os.path.exists(GROUND_TRUTH), reason="NB201 ground-truth file absent")
@pytest.mark.parametrize("dataset,classes,size", [("cifar10", 10, 32), ("cifar100", 100, 32),
                                                  ("ImageNet16-120", 120, 16)])
def test_counts_match_the_ground_truth_file(dataset, classes, size):
    with open(GROUND_TRUTH) as f:
        cells = json.load(f)[dataset]
    for key, entry in cells.items():
        cell = nb201.from_naslib(json.loads(key.replace("(", "[").replace(")", "]")))
        assert nb201.count_params(cell, classes) == round(entry["params"]["score"] * 1e6)
        flops = nb201.count_flops(cell, classes, size) / 1e6
        assert abs(flops / entry["flops"]["score"] - 1) < 3e-4, (key, flops)


def test_network_parameter_count_equals_formula():
    for cell in [(3, 3, 4, 1, 3, 1), (0,) * 6, (2, 1, 4, 2, 0, 3)]:
        model = nb201.NB201Network(cell, rngs=nnx.Rngs(0))
        n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        assert n == nb201.count_params(cell)


def test_masked_network_equals_cell_network():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 16, 16, 3)), jnp.float32)
    for cell in [(3, 3, 4, 1, 3, 1), (1, 0, 2, 4, 0, 3), (0,) * 6]:
        # Fresh networks per cell: a training-mode call updates BN statistics.
        masked = nb201.NB201Network(None, C=4, N=1, rngs=nnx.Rngs(3))
        masked.set_cell(cell)
        direct = nb201.NB201Network(cell, C=4, N=1, rngs=nnx.Rngs(3))  # same seed, same weights
        copied = nb201.exact_from_masked(masked, cell)
        for train in (False, True):
            for m in (masked, direct, copied):
                m.train() if train else m.eval()
            ref = direct(x)
            np.testing.assert_allclose(masked(x), ref, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(copied(x), ref, rtol=1e-5, atol=1e-6)
        assert float(masked.flops()) == nb201.count_flops(cell, 10, 32, 4, 1)


def test_cell_network_cannot_switch_cells():
    with pytest.raises(ValueError, match="masked network"):
        nb201.NB201Network((0,) * 6, C=2, N=1, rngs=nnx.Rngs(0)).set_cell((1,) * 6)


def test_average_pool_ignores_padding():
    x = jnp.ones((1, 3, 3, 1))
    np.testing.assert_allclose(nb201.avg_pool_3x3(x), x)  # a border mean of ones stays 1

