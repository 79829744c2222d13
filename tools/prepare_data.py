"""Prepares the data sets once and caches them, so runs start in seconds.

    python -m tools.prepare_data                      # every offline source found here
    python -m tools.prepare_data --names mnist kjv    # just these
    python -m tools.prepare_data --names cifar10 --source hub   # full CIFAR-10 from the hub

Prints, per data set, its splits and sizes, or the one line saying what would provide it.
"""
from __future__ import annotations

import argparse
import time

from research.data import sources


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--names", nargs="*", default=[n for n, s in sources.SOURCES.items() if s.offline])
    parser.add_argument("--source", default="offline", choices=sources.SOURCE_KINDS)
    parser.add_argument("--data_dir", default=None, help="folder holding cifar/*.npz (default $RESEARCH_DATA_DIR)")
    parser.add_argument("--cache_dir", default=None, help=f"default {sources.default_cache_dir()}")
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
        print(f"{name:16s} ok ({sizes}) in {time.perf_counter() - start:.1f} s")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
