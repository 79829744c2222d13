"""Model registry: ``build_model(name, num_classes=..., input_shape=(H, W, C), rngs=...)``.

Every model maps NHWC float images (N, H, W, C) to float32 logits (N, num_classes), keeps float32
parameters whatever the computation ``dtype``, switches train/eval with ``model.train()`` /
``model.eval()``, and names its classifier ``head``.
"""

from __future__ import annotations

import inspect

import jax.numpy as jnp
from flax import nnx

# Kernels carry logical sharding names (``out_sharding`` metadata) that a separate module maps to
# mesh axes later; with eager sharding on, creating such a Variable outside a mesh fails.
# (Thread-local in flax 0.12.8: other threads should build models through ``build_model``.)
nnx.use_eager_sharding(False)

from research.models.efficientnet_lite import efficientnet_lite0  # noqa: E402
from research.models.mlp import mlp  # noqa: E402
from research.models.mobilenet_v2 import mobilenet_v2  # noqa: E402
from research.models.resnet import resnet18, resnet20  # noqa: E402
from research.models.vit import vit_small, vit_tiny  # noqa: E402

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
    # Again here: the setting above is thread-local, and a model may be built in another thread.
    with nnx.use_eager_sharding(False):
        return _BUILDERS[name](num_classes=num_classes, input_shape=tuple(input_shape), rngs=rngs,
                               dtype=dtype, **kwargs)


COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_AUTOMATIC_WHEN_ZERO = ("patch_size", "depth")


def build_from_config(model_config, *, num_classes: int, input_shape: tuple[int, int, int],
                      rngs: nnx.Rngs) -> nnx.Module:
    """Build the model a config's ``model`` section names (``name``, ``dtype`` and the options the
    model takes; other fields are ignored, and 0 means "automatic" for ``patch_size`` / ``depth``)."""
    kwargs = {k: model_config[k] for k in model_options(model_config.name) if k in model_config}
    kwargs.update({k: None for k in _AUTOMATIC_WHEN_ZERO if kwargs.get(k) == 0})
    return build_model(model_config.name, num_classes=num_classes, input_shape=input_shape, rngs=rngs,
                       dtype=COMPUTE_DTYPES[model_config.dtype], **kwargs)


__all__ = ["COMPUTE_DTYPES", "MODEL_NAMES", "build_from_config", "build_model", "model_options"]
