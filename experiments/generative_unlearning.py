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

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from research.core import cli, experiment
from research.core import config as cfg
from research.recipes.classify import ClassifierTrainConfig
from research.core.optim import OptimConfig
from research.core.records import image_grid, write_json_atomic, write_npz_atomic, write_png
from research.data import pipeline
from research.data.sections import GeneratorData
from research.models import mae
from research.models.mae import MAEConfig, MaskConfig
from research.recipes.mae_train import fit_generator, generate, load_images
from research.unlearning import generative, image_metrics
from research.unlearning.generative import GenerativeUnlearnConfig

METRICS = ("fid", "is", "cosine")
# eval.masks: the mask each view generates under, and whether it is scored on the hidden box alone.
# center_box crops output and original to the centre box, so the visible 75% of the image, which
# every row keeps, cannot dilute a change in what the generator fills in.
VIEWS = {"center": ("center", False), "outpaint": ("outpaint", False), "center_box": ("center", True)}
MATCHED_RETAIN = (1.05, 1.10)  # retain FID / original's at which the methods' forget FID is compared


def validate(config: ml_collections.ConfigDict) -> None:
    for cls, key in ((MAEConfig, "generator.model"), (MaskConfig, "generator.masks"), (OptimConfig, "generator.optim"),
                     (ClassifierTrainConfig, "generator.train"), (GenerativeUnlearnConfig, "unlearn"),
                     (GeneratorData, "generator.data")):
        cfg.build(cls, config, key)
    if config.proxy.name:
        proxy_data(config)
    if config.baselines:  # () = ours alone (an alpha sweep)
        cfg.check_names(config, "baselines", [m for m in generative.METHODS if m != "ours"])
    if config.target_rows:
        cfg.check_names(config, "target_rows", generative.TARGET_METHODS)
    cfg.check(config, "alphas", lambda v: all(a >= 0 for a in v), "a tuple of floats >= 0")
    cfg.check(config, "baseline_alphas", lambda v: all(a >= 0 for a in v), "a tuple of floats >= 0")
    cfg.check(config, "eval.masks", lambda v: len(v) > 0 and set(v) <= set(VIEWS),
              f"a non-empty tuple of {', '.join(VIEWS)}")
    cfg.check(config, "eval.images_per_set", lambda v: v >= 2, "an int >= 2")
    cfg.check(config, "forget_classes", lambda v: len(v) > 0 and not set(v) & set(config.retain_classes),
              "a non-empty tuple of classes disjoint from retain_classes")


