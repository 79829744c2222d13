"""A converted Llama on disk: its LlamaConfig as JSON plus its parameters as an orbax checkpoint.

    save_converted(directory, config, model)       # directory/llama_config.json + directory/params/
    config, model = load_converted(directory)      # no GGUF / safetensors / torch needed

Loading a converted model takes about a second, against the seconds of dequantising a GGUF. The
directory is written under a temporary name and renamed when complete, so an interrupted save
leaves no half-written model behind. Before restoring, every stored array's shape is compared with
the model the JSON config describes; a difference fails naming the array and both shapes. A model
converted before the attention kernels kept their head axis stores them flattened, (L, D, H*Dh);
those are restored in that shape and split into heads.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import orbax.checkpoint as ocp
from flax import nnx

from research.attention.rope import Llama3RopeScaling
from research.core.checkpoint import array_shapes
from research.core.params import flat_heads_shape, path_str
from research.core.records import temp_dir_beside
from research.models.llama import Llama, LlamaConfig

CONFIG_FILE = "llama_config.json"
PARAMS_DIR = "params"


def config_to_json(config: LlamaConfig) -> dict:
    return dataclasses.asdict(config)  # rope_scaling becomes a nested dict (or None)


def config_from_json(data: dict, path: str = CONFIG_FILE) -> LlamaConfig:
    known = {f.name for f in dataclasses.fields(LlamaConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown LlamaConfig field(s) {', '.join(unknown)}")
    data = dict(data)
    if data.get("rope_scaling") is not None:
        data["rope_scaling"] = Llama3RopeScaling(**data["rope_scaling"])
    return LlamaConfig(**data)


def _checkarray_shapes(found: dict, wanted: dict, found_where: str, wanted_where: str) -> None:
    missing, extra = sorted(set(wanted) - set(found)), sorted(set(found) - set(wanted))
    if missing or extra:
        raise ValueError(f"{found_where} has different arrays than {wanted_where}: missing {missing[:3]}, "
                         f"unexpected {extra[:3]}")
    for name, shape in wanted.items():
        if found[name] != shape:
            raise ValueError(f"{found_where}: array '{name}' has shape {found[name]}, {wanted_where} expects {shape}")


def _abstract(config: LlamaConfig):
    """(graphdef, abstract Param state) of Llama(config), without allocating parameters."""
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))), nnx.Param)
    return graphdef, params


def save_converted(directory: str, config: LlamaConfig, model: Llama, *, force: bool = False) -> str:
    """Writes ``config`` and ``model``'s parameters to ``directory`` atomically; returns its absolute path.

    Fails if the model's parameter shapes do not match ``config``, or if ``directory`` exists and
    not ``force``.
    """
    directory = os.path.abspath(directory)
    if os.path.exists(directory) and not force:
        raise FileExistsError(f"{directory} exists; pass force=True (--force) to overwrite it")
    params = nnx.state(model, nnx.Param).to_pure_dict()
    _checkarray_shapes(array_shapes(params), array_shapes(_abstract(config)[1].to_pure_dict()), "the model", "the config")
    tmp = temp_dir_beside(directory)
    try:
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(config_to_json(config), f, indent=2)
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(os.path.join(tmp, PARAMS_DIR), params)
        checkpointer.wait_until_finished()
        if os.path.exists(directory):  # force: move the old one aside only once the new one is complete
            old = tmp + ".old"
            os.rename(directory, old)
            os.rename(tmp, directory)
            shutil.rmtree(old)
        else:
            os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_converted(directory: str, **overrides) -> tuple[LlamaConfig, Llama]:
    """(config, model) from a directory written by ``save_converted``; ``overrides`` replace config
    fields that do not change shapes (``dtype``, ``attention_impl``)."""
    directory = os.path.abspath(directory)
    config_path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} does not exist: expected a directory written by save_converted "
                                f"(python -m tools.convert_llama)")
    with open(config_path) as f:
        config = dataclasses.replace(config_from_json(json.load(f), config_path), **overrides)
    params_path = os.path.join(directory, PARAMS_DIR)
    if not os.path.isdir(params_path):
        raise FileNotFoundError(f"{params_path} does not exist: the parameters of {directory} are missing")
    checkpointer = ocp.StandardCheckpointer()
    graphdef, abstract = _abstract(config)
    target = abstract.to_pure_dict()
    found = array_shapes(checkpointer.metadata(params_path).item_metadata.tree)
    flat = _flat_head_shapes(abstract)
    wanted = array_shapes(target)
    legacy = {name for name, shape in found.items() if name in wanted and shape != wanted[name] and shape == flat.get(name)}
    _checkarray_shapes({**found, **{name: wanted[name] for name in legacy}}, wanted, params_path,
                       f"the config in {config_path}")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree_util.tree_map_with_path(lambda p, x: jax.ShapeDtypeStruct(
        found[path_str(p)] if path_str(p) in legacy else x.shape, x.dtype, sharding=device), target)
    restored = checkpointer.restore(params_path, target)
    abstract.replace_by_pure_dict(jax.tree_util.tree_map_with_path(
        lambda p, x: x.reshape(wanted[path_str(p)]) if path_str(p) in legacy else x, restored))
    return config, nnx.merge(graphdef, abstract)


def _flat_head_shapes(abstract: nnx.State) -> dict[str, tuple[int, ...]]:
    """{"path/to/array": its flattened-heads shape} for the head-shaped kernels of a Param state."""
    leaves = jax.tree_util.tree_flatten_with_path(abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    shapes = {path_str(p): flat_heads_shape(v.get_metadata().get("out_sharding"), v.get_value().shape)
              for p, v in leaves}
    return {name: shape for name, shape in shapes.items() if shape is not None}
