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
from research.nas.proxies import PROXY_NAMES

PRESETS = ("smoke", "cifar100")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    presets = config_lib.parse_presets(arg, PRESETS, "configs/nas_correlation.py")
    c = ml_collections.ConfigDict()
    c.seed = 0                        # network initialisation (the same for every cell)
    c.dataset = "cifar10"             # cifar10 | cifar100 (key of the ground-truth file)
    c.ground_truth = ""               # zc_nasbench201.json ("" = $RESEARCH_DATA_DIR/nasbench201/)
    c.num_cells = 0                   # 0 = every cell the file has for the dataset
    c.proxies = PROXY_NAMES
    c.mode = "exact"                  # exact: one network per cell, op by op | masked: super-network, vmapped
    c.chunk = 4                       # cells per vmapped call (mode=masked)
    c.width = 16                      # NB201's C
    c.cells_per_stage = 5             # NB201's N
    c.progress = True

    c.data = ml_collections.ConfigDict()
    c.data.source = "auto"            # auto | offline | hub
    c.data.data_dir = ""
    c.data.num_images = 256           # fixed training images every proxy reads from
    c.data.seed = 0
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