def class_images(data: pipeline.ImageArrays, classes, limit: int = 0) -> np.ndarray:
    """uint8 images of ``classes``; with ``limit``, the first limit / len(classes) of each class."""
    if limit:
        per = max(limit // len(classes), 1)
        return np.concatenate([data.images[data.labels == c][:per] for c in classes])
    return data.images[np.isin(data.labels, classes)]


def trained_generator(config, train, test, mesh, workdir: str) -> mae.MaskedAutoencoder:
    """The generator of ``generator.workdir`` (or WORKDIR/generator), trained there when unfinished."""
    gen = config.generator
    folder = gen.workdir or os.path.join(workdir, "generator")
    if gen.workdir:
        cfg.require_path(gen.workdir, "generator.workdir")
    model = mae.build(train.images.shape[1:], cfg.build(MAEConfig, config, "generator.model"), gen.seed)
    # A finished run is only restored: the core loop resumes from its last checkpoint.
    return fit_generator(model, train, test, gen, mesh=mesh, workdir=folder, seed=gen.seed, flip=gen.data.flip,
                         rules=experiment.mesh_config(config).logical).model


def proxy_data(config) -> GeneratorData:
    """The generator's data section with ``proxy.name`` as the data set: all of its training images."""
    section = dict(config.generator.data.to_dict(), name=config.proxy.name, train_limit=0, test_limit=1)
    return cfg.build(GeneratorData, {"proxy": section}, "proxy")


def proxy_images(config, shape) -> np.ndarray | None:
    """Training images of ``proxy.name`` at the generator's (H, W, C), or None without a proxy."""
    if not config.proxy.name:
        return None
    images = load_images(proxy_data(config))[0].images  # padded to the generator's data.pad_to
    if images.shape[1:] != tuple(shape):
        raise cfg.ConfigError(f"config key 'proxy.name' = {config.proxy.name!r} has images of shape "
                              f"{images.shape[1:]}, the generator takes {tuple(shape)}; choose a data set like it")
    return images


def method_rows(config) -> list[tuple[str, GenerativeUnlearnConfig | None, str]]:
    """(row name, unlearning config or None for the original, retain source: classes | proxy, or
    target for a ``target_rows`` row: no training, each image's output as if that method's forget
    target were reached exactly, generative.reached_target)."""
    base = cfg.build(GenerativeUnlearnConfig, config, "unlearn")
    rows = [("original", None, "classes")]
    rows += [(f"ours (alpha {a:g})", dataclasses.replace(base, method="ours", alpha=a), "classes") for a in config.alphas]
    if config.proxy.name:
        rows.append((f"ours, proxy retain {config.proxy.name} (alpha {config.proxy.alpha:g})",
                     dataclasses.replace(base, method="ours", alpha=config.proxy.alpha), "proxy"))
    for name in config.baselines:
        if config.baseline_alphas:
            rows += [(f"{name} (alpha {a:g})", dataclasses.replace(base, method=name, alpha=a), "classes")
                     for a in config.baseline_alphas]
        else:
            rows.append((name, dataclasses.replace(base, method=name), "classes"))
    rows += [(f"forget target reached: {m}", dataclasses.replace(base, method=m), "target")
             for m in config.target_rows]
    return rows


def row_signature(config, unlearn_config: GenerativeUnlearnConfig | None, retain_source: str) -> dict:
    """Everything that shapes one (seed, row) record besides the seed: the generator, the row's
    unlearning config and retain set, the classes and the evaluation. A saved row is reused only
    when its signature equals this one, so a changed setting is recomputed, never read stale."""
    generator = config.generator.to_dict()
    generator["train"] = {k: v for k, v in generator["train"].items() if k not in ("progress", "log_every")}
    signature = {"generator": generator, "forget_classes": config.forget_classes,
                 "retain_classes": config.retain_classes, "eval": config.eval.to_dict(),
                 "unlearn": dataclasses.asdict(unlearn_config) if unlearn_config else None,
                 "retain": retain_source, "proxy": config.proxy.name if retain_source == "proxy" else None}
    return json.loads(json.dumps(signature))  # tuples as lists, as they read back from the record


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


def view_crop(kind: str, grid, patch_size: int, mask_config) -> tuple[slice, slice]:
    """The pixels a view scores: the centre box for center_box, the whole image otherwise."""
    mask_kind, boxed = VIEWS[kind]
    if not boxed:
        return slice(None), slice(None)
    return mae.hidden_box(mae.fixed_mask(mask_kind, 1, grid, mask_config)[0], grid, patch_size)


def reference_features(sets, extractor, config, grid, patch_size, mask_config) -> dict:
    """{view: {set: (features, logits)}} of the real test images, cropped as each view scores them."""
    out = {}
    for kind in config.eval.masks:
        crop = view_crop(kind, grid, patch_size, mask_config)
        out[kind] = {name: extractor.features_and_logits(data[(slice(None), *crop)].astype(np.float32) / 255.0)
                     for name, data in sets.items()}
    return out


def target_outputs(generator, images: np.ndarray, kind: str, mask_config, method: str, noise: str, seed: int,
                   batch_size: int = 250) -> np.ndarray:
    """generative.reached_target over uint8 ``images`` under the fixed ``kind`` mask, float32 (N, H, W, C),
    in unpadded batches (zero padding would shift the noise's batch mean and std)."""
    out = []
    for i, start in enumerate(range(0, len(images), batch_size)):
        chunk = jnp.asarray(images[start:start + batch_size], jnp.float32) / 255.0
        mask = mae.fixed_mask(kind, len(chunk), generator.grid, mask_config)
        key = jax.random.fold_in(jax.random.PRNGKey(seed), i)
        out.append(np.asarray(generative.reached_target(generator, chunk, mask, key, method, noise)))
    return np.concatenate(out)


def evaluate_row(outputs, grid, patch_size, sets, originals, extractor, config, mask_config) -> tuple[dict, dict]:
    """{view: {set: {fid, is, cosine}}} and what the figures show of this row: {"images/MASK/SET":
    the first 4 outputs of each whole-image view, "features/SET": the features of the first
    ``eval.tsne_points`` outputs under the first view}. ``outputs(images, mask_kind)``: the row's
    generated images."""
    metrics, shown, made = {}, {}, {}
    for kind in config.eval.masks:
        mask_kind, boxed = VIEWS[kind]
        crop = view_crop(kind, grid, patch_size, mask_config)
        metrics[kind] = {}
        for name, data in sets.items():
            if (mask_kind, name) not in made:  # center and center_box share one generation
                made[mask_kind, name] = outputs(data, mask_kind)
            out = made[mask_kind, name]
            feats = extractor.features_and_logits(out[(slice(None), *crop)])
            metrics[kind][name] = image_metrics.quality(feats, originals[kind][name])
            if not boxed:
                shown[f"images/{kind}/{name}"] = out[:4]
            if kind == config.eval.masks[0]:
                shown[f"features/{name}"] = feats[0][:config.eval.tsne_points]
    return metrics, shown


def summarize(per_seed: list[dict]) -> dict:
    """{mask: {set: {metric: {"mean", "sd"}}}} over the seeds' metric dicts."""
    first = per_seed[0]
    return {kind: {name: {m: {"mean": float(np.mean([s[kind][name][m] for s in per_seed])),
                              "sd": float(np.std([s[kind][name][m] for s in per_seed]))} for m in METRICS}
                   for name in first[kind]} for kind in first}


def table_md(results: dict) -> str:
    lines = []
    for kind in results["masks"]:
        lines += [f"### {kind} mask", "",
                  "| method | retain FID | retain IS | retain cos | forget FID | forget IS | forget cos | forget FID / original | retain FID / original | seconds |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        orig = results["rows"]["original"]["metrics"][kind]
        for name, row in results["rows"].items():
            m = row["metrics"][kind]
            cell = lambda s, k: f"{m[s][k]['mean']:.2f} ± {m[s][k]['sd']:.2f}" if k == "fid" else \
                f"{m[s][k]['mean']:.3f} ± {m[s][k]['sd']:.3f}"
            ratio = lambda s: m[s]["fid"]["mean"] / max(orig[s]["fid"]["mean"], 1e-12)
            lines.append(f"| {name} | {cell('retain', 'fid')} | {cell('retain', 'is')} | {cell('retain', 'cosine')} | "
                         f"{cell('forget', 'fid')} | {cell('forget', 'is')} | {cell('forget', 'cosine')} | "
                         f"{ratio('forget'):.2f} | {ratio('retain'):.2f} | {row['seconds']:.0f} |")
        lines.append("")
        matched = results["matched"][kind]
        lines += ["forget FID / original's, read at the alpha where retain FID / original's is "
                  + " and ".join(f"{at:g}" for at in MATCHED_RETAIN) + " (seeds that reach it):", "",
                  "| method | " + " | ".join(f"at retain {at:g}" for at in MATCHED_RETAIN) + " |",
                  "|---|" + "---|" * len(MATCHED_RETAIN)]
        for label in matched[f"{MATCHED_RETAIN[0]:g}"]:
            cells = [matched[f"{at:g}"][label] for at in MATCHED_RETAIN]
            lines.append(f"| {label} | " + " | ".join(
                f"{c['mean']:.2f} ± {c['sd']:.2f} ({c['seeds']})" if c["seeds"] else "not reached" for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def fid_ratios(results: dict, kind: str) -> dict[str, dict[str, np.ndarray]]:
    """{row: {"retain", "forget": FID / the original's FID, per seed}} under mask ``kind``."""
    orig = results["rows"]["original"]["per_seed"]
    return {name: {s: np.array([seed[kind][s]["fid"] / max(o[kind][s]["fid"], 1e-12)
                                for seed, o in zip(row["per_seed"], orig, strict=True)]) for s in ("retain", "forget")}
            for name, row in results["rows"].items() if name != "original"}


def families(results: dict) -> dict[str, list[str]]:
    """{method (", proxy retain" for the proxy rows): its row names in order of alpha}, the original and
    the target rows aside."""
    out: dict[str, list[str]] = {}
    for name, row in results["rows"].items():
        if name != "original" and row["retain"] != "target":
            out.setdefault(row["method"] + (", proxy retain" if row["retain"] == "proxy" else ""), []).append(name)
    return {k: sorted(v, key=lambda n: results["rows"][n]["alpha"]) for k, v in out.items()}


def matched_forget_ratio(results: dict, kind: str, at: float) -> dict[str, dict[str, float]]:
    """Each method's forget FID / original's at the alpha where its retain FID / original's is ``at``:
    per seed, the piecewise-linear curve through the method's alphas (ordered by retain ratio) read
    at ``at``; mean and sd over the seeds that reach it (no extrapolation; if none does, None). The
    methods are then compared at one cost to the retain set, not at one alpha, whose meaning differs
    between objectives."""
    ratios = fid_ratios(results, kind)
    out = {}
    for label, names in families(results).items():
        per_seed = []
        for seed in range(len(ratios[names[0]]["retain"])):
            x = np.array([ratios[n]["retain"][seed] for n in names])
            y = np.array([ratios[n]["forget"][seed] for n in names])
            order = np.argsort(x)
            if x[order[0]] <= at <= x[order[-1]]:
                per_seed.append(float(np.interp(at, x[order], y[order])))
        out[label] = {"mean": float(np.mean(per_seed)) if per_seed else None,
                      "sd": float(np.std(per_seed)) if per_seed else None, "seeds": len(per_seed)}
    return out


def tradeoff_plot(path: str, results: dict, kind: str) -> None:
    """Forget FID against retain FID, both over the original's (mean and sd over seeds): one curve per
    method over its alphas, and the target region (forget >= 2x, retain within 10%) shaded."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = fid_ratios(results, kind)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label, names in families(results).items():
        x = [ratios[n]["retain"].mean() for n in names]
        y = [ratios[n]["forget"].mean() for n in names]
        ax.errorbar(x, y, xerr=[ratios[n]["retain"].std() for n in names],
                    yerr=[ratios[n]["forget"].std() for n in names], marker="o", ms=4, capsize=2, label=label)
        for n, xi, yi in zip(names, x, y):
            ax.annotate(f"{results['rows'][n]['alpha']:g}", (xi, yi), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
    ax.fill_between([min(ax.get_xlim()[0], 1.0), 1.1], 2.0, max(ax.get_ylim()[1], 2.1), color="tab:green",
                    alpha=0.12, label="target")
    for at in MATCHED_RETAIN:  # where results.md compares the methods
        ax.axvline(at, color="grey", linestyle=":", linewidth=0.8)
    ax.set(xlabel="retain FID / original's (lower is better)", ylabel="forget FID / original's (higher is better)",
           title=f"{results['data']}, {kind} mask: the trade-off of each method over alpha")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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


def tsne_plot(path: str, features: dict[str, dict[str, np.ndarray]], seed: int) -> None:
    """2-D t-SNE of the generated images' features, one colour per (row, set)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    labels, chunks = [], []
    for row, sets in features.items():
        for name, f in sets.items():
            chunks.append(f)
            labels += [f"{row}: {name}"] * len(f)
    stacked = np.concatenate(chunks)
    xy = TSNE(2, perplexity=min(30, len(stacked) - 1), random_state=seed, init="pca").fit_transform(stacked)
    labels = np.asarray(labels)
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for name in dict.fromkeys(labels):
        sel = labels == name
        ax.scatter(xy[sel, 0], xy[sel, 1], s=8, alpha=0.6, label=name)
    ax.set(title="t-SNE of EfficientNet-Lite0 features of generated images", xticks=[], yticks=[])
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(config: ml_collections.ConfigDict, workdir: str) -> dict:
    validate(config)
    train, test = load_images(cfg.build(GeneratorData, config, "generator.data"))
    classes = sorted((*config.forget_classes, *config.retain_classes))
    if classes[0] < 0 or classes[-1] >= train.num_classes:
        raise cfg.ConfigError(f"config keys 'forget_classes' / 'retain_classes': classes must lie in "
                              f"0..{train.num_classes - 1} for {config.generator.data.name}")
    proxy = proxy_images(config, train.images.shape[1:])
    mesh = experiment.start(config, workdir, subdirs=("rows",))
    generator = trained_generator(config, train, test, mesh, workdir)
    mask_config = cfg.build(MaskConfig, config, "generator.masks")
    extractor = image_metrics.FeatureExtractor(config.eval.image_size, config.eval.weights)

    sets = {"retain": class_images(test, config.retain_classes, config.eval.images_per_set),
            "forget": class_images(test, config.forget_classes, config.eval.images_per_set)}
    originals = reference_features(sets, extractor, config, generator.grid, generator.patch_size, mask_config)
    retain_train = class_images(train, config.retain_classes)
    forget_train = class_images(train, config.forget_classes)

    rows, shown = {}, {}
    for name, unlearn_config, retain_source in method_rows(config):
        per_seed, seconds = [], []
        signature = row_signature(config, unlearn_config, retain_source)
        for seed in config.seeds:
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
                                                    seed=seed, progress=config.progress, desc=name)
                        model, took = result.model, result.seconds

                    def outputs(data, kind, model=model):
                        return generate(model, data, kind, mask_config)
                metrics, figures = evaluate_row(outputs, generator.grid, generator.patch_size, sets, originals,
                                                extractor, config, mask_config)
                saved = {"metrics": metrics, "seconds": took, "signature": signature}
                if experiment.main_process():  # the figures first: the JSON marks the row finished
                    write_npz_atomic(record + ".npz", **figures)
                    write_json_atomic(record + ".json", saved)
            if seed == config.seeds[0]:
                shown[name] = figures
            per_seed.append(saved["metrics"])
            seconds.append(saved["seconds"])
        rows[name] = {"method": unlearn_config.method if unlearn_config else "original",
                      "alpha": unlearn_config.alpha if unlearn_config and retain_source != "target" else None,
                      "retain": retain_source,
                      "metrics": summarize(per_seed), "seconds": float(np.mean(seconds)), "per_seed": per_seed}
        first = rows[name]["metrics"][config.eval.masks[0]]
        print(f"{name}: retain FID {first['retain']['fid']['mean']:.2f}, forget FID {first['forget']['fid']['mean']:.2f}",
              flush=True)

    results = {"data": config.generator.data.name, "seeds": list(config.seeds), "masks": list(config.eval.masks),
               "images_per_set": {k: len(v) for k, v in sets.items()}, "rows": rows,
               "devices": experiment.device_summary(mesh)}
    results["matched"] = {kind: {f"{at:g}": matched_forget_ratio(results, kind, at) for at in MATCHED_RETAIN}
                          for kind in config.eval.masks}
    if experiment.main_process():
        experiment.write_results(workdir, results, table_md(results))
        for kind in config.eval.masks:
            if not VIEWS[kind][1]:  # a boxed view shows the same outputs as its whole-image view
                sample_png(os.path.join(workdir, f"samples_{kind}.png"), sets, shown, kind, generator.grid,
                           mask_config)
            tradeoff_plot(os.path.join(workdir, f"tradeoff_{kind}.png"), results, kind)
        ours = [n for n in shown if n.startswith("ours (")]
        if config.eval.tsne_points and ours:
            picked = {n: {s: shown[n][f"features/{s}"] for s in sets} for n in ("original", ours[len(ours) // 2])}
            tsne_plot(os.path.join(workdir, "tsne.png"), picked, config.seeds[0])
    return results


if __name__ == "__main__":
    cli.run(main)
