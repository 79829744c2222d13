"""Model registry: ``build_model(name, num_classes=..., input_shape=(H, W, C), rngs=...)``.

Every model maps NHWC float images (N, H, W, C) to float32 logits (N, num_classes), keeps float32
parameters whatever the computation ``dtype``, switches train/eval with ``model.train()`` /
``model.eval()``, and names its classifier ``head``.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Literal

import jax.numpy as jnp
from flax import nnx

from research.core import config as config_lib
from research.models.efficientnet_lite import efficientnet_lite0
from research.models.mlp import mlp
from research.models.mobilenet_v2 import mobilenet_v2
from research.models.resnet import resnet18, resnet20
from research.models.vit import vit_small, vit_tiny

MODEL_NAMES = ("mlp", "resnet20", "resnet18", "mobilenet_v2", "vit_tiny", "vit_small",
               "efficientnet_lite0")
_BUILDERS = {
    "mlp": mlp,
    "resnet20": resnet20,
    "resnet18": resnet18,
    "mobilenet_v2": mobilenet_v2,
    "vit_tiny": vit_tiny,
    "vit_small": vit_small,
    "efficientnet_lite0": efficientnet_lite0,
}
_COMMON_ARGS = ("num_classes", "input_shape", "rngs", "dtype")


def model_options(name: str) -> tuple[str, ...]:
    """The model-specific keyword options of ``name`` (e.g. ``("width_multiplier", ...)``)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")
    params = inspect.signature(_BUILDERS[name]).parameters
    return tuple(p for p in params if p not in _COMMON_ARGS)


def build_model(name: str, *, num_classes: int, input_shape: tuple[int, int, int],
                rngs: nnx.Rngs, dtype=jnp.float32, **kwargs) -> nnx.Module:
    """Build model ``name`` for images of shape ``input_shape`` = (H, W, C).

    ``dtype`` is the computation dtype (parameters stay float32); ``kwargs`` are the
    model's own options (see ``model_options``). Raises ValueError on an unknown name or option.
    """
    allowed = model_options(name)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(map(repr, unknown))} for model {name!r}; "
                         f"allowed: {', '.join(allowed) or '(none)'}")
    return _BUILDERS[name](num_classes=num_classes, input_shape=tuple(input_shape), rngs=rngs, dtype=dtype, **kwargs)


COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The ``model`` section: which model and its options; each model takes only the options in
    its builder's signature (``model_options``), the others are ignored."""
    name: Literal[MODEL_NAMES] = "resnet20"
    dtype: Literal[tuple(COMPUTE_DTYPES)] = "float32"  # computation dtype; parameters stay float32
    width_multiplier: float = 1.0       # mobilenet_v2
    patch_size: int = 0                 # vit_*: 0 = automatic (4 for small images, else 16)
    depth: int = 0                      # vit_*: 0 = the model's default
    dropout: float = 0.0                # vit_*, mobilenet_v2, efficientnet_lite0
    hidden_sizes: tuple[int, ...] = (512, 256)  # mlp

    def __post_init__(self):
        config_lib.check_fields(self)
        config_lib.require(self, "patch_size", self.patch_size >= 0, "an int >= 0 (0 = automatic)")
        config_lib.require(self, "depth", self.depth >= 0, "an int >= 0 (0 = the default)")
        config_lib.require(self, "width_multiplier", self.width_multiplier > 0, "a positive float")


_AUTOMATIC_WHEN_ZERO = ("patch_size", "depth")


def build_from_config(model_config: ModelConfig | Mapping, *, num_classes: int, input_shape: tuple[int, int, int],
                      rngs: nnx.Rngs, **builder_kwargs) -> nnx.Module:
    """Build the model a ``model`` section names (a `ModelConfig` or a config section made from one);
    ``builder_kwargs`` are the builder's own arguments that no config holds (e.g. ``conv_init``)."""
    if not isinstance(model_config, ModelConfig):
        model_config = config_lib.build(ModelConfig, model_config)
    kwargs = {k: getattr(model_config, k) for k in model_options(model_config.name) if hasattr(model_config, k)}
    kwargs.update({k: None for k in _AUTOMATIC_WHEN_ZERO if kwargs.get(k) == 0})
    return build_model(model_config.name, num_classes=num_classes, input_shape=input_shape, rngs=rngs,
                       dtype=COMPUTE_DTYPES[model_config.dtype], **kwargs, **builder_kwargs)


__all__ = ["COMPUTE_DTYPES", "MODEL_NAMES", "ModelConfig", "build_from_config", "build_model", "model_options"]
