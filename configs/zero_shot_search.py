"""Zero-shot architecture search under a budget: evolution (ZiCo / Zen-NAS) against random search
with the same number of proxy evaluations.

    python -m experiments.zero_shot_search --config configs/zero_shot_search.py --workdir runs/zs_nb201
    python -m experiments.zero_shot_search --config configs/zero_shot_search.py:cifar100 --workdir runs/zs_nb201_c100
    python -m experiments.zero_shot_search --config configs/zero_shot_search.py:mobilenet --workdir runs/zs_mbv2
    python -m experiments.zero_shot_search --config configs/zero_shot_search.py:smoke --workdir /tmp/smoke
    python -m experiments.zero_shot_search --config configs/zero_shot_search.py \
        --config.budget_kind=latency --config.budget=3 --workdir runs/zs_latency

``budget`` is in the unit of ``budget_kind``: MFLOPs (NB201: ``nb201.count_flops``' convention;
mobilenet: multiply-adds of convs and classifier), millions of parameters, or milliseconds of
measured forward latency on the device the run is on (batch ``latency_batch``). Costs are those of
the network as built (``width``, ``cells_per_stage``, ``width_multiplier``). For NB201 the ground
truth (``val_accuracy``) is that of NB201's full-size network of the cell, whatever the width
searched at. NB201 cells range from 7.8 to 220 MFLOPs and 0.07 to 1.53 M params at C=16, N=5;
the mobilenet space from about 13 to 210 M multiply-adds (MobileNetV2 itself: 88).
"""
import ml_collections

from research.core import config as config_lib

PRESETS = ("smoke", "cifar100", "mobilenet")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    presets = config_lib.parse_presets(arg, PRESETS, "configs/zero_shot_search.py")
    c = ml_collections.ConfigDict()
    c.space = "nb201"                 # nb201 | mobilenet
    c.proxy = "zico"                  # any name of research.nas.proxies
    c.budget_kind = "flops"           # flops | params | latency
    c.budget = 100.0                  # MFLOPs | M params | ms
    c.population = 20                 # P
    c.steps = 100                     # mutations tried by evolution
    c.seed = 0                        # search, network initialisation (one for all) and proxy key
    c.num_images = 256                # fixed CIFAR training images the proxy reads from
    c.dataset = "cifar10"             # cifar10 | cifar100: images, classes, ground truth
    c.jit = False                     # compile each candidate's proxy whole (else op by op)
    c.progress = True
    # NB201
    c.candidates = "file"             # file: only the ground-truth file's cells | all: 15,625
    c.ground_truth = ""               # zc_nasbench201.json ("" = $RESEARCH_DATA_DIR/nasbench201/)
    c.width = 16                      # NB201's C
    c.cells_per_stage = 5             # NB201's N
    # mobilenet
    c.width_multiplier = 1.0          # scales every width of the space (1.0: MobileNetV2's)
    # budget_kind=latency
    c.latency_batch = 1
    c.latency_runs = 5                # median of this many timed forward passes

    c.data = ml_collections.ConfigDict()
    c.data.source = "auto"            # auto | offline | hub
    c.data.data_dir = ""
    c.data.seed = 0                   # which training images
    if "cifar100" in presets:
        c.dataset = "cifar100"
    if "mobilenet" in presets:
        c.space = "mobilenet"
        c.budget = 50.0
    if "smoke" in presets:
        c.width = 4
        c.cells_per_stage = 1
        c.width_multiplier = 0.25
        c.budget = 1.5 if c.space == "nb201" else 6.0
        c.population = 3
        c.steps = 3
        c.progress = False
    return c


def get_sweep(arg: str | None = None) -> list[dict]:
    return [{"budget_kind": "flops", "budget": b} for b in (25.0, 50.0, 100.0)]
