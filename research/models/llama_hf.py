"""Llama weights from a Hugging Face checkpoint directory (config.json + safetensors).

``load_hf_llama(directory)`` reads ``config.json`` and ``model.safetensors`` or the shards named
by ``model.safetensors.index.json``, and returns ``(LlamaConfig, Llama)``. HF stores a linear
layer's weight as (out, in); our kernels are (in, out), stacked over layers, with the attention
heads split out of the flattened dim on the way in (``set_param``). The per-layer tensors
are read one name at a time, so peak host memory is about one copy of the model.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping

import numpy as np
from flax import nnx

from research.attention.rope import Llama3RopeScaling
from research.core.config import DamagedFileError
from research.core.params import set_param, zeros_module
from research.models.llama import Llama, LlamaConfig

# Our path inside a segment -> HF name inside model.layers.{i}, and whether to transpose.
LAYER_TENSORS = {
    ("attn_norm", "scale"): ("input_layernorm.weight", False),
    ("attn", "q", "kernel"): ("self_attn.q_proj.weight", True),
    ("attn", "k", "kernel"): ("self_attn.k_proj.weight", True),
    ("attn", "v", "kernel"): ("self_attn.v_proj.weight", True),
    ("attn", "o", "kernel"): ("self_attn.o_proj.weight", True),
    ("mlp_norm", "scale"): ("post_attention_layernorm.weight", False),
    ("mlp", "gate", "kernel"): ("mlp.gate_proj.weight", True),
    ("mlp", "up", "kernel"): ("mlp.up_proj.weight", True),
    ("mlp", "down", "kernel"): ("mlp.down_proj.weight", True),
}


def config_from_hf(hf: Mapping) -> LlamaConfig:
    """LlamaConfig from a parsed config.json (transformers 4 or 5 layout)."""
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError("attention_bias / mlp_bias are not supported by research.models.llama")
    rope = dict(hf.get("rope_parameters") or {})  # transformers 5
    legacy = hf.get("rope_scaling") or {}
    rope.update({k: v for k, v in legacy.items() if k not in rope})
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise ValueError(f"unsupported RoPE type {kind!r}; supported: default, llama3")
    scaling = None
    if kind == "llama3":
        scaling = Llama3RopeScaling(factor=rope["factor"], low_freq_factor=rope["low_freq_factor"],
                                    high_freq_factor=rope["high_freq_factor"],
                                    original_max_position=rope["original_max_position_embeddings"])
    heads = hf["num_attention_heads"]
    return LlamaConfig(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, mlp_dim=hf["intermediate_size"],
        rms_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=scaling,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def safetensors_reader(directory: str) -> Callable[[str], np.ndarray]:
    from safetensors import safe_open

    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
    else:
        single = os.path.join(directory, "model.safetensors")
        if not os.path.exists(single):
            raise FileNotFoundError(f"{directory} has neither model.safetensors nor model.safetensors.index.json")
        weight_map = None
    handles = {}

    def read(name: str) -> np.ndarray:
        file = weight_map.get(name) if weight_map is not None else "model.safetensors"
        if file is None:
            raise KeyError(f"tensor {name!r} is not in {index}")
        if file not in handles:
            try:
                handles[file] = safe_open(os.path.join(directory, file), framework="numpy")
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for a bad header
                raise DamagedFileError(f"{os.path.join(directory, file)} cannot be read ({str(e).splitlines()[0][:160]}); "
                                       "the file is damaged or truncated: download it again") from None
        if name not in handles[file].keys():
            raise KeyError(f"tensor {name!r} is not in {os.path.join(directory, file)}")
        try:  # bfloat16 tensors come back as ml_dtypes arrays; compute in float32.
            return np.asarray(handles[file].get_tensor(name), dtype=np.float32)
        except Exception as e:  # noqa: BLE001 - a truncated data section
            raise DamagedFileError(f"{os.path.join(directory, file)}: tensor {name!r} cannot be read "
                                   f"({str(e).splitlines()[0][:160]}); the file is damaged or truncated") from None

    return read


def fill_llama(model: Llama, read: Callable[[str], np.ndarray], *, layer_prefix: str = "model.layers.{}.",
               embed: str = "model.embed_tokens.weight", norm: str = "model.norm.weight",
               lm_head: str = "lm_head.weight", layer_tensors: Mapping = LAYER_TENSORS) -> Llama:
    """Copies every parameter of a single-segment (all-GQA) ``model`` from ``read(name)`` (HF layout)."""
    c = model.config
    if len(model.segments) != 1:
        raise ValueError("fill_llama expects an all-GQA model with one segment")
    state = nnx.state(model, nnx.Param)
    segment = state["segments"][0]
    for path, (name, transpose) in layer_tensors.items():
        per_layer = [read(layer_prefix.format(i) + name) for i in range(c.num_layers)]
        stacked = np.stack([w.T if transpose else w for w in per_layer])
        set_param(segment, path, stacked)
    set_param(state, ("embed", "embedding"), read(embed))
    set_param(state, ("norm", "scale"), read(norm))
    if not c.tie_embeddings:
        set_param(state, ("lm_head", "kernel"), read(lm_head).T)
    nnx.update(model, state)
    return model


def abstract_llama(config: LlamaConfig) -> Llama:
    """A Llama with zero-filled float32 parameters, built without running random initialisers."""
    return zeros_module(lambda: Llama(config, rngs=nnx.Rngs(0)))


def load_hf_llama(directory: str, **overrides) -> tuple[LlamaConfig, Llama]:
    """(config, model) from an HF Llama checkpoint directory; ``overrides`` replace config fields
    (e.g. ``dtype="bfloat16"``, ``attention_impl``)."""
    config_path = os.path.join(directory, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} does not exist: expected a Hugging Face checkpoint directory")
    with open(config_path) as f:
        config = config_from_hf(json.load(f))
    config = dataclasses.replace(config, **overrides)
    model = fill_llama(abstract_llama(config), safetensors_reader(directory))
    return config, model
