"""Task-free continual-learning streams: coverage, segment contents, blurriness, batching, seen classes."""
import os

import numpy as np
import pytest

from research.core import config as config_lib
from research.data import pipeline, sources
from research.data.streams import (KINDS, StreamConfig, class_incremental_tasks, make_stream, seen_classes,
                                   stream_batches, task_test_sets)


def arrays(num_classes=10, per_class=60, seed=0):
    """Shuffled labels; each image stores its own row index (two uint8 pixels) so batches can be traced."""
    n = num_classes * per_class
    labels = np.random.default_rng(seed).permutation(np.arange(n) % num_classes).astype(np.int32)
    rows = np.arange(n)
    images = np.stack([rows // 256, rows % 256], -1).astype(np.uint8).reshape(n, 1, 1, 2)
    return pipeline.ImageArrays(images, labels, tuple(str(c) for c in range(num_classes)))


def row_of(images):
    return images[:, 0, 0, 0].astype(np.int64) * 256 + images[:, 0, 0, 1]


def check_stream(stream, train):
    """Invariants every stream must hold: each example once, consistent segments and labels."""
    assert len(stream) == len(train)
    np.testing.assert_array_equal(np.sort(stream.order), np.arange(len(train)))
    np.testing.assert_array_equal(stream.labels, train.labels[stream.order])
    assert np.all(np.diff(stream.task_of_position) >= 0)  # segments are contiguous, in task order
    starts = [int(np.searchsorted(stream.task_of_position, t)) for t in range(len(stream.tasks))]
    assert stream.boundaries == tuple(starts) and stream.boundaries[0] == 0
    owned = sorted(c for t in stream.tasks for c in t)
    assert owned == list(range(train.num_classes))


def outside_fraction(stream, t):
    """Fraction of task t's classes' examples that sit outside segment t."""
    mine = np.isin(stream.labels, stream.tasks[t])
    return np.mean(stream.task_of_position[mine] != t)


def test_class_incremental_tasks_split_classes_evenly_in_order_or_shuffled():
    assert class_incremental_tasks(10, 3) == [(0, 1, 2, 3), (4, 5, 6), (7, 8, 9)]
    split = class_incremental_tasks(100, 10)
    assert split[0] == tuple(range(10)) and split[9] == tuple(range(90, 100))
    shuffled = class_incremental_tasks(100, 10, seed=3, shuffle_classes=True)
    assert sorted(c for t in shuffled for c in t) == list(range(100))
    assert [len(t) for t in shuffled] == [10] * 10 and shuffled != split
    assert shuffled == class_incremental_tasks(100, 10, seed=3, shuffle_classes=True)
    assert shuffled != class_incremental_tasks(100, 10, seed=4, shuffle_classes=True)
    assert class_incremental_tasks(5, 5) == [(0,), (1,), (2,), (3,), (4,)]


@pytest.mark.parametrize("num_tasks", [0, -1, 11])
def test_class_incremental_tasks_rejects_bad_task_counts(num_tasks):
    with pytest.raises(ValueError, match="num_tasks"):
        class_incremental_tasks(10, num_tasks)


@pytest.mark.parametrize("kind", KINDS)
def test_every_example_appears_exactly_once_in_every_kind(kind):
    train = arrays()
    for tasks in (class_incremental_tasks(10, 5), class_incremental_tasks(10, 3, shuffle_classes=True), [range(10)]):
        stream = make_stream(train, tasks, kind=kind, seed=1, blurry_ratio=0.3)
        check_stream(stream, train)
        assert stream.kind == kind and len(stream.tasks) == len(tasks)


def test_sharp_segments_hold_only_their_task_classes_in_task_order():
    train = arrays()
    tasks = class_incremental_tasks(10, 4, seed=2, shuffle_classes=True)
    stream = make_stream(train, tasks, kind="sharp", seed=0)
    assert stream.tasks == tuple(tasks) and stream.disjoint_classes == tuple(range(10))
    for t, classes in enumerate(tasks):
        segment = stream.labels[stream.task_of_position == t]
        assert set(segment) == set(classes)
        assert len(segment) == np.isin(train.labels, classes).sum()
    # The segments follow the task order: all of task 0, then all of task 1, ...
    first_task = np.searchsorted(stream.boundaries, np.arange(len(stream)), side="right") - 1
    np.testing.assert_array_equal(first_task, stream.task_of_position)
    # Within a segment the order is shuffled, not sorted by row or class.
    assert not np.all(np.diff(stream.order[:stream.boundaries[1]]) > 0)


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_gives_the_same_stream_and_another_seed_a_different_one(kind):
    train, tasks = arrays(), class_incremental_tasks(10, 5)
    a, b = make_stream(train, tasks, kind=kind, seed=7), make_stream(train, tasks, kind=kind, seed=7)
    np.testing.assert_array_equal(a.order, b.order)
    np.testing.assert_array_equal(a.task_of_position, b.task_of_position)
    assert a.tasks == b.tasks and a.boundaries == b.boundaries
    assert not np.array_equal(a.order, make_stream(train, tasks, kind=kind, seed=8).order)


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5])
def test_blurry_moves_about_blurry_ratio_of_each_task_out_of_its_segment(ratio):
    train, tasks = arrays(), class_incremental_tasks(10, 5)  # 120 examples per task
    stream = make_stream(train, tasks, kind="blurry", seed=3, blurry_ratio=ratio)
    assert stream.tasks == tuple(tasks) and stream.disjoint_classes == ()
    destinations = set()
    for t in range(len(tasks)):
        assert abs(outside_fraction(stream, t) - ratio) <= 0.01
        mine = np.isin(stream.labels, tasks[t])
        destinations |= set(stream.task_of_position[mine & (stream.task_of_position != t)])
        for c in tasks[t]:  # every class is still mostly at home
            assert np.mean(stream.task_of_position[stream.labels == c] == t) > 1 - ratio - 0.2
    assert len(destinations) == len(tasks)  # moved examples land in every segment, not in one
    # Boundaries really are blurred: segments now mix classes of several tasks.
    assert len(set(stream.labels[stream.task_of_position == 0])) > len(tasks[0])


