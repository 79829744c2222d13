"""Unlearning for an image-to-image generator: make it fail on the forget classes, keep it on the rest.

    python -m experiments.generative_unlearning --config configs/generative_unlearning.py[:PRESETS] --workdir DIR

1. The masked-autoencoder generator: restored from ``generator.workdir`` or DIR/generator, trained
   there first when it has no finished checkpoint (research/recipes/mae_train.py).
2. For each seed and row (ours at each alpha, ours with a proxy retain set, each baseline), a copy
   of the encoder is unlearned on the training images of the retain and forget classes
   (research/unlearning/generative.py); DIR/rows/ keeps each finished row, so a rerun resumes.
   Each of ``target_rows`` adds a row without training: the original generator's outputs with that
   method's forget target reached exactly (generative.reached_target), the ceiling of its forget term.
3. Each row's generator inpaints ``eval.images_per_set`` test images of the retain and of the forget
   classes; FID, IS and the embedding cosine against the originals (research/unlearning/image_metrics.py),
   for each view of ``eval.masks``: center or outpaint (the whole image), center_box (the centre
   mask, output and original cropped to the hidden box).

Writes to DIR: config.json, results.json (per row and mask: mean and sd over seeds), results.md,
samples_MASK.png (whole-image views; columns: retain then forget test images; rows: original, masked input, each
method's output), tradeoff_MASK.png (forget against retain FID over the original's, per method over
its alphas; results.json / .md also read each method's forget FID off that curve at matched retain
FID), tsne.png (2-D embedding of the generated images, original vs ours) and rows/ (one record per
seed and row, with the settings it was made with: a changed setting is recomputed).
"""
from __future__ import annotations

import json
import os

import ml_collections
import numpy as np

from research.core import cli, experiment
from research.core import config as cfg
from research.core.records import image_grid, write_json_atomic, write_npz_atomic, write_png
from research.data import pipeline
from research.models import mae
from research.recipes.mae_train import fit_generator, generate, load_images
from research.unlearning import generative, image_metrics
from research.unlearning.generative_benchmark import (VIEWS, GenerativeUnlearning, evaluate_row, method_rows,
                                                      reference_features, row_signature, target_outputs)
from research.unlearning.generative_report import MATCHED_RETAIN, matched_forget_ratio, summarize, table_md
from research.unlearning.generative_report import tradeoff_plot, tsne_plot


