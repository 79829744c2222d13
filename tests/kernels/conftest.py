"""On an accelerator the kernel tests compare float32 at full precision.

A float32 dot defaults to TF32 (a 10-bit mantissa) on an NVIDIA GPU and to bfloat16 passes on a
TPU, in the kernels and in the XLA reference alike, and the two sum in different orders: on an H200
they differed by up to 2e-4 where the tests allow 2e-5. The tests check the algorithm, so there each
runs under ``jax.default_matmul_precision("highest")`` (IEEE float32 dots in Triton and XLA); the
bfloat16 cases keep their own tolerances. On the CPU (kernels interpreted) this changes nothing.
"""
import contextlib

import jax
import pytest


@pytest.fixture(autouse=True)
def full_float32_precision_on_an_accelerator():
    with jax.default_matmul_precision("highest") if jax.default_backend() != "cpu" else contextlib.nullcontext():
        yield
