"""Unlearning for an image-to-image generator as a benchmark: its settings, one typed schema, its rows
and how a row is scored.

``GenerativeUnlearning`` is what ``configs/generative_unlearning.py`` makes and
``experiments/generative_unlearning.py`` builds once. Rows: the original generator, ours at each of
``alphas``, ours with a proxy retain set (``proxy``), each baseline (at each of ``baseline_alphas``),
and each of ``target_rows`` (no training: the original's outputs with that method's forget target
reached exactly, `generative.reached_target`, the ceiling of its forget term). Each row's generator
inpaints ``eval.images_per_set`` test images of the retain and of the forget classes, scored by FID,
IS and the embedding cosine against the originals for each view of ``eval.masks``: center or outpaint
(the whole image), center_box (the centre mask, output and original cropped to the hidden box).
"""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np

from research.core import config as config_lib
from research.core.config import ConfigError
from research.core.mesh import MeshConfig
from research.data import sources
from research.models import mae
from research.recipes.mae_train import GeneratorData, GeneratorStage
from research.unlearning import generative, image_metrics
from research.unlearning.generative import GenerativeUnlearnConfig

# eval.masks: the mask each view generates under, and whether it is scored on the hidden box alone.
# center_box crops output and original to the centre box, so the visible 75% of the image, which
# every row keeps, cannot dilute a change in what the generator fills in.
VIEWS = {"center": ("center", False), "outpaint": ("outpaint", False), "center_box": ("center", True)}
BASELINES = tuple(m for m in generative.METHODS if m != "ours")


@dataclasses.dataclass(frozen=True)
class ProxyRetain:
    """``name``: a data set whose training images stand in for D_r ("" = no such row), with ours at
    ``alpha``."""
    name: str = "mnist"
    alpha: float = 0.2

    def __post_init__(self):
        config_lib.check_fields(self)
        config_lib.require(self, "name", not self.name or self.name in sources.IMAGE_DATASETS,
                           f"'' or one of: {', '.join(sources.IMAGE_DATASETS)}")


@dataclasses.dataclass(frozen=True)
class GenerativeEval:
    """``images_per_set`` test images of the retain and of the forget classes; a block of metrics per
    view of ``masks``; EfficientNet-Lite0 at ``image_size`` px for FID / IS / cosine (``weights`` "" =
    the installed ImageNet package, or a converted folder); ``tsne_points`` per set and row in the 2-D
    embedding plot (0 = no plot)."""
    images_per_set: int = 500
    masks: tuple[str, ...] = ("center",)
    image_size: int = 64
    weights: str = ""
    tsne_points: int = 200

    def __post_init__(self):
        config_lib.check_fields(self)
        config_lib.require(self, "masks", len(self.masks) > 0 and set(self.masks) <= set(VIEWS),
                           f"a non-empty tuple of {', '.join(VIEWS)}")
        config_lib.require(self, "images_per_set", self.images_per_set >= 2, "an int >= 2")


@dataclasses.dataclass(frozen=True)
class GenerativeUnlearning:
    """The whole benchmark: a generator (``generator``, trained once and shared), then per seed of
    ``seeds`` every row unlearning ``forget_classes`` while keeping ``retain_classes``."""
    seeds: tuple[int, ...] = (0,)
    forget_classes: tuple[int, ...] = (0, 1, 2, 3, 4)
    retain_classes: tuple[int, ...] = (5, 6, 7, 8, 9)
    alphas: tuple[float, ...] = (0.05, 0.1, 0.2, 0.5, 1.0)   # ours: the forget term's weight
    baselines: tuple[str, ...] = ("max_loss", "noisy_label", "retain_label", "random_encoder")  # () = none
    target_rows: tuple[str, ...] = ("ours", "noisy_label")     # () = none
    baseline_alphas: tuple[float, ...] = ()  # each baseline also at these alphas: its own trade-off
    generator: GeneratorStage = GeneratorStage()
    unlearn: GenerativeUnlearnConfig = GenerativeUnlearnConfig()
    proxy: ProxyRetain = ProxyRetain()
    eval: GenerativeEval = GenerativeEval()
    progress: bool = True
    mesh: MeshConfig = MeshConfig()

    def __post_init__(self):
        config_lib.check_fields(self)
        if self.baselines:
            config_lib.require_names(self, "baselines", BASELINES)
        if self.target_rows:
            config_lib.require_names(self, "target_rows", generative.TARGET_METHODS)
        for field in ("alphas", "baseline_alphas"):
            config_lib.require(self, field, all(a >= 0 for a in getattr(self, field)), "a tuple of floats >= 0")
        config_lib.require(self, "forget_classes", len(self.forget_classes) > 0
                           and not set(self.forget_classes) & set(self.retain_classes),
                           "a non-empty tuple of classes disjoint from retain_classes")

    def check_classes(self, num_classes: int) -> None:
        """A `ConfigError` unless every forget and retain class is one of the data set's."""
        classes = sorted((*self.forget_classes, *self.retain_classes))
        if classes[0] < 0 or classes[-1] >= num_classes:
            raise ConfigError(f"config keys 'forget_classes' / 'retain_classes': classes must lie in "
                              f"0..{num_classes - 1} for {self.generator.data.name}")

    def proxy_data(self) -> GeneratorData:
        """The generator's data section with ``proxy.name`` as the data set: all of its training images."""
        return dataclasses.replace(self.generator.data, name=self.proxy.name, train_limit=0, test_limit=1)


