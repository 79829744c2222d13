"""Task-free streams for online continual learning, built from any classification split.

A stream is a fixed order over the training examples, each seen once (the learner makes one pass,
as in Online-LoRA). It is cut into task segments, but the learner is never told where: the
segment ids and boundaries are kept for plots and evaluation schedules only. Three kinds:

- ``sharp``: class-incremental; segment t holds exactly the examples of task t's classes.
- ``blurry`` (Blurry-M; Bang et al., CVPR 2021 "Rainbow Memory"; Koh et al., ICLR 2022): as sharp,
  but a fraction ``blurry_ratio`` of each task's examples is moved to random other segments.
- ``si_blurry`` (Moon et al., ICCV 2023): a random part of the classes is disjoint (never leaves
  its task), the rest is blurry; the number of classes per task is random. See `make_stream`.

Everything is a pure function of (data, tasks, kind, seed), so a run can be repeated exactly.
Labels stay global class ids throughout: class-incremental learning with one shared head.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np

from research.core import config as config_lib
from research.data.pipeline import ImageArrays, process_slice

KINDS = ("sharp", "blurry", "si_blurry")


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    """A class-incremental stream (the ``stream`` section of configs/online_lora.py): the classes
    in ``num_tasks`` groups (`class_incremental_tasks`, in order or shuffled with the seed), read
    once in the order of ``kind`` (`make_stream`) in batches of ``batch_size``."""
    num_tasks: int = 5
    kind: Literal[KINDS] = "sharp"
    blurry_ratio: float = 0.1
    disjoint_class_ratio: float = 0.5
    shuffle_classes: bool = False
    batch_size: int = 64

    def __post_init__(self):
        config_lib.check_fields(self)
        for name in ("num_tasks", "batch_size"):
            config_lib.require(self, name, getattr(self, name) > 0, "a positive int")
        for name in ("blurry_ratio", "disjoint_class_ratio"):
            config_lib.require(self, name, 0.0 <= getattr(self, name) <= 1.0, "a number in [0, 1]")

    def build(self, train: ImageArrays, seed: int) -> "Stream":
        """The stream of ``train`` under these settings."""
        tasks = class_incremental_tasks(train.num_classes, self.num_tasks, seed=seed,
                                        shuffle_classes=self.shuffle_classes)
        return make_stream(train, tasks, kind=self.kind, seed=seed, blurry_ratio=self.blurry_ratio,
                           disjoint_class_ratio=self.disjoint_class_ratio)


def class_incremental_tasks(num_classes: int, num_tasks: int, *, seed: int = 0,
                            shuffle_classes: bool = False) -> list[tuple[int, ...]]:
    """Classes 0..num_classes-1 in `num_tasks` groups whose sizes differ by at most one.

    Groups follow class order (Split CIFAR-100: (0..9), (10..19), ...) unless `shuffle_classes`,
    which permutes the classes with `seed` first; each group is returned sorted.
    """
    if not 1 <= num_tasks <= num_classes:
        raise ValueError(f"num_tasks must be between 1 and num_classes={num_classes}, got {num_tasks}")
    classes = np.random.default_rng(seed).permutation(num_classes) if shuffle_classes else np.arange(num_classes)
    return [tuple(sorted(int(c) for c in group)) for group in np.array_split(classes, num_tasks)]


@dataclasses.dataclass(frozen=True)
class Stream:
    """One pass over a training split. L = len(stream) = number of training examples.

    order: (L,) int64 row indices into the training ImageArrays, in the order the learner sees them.
    task_of_position: (L,) int32 task segment of each position; for plots and evaluation only.
    tasks: the classes of each task (for blurry kinds: the classes whose home is that task).
    boundaries: start position of each task segment; boundaries[0] == 0.
    kind: one of KINDS.
    labels: (L,) int32 class of each position, train.labels[order].
    disjoint_classes: classes that never leave their home segment by construction
        (all classes for sharp, none for blurry, the disjoint part for si_blurry).
    """
    order: np.ndarray
    task_of_position: np.ndarray
    tasks: tuple[tuple[int, ...], ...]
    boundaries: tuple[int, ...]
    kind: str
    labels: np.ndarray
    disjoint_classes: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.order)


def make_stream(train: ImageArrays, tasks: Sequence[Sequence[int]], *, kind: str = "sharp", seed: int = 0,
                blurry_ratio: float = 0.1, disjoint_class_ratio: float = 0.5) -> Stream:
    """The stream of `train` for class groups `tasks` (e.g. from `class_incremental_tasks`).

    `tasks` must partition the classes of `train` (every class 0..num_classes-1 in exactly one task;
    use `pipeline.select_classes` first to drop classes). Within each segment the order is random.

    sharp: segment t = the examples of tasks[t]'s classes.
    blurry: start from sharp; for each task, round(blurry_ratio * n_t) of its n_t examples, chosen
        at random, move to a uniformly random *other* segment. Each class stays mostly at home.
    si_blurry (our reading of Moon et al. 2023; `tasks` only gives the class set and the number of
        tasks T, the grouping itself is redrawn):
        1. the classes are shuffled; the first round(disjoint_class_ratio * C) are disjoint, the
           rest are blurry;
        2. disjoint classes, then blurry classes, are cut into T groups at T-1 random cut points,
           so each task gets a random (stochastic) number of each; the group of task t is its
           home. A type with fewer than T classes gives one class each to random tasks, tasks that
           own nothing yet first, so every task owns a class whenever C >= T;
        3. examples of disjoint classes stay in their home segment; of the blurry classes'
           examples homed in task t, round(blurry_ratio * n) chosen at random move to uniformly
           random other segments (as in blurry).
        `Stream.tasks[t]` holds the classes whose home is t; `Stream.disjoint_classes` the disjoint ones.
    With a single task nothing can move, and every kind gives the sharp stream.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown stream kind {kind!r}; choose one of: {', '.join(KINDS)}")
    for name, value in (("blurry_ratio", blurry_ratio), ("disjoint_class_ratio", disjoint_class_ratio)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    tasks = _check_tasks(tasks, train.num_classes)
    rng = np.random.default_rng(seed)
    num_tasks = len(tasks)
    everyone = np.ones(len(train), bool)

    if kind == "si_blurry":
        classes = rng.permutation(sorted(c for t in tasks for c in t))
        num_disjoint = int(disjoint_class_ratio * len(classes) + 0.5)
        disjoint_groups = _random_partition(classes[:num_disjoint], num_tasks, rng, set())
        owning = {t for t, group in enumerate(disjoint_groups) if group}
        blurry_groups = _random_partition(classes[num_disjoint:], num_tasks, rng, owning)
        tasks = tuple(tuple(sorted(d + b)) for d, b in zip(disjoint_groups, blurry_groups, strict=True))
        disjoint = tuple(sorted(int(c) for c in classes[:num_disjoint]))
    else:
        disjoint = tuple(sorted(c for t in tasks for c in t)) if kind == "sharp" else ()

    class_task = np.zeros(train.num_classes, np.int64)
    for t, group in enumerate(tasks):
        class_task[list(group)] = t
    home = class_task[train.labels]
    if kind == "sharp":
        dest = home
    else:
        movable = everyone if kind == "blurry" else ~np.isin(train.labels, disjoint)
        dest = _scatter(home, movable, blurry_ratio, num_tasks, rng)

    segments = [rng.permutation(np.flatnonzero(dest == t)) for t in range(num_tasks)]
    sizes = [len(s) for s in segments]
    order = np.concatenate(segments).astype(np.int64)
    return Stream(order=order,
                  task_of_position=np.repeat(np.arange(num_tasks, dtype=np.int32), sizes),
                  tasks=tasks,
                  boundaries=tuple(int(b) for b in np.cumsum([0] + sizes[:-1])),
                  kind=kind,
                  labels=train.labels[order].astype(np.int32),
                  disjoint_classes=disjoint)


def _check_tasks(tasks, num_classes: int) -> tuple[tuple[int, ...], ...]:
    """`tasks` as tuples of ints, after checking that it partitions 0..num_classes-1."""
    tasks = tuple(tuple(int(c) for c in group) for group in tasks)
    if not tasks:
        raise ValueError("tasks is empty; give at least one task")
    owner: dict[int, int] = {}
    for t, group in enumerate(tasks):
        if not group:
            raise ValueError(f"task {t} has no classes")
        for c in group:
            if not 0 <= c < num_classes:
                raise ValueError(f"class {c} in task {t} is not a class of the data (0..{num_classes - 1})")
            if c in owner:
                raise ValueError(f"class {c} is in task {owner[c]} and in task {t}; a class belongs to one task")
            owner[c] = t
    missing = sorted(set(range(num_classes)) - set(owner))
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        raise ValueError(f"{len(missing)} class(es) in no task ({shown}); every class of the data needs a task "
                         "(drop classes first with pipeline.select_classes)")
    return tasks


def _random_partition(items: np.ndarray, num_groups: int, rng: np.random.Generator,
                      owning: set[int]) -> list[list[int]]:
    """`items` in `num_groups` groups of random sizes (uniform over the ways to cut the sequence).

    With at least `num_groups` items every group is non-empty; with fewer, each item gets a group of
    its own, groups not in `owning` first, so that classes spread over as many tasks as possible.
    """
    items = [int(i) for i in items]
    if len(items) >= num_groups:
        cuts = np.sort(rng.choice(np.arange(1, len(items)), num_groups - 1, replace=False))
        return [[int(i) for i in g] for g in np.split(np.asarray(items, np.int64), cuts)]
    empty = [g for g in range(num_groups) if g not in owning]
    full = [g for g in range(num_groups) if g in owning]
    chosen = list(rng.permutation(empty)) + list(rng.permutation(full))
    groups: list[list[int]] = [[] for _ in range(num_groups)]
    for item, g in zip(items, chosen, strict=False):
        groups[int(g)].append(item)
    return groups


def _scatter(home: np.ndarray, movable: np.ndarray, ratio: float, num_tasks: int,
             rng: np.random.Generator) -> np.ndarray:
    """Destination task per example, (N,): home, except round(ratio * n) random movable examples of
    each task, which go to a uniformly random other task."""
    dest = home.copy()
    if num_tasks < 2:
        return dest
    for t in range(num_tasks):
        rows = np.flatnonzero((home == t) & movable)
        moved = rng.choice(rows, int(ratio * len(rows) + 0.5), replace=False)
        # An offset in 1..T-1 never lands back on t and is uniform over the other tasks.
        dest[moved] = (t + rng.integers(1, num_tasks, size=len(moved))) % num_tasks
    return dest


def stream_batches(train: ImageArrays, stream: Stream, batch_size: int, cuts: Sequence[int] = ()) -> Iterator[dict]:
    """Consecutive batches in stream order, each example once.

    Yields {"images": (B, H, W, C) uint8, "labels": (B,) int32, "mask": (B,) float32, "position": int,
    "end": int}: position is the stream position of the global batch's first example, end that after
    its last. A batch never crosses a position in ``cuts`` (e.g. the task boundaries, so a learner
    evaluated there has seen no example of the next task): the batch before a cut, like the last
    one, is padded to `batch_size` with mask 0 (as `pipeline.eval_batches`) so every batch has one
    shape; like there, each process gets its contiguous slice of the global batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if len(stream) != len(train):
        raise ValueError(f"the stream has {len(stream)} positions but the training split {len(train)} examples; "
                         "was it made from another split?")
    edges = sorted({0, len(stream), *(int(c) for c in cuts if 0 < int(c) < len(stream))})
    for first, last in zip(edges[:-1], edges[1:]):
        for start in range(first, last, batch_size):
            positions = np.arange(start, start + batch_size)
            valid = positions < last
            rows = stream.order[np.where(valid, positions, 0)]
            rows, valid = process_slice(rows), process_slice(valid)
            yield {"images": train.images[rows], "labels": train.labels[rows], "mask": valid.astype(np.float32),
                   "position": start, "end": min(start + batch_size, last)}


def task_test_sets(test: ImageArrays, tasks: Sequence[Sequence[int]]) -> list[ImageArrays]:
    """The test examples of each task's classes, in test-set order; labels stay global class ids."""
    return [test.subset(np.flatnonzero(np.isin(test.labels, [int(c) for c in group]))) for group in tasks]


def seen_classes(stream: Stream, position: int) -> tuple[int, ...]:
    """The classes at stream positions < `position`, sorted: what "accuracy on seen classes" uses
    when no task boundary is known."""
    if position < 0:
        raise ValueError(f"position must be >= 0, got {position}")
    return tuple(int(c) for c in np.unique(stream.labels[:position]))