def test_blurry_with_zero_ratio_has_the_sharp_segment_membership():
    train, tasks = arrays(), class_incremental_tasks(10, 5)
    sharp = make_stream(train, tasks, kind="sharp", seed=0)
    blurry = make_stream(train, tasks, kind="blurry", seed=5, blurry_ratio=0.0)
    for t in range(len(tasks)):
        assert set(sharp.order[sharp.task_of_position == t]) == set(blurry.order[blurry.task_of_position == t])
    assert sharp.boundaries == blurry.boundaries


def test_si_blurry_keeps_disjoint_classes_in_one_segment_and_spreads_blurry_classes():
    train = arrays(num_classes=20, per_class=50)
    stream = make_stream(train, class_incremental_tasks(20, 4), kind="si_blurry", seed=0, blurry_ratio=0.2,
                         disjoint_class_ratio=0.5)
    check_stream(stream, train)
    assert len(stream.disjoint_classes) == 10
    home = {c: t for t, classes in enumerate(stream.tasks) for c in classes}
    for c in range(20):
        segments = set(stream.task_of_position[stream.labels == c])
        if c in stream.disjoint_classes:
            assert segments == {home[c]}
        else:
            assert len(segments) > 1
            assert np.mean(stream.task_of_position[stream.labels == c] == home[c]) > 0.6
    # About blurry_ratio of each task's blurry examples left home; no disjoint example did.
    for t, classes in enumerate(stream.tasks):
        blurry = [c for c in classes if c not in stream.disjoint_classes]
        if blurry:
            mine = np.isin(stream.labels, blurry)
            assert abs(np.mean(stream.task_of_position[mine] != t) - 0.2) <= 0.01


def test_si_blurry_task_sizes_are_stochastic_and_every_task_owns_a_class():
    train = arrays(num_classes=20, per_class=5)
    sizes = set()
    for seed in range(10):
        stream = make_stream(train, class_incremental_tasks(20, 5), kind="si_blurry", seed=seed)
        check_stream(stream, train)
        assert all(stream.tasks)
        sizes.add(tuple(len(t) for t in stream.tasks))
    assert len(sizes) > 1  # the number of classes per task is drawn, not fixed
    # Fewer disjoint (2) and blurry (3) classes than tasks (4): still every task owns one.
    small = arrays(num_classes=5, per_class=20)
    for seed in range(10):
        stream = make_stream(small, [[0, 1], [2], [3], [4]], kind="si_blurry", seed=seed, disjoint_class_ratio=0.4)
        assert all(stream.tasks) and len(stream.disjoint_classes) == 2
    # The ratio extremes: all disjoint gives no blurring; all blurry gives no disjoint class.
    everything = make_stream(train, class_incremental_tasks(20, 5), kind="si_blurry", disjoint_class_ratio=1.0)
    assert all(outside_fraction(everything, t) == 0 for t in range(5))
    assert make_stream(train, class_incremental_tasks(20, 5), kind="si_blurry",
                       disjoint_class_ratio=0.0).disjoint_classes == ()


