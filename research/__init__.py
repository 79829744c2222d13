"""JAX/Flax research framework: compression, efficient adaptation and machine unlearning."""

from research.core import tracing as _tracing

_tracing.install()  # linear-time tracing of BatchNorm updates (see research/core/tracing.py)
