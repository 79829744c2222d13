"""Unlearning benchmark: NTK scrubbing / Fast-NTK against retraining and the standard baselines.

    python -m experiments.unlearning --config configs/unlearning.py[:fast_ntk|:vit_prompts|:smoke] --workdir DIR

1. Pre-train a backbone on data disjoint from D (``pretrain``; resumable, reused from another run's
   folder with ``pretrain.workdir``), or load EfficientNet-Lite0's ImageNet weights
   (``backbone.source=imagenet``).
2. Train the parameter subset ``unlearn.subset`` on D from w_init (pre-trained backbone, fresh head,
   fresh prompts), BatchNorm in eval mode: the model to unlearn, w(D). Saved and reused.
3. For each scenario (a class, a random 10%) and each method: unlearn, then measure retain / forget /
   test accuracy, MIA efficacy and seconds. ``gap_to_retrain`` is the mean absolute gap to the
   ``retrain`` row over those four (percentage points).
Steps 2-3 run once per seed of ``seeds`` (D's draw, the forget draw, the fresh head, the batch
order); the pre-trained backbone is shared. WORKDIR receives results.json and results.md (mean and
standard deviation over the seeds), unlearning.png (gaps with error bars), and per seed a folder
seed_<s> with its own results, w(D) and one JSON per finished (scenario, method), reused when the
run is repeated with the same config.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.flatten_util import ravel_pytree

from research.adapters.prompts import PromptedViT, prompt_and_head_filter, prompt_filter
from research.core import cli, experiment, report
from research.core import config as cfg
from research.core.records import read_signed, write_npz_atomic, write_signed
from research.data import pipeline
from research.data.augment import make_preprocess, normalize, resize
from research.models import build_from_config, filters
from research.models import efficientnet_lite as effnet
from research.recipes.classify import fit_classifier
from research.unlearning import baselines, metrics
from research.unlearning.benchmark import Unlearning
from research.unlearning.benchmark_report import REPORTED, plot_results, plot_sweep, results_table
from research.unlearning.model import ForgetProblem, Unlearnable
from research.unlearning.ntk_scrub import apply_scrub, scrub_direction, step_along
from research.unlearning.train import fit, recipe_gradient_norm

BASELINE_REFERENCE_LR = 0.01  # the training lr that the baselines' default lrs were chosen for
# The backbone is one for every seed of ``seeds``, so its own seed is fixed: a run of seeds (1,) in a
# workdir that holds seeds (0, 1) is then the same run as seed 1 there, on the same backbone.
BACKBONE_SEED = 0


# ---------------------------------------------------------------------------------------- models

def imagenet_backbone(exp: Unlearning, input_shape):
    """EfficientNet-Lite0's ImageNet weights (research/data/README.md): (state without the head, preprocess, info)."""
    # Any class count: the head is dropped, the model at w_init gets a fresh one for D's classes.
    model = build_from_config(exp.model, num_classes=10, input_shape=input_shape, rngs=nnx.Rngs(BACKBONE_SEED),
                              conv_init=effnet.placeholder_init)
    t0 = time.perf_counter()
    effnet.load_pretrained(model, exp.backbone.weights, include_head=False)
    state = nnx.state(model).filter(nnx.Not(nnx.PathContains("head")))

    def preprocess(images):  # the weights' own input scaling, not per-channel statistics
        return (resize(images, input_shape) - effnet.PIXEL_MEAN) / effnet.PIXEL_STD
    info = {"data": "imagenet", "weights": exp.backbone.weights or effnet.PRETRAINED_PACKAGE,
            "test_acc": float("nan"), "seconds": time.perf_counter() - t0}
    return state, preprocess, info


