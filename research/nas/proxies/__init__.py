"""Zero-cost NAS proxies: one registry, one signature.

    proxy(model, batch, key) -> scalar,   higher = predicted better

``model`` is any NNX classifier of the framework (NB201 cells and super-networks, ResNet,
MobileNetV2, ViT), at initialisation; ``batch`` = {"image": (N, H, W, C) normalised,
"label": (N,)}; ``key`` seeds proxies that draw random numbers (Zen). A proxy never changes
``model``. ``score`` applies a proxy's batch size and float64 needs; ``PROXIES[name].batch_size``
is how many images it reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from research.nas.proxies.activation import jacob_cov, naswot
from research.nas.proxies.cost import flops, params
from research.nas.proxies.gradient import fisher, grad_norm, grasp, snip
from research.nas.proxies.ntk import ntk
from research.nas.proxies.synflow import synflow
from research.nas.proxies.zen import zen
from research.nas.proxies.zico import zico


@dataclasses.dataclass(frozen=True)
class Proxy:
    name: str
    fn: Callable
    batch_size: int  # images read (0: data-free)
    float64: bool = False


PROXIES = {p.name: p for p in (
    Proxy("zico", zico, 256),  # 2 batches of 128, as the paper
    Proxy("params", params, 0),
    Proxy("flops", flops, 1),
    Proxy("grad_norm", grad_norm, 64),
    Proxy("snip", snip, 64),
    Proxy("grasp", grasp, 64),
    Proxy("fisher", fisher, 64),
    Proxy("synflow", synflow, 1, float64=True),
    Proxy("jacob_cov", jacob_cov, 64),
    Proxy("naswot", naswot, 128),
    Proxy("zen", zen, 64),
    Proxy("ntk", ntk, 64),
)}
PROXY_NAMES = tuple(PROXIES)


def get(name: str) -> Proxy:
    if name not in PROXIES:
        raise ValueError(f"unknown proxy {name!r}; choose from: {', '.join(PROXY_NAMES)}")
    return PROXIES[name]


def as_proxy_batch(batch: dict) -> dict:
    """``batch`` as the proxies read it: ``image`` (N, H, W, C) floats, normalised, and ``label`` (N,)
    ints. A training batch's ``images`` / ``labels`` are taken under those names; raw uint8 images or
    other keys are a ValueError saying what is expected."""
    batch = {{"images": "image", "labels": "label"}.get(k, k): v for k, v in batch.items()}
    if "image" not in batch or "label" not in batch:
        raise ValueError(f"a proxy batch holds 'image' (N, H, W, C) floats and 'label' (N,) ints; got keys "
                         f"{sorted(batch)}")
    if not jnp.issubdtype(batch["image"].dtype, jnp.floating):
        raise ValueError(f"the proxy batch's images are {batch['image'].dtype}: normalise them to floats first "
                         f"(research.data.augment.normalize, or research.nas.benchmark.proxy_batch)")
    return batch


def take(batch: dict, n: int, name: str = "this proxy") -> dict:
    """The first ``n`` images of ``batch`` (all of them for n = 0)."""
    have = batch["image"].shape[0]
    if n and have < n:
        raise ValueError(f"the batch has {have} images and {name} reads {n}: pass {n} or more, or "
                         f"score(..., batch_size={have}) to read fewer (its scores then differ from the paper's "
                         f"setting)")
    return {k: v[:n] for k, v in batch.items()} if n else batch


def read_batch(proxy: Proxy, batch: dict, batch_size: int | None = None) -> dict:
    """What ``proxy`` reads of ``batch``: `as_proxy_batch`, then its first ``batch_size`` images
    (default: the proxy's own count)."""
    return take(as_proxy_batch(batch), max(proxy.batch_size if batch_size is None else batch_size, 1),
                f"proxy {proxy.name}")


def score(name: str, model, batch: dict, key=None, jit: bool = True,
          batch_size: int | None = None) -> jax.Array:
    """Proxy ``name`` on ``model``, reading ``batch_size`` images of ``batch`` (default: the
    proxy's own); compiled as one program unless ``jit=False`` (op by op)."""
    proxy = get(name)
    batch = read_batch(proxy, batch, batch_size)
    fn = proxy.fn
    if jit:  # state, batch and key as arguments: as closed-over constants XLA would fold them
        graphdef, state = nnx.split(model)
        fn = lambda m, b, k: jax.jit(  # noqa: E731
            lambda s, b, k: proxy.fn(nnx.merge(graphdef, s, copy=True), b, k))(state, b, k)
    with jax.enable_x64(True) if proxy.float64 else contextlib.nullcontext():
        return fn(model, batch, key)


__all__ = ["PROXIES", "PROXY_NAMES", "Proxy", "as_proxy_batch", "get", "read_batch", "score", "take"]