@pytest.mark.parametrize("kwargs, tasks, message", [
    ({"kind": "fuzzy"}, None, "sharp, blurry, si_blurry"),
    ({"kind": "blurry", "blurry_ratio": 1.5}, None, "blurry_ratio"),
    ({"kind": "blurry", "blurry_ratio": -0.1}, None, "blurry_ratio"),
    ({"kind": "si_blurry", "disjoint_class_ratio": 2.0}, None, "disjoint_class_ratio"),
    ({}, [[0, 1, 2], [3, 4, 5, 6, 7, 8]], "in no task"),
    ({}, [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8, 9]], "class 4 is in task 0 and in task 1"),
    ({}, [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10]], "not a class"),
    ({}, [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], []], "no classes"),
    ({}, [], "empty"),
])
def test_make_stream_rejects_bad_arguments(kwargs, tasks, message):
    tasks = class_incremental_tasks(10, 2) if tasks is None else tasks
    with pytest.raises(ValueError, match=message):
        make_stream(arrays(), tasks, **kwargs)


@pytest.mark.parametrize("kind", KINDS)
def test_stream_batches_cover_the_stream_once_with_fixed_shapes_and_masks(kind):
    train = arrays()  # 600 examples: 9 full batches of 64 and one of 24 padded to 64
    stream = make_stream(train, class_incremental_tasks(10, 5), kind=kind, seed=2)
    batches = list(stream_batches(train, stream, 64))
    assert len(batches) == 10
    assert all(b["images"].shape == (64, 1, 1, 2) and b["labels"].shape == (64,) for b in batches)
    assert [b["position"] for b in batches] == list(range(0, 600, 64))
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.sum() == 600 and np.all(mask[:600] == 1) and np.all(mask[600:] == 0)
    rows = np.concatenate([row_of(b["images"]) for b in batches])[mask > 0]
    np.testing.assert_array_equal(rows, stream.order)  # stream order, each example once
    labels = np.concatenate([b["labels"] for b in batches])[mask > 0]
    np.testing.assert_array_equal(labels, stream.labels)
    assert [b["end"] for b in batches] == list(range(64, 600, 64)) + [600]
    # An exact multiple needs no padding.
    assert all(b["mask"].all() for b in stream_batches(train, stream, 100))
    # No batch crosses a cut: the one before it ends there, padded.
    cut = list(stream_batches(train, stream, 64, cuts=(100, 600, 0)))
    assert [(b["position"], b["end"]) for b in cut][:3] == [(0, 64), (64, 100), (100, 164)]
    assert cut[1]["mask"].sum() == 36 and len(cut) == 2 + 8  # 500 after the cut: 8 batches
    rows = np.concatenate([row_of(b["images"])[b["mask"] > 0] for b in cut])
    np.testing.assert_array_equal(rows, stream.order)
    with pytest.raises(ValueError, match="batch_size"):
        next(stream_batches(train, stream, 0))
    with pytest.raises(ValueError, match="another split"):
        next(stream_batches(train.subset(np.arange(10)), stream, 8))


def test_task_test_sets_partition_the_test_set_with_global_labels():
    test = arrays(per_class=7, seed=1)
    tasks = class_incremental_tasks(10, 3, shuffle_classes=True, seed=1)
    sets = task_test_sets(test, tasks)
    assert [len(s) for s in sets] == [7 * len(t) for t in tasks]
    for part, classes in zip(sets, tasks, strict=True):
        assert set(part.labels) == set(classes)  # global ids, not relabelled from 0
        assert part.label_names == test.label_names
    rows = np.concatenate([row_of(s.images) for s in sets])
    np.testing.assert_array_equal(np.sort(rows), np.arange(len(test)))