def pretrained_backbone(exp: Unlearning, mesh, workdir: str, input_shape):
    """(state of the pre-trained model without its head, preprocess, info); one for all the seeds,
    pre-trained with ``BACKBONE_SEED``."""
    if exp.backbone.source == "imagenet":
        return imagenet_backbone(exp, input_shape)
    stage = exp.pretrain
    pre_train, pre_test = exp.data.splits(stage.data, stage.label, stage.classes, "pretrain.classes")
    if pre_train.images.shape[1:] != tuple(input_shape):
        raise cfg.ConfigError(f"pretrain.data: {stage.data} images are {pre_train.images.shape[1:]}, "
                              f"D's are {tuple(input_shape)}; pre-train on images of the same shape")
    mean, std = pipeline.channel_stats(pre_train.images)
    model = build_from_config(exp.model, num_classes=pre_train.num_classes, input_shape=input_shape,
                              rngs=nnx.Rngs(BACKBONE_SEED))
    t0 = time.perf_counter()
    run = fit_classifier(model, pre_train, pre_test, stage, preprocess=make_preprocess(mean, std, stage.crop_padding,
                                                                                       stage.flip),
                         mesh=mesh, workdir=stage.workdir or os.path.join(workdir, "pretrain"), seed=BACKBONE_SEED,
                         rules=exp.mesh.logical)
    state = nnx.state(run.model()).filter(nnx.Not(nnx.PathContains("head")))
    info = {"data": stage.data, "classes": pre_train.num_classes, "images": len(pre_train),
            "test_acc": 100 * float(run.eval_metrics.get("test/accuracy", float("nan"))),
            "steps": int(run.state.step), "seconds": time.perf_counter() - t0}
    mean, std = tuple(map(float, mean)), tuple(map(float, std))
    return state, (lambda images: normalize(images, mean, std)), info


def model_at_init(exp: Unlearning, backbone_state, num_classes: int, input_shape, seed: int) -> tuple[nnx.Module, object]:
    """The model at w_init (pre-trained backbone, fresh head / prompts) and the filter of its subset."""
    recipe = exp.unlearn
    model = build_from_config(exp.model, num_classes=num_classes, input_shape=input_shape, rngs=nnx.Rngs(seed + 1))
    nnx.update(model, backbone_state)
    if recipe.subset.startswith("prompts"):
        model = PromptedViT(model, recipe.num_prompts, deep=recipe.deep_prompts, rngs=nnx.Rngs(seed + 2))
        return model, prompt_and_head_filter() if recipe.subset == "prompts_and_head" else prompt_filter()
    return model, filters.param_filter(model, recipe.subset)


def trained_params(init: Unlearnable, train, recipe, path: str, seed: int, progress: bool, signature: str):
    """w(D): trained once, then read back from ``path`` (a .npz of the flat subset and the settings that
    produced it; other settings train again)."""
    theta0, _, unravel = init.flat()
    if os.path.exists(path):
        saved = np.load(path)
        if str(saved["signature"]) == signature:
            if saved["theta"].shape != theta0.shape:
                raise cfg.ConfigError(f"{path} holds {saved['theta'].shape[0]} parameters, the subset has "
                                      f"{theta0.shape[0]}; delete it or use another workdir")
            return unravel(jnp.asarray(saved["theta"])), 0.0
    t0 = time.perf_counter()
    params = fit(init, train, recipe, seed=seed, progress=progress, desc="train on D")
    seconds = time.perf_counter() - t0
    write_npz_atomic(path, theta=np.asarray(ravel_pytree(params)[0]), signature=np.asarray(signature))
    return params, seconds


# --------------------------------------------------------------------------------------- methods

def unlearn(method: str, problem: ForgetProblem, exp: Unlearning, mesh, seed: int):
    """(params, info) of one method."""
    if method == "ntk":
        chunk_mesh = mesh if mesh.shape["data"] > 1 and exp.ntk.chunk_size % mesh.shape["data"] == 0 else None
        direction = scrub_direction(problem, exp.ntk, mesh=chunk_mesh, progress=exp.progress)
        params, info = apply_scrub(problem, direction, exp.ntk, seed=seed)
        return params, {**info, "direction": direction.dw}  # run_seed takes dw out for the scale sweep
    kwargs = dict(exp.baselines[method]) if method != "retrain" else {}
    if "lr" in kwargs:  # baseline lrs are set for a model trained at lr 0.01 and follow the training lr
        kwargs["lr"] *= problem.recipe.lr / BASELINE_REFERENCE_LR
    return baselines.BASELINES[method](problem, seed=seed, progress=exp.progress, **kwargs), {}


