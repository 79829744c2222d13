"""run_compiled: the plain call's outputs and BN statistics, one program per module structure."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.models import compiled, taps


class ConvBN(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(6, 6, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(6, rngs=rngs)

    def __call__(self, x):
        return taps.relu(self.bn(self.conv(x)))


X = jax.random.normal(jax.random.key(0), (4, 8, 8, 6))


def test_training_mode_matches_the_plain_call_and_writes_statistics():
    for seed in (1, 2):
        module = ConvBN(nnx.Rngs(seed))
        inline = nnx.clone(module)
        np.testing.assert_allclose(compiled.run_compiled(module, X), inline(X), atol=1e-5)
        np.testing.assert_allclose(module.bn.mean[...], inline.bn.mean[...], atol=1e-6)
        assert float(jnp.abs(module.bn.mean[...]).sum()) > 0  # the statistics did move


def test_one_program_serves_every_module_of_a_structure():
    compiled.run_compiled(ConvBN(nnx.Rngs(3)), X)
    size = compiled._compiled_call._cache_size()
    module = ConvBN(nnx.Rngs(4))
    compiled.run_compiled(module, X)
    assert compiled._compiled_call._cache_size() == size
    module.eval()  # another structure (BN reads its statistics): one more program
    before = module.bn.mean[...]
    np.testing.assert_allclose(compiled.run_compiled(module, X), nnx.clone(module)(X), atol=1e-5)
    np.testing.assert_array_equal(module.bn.mean[...], before)
    assert compiled._compiled_call._cache_size() == size + 1


def test_runs_inline_while_taps_record():
    module = ConvBN(nnx.Rngs(5))
    with taps.recording() as recorder:
        compiled.run_compiled(module, X)
    assert len(recorder.taps) == 1 and recorder.taps[0].pre.shape == X.shape


def test_gradients_equal_the_plain_call():
    module = ConvBN(nnx.Rngs(6))
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def loss(p, run):
        m = nnx.merge(graphdef, p, rest, copy=True)
        return jnp.sum(run(m, X) ** 2)
    want = jax.grad(loss)(params, lambda m, x: m(x))
    got = jax.grad(loss)(params, compiled.run_compiled)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), got, want)
