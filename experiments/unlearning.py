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
from research.core import cli, experiment
from research.core import config as cfg
from research.recipes.classify import PretrainConfig, fit_classifier
from research.core.records import read_signed, write_npz_atomic, write_signed
from research.data import pipeline
from research.data.augment import make_preprocess, normalize, resize
from research.data.sections import UnlearningData
from research.models import ModelConfig, build_from_config, filters
from research.models import efficientnet_lite as effnet
from research.unlearning import baselines, metrics
from research.unlearning.model import ForgetProblem, Unlearnable
from research.unlearning.ntk_scrub import NTKScrubConfig, apply_scrub, scrub_direction, step_along
from research.unlearning.train import TrainRecipe, fit, recipe_gradient_norm

METHOD_NAMES = ("retrain", "ntk", *[m for m in baselines.BASELINES if m != "retrain"])
SCENARIOS = ("class", "random")
REPORTED = ("retain_acc", "forget_acc", "test_acc", "mia")
BASELINE_REFERENCE_LR = 0.01  # the training lr that the baselines' default lrs were chosen for
# The backbone is one for every seed of ``seeds``, so its own seed is fixed: a run of seeds (1,) in a
# workdir that holds seeds (0, 1) is then the same run as seed 1 there, on the same backbone.
BACKBONE_SEED = 0


def validate(config: ml_collections.ConfigDict) -> tuple[list[str], list[str], TrainRecipe, NTKScrubConfig]:
    """(methods, scenarios, recipe, ntk settings); the sections' own checks live in their dataclasses."""
    methods = cfg.check_names(config, "methods", METHOD_NAMES)
    if "retrain" not in methods:
        methods.insert(0, "retrain")  # gap_to_retrain needs it
    scenarios = cfg.check_names(config, "scenarios", SCENARIOS)
    model = cfg.build(ModelConfig, config, "model")
    recipe = cfg.build(TrainRecipe, config, "unlearn")
    ntk_config = cfg.build(NTKScrubConfig, config, "ntk")  # its loss and ridge are the recipe's
    cfg.build(PretrainConfig, config, "pretrain")
    cfg.build(UnlearningData, config, "data")
    cfg.build(effnet.BackboneConfig, config, "backbone").check_model(model.name)
    cfg.check(config, "forget_fraction", lambda v: 0 < v < 1, "a fraction strictly between 0 and 1")
    cfg.check(config, "eval_batch_size", lambda v: v > 0, "a positive int")
    cfg.check(config, "seeds", lambda v: len(v) > 0 and len(set(v)) == len(v) and all(isinstance(s, int) for s in v),
              "distinct ints, e.g. 0,1,2")
    if config.data.image_size and config.backbone.source != "imagenet":
        raise cfg.ConfigError(f"data.image_size: {config.data.image_size} resizes for the ImageNet backbone only "
                              f"(backbone.source=imagenet); the pre-training stage uses the stored size, so use 0")
    if recipe.subset.startswith("prompts") and not model.name.startswith("vit"):
        raise cfg.ConfigError(f"unlearn.subset: {recipe.subset} needs a ViT (model.name vit_tiny | vit_small), "
                              f"not {model.name}")
    return methods, scenarios, recipe, ntk_config


# ------------------------------------------------------------------------------------------- data

def data_of_d(config, seed: int) -> tuple[pipeline.ImageArrays, pipeline.ImageArrays]:
    """D (train, a seeded draw) and its test split."""
    data = cfg.build(UnlearningData, config, "data")
    train, test = data.splits(classes=data.classes)
    train = pipeline.per_class(train, config.data.train_per_class, seed)
    if config.data.train_total and config.data.train_total < len(train):
        rows = np.random.default_rng(seed).permutation(len(train))[:config.data.train_total]
        train = train.subset(np.sort(rows))
    return train, test


def scenario_split(name: str, train, test, config, seed: int):
    """(retain, forget, test) of one scenario. For a class, the test split drops that class (the
    test accuracy of what should be kept)."""
    if name == "class":
        if not 0 <= config.forget_class < train.num_classes:
            raise cfg.ConfigError(f"forget_class: {config.forget_class} is not a class of D (0..{train.num_classes - 1})")
        forget_rows = np.flatnonzero(train.labels == config.forget_class)
        test = test.subset(np.flatnonzero(test.labels != config.forget_class))
    else:
        n_forget = max(1, round(config.forget_fraction * len(train)))
        forget_rows = np.sort(np.random.default_rng([seed, 1]).permutation(len(train))[:n_forget])
    keep = np.ones(len(train), bool)
    keep[forget_rows] = False
    return train.subset(np.flatnonzero(keep)), train.subset(forget_rows), test


