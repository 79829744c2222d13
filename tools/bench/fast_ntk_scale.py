"""Fast-NTK at the paper's scale on EfficientNet-Lite0 (ImageNet weights, BatchNorm + head): what the
scrub costs against retraining with the same recipe, and what memory its solve needs.

    python -m tools.bench.fast_ntk_scale [--images 5000] [--measure-images 1000] [--measure-epochs 1]
                                         [--out FILE.json]

D is ``--images`` CIFAR-10 sample images at 32 px (10 classes), as ``configs/unlearning.py:
fast_ntk_effnet``. Measured in one run, on ``--measure-images`` of them:
  jacobian   seconds per Jacobian row (one VJP per sample and class, in chunks of 32 samples);
  retrain    seconds per SGD step of the reference recipe (batch 128), over ``--measure-epochs``.
Each rate is the difference of two timed calls (so compilation cancels). Both costs are linear
in what they do (rows, steps), so the figures for D are the measured rates times
N C rows and 25 epochs x N / 128 steps; the output says which figures are measured and which are
scaled. The solve is not run when it does not fit in memory: the output gives the bytes of J
(float32) and of the float64 kernel in sample space (N C)^2 and in parameter space P^2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import numpy as np

from research.core.config import build, load_config
from research.unlearning import ntk
from research.unlearning.model import Unlearnable
from research.unlearning.train import fit


def _setup(images: int):
    from experiments import unlearning
    from research.unlearning.benchmark import Unlearning

    exp = build(Unlearning, load_config("configs/unlearning.py:fast_ntk_effnet", {"data.train_total": images}))
    train, _ = exp.data.draw(0)
    shape = exp.input_shape(train.images.shape[1:])
    backbone_state, preprocess, _ = unlearning.imagenet_backbone(exp, shape)
    model, subset = unlearning.model_at_init(exp, backbone_state, train.num_classes, shape, 0)
    return Unlearnable.from_model(model, subset, preprocess), train, exp.unlearn


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--measure-images", type=int, default=1000)
    parser.add_argument("--measure-epochs", type=int, default=1)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    init, train, recipe = _setup(args.images)
    n, c, p = len(train), train.num_classes, init.num_params
    sample = train.subset(np.arange(min(args.measure_images, n)))

    # Each call compiles afresh (a new jitted closure), so a rate is a difference of two timed calls:
    # the small one's compilation cancels out.
    theta, fn, _ = init.flat()

    def jacobian_seconds(count: int) -> float:
        t0 = time.perf_counter()
        jax.block_until_ready(ntk.jacobian(fn, theta, sample.images[:count], chunk_size=32))
        return time.perf_counter() - t0
    small, big = jacobian_seconds(32), jacobian_seconds(len(sample))
    per_row = (big - small) / ((len(sample) - 32) * c)

    def fit_seconds(epochs: int) -> tuple[float, int]:
        probe = dataclasses.replace(recipe, epochs=epochs)
        t0 = time.perf_counter()
        jax.block_until_ready(fit(init, sample, probe))
        return time.perf_counter() - t0, probe.steps(len(sample))
    (t1, s1), (t2, s2) = fit_seconds(1), fit_seconds(1 + args.measure_epochs)
    per_step, steps = (t2 - t1) / (s2 - s1), s2 - s1
    jac_seconds = big

    rows, full_steps = n * c, recipe.steps(int(0.9 * n))  # retraining sees D_r: 90% of D for a random 10%
    report = {
        "images": n, "classes": c, "parameters": p, "kernel_rows": rows,
        "measured": {"images": len(sample), "jacobian_seconds": jac_seconds, "jacobian_seconds_per_row": per_row,
                     "retrain_steps": steps, "retrain_seconds_per_step": per_step},
        "scaled": {"jacobian_seconds": per_row * rows, "retrain_steps": full_steps,
                   "retrain_seconds": per_step * full_steps,
                   "jacobian_over_retrain": per_row * rows / (per_step * full_steps)},
        "memory_gb": {"jacobian_float32": rows * p * 4 / 1e9, "sample_kernel_float64": rows ** 2 * 8 / 1e9,
                      "parameter_kernel_float64": p ** 2 * 8 / 1e9},
        "solve_space": ntk.solve_space(rows, p), "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
    }
    m, s, g = report["measured"], report["scaled"], report["memory_gb"]
    print(f"D: {n} images x {c} classes = {rows:,} kernel rows; {p:,} parameters (BN + head)")
    print(f"measured on {m['images']} images: Jacobian {1e3 * per_row:.2f} ms/row; "
          f"recipe SGD {1e3 * per_step:.0f} ms/step over {steps} steps")
    print(f"scaled to D: Jacobian {s['jacobian_seconds']:.0f} s; retraining {s['retrain_steps']} steps = "
          f"{s['retrain_seconds']:.0f} s; ratio Jacobian / retrain {s['jacobian_over_retrain']:.2f}")
    print(f"memory: J {g['jacobian_float32']:.1f} GB (float32); kernel {g['sample_kernel_float64']:.1f} GB in sample "
          f"space, {g['parameter_kernel_float64']:.1f} GB in parameter space (float64); the smaller is "
          f"{report['solve_space']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
