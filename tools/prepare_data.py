"""Prepares the data sets once and caches them, so runs start in seconds.

    python -m tools.prepare_data                      # every offline source found here
    python -m tools.prepare_data --names mnist kjv    # just these
    python -m tools.prepare_data --names cifar10 --source hub   # full CIFAR-10 from the hub
    python -m tools.prepare_data --names cifar10_sample cifar100_sample --source hub --write DIR
                                                      # the CIFAR samples' files, rebuilt from the hub

Prints, per data set, its splits and sizes, or the one line saying what would provide it.
"""
from __future__ import annotations

import argparse
import time

import os

import numpy as np

from research.core.records import write_npz_atomic
from research.data import pipeline, sources

SAMPLE_FILES = {"cifar10_sample": "cifar10_subset.npz", "cifar100_sample": "cifar100_subset.npz"}


def write_sample(name: str, ds, folder: str) -> str:
    """``folder/cifar/FILE.npz`` of sample ``name`` with the keys the offline source reads (and each
    split's rows in the full set, ``train_index`` / ``test_index``)."""
    arrays = {}
    for split in ("train", "test"):
        data = pipeline.to_arrays(ds[split])
        arrays.update({f"x_{split}": data.images, f"y_{split}": data.labels,
                       f"{split}_index": sources.sample_rows(name)[split]})
        if name == "cifar100_sample":
            arrays[f"y_{split}_coarse"] = pipeline.to_arrays(ds[split], "coarse_label").labels
    if name == "cifar100_sample":
        arrays["fine_label_names"] = np.asarray(data.label_names)
        arrays["coarse_label_names"] = np.asarray(pipeline.to_arrays(ds["test"], "coarse_label").label_names)
    else:
        arrays["label_names"] = np.asarray(data.label_names)
    path = os.path.join(folder, "cifar", SAMPLE_FILES[name])
    write_npz_atomic(path, **arrays)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--names", nargs="*", default=[n for n, s in sources.SOURCES.items() if s.offline])
    parser.add_argument("--source", default="offline", choices=sources.SOURCE_KINDS)
    parser.add_argument("--data_dir", default=None, help="folder holding cifar/*.npz (default $RESEARCH_DATA_DIR)")
    parser.add_argument("--cache_dir", default=None, help=f"default {sources.default_cache_dir()}")
    parser.add_argument("--write", default=None, metavar="DIR",
                        help="write the CIFAR samples' files under DIR/cifar/ (then RESEARCH_DATA_DIR=DIR)")
    args = parser.parse_args()
    failed = 0
    for name in args.names:
        start = time.perf_counter()
        try:
            ds = sources.load(name, source=args.source, data_dir=args.data_dir, cache_dir=args.cache_dir)
        except sources.DataSourceError as e:
            print(f"{name:16s} missing: {e}")
            failed += 1
            continue
        sizes = ", ".join(f"{split} {len(d):,}" for split, d in ds.items())
        written = f"; wrote {write_sample(name, ds, args.write)}" if args.write and name in SAMPLE_FILES else ""
        print(f"{name:16s} ok ({sizes}) in {time.perf_counter() - start:.1f} s{written}")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
