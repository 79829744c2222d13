"""Parameter-subset filters: bn / head / backbone partition every model's Params exactly."""

import jax
import pytest
from flax import nnx

from research.models import build_model
from research.models.filters import PARAM_SUBSETS, param_filter


def abstract(name, **kwargs):
    return nnx.eval_shape(lambda: build_model(name, num_classes=10, input_shape=(32, 32, 3),
                                              rngs=nnx.Rngs(0), **kwargs))


def param_paths(model, subset):
    return set(nnx.state(model, param_filter(model, subset)).flat_state().paths)


@pytest.mark.parametrize("name", ["resnet20", "mobilenet_v2", "vit_tiny"])
def test_subsets_partition_params(name):
    model = abstract(name)
    every = param_paths(model, "all")
    bn, head, backbone = (param_paths(model, s) for s in ("bn", "head", "backbone"))
    assert bn | head | backbone == every
    assert len(bn) + len(head) + len(backbone) == len(every)  # pairwise disjoint
    assert param_paths(model, "bn_and_head") == bn | head
    assert head == {("head", "kernel"), ("head", "bias")}
    # bn holds exactly the scale/bias of BatchNorm layers, and never the running statistics.
    assert all(path[-1] in ("scale", "bias") and "bn" in path[-2] for path in bn)
    assert not nnx.state(model, nnx.All(nnx.BatchStat, param_filter(model, "bn"))).flat_state()
    if name == "vit_tiny":
        assert bn == set()  # LayerNorm is not BatchNorm
    else:
        n_bn = sum(isinstance(node, nnx.BatchNorm) for _, node in nnx.iter_graph(model))
        assert len(bn) == 2 * n_bn


def count(state):
    return sum(x.size for x in jax.tree.leaves(state))


def test_filters_work_with_split():
    model = abstract("resnet20")
    _, trainable, frozen = nnx.split(model, param_filter(model, "bn_and_head"), ...)
    assert count(trainable) == 1376 + 650  # 688 BN channels x 2, head 64 x 10 + 10
    frozen_params, _ = nnx.split_state(frozen, nnx.Param, ...)
    assert count(frozen_params) == 269_722 - count(trainable)


def test_unknown_subset_raises():
    model = abstract("vit_tiny", depth=1)
    with pytest.raises(ValueError, match="'bogus'.*all, bn, head, backbone, bn_and_head"):
        param_filter(model, "bogus")
    assert set(PARAM_SUBSETS) == {"all", "bn", "head", "backbone", "bn_and_head"}