def run_seed(exp: Unlearning, seed: int, workdir: str, mesh, backbone) -> dict:
    """One seed: D drawn, w(D) trained (or reused), every (scenario, method) run (or reused). The
    seed's summary, also written to WORKDIR/seed_<seed>/results.json."""
    start = time.perf_counter()
    os.makedirs(os.path.join(workdir, "methods"), exist_ok=True)
    backbone_state, preprocess, pretrain_info = backbone
    recipe, settings = exp.unlearn, dataclasses.asdict(exp)
    train, test = exp.data.draw(seed)
    model, subset = model_at_init(exp, backbone_state, train.num_classes, exp.input_shape(train.images.shape[1:]), seed)
    init = Unlearnable.from_model(model, subset, preprocess)
    what_shapes_w_d = json.dumps({"seed": seed, **{k: settings[k] for k in ("data", "backbone", "model", "pretrain",
                                                                            "unlearn")}}, sort_keys=True)
    params, train_seconds = trained_params(init, train, recipe, os.path.join(workdir, "trained.npz"), seed,
                                           exp.progress, what_shapes_w_d)
    trained = init.with_params(params)
    # |grad| of the recipe's objective at w(D), against at w_init: how near a minimum training stopped.
    grad_norms = {"init": recipe_gradient_norm(init, train, recipe, init.params, init.params),
                  "trained": recipe_gradient_norm(init, train, recipe, params, init.params)}
    pretrain_acc = "" if np.isnan(pretrain_info["test_acc"]) else f" (test acc {pretrain_info['test_acc']:.1f}%)"
    print(f"seed {seed}. D: {len(train)} {exp.data.name} images, {train.num_classes} classes; subset "
          f"{recipe.subset}: {init.num_params:,} parameters; pre-trained on {pretrain_info['data']}{pretrain_acc}; "
          f"trained on D: test acc {metrics.accuracy(trained, test):.1f}%, |grad| {grad_norms['trained']:.2e} "
          f"(at w_init {grad_norms['init']:.2e})")

    # A finished (scenario, method) is reused only if everything that shaped it is unchanged: the
    # run's settings and that method's own hyperparameters (not the other methods'; ntk.* are ntk's).
    shared = {"seed": seed, **{k: v for k, v in settings.items()
                               if k not in ("seeds", "methods", "scenarios", "progress", "baselines", "ntk")}}
    own = {**settings["baselines"], "ntk": settings["ntk"]}
    results = {}
    for scenario in exp.scenarios:
        retain, forget, scenario_test = exp.scenario_split(scenario, train, test, seed)
        problem = ForgetProblem(trained, init.params, retain, forget, scenario_test, recipe)
        rows = {"original": {**metrics.unlearning_metrics(trained, trained.params, problem), "seconds": 0.0}}
        for method in exp.run_methods:
            path = os.path.join(workdir, "methods", f"{scenario}_{method}.json")
            signature = {**shared, "hyperparameters": own.get(method, {})}
            rows[method] = read_signed(path, signature)
            if rows[method] is None:
                rows[method] = run_method(method, scenario, problem, exp, mesh, seed)
                if experiment.main_process():
                    write_signed(path, signature, rows[method])
        for row in rows.values():
            row["gap_to_retrain"] = metrics.gap_to_retrain(row, rows["retrain"])
            for point in row.get("info_sweep", []):
                point["gap_to_retrain"] = metrics.gap_to_retrain(point, rows["retrain"])
        results[scenario] = {"n_retain": len(retain), "n_forget": len(forget), "n_test": len(scenario_test),
                             "methods": rows}
    summary = {"seed": seed, "scenarios": results, "num_params": init.num_params, "n_train": len(train),
               "train_seconds": train_seconds, "grad_norm": grad_norms, "wall_time_s": time.perf_counter() - start}
    if experiment.main_process():
        experiment.write_results(workdir, summary, results_table(summary))
    return summary


