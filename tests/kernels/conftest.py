"""On a GPU the kernel tests compare float32 at full precision.

A float32 dot on an NVIDIA GPU defaults to TF32 (a 10-bit mantissa), in the kernels and in the XLA
reference alike, and the two sum in different orders: on an H200 they differed by up to 2e-4 where
the tests allow 2e-5. The tests check the algorithm, so each runs under
``jax.default_matmul_precision("highest")`` there (IEEE float32 dots in Triton and XLA); the
bfloat16 cases keep their own tolerances. Elsewhere (interpreted on the CPU) this changes nothing.
"""
import contextlib

import jax
import pytest


@pytest.fixture(autouse=True)
def full_float32_precision_on_a_gpu():
    with jax.default_matmul_precision("highest") if jax.default_backend() == "gpu" else contextlib.nullcontext():
        yield
