"""Activation taps: the nonlinearities of the framework's models, made observable.

Zero-cost NAS proxies read the inside of a network: NASWOT the binary codes of every ReLU, Fisher
the activations and their gradients. The models call ``taps.relu`` (``relu6``, ``gelu``) instead of
the plain function; outside ``recording()`` this is exactly the plain activation, so training and
inference are unaffected. Inside ``recording()`` (at trace time, so it works under ``jit``, ``grad``
and ``vmap``) every call appends a ``Tap``, and may add a zero ``probe`` to its output so that the
gradient with respect to the probe is dL/da for that activation.

``active`` marks a tap that belongs to an operation a masked super-network has switched off
(weight 0.0); proxies weight each tap by it, so a masked network scores like the exact one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp

_local = threading.local()


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Tap:
    """One activation call: ``pre`` its input, ``post`` its output (with any probe added),
    ``active`` a scalar weight (1.0 unless a masked network switched the operation off)."""

    pre: jax.Array
    post: jax.Array
    active: jax.Array | float


@dataclasses.dataclass
class Recorder:
    probes: Sequence[jax.Array] | None = None
    taps: list[Tap] = dataclasses.field(default_factory=list)


@contextlib.contextmanager
def recording(probes: Sequence[jax.Array] | None = None) -> Iterator[Recorder]:
    """Record every tapped activation run inside the block; ``probes[i]`` (same shape as the i-th
    activation's output) is added to that output."""
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    recorder = Recorder(probes=probes)
    stack.append(recorder)
    try:
        yield recorder
    finally:
        stack.pop()


def is_recording() -> bool:
    """Whether a ``recording()`` block is open (code that traces a separate program, such as a
    nested ``jax.jit``, must then run inline so its taps reach the recorder)."""
    return bool(getattr(_local, "stack", None))


def _tap(pre: jax.Array, post: jax.Array, active) -> jax.Array:
    stack = getattr(_local, "stack", None)
    if not stack:
        return post
    recorder = stack[-1]
    if recorder.probes is not None:
        post = post + recorder.probes[len(recorder.taps)].astype(post.dtype)
    recorder.taps.append(Tap(pre, post, 1.0 if active is None else active))
    return post


def relu(x: jax.Array, active=None) -> jax.Array:
    return _tap(x, jax.nn.relu(x), active)


def relu6(x: jax.Array, active=None) -> jax.Array:
    return _tap(x, jax.nn.relu6(x), active)


def gelu(x: jax.Array, active=None, approximate: bool = False) -> jax.Array:
    return _tap(x, jax.nn.gelu(x, approximate=approximate), active)


def zeros_like_outputs(taps: Sequence[Tap]) -> list[jax.Array]:
    """Zero probes shaped like the recorded activations' outputs."""
    return [jnp.zeros(t.post.shape, t.post.dtype) for t in taps]
