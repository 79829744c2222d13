"""ResNet-20 equivalence with an independent PyTorch implementation (tools/bench/torch_resnet)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research.models import build_model
from tests.models.batch_norms import randomise_batch_norms

torch = pytest.importorskip("torch")

from tools.bench import torch_resnet  # noqa: E402  (needs torch)


@pytest.fixture(scope="module")
def models():
    # An "rbg" key: its initialiser programs compile ~3x faster on CPU than the default threefry.
    rngs = nnx.Rngs(jax.random.key(0, impl="rbg"))
    model = build_model("resnet20", num_classes=10, input_shape=(16, 16, 3), rngs=rngs)
    randomise_batch_norms(model, seed=1)
    reference = torch_resnet.load_from_nnx(torch_resnet.torch_resnet20(10), model)
    x = np.random.default_rng(2).standard_normal((8, 16, 16, 3)).astype(np.float32)
    return model, reference, x


def _torch_logits(reference, x):
    with torch.no_grad():
        return reference(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()  # NHWC -> NCHW


def test_parameter_count_matches_torch(models):
    model, reference, _ = models
    ours = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    theirs = sum(p.numel() for p in reference.parameters())
    assert ours == theirs == 269_722


def test_eval_logits_match(models):
    model, reference, x = models
    model.eval()
    reference.eval()
    ours = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(ours), _torch_logits(reference, x), atol=1e-4, rtol=0)


def test_train_logits_and_running_means_match(models):
    model, reference, x = models
    model.train()
    reference.train()
    ours = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(x))  # updates the BN statistics in place
    np.testing.assert_allclose(np.asarray(ours), _torch_logits(reference, x), atol=1e-4, rtol=0)
    # flax momentum 0.9 == torch momentum 0.1. (Running variances differ by design: torch stores
    # the unbiased batch variance, flax the biased one, so only the means are compared.)
    np.testing.assert_allclose(np.asarray(model.stem_bn.mean[...]),
                               reference.stem_bn.running_mean.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(model.blocks[-1].bn2.mean[...]),
                               reference.blocks[-1].bn2.running_mean.numpy(), atol=1e-5)
