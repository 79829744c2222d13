"""The TIPS proposition on MNIST: TPS of paths against their Jacobian's mean singular value.

    python -m tools.tips_proposition --out runs/tips_proposition [--init torch,he] [--per_mix 3]

MLPs 784 -> 80 with 6-10 basic blocks of two Linear+ReLU (research/anytime/proposition.py), one
batch of MNIST training images at initialisation. Prints Spearman's rho of TPS (sum and product)
against the mean singular value, over all sampled paths and within groups of equal node count;
writes proposition.json and proposition.png (log-log, one panel per init).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os

import numpy as np

from research.anytime import proposition
from research.data import pipeline, sources


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for proposition.json and proposition.png")
    parser.add_argument("--init", default="torch,he", help=f"comma-separated, of: {', '.join(proposition.INITS)}")
    parser.add_argument("--depths", default="6,7,8,9,10", help="comma-separated numbers of blocks")
    parser.add_argument("--per_mix", type=int, default=3, help="paths per (depth, number of chains)")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    inits = args.init.split(",")
    bad = [i for i in inits if i not in proposition.INITS]
    if bad:
        parser.error(f"unknown --init {bad}; choose from {', '.join(proposition.INITS)}")
    images = pipeline.to_arrays(sources.load("mnist")["train"]).images[:args.images].astype(np.float32) / 255.0

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = {}
    fig, axes = plt.subplots(1, len(inits), figsize=(5 * len(inits), 4), squeeze=False)
    for ax, init in zip(axes[0], inits):
        records = proposition.check(images, [int(d) for d in args.depths.split(",")], per_mix=args.per_mix,
                                    init=init, seed=args.seed)
        rho = proposition.rank_correlations(records)
        report[init] = {"correlations": rho, "paths": [dataclasses.asdict(r) for r in records]}
        print(f"{init}: {len(records)} paths; " + ", ".join(f"{k} {v:+.3f}" for k, v in rho.items()))
        scatter = ax.scatter([r.tps_sum for r in records], [r.mean_sigma for r in records],
                             c=[r.nodes for r in records], s=14, cmap="viridis")
        ax.set(xscale="log", yscale="log", xlabel="TPS (sum of TAS over the path's nodes)",
               ylabel="mean singular value of the path's Jacobian",
               title=f"{init} init: Spearman {rho['spearman_sum']:+.2f}")
        fig.colorbar(scatter, ax=ax, label="nodes on the path")
    fig.tight_layout()
    os.makedirs(args.out, exist_ok=True)
    fig.savefig(os.path.join(args.out, "proposition.png"), dpi=110)
    with open(os.path.join(args.out, "proposition.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