# ---------------------------------------------------------------------------------------- models

def model_input_shape(config, stored_shape) -> tuple[int, int, int]:
    """(H, W, C) the model sees: the stored images, or resized to ``data.image_size``."""
    size = config.data.image_size
    return (size, size, stored_shape[-1]) if size else tuple(stored_shape)


def imagenet_backbone(config, input_shape):
    """EfficientNet-Lite0's ImageNet weights (DATA.md): (state without the head, preprocess, info)."""
    # Any class count: the head is dropped, the model at w_init gets a fresh one for D's classes.
    model = build_from_config(config.model, num_classes=10, input_shape=input_shape, rngs=nnx.Rngs(BACKBONE_SEED),
                              conv_init=effnet.placeholder_init)
    t0 = time.perf_counter()
    effnet.load_pretrained(model, config.backbone.weights, include_head=False)
    state = nnx.state(model).filter(nnx.Not(nnx.PathContains("head")))

    def preprocess(images):  # the weights' own input scaling, not per-channel statistics
        return (resize(images, input_shape) - effnet.PIXEL_MEAN) / effnet.PIXEL_STD
    info = {"data": "imagenet", "weights": config.backbone.weights or effnet.PRETRAINED_PACKAGE,
            "test_acc": float("nan"), "seconds": time.perf_counter() - t0}
    return state, preprocess, info


def pretrained_backbone(config, mesh, workdir: str, input_shape):
    """(state of the pre-trained model without its head, preprocess, info); one for all the seeds,
    pre-trained with ``BACKBONE_SEED``."""
    if config.backbone.source == "imagenet":
        return imagenet_backbone(config, input_shape)
    stage = cfg.build(PretrainConfig, config, "pretrain")
    pre_train, pre_test = cfg.build(UnlearningData, config, "data").splits(stage.data, stage.label, stage.classes,
                                                                           "pretrain.classes")
    if pre_train.images.shape[1:] != tuple(input_shape):
        raise cfg.ConfigError(f"pretrain.data: {stage.data} images are {pre_train.images.shape[1:]}, "
                              f"D's are {tuple(input_shape)}; pre-train on images of the same shape")
    mean, std = pipeline.channel_stats(pre_train.images)
    model = build_from_config(config.model, num_classes=pre_train.num_classes, input_shape=input_shape,
                              rngs=nnx.Rngs(BACKBONE_SEED))
    t0 = time.perf_counter()
    run = fit_classifier(model, pre_train, pre_test, config.pretrain,
                         preprocess=make_preprocess(mean, std, stage.crop_padding, stage.flip),
                         mesh=mesh, workdir=stage.workdir or os.path.join(workdir, "pretrain"), seed=BACKBONE_SEED,
                         rules=experiment.mesh_config(config).logical)
    state = nnx.state(run.model()).filter(nnx.Not(nnx.PathContains("head")))
    info = {"data": stage.data, "classes": pre_train.num_classes, "images": len(pre_train),
            "test_acc": 100 * float(run.eval_metrics.get("test/accuracy", float("nan"))),
            "steps": int(run.state.step), "seconds": time.perf_counter() - t0}
    mean, std = tuple(map(float, mean)), tuple(map(float, std))
    return state, (lambda images: normalize(images, mean, std)), info


def model_at_init(config, recipe: TrainRecipe, backbone_state, num_classes: int,
                  input_shape, seed: int) -> tuple[nnx.Module, object]:
    """The model at w_init (pre-trained backbone, fresh head / prompts) and the filter of its subset."""
    model = build_from_config(config.model, num_classes=num_classes, input_shape=input_shape,
                              rngs=nnx.Rngs(seed + 1))
    nnx.update(model, backbone_state)
    if recipe.subset.startswith("prompts"):
        model = PromptedViT(model, recipe.num_prompts, deep=recipe.deep_prompts, rngs=nnx.Rngs(seed + 2))
        return model, prompt_and_head_filter() if recipe.subset == "prompts_and_head" else prompt_filter()
    return model, filters.param_filter(model, recipe.subset)


