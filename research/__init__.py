"""JAX/Flax research framework: compression, efficient adaptation and machine unlearning.

Importing the library changes no global JAX or Flax setting. On jax versions whose tracers walk
the whole trace on ``.sharding`` (see research/core/tracing.py), call
``research.core.tracing.install()`` once for linear-time tracing of networks with many BatchNorm
layers; the command-line entry (``research.core.cli.run``) does.
"""

__version__ = "0.2.0"
