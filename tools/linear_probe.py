"""Frozen-backbone linear probe of EfficientNet-Lite0's ImageNet features at several input sizes:
which resolution makes the backbone's features strong enough for a continual-learning stream.

    python -m tools.linear_probe --data cifar10_sample --sizes 64,96,128,160,224 --out runs/linear_probe

For each size the images are resized (bilinear) and normalised as the backbone expects, the pooled
1280-d features (the head's input, BatchNorm in eval mode) are computed once for the training and
test images, and a multinomial logistic regression (scikit-learn, standardised features, L2 C = 1)
is fitted on the training features. Prints accuracy and feature seconds per image on this machine,
and the smallest size within ``--tolerance`` points of the largest size's accuracy. Writes
OUT/probe.json, OUT/probe.md and OUT/probe.png.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def features(model, images: np.ndarray, size: int, batch_size: int) -> tuple[np.ndarray, float]:
    """(N, 1280) pooled features at ``size`` px and the seconds per image (compilation excluded)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from research.adapters.online_lora import batched
    from research.data.augment import resize
    from research.models import efficientnet_lite as effnet

    graphdef, state = nnx.split(model)

    @jax.jit
    def embed(state, x):
        x = (resize(x, (size, size, 3)) - effnet.PIXEL_MEAN) / effnet.PIXEL_STD
        return nnx.merge(graphdef, state).embedding(x).astype(jnp.float32)

    batched(lambda x: embed(state, x), images[:1], batch_size)  # compile (padded batch shape) outside the timing
    start = time.perf_counter()
    out = batched(lambda x: embed(state, x), images, batch_size)
    return out, (time.perf_counter() - start) / len(images)


def probe(train_x, train_y, test_x, test_y) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    clf.fit(train_x, train_y)
    return float(clf.score(test_x, test_y))


def choose(rows: list[dict], tolerance: float) -> int:
    """The smallest size whose accuracy is within ``tolerance`` (a fraction) of the largest size's."""
    reference = max(rows, key=lambda r: r["size"])["accuracy"]
    return min(r["size"] for r in rows if r["accuracy"] >= reference - tolerance)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="cifar10_sample")
    p.add_argument("--data_dir", default="")
    p.add_argument("--sizes", default="64,96,128,160,224")
    p.add_argument("--train_limit", type=int, default=0, help="the first N training images (0 = all)")
    p.add_argument("--test_limit", type=int, default=0)
    p.add_argument("--tolerance", type=float, default=0.03, help="accuracy (a fraction) allowed below the largest size")
    p.add_argument("--batch_size", type=int, default=100)
    p.add_argument("--weights", default="", help="the weights package (default) or a converted orbax directory")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    try:
        sizes = sorted({int(s) for s in args.sizes.split(",")})
    except ValueError:
        sys.exit(f"error: --sizes {args.sizes!r}: expected integers such as 64,128,224")
    if not sizes or sizes[0] < 32:
        sys.exit(f"error: --sizes {args.sizes!r}: every size must be >= 32")

    from flax import nnx

    from research.data import pipeline, sources
    from research.models import build_model
    from research.models import efficientnet_lite as effnet

    try:
        ds = sources.load(args.data, data_dir=args.data_dir or None)
        effnet.pretrained_state_dict_path() if not args.weights else None  # the weights are here
    except (sources.DataSourceError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    train, test = pipeline.to_arrays(ds["train"]), pipeline.to_arrays(ds["test"])
    if args.train_limit:
        train = train.subset(np.arange(min(args.train_limit, len(train))))
    if args.test_limit:
        test = test.subset(np.arange(min(args.test_limit, len(test))))
    if train.images.shape[-1] != 3:
        sys.exit(f"error: --data {args.data}: the ImageNet backbone needs RGB images, got {train.images.shape[1:]}")
    rows = []
    for size in sizes:
        model = build_model("efficientnet_lite0", num_classes=train.num_classes, input_shape=(size, size, 3),
                            rngs=nnx.Rngs(0), conv_init=effnet.placeholder_init)
        try:
            effnet.load_pretrained(model, args.weights, include_head=False)
        except FileNotFoundError as e:
            sys.exit(f"error: {e}")
        model.eval()
        train_x, seconds = features(model, train.images, size, args.batch_size)
        test_x, _ = features(model, test.images, size, args.batch_size)
        accuracy = probe(train_x, train.labels, test_x, test.labels)
        rows.append({"size": size, "accuracy": accuracy, "seconds_per_image": seconds})
        print(f"{size:4d} px: linear probe {100 * accuracy:.2f}%, features {1000 * seconds:.2f} ms/image", flush=True)
    chosen = choose(rows, args.tolerance)
    print(f"smallest size within {100 * args.tolerance:.0f} points of {sizes[-1]} px: {chosen} px")
    os.makedirs(args.out, exist_ok=True)
    record = {"data": args.data, "train_examples": len(train), "test_examples": len(test), "rows": rows,
              "tolerance": args.tolerance, "chosen_size": chosen}
    with open(os.path.join(args.out, "probe.json"), "w") as f:
        json.dump(record, f, indent=2)
    lines = [f"EfficientNet-Lite0 (ImageNet) frozen features, linear probe on {args.data} "
             f"({len(train)} train / {len(test)} test images)", "",
             "| size (px) | probe accuracy (%) | feature ms / image |", "|---|---|---|"]
    lines += [f"| {r['size']}{' (chosen)' if r['size'] == chosen else ''} | {100 * r['accuracy']:.2f} | "
              f"{1000 * r['seconds_per_image']:.2f} |" for r in rows]
    with open(os.path.join(args.out, "probe.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(rows, chosen, os.path.join(args.out, "probe.png"))
    return 0


def plot(rows: list[dict], chosen: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["size"] for r in rows], [100 * r["accuracy"] for r in rows], marker="o", label="probe accuracy")
    ax.axvline(chosen, color="grey", alpha=0.4, label=f"chosen: {chosen} px")
    ax.set_xlabel("input size (px)")
    ax.set_ylabel("linear probe accuracy (%)")
    twin = ax.twinx()
    twin.plot([r["size"] for r in rows], [1000 * r["seconds_per_image"] for r in rows], color="C1", marker="s",
              label="ms / image")
    twin.set_ylabel("feature ms / image", color="C1")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
