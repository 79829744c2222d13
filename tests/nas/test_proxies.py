"""Proxies: a masked super-network scores like the cell network, vmapped scoring equals one cell at a
time, proxies leave the model alone and run on the framework's other classifiers."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research.models import build_model
from research.nas import nb201, proxies, scoring

CELL = (3, 3, 4, 1, 2, 1)  # both convs, a pool, skips: every kind of edge


def _batch(n=8, size=8, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": jnp.asarray(rng.normal(size=(n, size, size, 3)), jnp.float32),
            "label": jnp.asarray(rng.integers(0, classes, n), jnp.int32)}


def _run(name, model, batch):
    """The proxy compiled as one program (op by op would compile every primitive separately)."""
    return float(proxies.score(name, model, batch, jax.random.key(1), batch_size=len(batch["label"])))


@pytest.fixture(scope="module")
def networks():
    masked = nb201.NB201Network(None, C=2, N=1, rngs=nnx.Rngs(0))
    masked.set_cell(CELL)
    return masked, nb201.exact_from_masked(masked, CELL)


# The default run covers each mechanism that could break under masking (gradients, activation
# taps, BN layers, parameter counts, float64); the rest are marked slow (one compilation each).
FAST = ("zico", "naswot", "zen", "params", "flops")


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow)
                                  for n in proxies.PROXY_NAMES])
def test_masked_network_scores_like_the_cell_network(networks, name):
    masked, exact = networks
    batch = _batch()
    a, b = _run(name, masked, batch), _run(name, exact, batch)
    assert np.isfinite(a)
    np.testing.assert_allclose(a, b, rtol=2e-4)


def test_proxies_leave_the_model_unchanged(networks):
    masked, _ = networks
    before = jax.tree.map(np.array, nnx.state(masked))
    for name in ("zen", "synflow"):  # the two that rewrite weights
        proxy = proxies.get(name)
        run = nnx.jit(proxy.fn)  # nnx.jit writes a mutation of `masked` back to it, as running op by op would
        with jax.enable_x64(True) if proxy.float64 else contextlib.nullcontext():
            run(masked, _batch(), jax.random.key(0))
    after = jax.tree.map(np.array, nnx.state(masked))
    jax.tree.map(np.testing.assert_array_equal, before, after)


@pytest.mark.parametrize("name", ["naswot", pytest.param("snip", marks=pytest.mark.slow)])
def test_vmapped_scores_equal_one_cell_at_a_time(name):
    model = nb201.NB201Network(None, C=2, N=1, rngs=nnx.Rngs(0))
    cells = [CELL, (1, 0, 2, 4, 0, 3), (2, 2, 2, 2, 2, 2)]
    batch = _batch(n=8, size=8)
    vmapped = scoring.score_cells(name, model, cells, batch, chunk=2, batch_size=8)
    for cell, v in zip(cells, vmapped):
        model.set_cell(cell)
        np.testing.assert_allclose(v, _run(name, model, batch), rtol=1e-4)


def test_zico_drops_switched_off_layers():
    # A cell of skip edges leaves only stem, reductions and head; their log-terms are the score.
    from research.nas.proxies.zico import layer_scores
    masked = nb201.NB201Network(None, C=2, N=1, rngs=nnx.Rngs(0))
    masked.set_cell((nb201.SKIP,) * 6)
    scores = nnx.jit(lambda m, b: layer_scores(m, b, 2))(masked, _batch())  # one program, not op by op
    for path, s in scores.items():
        if "edges" in path:
            assert float(s) == 0.0
    assert sum(float(s) != 0 for s in scores.values()) == 1 + 2 * 3 + 1  # stem, 2x(a, b, short), head


OTHERS = [("resnet20", {}), ("mobilenet_v2", {"width_multiplier": 0.25}),
          ("vit_tiny", {"patch_size": 4, "depth": 1})]


@pytest.fixture(scope="module")
def other_classifiers():
    """One build of each of OTHERS, shared by the proxies (which leave a model unchanged, see above)."""
    built = {}

    def get(model_name, kwargs):
        if model_name not in built:
            built[model_name] = build_model(model_name, num_classes=10, input_shape=(8, 8, 3), rngs=nnx.Rngs(0),
                                            **kwargs)
        return built[model_name]
    return get


@pytest.mark.parametrize("model_name,kwargs", OTHERS)
@pytest.mark.parametrize("name", ["naswot", "zen", "zico"])
def test_proxies_run_on_other_classifiers(other_classifiers, model_name, kwargs, name):
    assert np.isfinite(_run(name, other_classifiers(model_name, kwargs), _batch()))


@pytest.mark.slow
@pytest.mark.parametrize("model_name,kwargs", OTHERS)
def test_every_proxy_runs_on_other_classifiers(model_name, kwargs):
    model = build_model(model_name, num_classes=10, input_shape=(8, 8, 3), rngs=nnx.Rngs(0),
                        **kwargs)
    for name in proxies.PROXY_NAMES:
        assert np.isfinite(_run(name, model, _batch())), name


def test_score_reads_its_batch_size_and_rejects_a_short_batch(networks):
    masked, _ = networks
    with pytest.raises(ValueError, match=r"the batch has 8 images and proxy zico reads 256: .*batch_size=8"):
        proxies.score("zico", masked, _batch())
    with pytest.raises(ValueError, match="unknown proxy 'zicoo'"):
        proxies.get("zicoo")


class PlainReluNet(nnx.Module):
    """A network that calls jax.nn.relu itself: no activation taps."""

    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.head = nnx.Linear(4, 10, rngs=rngs)

    def __call__(self, x):
        return self.head(jax.nn.relu(self.conv(x)).mean(axis=(1, 2)))


@pytest.mark.parametrize("name", ["naswot", "fisher"])
def test_a_proxy_that_reads_activations_says_so_on_a_network_without_taps(name):
    with pytest.raises(ValueError, match=f"proxy {name} reads the network's activations through research.models.taps"):
        proxies.score(name, PlainReluNet(nnx.Rngs(0)), _batch(), jit=False, batch_size=8)


def test_a_training_batch_is_read_under_its_own_names_and_raw_images_are_refused():
    batch = _batch()
    named = {"images": batch["image"], "labels": batch["label"]}
    assert proxies.as_proxy_batch(named).keys() == {"image", "label"}
    with pytest.raises(ValueError, match=r"images are uint8: normalise them to floats first"):
        proxies.as_proxy_batch({"images": np.zeros((2, 8, 8, 3), np.uint8), "labels": np.zeros(2, np.int32)})
    with pytest.raises(ValueError, match=r"holds 'image' .* and 'label' .*; got keys \['x', 'y'\]"):
        proxies.as_proxy_batch({"x": 1, "y": 2})