def class_images(data: pipeline.ImageArrays, classes, limit: int = 0) -> np.ndarray:
    """uint8 images of ``classes``; with ``limit``, the first limit / len(classes) of each class."""
    if limit:
        per = max(limit // len(classes), 1)
        return np.concatenate([data.images[data.labels == c][:per] for c in classes])
    return data.images[np.isin(data.labels, classes)]


def trained_generator(exp: GenerativeUnlearning, train, test, mesh, workdir: str) -> mae.MaskedAutoencoder:
    """The generator of ``generator.workdir`` (or WORKDIR/generator), trained there when unfinished."""
    gen = exp.generator
    folder = gen.workdir or os.path.join(workdir, "generator")
    if gen.workdir:
        cfg.require_path(gen.workdir, "generator.workdir")
    model = mae.build(train.images.shape[1:], gen.model, gen.seed)
    # A finished run is only restored: the core loop resumes from its last checkpoint.
    return fit_generator(model, train, test, gen, mesh=mesh, workdir=folder, seed=gen.seed, flip=gen.data.flip,
                         rules=exp.mesh.logical).model


def proxy_images(exp: GenerativeUnlearning, shape) -> np.ndarray | None:
    """Training images of ``proxy.name`` at the generator's (H, W, C), or None without a proxy."""
    if not exp.proxy.name:
        return None
    images = load_images(exp.proxy_data())[0].images  # padded to the generator's data.pad_to
    if images.shape[1:] != tuple(shape):
        raise cfg.ConfigError(f"config key 'proxy.name' = {exp.proxy.name!r} has images of shape "
                              f"{images.shape[1:]}, the generator takes {tuple(shape)}; choose a data set like it")
    return images


def saved_row(record: str, signature: dict) -> tuple[dict, dict] | None:
    """(saved record, figures) of a finished row whose signature matches, else None."""
    if not os.path.exists(record + ".json"):
        return None
    with open(record + ".json") as f:
        saved = json.load(f)
    if saved.get("signature") != signature:
        print(f"{os.path.basename(record)}: settings changed since it was saved; recomputing", flush=True)
        return None
    with np.load(record + ".npz") as npz:
        return saved, dict(npz)


def sample_png(path: str, sets, shown: dict, kind: str, grid, mask_config) -> None:
    """Columns: 4 retain then 4 forget test images; rows: original, masked input, then each row's
    output (in the order of ``shown``)."""
    originals = np.concatenate([sets["retain"][:4], sets["forget"][:4]]).astype(np.float32) / 255.0
    patch = originals.shape[1] // grid[0]
    hidden = np.asarray(mae.pixel_mask(mae.fixed_mask(kind, len(originals), grid, mask_config), patch,
                                       originals.shape[1:]))
    rows = [originals, mae.masked_view(originals, hidden)]
    rows += [np.concatenate([row[f"images/{kind}/retain"], row[f"images/{kind}/forget"]]) for row in shown.values()]
    write_png(path, image_grid(np.concatenate(rows), columns=len(originals)))


def main(config: ml_collections.ConfigDict, workdir: str) -> dict:
    exp = cfg.build(GenerativeUnlearning, config)
    train, test = load_images(exp.generator.data)
    exp.check_classes(train.num_classes)
    proxy = proxy_images(exp, train.images.shape[1:])
    mesh = experiment.start(config, workdir, subdirs=("rows",))
    generator = trained_generator(exp, train, test, mesh, workdir)
    mask_config = exp.generator.masks
    extractor = image_metrics.FeatureExtractor(exp.eval.image_size, exp.eval.weights)

    sets = {"retain": class_images(test, exp.retain_classes, exp.eval.images_per_set),
            "forget": class_images(test, exp.forget_classes, exp.eval.images_per_set)}
    originals = reference_features(sets, extractor, exp, generator.grid, generator.patch_size, mask_config)
    retain_train = class_images(train, exp.retain_classes)
    forget_train = class_images(train, exp.forget_classes)

    rows, shown = {}, {}
    for name, unlearn_config, retain_source in method_rows(exp):
        per_seed, seconds = [], []
        signature = row_signature(exp, unlearn_config, retain_source)
        for seed in exp.seeds:
            record = os.path.join(workdir, "rows", f"seed{seed}_" + "".join(c if c.isalnum() else "_" for c in name))
            reused = saved_row(record, signature)
            if reused:
                saved, figures = reused
            else:
                model, took = generator, 0.0
                if retain_source == "target":
                    def outputs(data, kind, method=unlearn_config.method, seed=seed):
                        return target_outputs(generator, data, kind, mask_config, method, unlearn_config.noise, seed)
                else:
                    if unlearn_config is not None:
                        retain = proxy if retain_source == "proxy" else retain_train
                        result = generative.unlearn(generator, retain, forget_train, unlearn_config, mask_config,
                                                    seed=seed, progress=exp.progress, desc=name)
                        model, took = result.model, result.seconds

                    def outputs(data, kind, model=model):
                        return generate(model, data, kind, mask_config)
                metrics, figures = evaluate_row(outputs, generator.grid, generator.patch_size, sets, originals,
                                                extractor, exp, mask_config)
                saved = {"metrics": metrics, "seconds": took, "signature": signature}
                if experiment.main_process():  # the figures first: the JSON marks the row finished
                    write_npz_atomic(record + ".npz", **figures)
                    write_json_atomic(record + ".json", saved)
            if seed == exp.seeds[0]:
                shown[name] = figures
            per_seed.append(saved["metrics"])
            seconds.append(saved["seconds"])
        rows[name] = {"method": unlearn_config.method if unlearn_config else "original",
                      "alpha": unlearn_config.alpha if unlearn_config and retain_source != "target" else None,
                      "retain": retain_source,
                      "metrics": summarize(per_seed), "seconds": float(np.mean(seconds)), "per_seed": per_seed}
        first = rows[name]["metrics"][exp.eval.masks[0]]
        print(f"{name}: retain FID {first['retain']['fid']['mean']:.2f}, forget FID {first['forget']['fid']['mean']:.2f}",
              flush=True)

    results = {"data": exp.generator.data.name, "seeds": list(exp.seeds), "masks": list(exp.eval.masks),
               "images_per_set": {k: len(v) for k, v in sets.items()}, "rows": rows,
               "devices": experiment.device_summary(mesh)}
    results["matched"] = {kind: {f"{at:g}": matched_forget_ratio(results, kind, at) for at in MATCHED_RETAIN}
                          for kind in exp.eval.masks}
    if experiment.main_process():
        experiment.write_results(workdir, results, table_md(results))
        for kind in exp.eval.masks:
            if not VIEWS[kind][1]:  # a boxed view shows the same outputs as its whole-image view
                sample_png(os.path.join(workdir, f"samples_{kind}.png"), sets, shown, kind, generator.grid,
                           mask_config)
            tradeoff_plot(os.path.join(workdir, f"tradeoff_{kind}.png"), results, kind)
        ours = [n for n in shown if n.startswith("ours (")]
        if exp.eval.tsne_points and ours:
            picked = {n: {s: shown[n][f"features/{s}"] for s in sets} for n in ("original", ours[len(ours) // 2])}
            tsne_plot(os.path.join(workdir, "tsne.png"), picked, exp.seeds[0])
    return results


if __name__ == "__main__":
    cli.run(main)