@pytest.mark.parametrize("kind", KINDS)
def test_seen_classes_grow_monotonically(kind):
    train, tasks = arrays(), class_incremental_tasks(10, 5)
    stream = make_stream(train, tasks, kind=kind, seed=4)
    assert seen_classes(stream, 0) == ()
    previous = ()
    for position in range(0, len(stream) + 1, 25):
        seen = seen_classes(stream, position)
        assert set(previous) <= set(seen)
        assert set(seen) == set(stream.labels[:position])
        previous = seen
    assert seen_classes(stream, len(stream)) == tuple(range(10))
    if kind == "sharp":  # at each boundary exactly the earlier tasks' classes have been seen
        for t, start in enumerate(stream.boundaries):
            assert seen_classes(stream, start) == tuple(sorted(c for group in tasks[:t] for c in group))
    with pytest.raises(ValueError, match="position"):
        seen_classes(stream, -1)


@pytest.mark.parametrize("kind", KINDS)
def test_streams_on_the_real_digits_data(kind):
    ds = sources.load("digits")
    train, test = pipeline.to_arrays(ds["train"]), pipeline.to_arrays(ds["test"])
    tasks = class_incremental_tasks(train.num_classes, 5)
    stream = make_stream(train, tasks, kind=kind, seed=0, blurry_ratio=0.1)
    check_stream(stream, train)
    if kind == "blurry":
        assert all(abs(outside_fraction(stream, t) - 0.1) <= 0.01 for t in range(5))
    batches = list(stream_batches(train, stream, 64))
    assert sum(b["mask"].sum() for b in batches) == len(train)
    assert all(b["images"].shape == (64, 8, 8, 1) for b in batches)
    sets = task_test_sets(test, stream.tasks)
    assert sum(len(s) for s in sets) == len(test)


def test_split_cifar100_sample_in_ten_tasks():
    data_dir = os.environ.get("RESEARCH_DATA_DIR")
    if not data_dir:
        pytest.skip("RESEARCH_DATA_DIR is not set; it should name the folder holding cifar/cifar100_subset.npz")
    try:
        ds = sources.load("cifar100_sample", data_dir=data_dir)
    except sources.DataSourceError as e:
        pytest.skip(f"CIFAR-100 sample not available: {e}")
    train, test = pipeline.to_arrays(ds["train"]), pipeline.to_arrays(ds["test"])
    assert train.num_classes == 100
    tasks = class_incremental_tasks(100, 10)
    for kind in KINDS:
        stream = make_stream(train, tasks, kind=kind, seed=0)
        check_stream(stream, train)
        assert len(stream.boundaries) == 10
        batches = list(stream_batches(train, stream, 64))
        assert all(b["images"].shape == (64, 32, 32, 3) for b in batches)
        assert sum(b["mask"].sum() for b in batches) == len(train)
    sharp = make_stream(train, tasks, kind="sharp", seed=0)
    for t, classes in enumerate(tasks):
        assert set(sharp.labels[sharp.task_of_position == t]) <= set(classes)
    sets = task_test_sets(test, tasks)
    assert [len(s) for s in sets] == [int(np.isin(test.labels, t).sum()) for t in tasks]
    assert sum(len(s) for s in sets) == len(test)


def test_the_stream_section_builds_the_stream_its_settings_describe():
    train = arrays()
    spec = config_lib.build(StreamConfig, {"stream": {"kind": "si_blurry", "num_tasks": 4, "shuffle_classes": True,
                                                      "disjoint_class_ratio": 0.3}}, "stream")
    tasks = class_incremental_tasks(10, 4, seed=3, shuffle_classes=True)
    expected = make_stream(train, tasks, kind="si_blurry", seed=3, blurry_ratio=0.1, disjoint_class_ratio=0.3)
    got = spec.build(train, seed=3)
    np.testing.assert_array_equal(got.order, expected.order)
    assert got.tasks == expected.tasks and got.boundaries == expected.boundaries


@pytest.mark.parametrize("values, message", [
    ({"kind": "gradual"}, "config key 'stream.kind' = 'gradual' is not allowed; choose one of: sharp, blurry, si_blurry"),
    ({"blurry_ratio": 1.5}, "config key 'stream.blurry_ratio' = 1.5 is not allowed; expected a number in [0, 1]"),
    ({"num_tasks": 0}, "config key 'stream.num_tasks' = 0 is not allowed; expected a positive int"),
])
def test_a_bad_stream_setting_names_its_key(values, message):
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.build(StreamConfig, {"stream": values}, "stream")
    assert str(e.value) == message
