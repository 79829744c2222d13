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
from research.nas.benchmark import ZeroShotSearch

PRESETS = ("smoke", "cifar100", "mobilenet")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    presets = config_lib.parse_presets(arg, PRESETS, "configs/zero_shot_search.py")
    # The defaults (research/nas/benchmark.py): NB201's file cells, ZiCo, 100 MFLOPs, a population
    # of 20 and 100 mutations, 256 fixed CIFAR-10 images.
    c = config_lib.section(ZeroShotSearch)
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
