"""Every zero-cost proxy against an independent PyTorch computation of its docstring formula, on a
tiny NB201 cell network copied into a PyTorch twin (float64 there, so the tolerances measure the
float32 error of the JAX side)."""

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from research.nas import nb201  # noqa: E402
from research.nas.proxies import PROXIES, score  # noqa: E402
from tests.models.batch_norms import randomise_batch_norms  # noqa: E402

CELL = (3, 3, 4, 1, 2, 1)  # both convs, the pool and two skips
C, N, CLASSES, SIDE, BATCH = 4, 1, 10, 16, 16
ZEN_KEY = 3
RTOL = 1e-4


# --------------------------------------------------------------------------- the PyTorch twin


class Zero(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


class GlobalPool(nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3))


class ReLUConvBN(nn.Module):
    def __init__(self, cin, cout, kernel, stride):
        super().__init__()
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-5, momentum=0.1)

    def forward(self, x):
        return self.bn(self.conv(self.relu(x)))


def _op(op, c):
    return {nb201.NONE: Zero, nb201.SKIP: nn.Identity,
            nb201.CONV1: lambda: ReLUConvBN(c, c, 1, 1),
            nb201.CONV3: lambda: ReLUConvBN(c, c, 3, 1),
            nb201.POOL: lambda: nn.AvgPool2d(3, 1, 1, count_include_pad=False)}[op]()


class Cell(nn.Module):
    def __init__(self, cell, c):
        super().__init__()
        self.edges = nn.ModuleList(_op(op, c) for op in cell)

    def forward(self, x):
        nodes = [x]
        for node in (1, 2, 3):
            nodes.append(sum(self.edges[e](nodes[src])
                             for e, (dst, src) in enumerate(nb201.EDGES) if dst == node))
        return nodes[3]


class Reduction(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv_a = ReLUConvBN(cin, cout, 3, 2)
        self.conv_b = ReLUConvBN(cout, cout, 3, 1)
        self.pool = nn.AvgPool2d(2, 2)
        self.shortcut = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x):
        return self.conv_b(self.conv_a(x)) + self.shortcut(self.pool(x))


class Network(nn.Module):
    def __init__(self, cell, c, n, classes):
        super().__init__()
        self.stem_conv = nn.Conv2d(3, c, 3, 1, 1, bias=False)
        self.stem_bn = nn.BatchNorm2d(c, eps=1e-5, momentum=0.1)
        blocks = []
        for stage in range(3):
            if stage:
                blocks.append(Reduction(c << (stage - 1), c << stage))
            blocks += [Cell(cell, c << stage) for _ in range(n)]
        self.blocks = nn.ModuleList(blocks)
        self.last_bn = nn.BatchNorm2d(4 * c, eps=1e-5, momentum=0.1)
        self.relu = nn.ReLU()
        self.pool = GlobalPool()
        self.head = nn.Linear(4 * c, classes)

    def features(self, x):
        x = self.stem_bn(self.stem_conv(x))
        for block in self.blocks:
            x = block(x)
        return self.relu(self.last_bn(x))

    def forward(self, x):
        return self.head(self.pool(self.features(x)))


def _array(v):
    return torch.from_numpy(np.array(v[...]))


def _load_conv(t, j):
    # (kh, kw, in, out) -> (out, in, kh, kw)
    t.weight.data = _array(j.kernel).permute(3, 2, 0, 1).contiguous()


def _load_bn(t, j):
    t.weight.data, t.bias.data = _array(j.scale), _array(j.bias)
    t.running_mean.data, t.running_var.data = _array(j.mean), _array(j.var)


def _load_relu_conv_bn(t, j):
    _load_conv(t.conv, j.conv)
    _load_bn(t.bn, j.bn)


def twin(model, dtype=torch.float64):
    """The PyTorch network holding ``model``'s weights and BN statistics."""
    net = Network(model.cell, model.C, model.N, model.num_classes)
    _load_conv(net.stem_conv, model.stem_conv)
    _load_bn(net.stem_bn, model.stem_bn)
    for t, j in zip(net.blocks, model.blocks, strict=True):
        if isinstance(t, Cell):
            for op, te, je in zip(model.cell, t.edges, j.edges, strict=True):
                if op in (nb201.CONV1, nb201.CONV3):
                    _load_relu_conv_bn(te, je.conv_1x1 if op == nb201.CONV1 else je.conv_3x3)
        else:
            _load_relu_conv_bn(t.conv_a, j.conv_a)
            _load_relu_conv_bn(t.conv_b, j.conv_b)
            _load_conv(t.shortcut, j.shortcut)
    _load_bn(net.last_bn, model.last_bn)
    net.head.weight.data = _array(model.head.kernel).T.contiguous()
    net.head.bias.data = _array(model.head.bias)
    return net.to(dtype).train()