def trained_params(init: Unlearnable, train, recipe: TrainRecipe, path: str, seed: int, progress: bool,
                   signature: str):
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

def unlearn(method: str, problem: ForgetProblem, config, ntk_config: NTKScrubConfig, mesh, seed: int):
    """(params, info) of one method."""
    if method == "ntk":
        chunk_mesh = mesh if mesh.shape["data"] > 1 and ntk_config.chunk_size % mesh.shape["data"] == 0 else None
        direction = scrub_direction(problem, ntk_config, mesh=chunk_mesh, progress=config.progress)
        params, info = apply_scrub(problem, direction, ntk_config, seed=seed)
        return params, {**info, "direction": direction.dw}  # main takes dw out for the scale sweep
    kwargs = config.baselines[method].to_dict() if method != "retrain" else {}
    if "lr" in kwargs:  # baseline lrs are set for a model trained at lr 0.01 and follow the training lr
        kwargs["lr"] *= problem.recipe.lr / BASELINE_REFERENCE_LR
    return baselines.BASELINES[method](problem, seed=seed, progress=config.progress, **kwargs), {}


def run_seed(config, seed: int, workdir: str, methods, scenarios, recipe: TrainRecipe, ntk_config: NTKScrubConfig,
             mesh, backbone) -> dict:
    """One seed: D drawn, w(D) trained (or reused), every (scenario, method) run (or reused). The
    seed's summary, also written to WORKDIR/seed_<seed>/results.json."""
    start = time.perf_counter()
    os.makedirs(os.path.join(workdir, "methods"), exist_ok=True)
    backbone_state, preprocess, pretrain_info = backbone
    train, test = data_of_d(config, seed)
    model, subset = model_at_init(config, recipe, backbone_state, train.num_classes,
                                  model_input_shape(config, train.images.shape[1:]), seed)
    init = Unlearnable.from_model(model, subset, preprocess)
    what_shapes_w_d = json.dumps({"seed": seed, **{k: config.to_dict()[k] for k in ("data", "backbone", "model",
                                                                                    "pretrain", "unlearn")}},
                                 sort_keys=True)
    params, train_seconds = trained_params(init, train, recipe, os.path.join(workdir, "trained.npz"), seed,
                                           config.progress, what_shapes_w_d)
    trained = init.with_params(params)
    # |grad| of the recipe's objective at w(D), against at w_init: how near a minimum training stopped.
    grad_norms = {"init": recipe_gradient_norm(init, train, recipe, init.params, init.params),
                  "trained": recipe_gradient_norm(init, train, recipe, params, init.params)}
    pretrain_acc = "" if np.isnan(pretrain_info["test_acc"]) else f" (test acc {pretrain_info['test_acc']:.1f}%)"
    print(f"seed {seed}. D: {len(train)} {config.data.name} images, {train.num_classes} classes; subset "
          f"{recipe.subset}: {init.num_params:,} parameters; pre-trained on {pretrain_info['data']}{pretrain_acc}; "
          f"trained on D: test acc {metrics.accuracy(trained, test):.1f}%, |grad| {grad_norms['trained']:.2e} "
          f"(at w_init {grad_norms['init']:.2e})")

    # A finished (scenario, method) is reused only if everything that shaped it is unchanged: the
    # run's settings and that method's own hyperparameters (not the other methods'; ntk.* are ntk's).
    shared = {"seed": seed, **{k: v for k, v in config.to_dict().items()
                               if k not in ("seeds", "methods", "scenarios", "progress", "baselines", "ntk")}}
    own = {**config.baselines.to_dict(), "ntk": config.ntk.to_dict()}
    results = {}
    for scenario in scenarios:
        retain, forget, scenario_test = scenario_split(scenario, train, test, config, seed)
        problem = ForgetProblem(trained, init.params, retain, forget, scenario_test, recipe)
        rows = {"original": {**metrics.unlearning_metrics(trained, trained.params, problem), "seconds": 0.0}}
        for method in methods:
            path = os.path.join(workdir, "methods", f"{scenario}_{method}.json")
            signature = {**shared, "hyperparameters": own.get(method, {})}
            saved = read_signed(path, signature)
            if saved is not None:
                rows[method] = saved
                continue
            t0 = time.perf_counter()
            new_params, info = unlearn(method, problem, config, ntk_config, mesh, seed)
            jax.block_until_ready(new_params)
            seconds = time.perf_counter() - t0
            if method == "retrain":  # after the timing: the retrain's own distance from a minimum
                info["grad_norm"] = recipe_gradient_norm(trained, retain, recipe, new_params, init.params)
            dw = info.pop("direction", None)
            if dw is not None and ntk_config.scale_sweep:  # a diagnostic, after the timed scrub
                info["sweep"] = [{"scale": s, **metrics.unlearning_metrics(trained, step_along(problem, dw, s), problem)}
                                 for s in ntk_config.scale_sweep]
            row = {**metrics.unlearning_metrics(trained, new_params, problem), "seconds": seconds,
                   **{f"info_{k}": v for k, v in info.items()}}
            rows[method] = row
            if experiment.main_process():
                write_signed(path, signature, row)
            print(f"{scenario:6s} {method:18s} " + " ".join(f"{k} {row[k]:6.2f}" for k in REPORTED)
                  + f"  {seconds:7.1f} s")
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