def run_method(method: str, scenario: str, problem: ForgetProblem, exp: Unlearning, mesh, seed: int) -> dict:
    """One method's row: its metrics, its seconds and what it reports of itself (info_*)."""
    t0 = time.perf_counter()
    new_params, info = unlearn(method, problem, exp, mesh, seed)
    jax.block_until_ready(new_params)
    seconds = time.perf_counter() - t0
    if method == "retrain":  # after the timing: the retrain's own distance from a minimum
        info["grad_norm"] = recipe_gradient_norm(problem.trained, problem.retain, exp.unlearn, new_params, problem.init_params)
    dw = info.pop("direction", None)
    if dw is not None and exp.ntk.scale_sweep:  # a diagnostic, after the timed scrub
        info["sweep"] = [{"scale": s, **metrics.unlearning_metrics(problem.trained, step_along(problem, dw, s), problem)}
                         for s in exp.ntk.scale_sweep]
    row = {**metrics.unlearning_metrics(problem.trained, new_params, problem), "seconds": seconds,
           **{f"info_{k}": v for k, v in info.items()}}
    print(f"{scenario:6s} {method:18s} " + " ".join(f"{k} {row[k]:6.2f}" for k in REPORTED)
          + f"  {seconds:7.1f} s")
    return row


AVERAGED = (*REPORTED, "gap_to_retrain", "seconds")


def mean_over_seeds(per_seed: list[dict]) -> dict:
    """Scenario blocks as one seed's, each method's row merged over the seeds (`report.merge_seeds`:
    every metric of AVERAGED as mean, ``_sd`` and ``_values``; info_* from the first seed)."""
    return {scenario: {**{k: v for k, v in first.items() if k != "methods"},
                       "methods": {method: report.merge_seeds([run["scenarios"][scenario]["methods"][method]
                                                               for run in per_seed], AVERAGED)
                                   for method in first["methods"]}}
            for scenario, first in per_seed[0]["scenarios"].items()}


def main(config: ml_collections.ConfigDict, workdir: str) -> dict:
    exp = cfg.build(Unlearning, config)
    mesh = experiment.start(config, workdir)
    train, _ = exp.data.draw(exp.seeds[0])
    backbone = pretrained_backbone(exp, mesh, workdir, exp.input_shape(train.images.shape[1:]))
    per_seed = [run_seed(exp, seed, os.path.join(workdir, f"seed_{seed}"), mesh, backbone) for seed in exp.seeds]
    scenarios_mean = mean_over_seeds(per_seed)
    speed = {scenario: block["methods"]["ntk"]["seconds"] / block["methods"]["retrain"]["seconds"]
             for scenario, block in scenarios_mean.items()
             if "ntk" in block["methods"] and block["methods"]["retrain"]["seconds"] > 0}
    summary = {"scenarios": scenarios_mean, "seeds": list(exp.seeds), "model": exp.model.name,
               "subset": exp.unlearn.subset, "recipe": dataclasses.asdict(exp.unlearn),
               "num_params": per_seed[0]["num_params"], "data": exp.data.name, "n_train": per_seed[0]["n_train"],
               "pretrain": backbone[2], "train_seconds": float(np.mean([run["train_seconds"] for run in per_seed])),
               "ntk_seconds_over_retrain_seconds": speed,
               "wall_time_s": experiment.wall_time_s(workdir), "devices": experiment.device_summary(mesh)}
    table = results_table(summary)
    if experiment.main_process():
        experiment.write_results(workdir, summary, table)
        plot_results(summary, os.path.join(workdir, "unlearning.png"))
        if exp.ntk.scale_sweep and "ntk" in exp.run_methods:
            plot_sweep(summary, os.path.join(workdir, "ntk_scale_sweep.png"))
    print(table)
    return summary


if __name__ == "__main__":
    cli.run(main)
