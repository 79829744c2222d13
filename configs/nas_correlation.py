"""Zero-cost proxies against NAS-Bench-201 ground truth (Spearman / Kendall per proxy).

    python -m experiments.nas_correlation --config configs/nas_correlation.py --workdir runs/nas_corr_c10
    python -m experiments.nas_correlation --config configs/nas_correlation.py:cifar100 --workdir runs/nas_corr_c100
    python -m experiments.nas_correlation --config configs/nas_correlation.py:smoke --workdir /tmp/smoke

Every cell of the ground-truth file for ``dataset`` (or a seeded ``num_cells`` of them) is built
from one seed (PyTorch's default initialisation), and every proxy reads the same fixed CIFAR
training images (NB201's mean/std normalisation). Per-cell scores are saved as they come, so a
stopped run resumes where it was.
"""
import ml_collections

from research.core import config as config_lib
from research.nas.benchmark import NASCorrelation

PRESETS = ("smoke", "cifar100")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    presets = config_lib.parse_presets(arg, PRESETS, "configs/nas_correlation.py")
    # The defaults (research/nas/benchmark.py): every NB201 cell of the CIFAR-10 ground truth, every
    # proxy, one network per cell at NB201's size (C 16, N 5), 256 fixed training images.
    c = config_lib.section(NASCorrelation)
    if "cifar100" in presets:
        c.dataset = "cifar100"
    if "smoke" in presets:
        c.num_cells = 3
        c.width = 4
        c.cells_per_stage = 1
        c.data.num_images = 256
        c.proxies = ("zico", "params", "flops", "synflow", "naswot")
        c.progress = False
    return c


def get_sweep(arg: str | None = None) -> list[dict]:
    return [{"dataset": d} for d in ("cifar10", "cifar100")]