def _nchw(images, dtype=torch.float64):
    return torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).to(dtype)


def _kernels(net):
    return [m.weight for m in net.modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def _relus(net):
    return [m for m in net.modules() if isinstance(m, nn.ReLU)]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model():
    # An "rbg" key: its initialiser programs compile faster on CPU than the default threefry.
    return nb201.NB201Network(CELL, num_classes=CLASSES, C=C, N=N,
                              rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(1)
    return {"image": rng.standard_normal((BATCH, SIDE, SIDE, 3)).astype(np.float32),
            "label": rng.integers(0, CLASSES, BATCH).astype(np.int32)}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # Torch's spinning worker threads and XLA's share two busy cores: one thread is ~100x faster.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _zen_key():
    return jax.random.key(ZEN_KEY, impl="rbg")  # rbg: its normal() compiles far faster on CPU


@pytest.fixture(scope="module")
def jax_scores(model, batch):
    """Every registry proxy through ``score``, each compiled on its own (one program holding all
    of them compiles slower than the separate ones together)."""
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
    graphdef, state = nnx.split(model)
    scores = {}
    # score() insists on each proxy's full batch (up to 256 images); a registry shrunk to this
    # batch keeps the test small while still going through score's slicing and float64 handling.
    # ZiCo then splits the 16 images into its 2 batches of 8.
    with pytest.MonkeyPatch.context() as patch:
        for name, proxy in list(PROXIES.items()):
            patch.setitem(PROXIES, name,
                          dataclasses.replace(proxy, batch_size=min(proxy.batch_size, BATCH)))
        for name, proxy in PROXIES.items():
            # score's own jit=True path, compiled as one program per proxy.
            run = jax.jit(lambda s, b, k, name=name: score(name, nnx.merge(graphdef, s, copy=True),
                                                           b, k, jit=False))
            with jax.enable_x64(proxy.float64):  # synflow's float64 must hold at trace time too
                scores[name] = float(run(state, jbatch, _zen_key()))
    return scores


def _check(jax_scores, name, expected, rtol=RTOL):
    got = jax_scores[name]
    assert np.isfinite(expected), (name, expected)
    np.testing.assert_allclose(got, expected, rtol=rtol, err_msg=name)


# --------------------------------------------------------------------------- the twin itself


@pytest.mark.parametrize("train", [True, False])
def test_twin_forward_matches(model, batch, train):
    model = nnx.clone(model)
    randomise_batch_norms(model, seed=2)
    net = twin(model).train(train)  # float64: the tolerance is then JAX's float32 rounding alone
    if train:
        model.train()
    else:
        model.eval()
    x = batch["image"]
    with torch.no_grad():
        logits = net(_nchw(x)).numpy()
        features = net.features(_nchw(x)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(model.features(jnp.asarray(x))), features,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(x))), logits, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- cost proxies


def test_params(model, jax_scores):
    net = twin(model)
    expected = sum(p.numel() for p in net.parameters())
    assert expected == nb201.count_params(CELL, CLASSES, C, N)
    _check(jax_scores, "params", expected, rtol=0)


def _hook_flops(net, side):
    """count_flops' convention, counted by forward hooks on one image."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            fan_in = module.in_channels // module.groups * int(np.prod(module.kernel_size))
            total += output.numel() * fan_in
        elif isinstance(module, nn.Linear):
            total += output.numel() * module.in_features
        elif isinstance(module, nn.BatchNorm2d):
            total += 2 * output.numel()
        elif isinstance(module, nn.ReLU):
            total += output.numel()
        elif isinstance(module, nn.AvgPool2d):
            total += output.numel() * module.kernel_size**2
        elif isinstance(module, GlobalPool):
            total += inputs[0].numel()

    handles = [m.register_forward_hook(hook) for m in net.modules() if not list(m.children())]
    with torch.no_grad():
        net.eval()(torch.zeros(1, 3, side, side, dtype=torch.float64))
    for h in handles:
        h.remove()
    return total


@pytest.mark.parametrize("side", [16, 32])
def test_count_flops(model, side):
    assert nb201.count_flops(CELL, CLASSES, side, C, N) == _hook_flops(twin(model), side)


def test_flops(model, jax_scores):
    _check(jax_scores, "flops", _hook_flops(twin(model), 32), rtol=0)  # model.flops(): 32x32


# --------------------------------------------------------------------------- gradient proxies


def _loss(net, images, labels):
    return F.cross_entropy(net(_nchw(images)), torch.from_numpy(labels).long())


def _kernel_grads(model, batch):
    net = twin(model)
    kernels = _kernels(net)
    grads = torch.autograd.grad(_loss(net, batch["image"], batch["label"]), kernels)
    return kernels, grads


def test_grad_norm(model, batch, jax_scores):
    _, grads = _kernel_grads(model, batch)
    _check(jax_scores, "grad_norm", sum(g.norm().item() for g in grads))


def test_snip(model, batch, jax_scores):
    kernels, grads = _kernel_grads(model, batch)
    _check(jax_scores, "snip", sum((w * g).abs().sum().item() for w, g in zip(kernels, grads)))


def test_grasp(model, batch, jax_scores):
    net = twin(model)
    kernels = _kernels(net)
    grads = torch.autograd.grad(_loss(net, batch["image"], batch["label"]), kernels,
                                create_graph=True)
    # H g as the gradient of g . stop_gradient(g).
    hg = torch.autograd.grad(sum((g * g.detach()).sum() for g in grads), kernels)
    _check(jax_scores, "grasp", -sum((w * h).sum().item() for w, h in zip(kernels, hg)))


def test_fisher(model, batch, jax_scores):
    net = twin(model)
    taps = []  # every ReLU's output; backward fills in its .grad = dL/da

    def hook(module, inputs, output):
        output.retain_grad()
        taps.append(output)

    for relu in _relus(net):
        relu.register_forward_hook(hook)
    _loss(net, batch["image"], batch["label"]).backward()
    total = 0.0
    for a in taps:
        per_channel = (a * a.grad).sum(dim=(2, 3))  # (N, C)
        total += 0.5 * (per_channel**2).mean(dim=0).sum().item()
    assert len(taps) == 1 + sum(op in (nb201.CONV1, nb201.CONV3) for op in CELL) * 3 * N + 4
    _check(jax_scores, "fisher", total)


def test_zico(model, batch, jax_scores):
    net = twin(model)
    half = BATCH // 2
    per_batch = [torch.autograd.grad(_loss(net, batch["image"][s], batch["label"][s]),
                                     _kernels(net))
                 for s in (slice(0, half), slice(half, BATCH))]
    total = 0.0
    for layer in zip(*per_batch):
        g = torch.stack(layer)
        std = g.std(dim=0, unbiased=False)
        kept = std > 0
        layer_sum = (g.abs().mean(dim=0)[kept] / std[kept]).sum().item()
        total += np.log(layer_sum) if layer_sum > 0 else 0.0
    # mean|g| / std = (|g1| + |g2|) / |g1 - g2| amplifies rounding where a weight's two batch
    # gradients nearly agree (ratios reach ~1e4 here): torch's own float32 run is 4e-5 off this
    # float64 value, JAX's 2e-5.
    _check(jax_scores, "zico", total, rtol=5e-4)


# --------------------------------------------------------------------------- activation proxies


def test_naswot(model, batch, jax_scores):
    net = twin(model)
    pre = []
    for relu in _relus(net):
        relu.register_forward_hook(lambda m, inputs, output: pre.append(inputs[0]))
    with torch.no_grad():
        net(_nchw(batch["image"]))
    kernel = torch.zeros(BATCH, BATCH, dtype=torch.float64)
    for p in pre:
        c = (p.reshape(BATCH, -1) > 0).double()
        kernel += c @ c.T + (1 - c) @ (1 - c).T
    _check(jax_scores, "naswot", torch.linalg.slogdet(kernel).logabsdet.item())


def test_jacob_cov(model, batch, jax_scores):
    net = twin(model)
    x = _nchw(batch["image"]).requires_grad_()
    (jacobian,) = torch.autograd.grad(net(x).sum(), x)
    # Rows are samples; the NCHW feature order does not change a correlation between samples.
    eigenvalues = torch.linalg.eigvalsh(torch.corrcoef(jacobian.reshape(BATCH, -1)))
    k = 1e-5
    _check(jax_scores, "jacob_cov",
           -(torch.log(eigenvalues + k) + 1 / (eigenvalues + k)).sum().item())


def test_ntk(model, batch, jax_scores):
    net = twin(model)
    kernels = _kernels(net)
    sums = net(_nchw(batch["image"])).sum(dim=1)
    rows = torch.stack([torch.cat([g.reshape(-1) for g in
                                   torch.autograd.grad(sums[n], kernels, retain_graph=True)])
                        for n in range(BATCH)])
    eigenvalues = torch.linalg.eigvalsh(rows @ rows.T)
    condition = (eigenvalues[-1] / eigenvalues[0]).item()
    # The JAX side takes eigenvalues of a float32 Theta: lambda_min carries an absolute error of
    # about eps32 * lambda_max, i.e. a relative error of eps32 * condition.
    _check(jax_scores, "ntk", -condition, rtol=max(RTOL, 10 * condition * 2**-23))


# --------------------------------------------------------------------------- data-free proxies


def test_synflow(model, batch, jax_scores):
    net = twin(model)

    def strip_bn(module):  # BatchNorm switched off: the identity
        for name, child in module.named_children():
            if isinstance(child, nn.BatchNorm2d):
                setattr(module, name, nn.Identity())
            else:
                strip_bn(child)

    strip_bn(net)
    with torch.no_grad():
        for p in net.parameters():
            p.abs_()
    kernels = _kernels(net)
    total_output = net.eval()(torch.ones(1, 3, SIDE, SIDE, dtype=torch.float64)).sum()
    grads = torch.autograd.grad(total_output, kernels)
    _check(jax_scores, "synflow", sum((w * g).abs().sum().item() for w, g in zip(kernels, grads)),
           rtol=1e-12)  # float64 on both sides


def _zen_draws(model):
    """The Gaussian kernels, clean input x and noise eps that zen draws for ``ZEN_KEY``: a key per
    kernel folded in from its path, then x and eps from their own keys."""
    k_weights, k_x, k_eps = jax.random.split(_zen_key(), 3)
    is_kernel = lambda path, v: isinstance(v, nnx.Param) and path[-1] == "kernel"  # noqa: E731
    kernels = {path: jax.random.normal(
                   jax.random.fold_in(k_weights, zlib.crc32(repr(path).encode())), v.shape, v.dtype)
               for path, v in nnx.to_flat_state(nnx.state(model, is_kernel))}
    shape = (BATCH, SIDE, SIDE, 3)
    return (kernels, jax.random.normal(k_x, shape, jnp.float32),
            jax.random.normal(k_eps, shape, jnp.float32))


def test_zen(model, jax_scores):
    kernels, x, eps = _zen_draws(model)
    gaussian = nnx.clone(model)
    nnx.update(gaussian, nnx.from_flat_state(list(kernels.items())))
    net = twin(gaussian)
    with torch.no_grad():
        net.head.bias.zero_()
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0)
                m.bias.zero_()
        variances = []
        hooks = [m.register_forward_hook(lambda m, inputs, output: variances.append(
                     inputs[0].var(dim=(0, 2, 3), unbiased=False)))
                 for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
        clean = net.features(_nchw(x))
        for h in hooks:
            h.remove()
        mixed = net.features(_nchw(x + 0.01 * eps))
        expressivity = (clean - mixed).abs().reshape(BATCH, -1).sum(dim=1).mean()
        bn_term = sum(torch.log(torch.sqrt(v.mean())) for v in variances)
    assert len(variances) == 2 + sum(op in (nb201.CONV1, nb201.CONV3) for op in CELL) * 3 * N + 4
    _check(jax_scores, "zen", (torch.log(expressivity) + bn_term).item())


def test_every_proxy_is_tested(jax_scores):
    tested = {name[len("test_"):] for name in globals() if name.startswith("test_")}
    assert set(PROXIES) <= tested, set(PROXIES) - tested
