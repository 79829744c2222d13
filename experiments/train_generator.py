"""Train the masked-autoencoder generator (inpainting / outpainting) on an image data set.

    python -m experiments.train_generator --config configs/train_generator.py[:PRESETS] --workdir DIR

Writes to DIR: config.json, TensorBoard events with sample grids (tb/), checkpoints (checkpoints/,
resumed when present), samples.png (rows: originals, centre-masked input, inpainting, border-masked
input, outpainting), curves.png and results.json (test MSE on the hidden pixels of both masks).
"""
from __future__ import annotations

import os

import jax.numpy as jnp
import ml_collections

from research.core import cli, experiment, report
from research.core import config as cfg
from research.core.records import write_png
from research.models import mae
from research.recipes.mae_train import GeneratorTraining, fit_generator, load_images, sample_grid, to_unit


def main(config: ml_collections.ConfigDict, workdir: str) -> dict:
    exp = cfg.build(GeneratorTraining, config)
    train, test = load_images(exp.data)
    mesh = experiment.start(config, workdir)
    model = mae.build(train.images.shape[1:], exp.model, exp.seed)
    run = fit_generator(model, train, test, exp, mesh=mesh, workdir=workdir, seed=exp.seed, flip=exp.data.flip,
                        rules=exp.mesh.logical)
    results = {"data": exp.data.name, "image_shape": list(train.images.shape[1:]),
               "train_images": len(train), "test_images": len(test), "steps": run.steps,
               "train_loss": run.train_metrics.get("train/loss"),
               "test_mse_center": run.eval_metrics.get("test/mse_center"),
               "test_mse_outpaint": run.eval_metrics.get("test/mse_outpaint"),
               "wall_time_s": experiment.wall_time_s(workdir),
               "devices": experiment.device_summary(mesh)}
    if experiment.main_process():
        experiment.write_results(workdir, results)
        grid = sample_grid(run.model, to_unit(jnp.asarray(test.images[:8])), exp.masks)
        write_png(os.path.join(workdir, "samples.png"), grid)
        report.curves(run.history, os.path.join(workdir, "curves.png"), title=f"generator on {exp.data.name}")
        print(f"test MSE on hidden pixels: centre {results['test_mse_center']:.4f}, "
              f"outpaint {results['test_mse_outpaint']:.4f} after {run.steps} steps in {results['wall_time_s']:.0f} s")
    return results


if __name__ == "__main__":
    cli.run(main)
