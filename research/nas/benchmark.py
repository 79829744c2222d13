"""NAS-Bench-201 as the NAS experiments read it: the ground-truth file, the fixed CIFAR proxy batch,
and NASLib's cell keys.

The ground-truth file (``nasbench201/zc_nasbench201.json``, research/data/README.md) maps a dataset name to
``{cell key: {"val_accuracy": ..., proxy values NASLib stored ...}}``; a cell key is NASLib's
op-index tuple written as text, ``"(4, 0, 3, 1, 4, 3)"``.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from research.core import config as config_lib
from research.core.config import require_path
from research.data import pipeline, sources
from research.data.augment import normalize
from research.nas import nb201
from research.nas import proxies as nas_proxies
from research.nas import search

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
            f"NB201 ground truth {found!r} not found; it is NASLib's zero-cost benchmark file "
            f"(naslib/data/zc_nasbench201.json in github.com/automl/NASLib, Apache-2.0): set "
            f"--config.ground_truth=FILE, or data.data_dir / $RESEARCH_DATA_DIR to a folder holding {GROUND_TRUTH_FILE}")
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


@dataclasses.dataclass(frozen=True)
class ImageSource:
    """Where the proxy batch's images come from: ``source`` auto | offline | hub (``data_dir`` "" =
    $RESEARCH_DATA_DIR), the training images drawn with ``seed``."""
    source: Literal[sources.SOURCE_KINDS] = "auto"
    data_dir: str = ""
    seed: int = 0

    def __post_init__(self):
        config_lib.check_fields(self)

    def batch(self, dataset: str, num_images: int) -> dict[str, jax.Array]:
        """`proxy_batch` of ``dataset`` from this source."""
        return proxy_batch(dataset, num_images, self.seed, source=self.source, data_dir=self.data_dir or None)


@dataclasses.dataclass(frozen=True)
class ProxyData(ImageSource):
    """`ImageSource` and how many images the fixed proxy batch holds."""
    num_images: int = 256

    def __post_init__(self):
        super().__post_init__()
        config_lib.require(self, "num_images", self.num_images >= 1, "an integer >= 1")


@dataclasses.dataclass(frozen=True)
class NASCorrelation:
    """How well each of ``proxies`` ranks NB201 cells: every cell of ``dataset`` in the ground-truth
    file (``ground_truth`` "" = under data.data_dir / $RESEARCH_DATA_DIR; ``num_cells`` > 0: a seeded
    subset), scored at width ``width`` and ``cells_per_stage`` from ``seed``, one network per cell
    (``mode`` exact) or the masked super-network, ``chunk`` cells per vmapped call (masked)."""
    seed: int = 0
    dataset: Literal[tuple(DATASETS)] = "cifar10"
    ground_truth: str = ""
    num_cells: int = 0
    proxies: tuple[str, ...] = nas_proxies.PROXY_NAMES
    mode: Literal["exact", "masked"] = "exact"
    chunk: int = 4
    width: int = 16
    cells_per_stage: int = 5
    progress: bool = True
    data: ProxyData = ProxyData()

    def __post_init__(self):
        config_lib.check_fields(self)
        config_lib.require(self, "num_cells", self.num_cells >= 0, "an integer >= 0 (0 = all)")
        config_lib.require(self, "chunk", self.chunk >= 1, "an integer >= 1")
        config_lib.require_names(self, "proxies", nas_proxies.PROXY_NAMES)
        need = max(nas_proxies.get(n).batch_size for n in self.proxies)
        if self.data.num_images < need:
            raise config_lib.ConfigError(f"data.num_images={self.data.num_images}: the proxies chosen read "
                                         f"up to {need} images; allowed: >= {need}")


SPACES = ("nb201", "mobilenet")


@dataclasses.dataclass(frozen=True)
class ZeroShotSearch:
    """Evolution against random search in ``space`` under a ``budget`` of ``budget_kind`` (MFLOPs, M
    params or ms), each candidate scored by ``proxy`` on ``num_images`` fixed images of ``dataset``
    (``jit``: compile each candidate's proxy whole, else op by op). NB201: ``candidates`` file (the
    ground-truth file's cells) or all 15,625 at ``width`` x ``cells_per_stage``; mobilenet: widths
    scaled by ``width_multiplier``. Latency: median of ``latency_runs`` passes at ``latency_batch``."""
    space: Literal[SPACES] = "nb201"
    proxy: Literal[nas_proxies.PROXY_NAMES] = "zico"
    budget_kind: Literal[search.COST_KINDS] = "flops"
    budget: float = 100.0
    population: int = 20
    steps: int = 100
    seed: int = 0
    num_images: int = 256
    dataset: Literal[tuple(DATASETS)] = "cifar10"
    jit: bool = False
    progress: bool = True
    candidates: Literal["file", "all"] = "file"
    ground_truth: str = ""
    width: int = 16
    cells_per_stage: int = 5
    width_multiplier: float = 1.0
    latency_batch: int = 1
    latency_runs: int = 5
    data: ImageSource = ImageSource()

    def __post_init__(self):
        config_lib.check_fields(self)
        config_lib.require(self, "budget", self.budget > 0, f"a number > 0 ({search.UNITS[self.budget_kind]})")
        config_lib.require(self, "population", self.population >= 1, "an integer >= 1")
        config_lib.require(self, "steps", self.steps >= 0, "an integer >= 0")
        need = max(nas_proxies.get(self.proxy).batch_size, 1)
        config_lib.require(self, "num_images", self.num_images >= need, f">= {need} (the images proxy {self.proxy} reads)")
        for field in ("width", "cells_per_stage", "latency_batch", "latency_runs"):
            config_lib.require(self, field, getattr(self, field) >= 1, "an integer >= 1")
        config_lib.require(self, "width_multiplier", self.width_multiplier > 0, "a number > 0")