def method_rows(exp: GenerativeUnlearning) -> list[tuple[str, GenerativeUnlearnConfig | None, str]]:
    """(row name, unlearning config or None for the original, retain source: classes | proxy, or
    target for a ``target_rows`` row: no training, each image's output as if that method's forget
    target were reached exactly, generative.reached_target)."""
    base = exp.unlearn
    rows = [("original", None, "classes")]
    rows += [(f"ours (alpha {a:g})", dataclasses.replace(base, method="ours", alpha=a), "classes") for a in exp.alphas]
    if exp.proxy.name:
        rows.append((f"ours, proxy retain {exp.proxy.name} (alpha {exp.proxy.alpha:g})",
                     dataclasses.replace(base, method="ours", alpha=exp.proxy.alpha), "proxy"))
    for name in exp.baselines:
        if exp.baseline_alphas:
            rows += [(f"{name} (alpha {a:g})", dataclasses.replace(base, method=name, alpha=a), "classes")
                     for a in exp.baseline_alphas]
        else:
            rows.append((name, dataclasses.replace(base, method=name), "classes"))
    rows += [(f"forget target reached: {m}", dataclasses.replace(base, method=m), "target")
             for m in exp.target_rows]
    return rows


def row_signature(exp: GenerativeUnlearning, unlearn_config: GenerativeUnlearnConfig | None, retain_source: str) -> dict:
    """Everything that shapes one (seed, row) record besides the seed: the generator, the row's
    unlearning config and retain set, the classes and the evaluation. A saved row is reused only
    when its signature equals this one, so a changed setting is recomputed, never read stale."""
    generator = dataclasses.asdict(exp.generator)
    generator["train"] = {k: v for k, v in generator["train"].items() if k not in ("progress", "log_every")}
    signature = {"generator": generator, "forget_classes": exp.forget_classes,
                 "retain_classes": exp.retain_classes, "eval": dataclasses.asdict(exp.eval),
                 "unlearn": dataclasses.asdict(unlearn_config) if unlearn_config else None,
                 "retain": retain_source, "proxy": exp.proxy.name if retain_source == "proxy" else None}
    return json.loads(json.dumps(signature))  # tuples as lists, as they read back from the record


def view_crop(kind: str, grid, patch_size: int, mask_config) -> tuple[slice, slice]:
    """The pixels a view scores: the centre box for center_box, the whole image otherwise."""
    mask_kind, boxed = VIEWS[kind]
    if not boxed:
        return slice(None), slice(None)
    return mae.hidden_box(mae.fixed_mask(mask_kind, 1, grid, mask_config)[0], grid, patch_size)


def reference_features(sets, extractor, exp: GenerativeUnlearning, grid, patch_size, mask_config) -> dict:
    """{view: {set: (features, logits)}} of the real test images, cropped as each view scores them."""
    out = {}
    for kind in exp.eval.masks:
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


def evaluate_row(outputs, grid, patch_size, sets, originals, extractor, exp: GenerativeUnlearning, mask_config) -> tuple[dict, dict]:
    """{view: {set: {fid, is, cosine}}} and what the figures show of this row: {"images/MASK/SET":
    the first 4 outputs of each whole-image view, "features/SET": the features of the first
    ``eval.tsne_points`` outputs under the first view}. ``outputs(images, mask_kind)``: the row's
    generated images."""
    metrics, shown, made = {}, {}, {}
    for kind in exp.eval.masks:
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
            if kind == exp.eval.masks[0]:
                shown[f"features/{name}"] = feats[0][:exp.eval.tsne_points]
    return metrics, shown