AVERAGED = (*REPORTED, "gap_to_retrain", "seconds")


def mean_over_seeds(per_seed: list[dict]) -> dict:
    """Scenario blocks as one seed's, every metric of AVERAGED the mean over the seeds, beside it
    ``<metric>_sd`` (sample standard deviation; 0 for one seed) and ``<metric>_values``; a method's
    other entries (info_*) come from the first seed."""
    out = {}
    for scenario, first in per_seed[0]["scenarios"].items():
        methods = {}
        for method, row in first["methods"].items():
            merged = dict(row)
            for key in AVERAGED:
                values = [run["scenarios"][scenario]["methods"][method][key] for run in per_seed]
                merged.update({key: float(np.mean(values)), f"{key}_sd": float(np.std(values, ddof=1)) if len(values) > 1
                               else 0.0, f"{key}_values": values})
            methods[method] = merged
        out[scenario] = {**{k: v for k, v in first.items() if k != "methods"}, "methods": methods}
    return out


def main(config: ml_collections.ConfigDict, workdir: str) -> dict:
    methods, scenarios, recipe, ntk_config = validate(config)
    start = time.perf_counter()
    mesh = experiment.start(config, workdir)
    train, _ = data_of_d(config, config.seeds[0])
    backbone = pretrained_backbone(config, mesh, workdir, model_input_shape(config, train.images.shape[1:]))
    per_seed = [run_seed(config, seed, os.path.join(workdir, f"seed_{seed}"), methods, scenarios, recipe, ntk_config,
                         mesh, backbone) for seed in config.seeds]
    scenarios_mean = mean_over_seeds(per_seed)
    speed = {}
    for scenario, block in scenarios_mean.items():
        rows = block["methods"]
        if "ntk" in rows and rows["retrain"]["seconds"] > 0:
            speed[scenario] = rows["ntk"]["seconds"] / rows["retrain"]["seconds"]
    summary = {"scenarios": scenarios_mean, "seeds": list(config.seeds), "model": config.model.name,
               "subset": recipe.subset, "recipe": dataclasses.asdict(recipe), "num_params": per_seed[0]["num_params"],
               "data": config.data.name, "n_train": per_seed[0]["n_train"], "pretrain": backbone[2],
               "train_seconds": float(np.mean([run["train_seconds"] for run in per_seed])),
               "ntk_seconds_over_retrain_seconds": speed,
               "wall_time_s": time.perf_counter() - start, "devices": experiment.device_summary(mesh)}
    table = results_table(summary)
    if experiment.main_process():
        experiment.write_results(workdir, summary, table)
        plot_results(summary, os.path.join(workdir, "unlearning.png"))
        if ntk_config.scale_sweep and "ntk" in methods:
            plot_sweep(summary, os.path.join(workdir, "ntk_scale_sweep.png"))
    print(table)
    return summary


def _cell(row: dict, key: str, digits: int = 2) -> str:
    sd = row.get(f"{key}_sd")
    return f"{row[key]:.{digits}f}" if not sd else f"{row[key]:.{digits}f} ± {sd:.{digits}f}"


