"""Train any classifier of research.models on any image data set of research.data.

    python -m experiments.train_classifier --config configs/train_classifier.py[:PRESETS] --workdir DIR

Writes to DIR: config.json, TensorBoard events (tb/), checkpoints (checkpoints/, resumed when
present), curves.png and results.json (test_accuracy, train_loss, steps, wall_time_s, ...).
"""
from __future__ import annotations

import json
import os

import jax
import ml_collections
from flax import nnx

from research.core import cli, experiment, report
from research.core import config as cfg
from research.core.records import write_json_atomic
from research.data import pipeline
from research.data.augment import make_preprocess
from research.models import COMPUTE_DTYPES, build_from_config
from research.recipes.classify import ClassifierTraining, fit_classifier


def main(config: ml_collections.ConfigDict, workdir: str) -> dict:
    exp = cfg.build(ClassifierTraining, config)
    data = exp.data
    mesh = experiment.start(config, workdir)

    # Data: arrays in host memory; augmentation runs on the device inside the step.
    ds = data.load()
    train = pipeline.to_arrays(ds["train"]).first(data.train_limit)
    test = pipeline.to_arrays(ds["test"])
    mean, std = pipeline.channel_stats(train.images)
    dtype = COMPUTE_DTYPES[exp.model.dtype]
    preprocess = make_preprocess(mean, std, data.crop_padding, data.flip, dtype)

    model = build_from_config(exp.model, num_classes=train.num_classes, input_shape=train.images.shape[1:],
                              rngs=nnx.Rngs(exp.seed))
    num_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    run = fit_classifier(model, train, test, exp, preprocess=preprocess, mesh=mesh, workdir=workdir,
                         seed=exp.seed, rules=exp.mesh.logical)
    state, train_metrics, eval_metrics = run.state, run.train_metrics, run.eval_metrics
    results_path = os.path.join(workdir, "results.json")
    if not train_metrics and os.path.exists(results_path):  # a finished run resumed: keep its training record
        with open(results_path) as f:
            previous = json.load(f)
        train_metrics = {f"train/{k.removeprefix('train_')}": previous[k] for k in ("train_loss", "train_accuracy")
                         if previous.get(k) is not None}

    results = {
        "test_accuracy": eval_metrics.get("test/accuracy"),
        "test_loss": eval_metrics.get("test/loss"),
        "train_loss": train_metrics.get("train/loss"),
        "train_accuracy": train_metrics.get("train/accuracy"),
        "steps": int(jax.device_get(state.step)),
        "epochs": int(jax.device_get(state.step)) / run.steps_per_epoch,
        "wall_time_s": experiment.wall_time_s(workdir),
        "examples_per_s": train_metrics.get("train/examples_per_s"),
        "model": exp.model.name,
        "num_params": int(num_params),
        "num_trainable_params": int(run.num_trainable),
        "data": ds["train"].info.description or data.name,
        "train_examples": len(train),
        "test_examples": len(test),
        "devices": experiment.device_summary(mesh),
        "mesh": dict(mesh.shape),
    }
    if experiment.main_process():
        write_json_atomic(results_path, results)
        report.curves(run.history, os.path.join(workdir, "curves.png"),
                    title=f"{exp.model.name} on {results['data']}")
        print(f"test accuracy {results['test_accuracy']:.4f} after {results['steps']} steps "
              f"in {results['wall_time_s']:.1f} s; results in {results_path}")
    return results


if __name__ == "__main__":
    cli.run(main)
