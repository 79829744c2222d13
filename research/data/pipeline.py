"""Image classification input pipeline: arrays in host memory, deterministic batches.

The order of training examples is a pure function of (seed, step): epoch e is the permutation
`default_rng([seed, e])`, and step s reads rows [i*B, (i+1)*B) of it. A resumed run therefore
sees exactly the batches the uninterrupted run would have seen, with no iterator state to save.
Evaluation batches are padded to the batch size with `mask` = 0, so the metrics of an uneven
last batch are averaged correctly and every batch fits the `data` mesh axis.
Augmentation and normalisation run on the device inside the jitted step (see augment.py).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import datasets as hf
import jax
import numpy as np
import pyarrow as pa


@dataclasses.dataclass(frozen=True)
class ImageArrays:
    """One split in memory. images: (N, H, W, C) uint8; labels: (N,) int32."""
    images: np.ndarray
    labels: np.ndarray
    label_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def subset(self, indices) -> "ImageArrays":
        return ImageArrays(self.images[indices], self.labels[indices], self.label_names)

    def first(self, n: int) -> "ImageArrays":
        """The first ``n`` rows (``n`` 0: all of them)."""
        return self.subset(slice(0, n)) if n else self


def to_arrays(ds: hf.Dataset, label_column: str = "label") -> ImageArrays:
    """A split with an `image` column (Array3D, or Image from the hub) -> ImageArrays."""
    if getattr(ds, "_indices", None) is not None:  # a select()ed split: ds.data is still the whole table
        ds = ds.flatten_indices()
    feature = ds.features["image"]
    if isinstance(feature, (hf.Array2D, hf.Array3D)):
        column = ds.data.column("image").combine_chunks()
        while pa.types.is_list(column.type) or pa.types.is_fixed_size_list(column.type) or hasattr(column, "storage"):
            column = column.storage if hasattr(column, "storage") else column.flatten()
        images = np.asarray(column).reshape((len(ds),) + tuple(feature.shape))
    else:  # hub `Image` feature: decode to arrays
        images = np.stack([np.asarray(im) for im in ds.with_format("numpy")["image"]])
    images = images.astype(np.uint8)
    if images.ndim == 3:
        images = images[..., None]
    labels = np.asarray(ds.data.column(label_column)).astype(np.int32)
    names = tuple(ds.features[label_column].names) if isinstance(ds.features[label_column], hf.ClassLabel) \
        else tuple(str(i) for i in range(int(labels.max()) + 1))
    return ImageArrays(images, labels, names)


def select_classes(data: ImageArrays, classes) -> ImageArrays:
    """The examples of ``classes`` only, relabelled 0..len(classes)-1 in the given order."""
    classes = [int(c) for c in classes]
    remap = np.full(data.num_classes, -1, np.int32)
    remap[classes] = np.arange(len(classes), dtype=np.int32)
    rows = np.flatnonzero(remap[data.labels] >= 0)
    return ImageArrays(data.images[rows], remap[data.labels[rows]], tuple(data.label_names[c] for c in classes))


def _per_class_rows(data: ImageArrays, n: int, seed: int) -> np.ndarray:
    order = np.random.default_rng(seed).permutation(len(data))
    return np.sort(np.concatenate([order[data.labels[order] == c][:n] for c in range(data.num_classes)]))


def per_class(data: ImageArrays, n: int, seed: int) -> ImageArrays:
    """The first n examples of each class after a seeded shuffle (all of them when n == 0), in data order."""
    return data.subset(_per_class_rows(data, n, seed)) if n else data


def hold_out(data: ImageArrays, n: int, seed: int) -> tuple[ImageArrays, ImageArrays]:
    """(the rest, the held-out slice): ``per_class(data, n, seed)`` is held out, the rest keeps data
    order. Every class must keep at least one example outside the slice."""
    held = _per_class_rows(data, n, seed)
    counts = np.bincount(data.labels, minlength=data.num_classes)
    if n < 1 or np.any(counts <= n):
        raise ValueError(f"cannot hold out {n} examples per class: the smallest class has {counts.min()}")
    return data.subset(np.setdiff1d(np.arange(len(data)), held)), data.subset(held)


def split_halves(train: ImageArrays, test: ImageArrays, by: str, seed: int = 0):
    """Two (train, test) tasks from one data set: ``by="classes"`` gives the first half of the classes
    and then the second half (a non-IID split, each relabelled from 0); ``by="samples"`` gives two
    random halves of the training examples (seeded), each with the whole test split."""
    if by == "classes":
        half = train.num_classes // 2
        first, second = range(half), range(half, 2 * half)
        return ((select_classes(train, first), select_classes(test, first)),
                (select_classes(train, second), select_classes(test, second)))
    if by == "samples":
        order = np.random.default_rng(seed).permutation(len(train))
        half = len(train) // 2
        return (train.subset(np.sort(order[:half])), test), (train.subset(np.sort(order[half:])), test)
    raise ValueError(f"unknown split {by!r}; choose one of: classes, samples")


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of uint8 images, on the 0-1 scale; (C,) each."""
    x = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    return x.mean(0).astype(np.float32), np.maximum(x.std(0), 1e-3).astype(np.float32)


def steps_per_epoch(n: int, batch_size: int) -> int:
    if n < batch_size:
        raise ValueError(f"training split has {n} examples, fewer than the batch size {batch_size}")
    return n // batch_size  # the remainder is dropped; the next epoch's permutation covers it


def train_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Row indices of global training batch `step`: (batch_size,)."""
    per_epoch = steps_per_epoch(n, batch_size)
    epoch, i = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return order[i * batch_size:(i + 1) * batch_size]


def process_slice(global_rows: np.ndarray) -> np.ndarray:
    """The contiguous part of a global batch that this process feeds to its devices."""
    return np.split(global_rows, jax.process_count())[jax.process_index()]


def train_batch(data: ImageArrays, batch_size: int, seed: int, step: int) -> dict[str, np.ndarray]:
    rows = process_slice(train_indices(len(data), batch_size, seed, step))
    return {"images": data.images[rows], "labels": data.labels[rows], "mask": np.ones(len(rows), np.float32)}


def eval_batches(data: ImageArrays, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Sequential batches over the whole split; the last is padded (mask 0) to `batch_size`."""
    for start in range(0, len(data), batch_size):
        rows = np.arange(start, start + batch_size)
        valid = rows < len(data)
        rows = np.where(valid, rows, 0)
        rows, valid = process_slice(rows), process_slice(valid)
        yield {"images": data.images[rows], "labels": data.labels[rows], "mask": valid.astype(np.float32)}