def results_table(summary: dict) -> str:
    """Markdown: one table per scenario (mean ± sd over the seeds when there are several)."""
    seeds = summary.get("seeds", [summary.get("seed")])
    lines = []
    for scenario, block in summary["scenarios"].items():
        lines += [f"\n**{scenario}** ({block['n_retain']} retain, {block['n_forget']} forget, {block['n_test']} test; "
                  f"{summary['num_params']:,} parameters in the subset; seeds {', '.join(map(str, seeds))})\n",
                  "| method | retain acc | forget acc | test acc | MIA | gap to retrain | seconds |",
                  "|---|---|---|---|---|---|---|"]
        for method, r in block["methods"].items():
            lines.append(f"| {method} | " + " | ".join(_cell(r, k) for k in (*REPORTED, "gap_to_retrain"))
                         + f" | {_cell(r, 'seconds', 1)} |")
        ratio = summary.get("ntk_seconds_over_retrain_seconds", {}).get(scenario)
        if ratio is not None:
            lines += ["", f"NTK scrub seconds / retrain seconds (same recipe): {ratio:.2f}"]
        ntk_row = block["methods"].get("ntk", {})
        if ntk_row.get("info_sweep"):
            lines += ["", f"NTK scrub along its direction, w(D) + s dw (the scrub took s = {ntk_row['info_scale']:.2f}):", "",
                      "| s | retain acc | forget acc | test acc | MIA | gap to retrain |", "|---|---|---|---|---|---|"]
            lines += [f"| {p['scale']:g} | {p['retain_acc']:.2f} | {p['forget_acc']:.2f} | {p['test_acc']:.2f} | "
                      f"{p['mia']:.2f} | {p['gap_to_retrain']:.2f} |" for p in ntk_row["info_sweep"]]
    return "\n".join(lines)


def plot_results(summary: dict, path: str) -> None:
    """Gap to retrain per method and scenario, bars at the mean with the seeds' sd as error bars and
    each seed as a dot: the figure a reader looks at first."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    scenarios = list(summary["scenarios"])
    fig, axes = plt.subplots(1, len(scenarios), figsize=(6 * len(scenarios), 3.8), squeeze=False)
    for ax, scenario in zip(axes[0], scenarios):
        rows = summary["scenarios"][scenario]["methods"]
        names = [m for m in rows if m != "retrain"]
        x = np.arange(len(names))
        ax.bar(x, [rows[m]["gap_to_retrain"] for m in names], yerr=[rows[m].get("gap_to_retrain_sd", 0) for m in names],
               color=["tab:orange" if m == "ntk" else "tab:blue" for m in names], capsize=3)
        for i, m in enumerate(names):
            values = rows[m].get("gap_to_retrain_values", [])
            ax.plot([i] * len(values), values, "k.", ms=4)
        ax.set_xticks(x, names, rotation=60)
        ax.set_title(f"forget {scenario}: mean |gap| to retrain (points), {len(summary.get('seeds', [0]))} seed(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_sweep(summary: dict, path: str) -> None:
    """Retain / forget / test accuracy and MIA at w(D) + s dw against s, one panel per scenario;
    dashed: retraining's values; dotted vertical: the scale the scrub took (``ntk.scale``)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    scenarios = [s for s, b in summary["scenarios"].items() if b["methods"].get("ntk", {}).get("info_sweep")]
    if not scenarios:
        return
    fig, axes = plt.subplots(1, len(scenarios), figsize=(5.5 * len(scenarios), 3.6), squeeze=False)
    for ax, scenario in zip(axes[0], scenarios):
        rows = summary["scenarios"][scenario]["methods"]
        sweep = rows["ntk"]["info_sweep"]
        for key, color in zip(REPORTED, ("tab:blue", "tab:red", "tab:green", "tab:purple")):
            ax.plot([p["scale"] for p in sweep], [p[key] for p in sweep], "o-", color=color, label=key)
            ax.axhline(rows["retrain"][key], color=color, ls="--", lw=0.8)
        ax.axvline(rows["ntk"]["info_scale"], color="k", ls=":", lw=1)
        ax.set_xlabel("s in w(D) + s dw")
        ax.set_ylabel("%")
        ax.set_title(f"forget {scenario}: dashed = retrain")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    cli.run(main, default_workdir="runs/unlearning")
