"""NAS-Bench-201 as the NAS experiments read it: the ground-truth file, the fixed CIFAR proxy batch,
and NASLib's cell keys.

The ground-truth file (``nasbench201/zc_nasbench201.json``, DATA.md) maps a dataset name to
``{cell key: {"val_accuracy": ..., proxy values NASLib stored ...}}``; a cell key is NASLib's
op-index tuple written as text, ``"(4, 0, 3, 1, 4, 3)"``.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from research.core.config import require_path
from research.data import pipeline, sources
from research.data.augment import normalize
from research.nas import nb201

# NB201's CIFAR normalisation (Dong & Yang 2020).
CIFAR_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)
DATASETS = {"cifar10": ("cifar10_sample", 10), "cifar100": ("cifar100_sample", 100)}  # name: (images, classes)
GROUND_TRUTH_FILE = os.path.join("nasbench201", "zc_nasbench201.json")


def ground_truth_path(path: str = "", data_dir: str = "") -> str:
    """The ground-truth file: ``path`` when given (it must exist: a `PathNotFoundError`), else
    ``GROUND_TRUTH_FILE`` under ``data_dir`` when given, else under ``$RESEARCH_DATA_DIR`` (a
    `DataSourceError` names what is missing)."""
    if path:
        return require_path(path, "ground_truth")
    root = data_dir or os.environ.get("RESEARCH_DATA_DIR", "")
    found = os.path.join(root, GROUND_TRUTH_FILE)
    if not root or not os.path.isfile(found):
        raise sources.DataSourceError(
            f"NB201 ground truth {found!r} not found; set --config.ground_truth=FILE, or "
            f"data.data_dir / $RESEARCH_DATA_DIR to a folder holding {GROUND_TRUTH_FILE}")
    return found


def load_ground_truth(path: str, dataset: str, num_cells: int = 0, seed: int = 0) -> dict[str, dict]:
    """{cell key: record} of ``dataset`` in the file at ``path``; ``num_cells`` > 0 keeps a seeded
    random subset of that many cells. Keys are sorted."""
    with open(path) as f:
        cells = json.load(f)[dataset]
    keys = sorted(cells)
    if num_cells:
        keys = sorted(np.random.default_rng(seed).choice(keys, min(num_cells, len(keys)), replace=False).tolist())
    return {k: cells[k] for k in keys}


def proxy_batch(dataset: str, num_images: int, seed: int = 0, *, source: str = "auto",
                data_dir: str | None = None) -> dict[str, jax.Array]:
    """The fixed batch every proxy reads: ``num_images`` seeded training images of ``dataset``'s
    CIFAR sample, NB201-normalised (``image`` (N, 32, 32, 3) float32, ``label`` (N,) int32)."""
    ds = sources.load(DATASETS[dataset][0], source=source, data_dir=data_dir)
    train = pipeline.to_arrays(ds["train"])
    rows = np.random.default_rng(seed).permutation(len(train))[:num_images]
    return {"image": normalize(jnp.asarray(train.images[rows]), CIFAR_MEAN, CIFAR_STD),
            "label": jnp.asarray(train.labels[rows])}


def naslib_cell(key: str) -> nb201.Cell:
    """The cell of a ground-truth key, ``"(4, 0, 3, 1, 4, 3)"``."""
    return nb201.from_naslib(json.loads(key.replace("(", "[").replace(")", "]")))
