"""Test set-up: eight virtual CPU devices, so sharding tests run on one machine.

The device count must be fixed before JAX initialises its backend, hence at import time here.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
