"""Test set-up: eight virtual CPU devices, so sharding tests run on one machine.

The device count must be fixed before JAX initialises its backend, hence at import time here.
"""
import glob
import mmap
import os


def _add_known_xla_flags(flags: dict[str, str]) -> None:
    """Appends ``--NAME=VALUE`` to XLA_FLAGS for each flag the installed jaxlib's libraries name."""
    import importlib.util

    spec = importlib.util.find_spec("jaxlib")
    libraries = glob.glob(os.path.join(os.path.dirname(spec.origin), "*.so")) if spec and spec.origin else []
    current = os.environ.get("XLA_FLAGS", "")
    wanted = {name: value for name, value in flags.items() if name not in current}
    known = set()
    for path in libraries:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            known |= {name for name in wanted if data.find(name.encode()) >= 0}
    added = " ".join(f"--{name}={value}" for name, value in wanted.items() if name in known)
    os.environ["XLA_FLAGS"] = f"{current} {added}".strip()


if os.environ.get("RESEARCH_TEST_PLATFORM") != "device":  # tools/bench/gpu_check runs the kernel tests on the device
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # Most of the suite's time is XLA:CPU compiling small programs that then run a few times. LLVM at
    # -O0 without its expensive passes halves it, and the older elemental emitters for fusions halve
    # it again (the generative-unlearning smoke run: 273 compiles in 18.2 s -> 8.9 s, run time
    # unchanged). Notebooks and subprocesses inherit the flags. Each is set only where this jaxlib
    # knows it (XLA aborts on an unknown flag) and the caller has not set it.
    _add_known_xla_flags({"xla_backend_optimization_level": "0", "xla_llvm_disable_expensive_passes": "true",
                          "xla_cpu_use_fusion_emitters": "false"})
    # numpy's OpenBLAS threads and XLA's thread pool fight over two cores: in a notebook kernel the
    # four SVDs of upcycling SmolLM2 took 16 s with OpenBLAS's default threads and 0.4 s with one.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    # Many tests build the same programs from fresh closures, on both workers, in notebook kernels
    # and in subprocesses: XLA's persistent cache, keyed on the program, compiles each once (cold,
    # the notebooks, experiments, models and nas tests took 442 s against 471 s without it). Only
    # compiles over 0.1 s are stored, and there is no size cap: with every compile stored and a cap
    # (each write then scans the whole folder) the suite ran far slower than without the cache.
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "jax-tests"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

from research.core import tracing  # noqa: E402

tracing.install()  # as the command-line entry does: linear-time tracing of BatchNorm updates


import pytest  # noqa: E402


@pytest.fixture
def skip_without_imagenet_weights_or_data():
    """skip(config): skip the test unless torch, the EfficientNet-Lite0 weights' package and
    ``config.data`` (e.g. the CIFAR-10 sample under RESEARCH_DATA_DIR) are all here."""
    def skip(config) -> None:
        from research.data import sources
        from research.models import efficientnet_lite as effnet
        pytest.importorskip("torch", reason="the ImageNet weights are read with torch (the `ref` extra)")
        try:
            effnet.pretrained_state_dict_path()
            sources.load(config.data.name, source=config.data.source, data_dir=config.data.data_dir or None)
        except FileNotFoundError as e:
            pytest.skip(str(e))
    return skip


# SmolLM2-135M from its GGUF, loaded once per test process; the tests that use it must not change it.
@pytest.fixture(scope="session")
def smollm2_path():
    pytest.importorskip("gguf")
    pytest.importorskip("tokenizers")
    from research.models import llama_gguf
    try:
        return llama_gguf.smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2_reader(smollm2_path):
    import gguf

    return gguf.GGUFReader(smollm2_path)  # parsed once (~4 s) for both the model and the tokenizer


@pytest.fixture(scope="session")
def smollm2(smollm2_reader):
    """(LlamaConfig, Llama) of SmolLM2-135M."""
    from research.models.llama_gguf import load_gguf_llama
    return load_gguf_llama(smollm2_reader)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_reader):
    from research.models.tokenizer import tokenizer_from_gguf
    return tokenizer_from_gguf(smollm2_reader)


# The longest tests (notebooks, experiment runs, the GPU script's dry run) go first, so that two
# workers end together instead of one finishing a long test alone at the end.
LONG_FIRST = ("tests/notebooks/", "tests/experiments/", "tests/tools/test_gpu_check.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        path = item.nodeid.replace("\\", "/")
        return next((i for i, prefix in enumerate(LONG_FIRST) if path.startswith(prefix)), len(LONG_FIRST))
    items.sort(key=rank)  # stable: the order within each group is unchanged
