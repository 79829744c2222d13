"""Linear-time tracing of NNX Variable writes on JAX versions whose tracers probe the whole trace.

``Tracer.sharding`` and ``Tracer.device`` raise AttributeError, so that ``getattr(x, "sharding",
None)`` works on tracers. Before jax-ml/jax#40041 their message also named the operations a tracer
came from, and finding them walks every equation traced so far. Flax NNX's ``Variable.set_value``
probes ``value.sharding`` on every write (each BatchNorm statistics update in training mode), so
tracing a network with many BatchNorm layers was quadratic in its size: minutes for the NB201
super-network. ``install()`` keeps the AttributeError and drops only the walk; it does nothing on
JAX versions that no longer walk.
"""

from __future__ import annotations

from jax._src import core as _core

_ATTRIBUTES = ("sharding", "device")


def _walks(prop: property) -> bool:
    return "_origin_msg" in prop.fget.__code__.co_names


def _short(name: str) -> property:
    def fget(self):
        raise AttributeError(f"The '{name}' attribute is not available on {self._error_repr()}.")
    return property(fget)


def install() -> bool:
    """Patches the tracer attributes that walk the trace; True when anything was patched."""
    patched = False
    for name in _ATTRIBUTES:
        prop = getattr(_core.Tracer, name, None)
        if isinstance(prop, property) and _walks(prop):
            setattr(_core.Tracer, name, _short(name))
            patched = True
    return patched
