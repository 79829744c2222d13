"""LoRA adapters of a Llama-family model in Hugging Face PEFT's format, both ways.

    save_peft_adapter(model, "adapter/")              # adapter_config.json + adapter_model.safetensors
    PeftModel.from_pretrained(hf_llama, "adapter/")    # then: the same logits as ``model``
    load_peft_adapter(model, "adapter/", rngs=...)     # a PEFT adapter onto research.models.llama

PEFT computes ``W x + (lora_alpha / r) B A x`` with ``lora_A.weight`` (r, in) and ``lora_B.weight``
(out, r): our ``a`` (in, r) and ``b`` (r, out) transposed, with the head axes of our attention
kernels flattened as Hugging Face stores them. ``use_rslora`` scales by lora_alpha / sqrt(r): it
loads as alpha' = lora_alpha sqrt(r). Layer i of our stacked ``segments/s`` is HF's
``model.layers.{offset_s + i}``; the module names are Llama's::

    attn/q, attn/k, attn/v, attn/o  ->  self_attn.{q,k,v,o}_proj
    mlp/gate, mlp/up, mlp/down      ->  mlp.{gate,up,down}_proj

Every layer of the model carries the adapter (PEFT's ``layers_to_transform`` is not supported),
with one rank, alpha and dropout (no ``rank_pattern``), on Llama (GQA) layers only (an upcycled
MLA layer has other tensors); a setting beyond that fails naming the field, a tensor of the file
that is not read fails naming it, and the shapes are checked before the model changes.
"""
from __future__ import annotations

import json
import math
import os
import re

import numpy as np
from flax import nnx

from research.adapters.lora import LoraLayer, LoraSpec, add_lora, lora_layers
from research.core.params import path_str
from research.core.records import folder_written_whole

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
HF_MODULES = {"attn/q": "self_attn.q_proj", "attn/k": "self_attn.k_proj", "attn/v": "self_attn.v_proj",
              "attn/o": "self_attn.o_proj", "mlp/gate": "mlp.gate_proj", "mlp/up": "mlp.up_proj",
              "mlp/down": "mlp.down_proj"}
OUR_MODULES = {hf.split(".")[-1]: ours for ours, hf in HF_MODULES.items()}   # q_proj -> attn/q
UNSUPPORTED_EXTRAS = ("lora_bias", "trainable_token_indices", "layer_replication", "target_parameters",
                      "alora_invocation_tokens", "exclude_modules", "megatron_config")  # refused when set
_LAYER_PATH = re.compile(r"^segments/(\d+)/(attn/[qkvo]|mlp/(?:gate|up|down))$")


def _segment_offsets(model) -> list[int]:
    sizes = model.segment_sizes()
    return [sum(sizes[:s]) for s in range(len(sizes))]


def _check_llama_layers(model, segments) -> None:
    """A ValueError unless every layer of ``segments`` is a Llama (GQA) layer: an MLA layer's q and
    o are laid out otherwise in a DeepSeek checkpoint (RoPE rows, scale), so PEFT's names mislead."""
    offsets, sizes = _segment_offsets(model), model.segment_sizes()
    for s in sorted(set(segments)):
        kinds = set(model.layer_kinds[offsets[s]:offsets[s] + sizes[s]])
        if kinds != {"gqa"}:
            raise ValueError(f"segments/{s} holds {sorted(kinds)} layers; the PEFT format here covers Llama (GQA) "
                             "layers only")


def _adapted_layers(model, name: str) -> list[tuple[int, str, LoraLayer]]:
    """(segment, module, layer) of every LoraLayer holding adapter ``name``; ValueError for a
    layer PEFT's Llama has no name for."""
    found = []
    for path, layer in lora_layers(model):
        if name not in layer.lora:
            continue
        match = _LAYER_PATH.match(path_str(path))
        if match is None:
            raise ValueError(f"LoRA layer '{path_str(path)}' has no PEFT name on a Llama; PEFT export covers "
                             f"{', '.join(HF_MODULES)} of research.models.llama")
        found.append((int(match.group(1)), match.group(2), layer))
    if not found:
        raise ValueError(f"no LoRA adapter named {name!r} in the model")
    _check_llama_layers(model, [segment for segment, _, _ in found])
    return found


def save_peft_adapter(model, directory: str, name: str = "default", *, base_model_name_or_path: str = "",
                      force: bool = False) -> str:
    """Writes adapter ``name`` of a research.models.llama model as a PEFT LoRA adapter (written to a
    temporary folder and renamed when complete). Returns the directory."""
    from safetensors.numpy import save_file

    layers = _adapted_layers(model, name)
    specs = {(a.rank, a.alpha, float(a.dropout.rate)) for _, _, layer in layers for a in [layer.lora[name]]}
    if len(specs) != 1:
        raise ValueError(f"adapter {name!r} has several (rank, alpha, dropout) settings {sorted(specs)}; PEFT export "
                         "writes one")
    if any(layer.lora[name].merged for _, _, layer in layers):
        raise ValueError(f"adapter {name!r} is merged into the weights; unmerge it before exporting")
    (rank, alpha, dropout), = specs
    offsets = _segment_offsets(model)
    tensors = {}
    for segment, module, layer in layers:
        adapter = layer.lora[name]
        a, b = np.asarray(adapter.a.get_value(), np.float32), np.asarray(adapter.b.get_value(), np.float32)
        for i in range(a.shape[0]):                      # the stacked-layer axis
            prefix = f"base_model.model.model.layers.{offsets[segment] + i}.{HF_MODULES[module]}"
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, rank).T)
            tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(rank, -1).T)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path or None,
        "r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "bias": "none", "fan_in_fan_out": False,
        "target_modules": sorted({HF_MODULES[module].split(".")[-1] for _, module, _ in layers}),
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
    }
    directory = os.path.abspath(directory)
    with folder_written_whole(directory, force=force) as tmp:
        save_file(tensors, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=2)
    return directory


def read_peft_config(directory: str) -> dict:
    """adapter_config.json of a PEFT LoRA adapter, checked for what ``load_peft_adapter`` supports."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: expected a PEFT adapter directory")
    with open(path) as f:
        config = json.load(f)
    unsupported = {"peft_type": config.get("peft_type") != "LORA", "use_dora": bool(config.get("use_dora")),
                   "bias": config.get("bias", "none") != "none", "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
                   "layers_to_transform": config.get("layers_to_transform") is not None,
                   "rank_pattern": bool(config.get("rank_pattern")), "alpha_pattern": bool(config.get("alpha_pattern")),
                   "modules_to_save": bool(config.get("modules_to_save")),
                   **{key: bool(config.get(key)) for key in UNSUPPORTED_EXTRAS}}
    bad = [key for key, is_bad in unsupported.items() if is_bad]
    if bad:
        raise ValueError(f"{path}: {bad[0]} = {config.get(bad[0])!r} is not supported (plain LoRA on every layer)")
    return config


def _target_modules(config: dict) -> list[str]:
    """Our module paths ("attn/q") named by PEFT's ``target_modules`` (a list of names or a regex)."""
    targets = config.get("target_modules")
    if isinstance(targets, str):    # a regex over the full module names
        names = [short for short, ours in OUR_MODULES.items()
                 if re.fullmatch(targets, f"model.layers.0.{HF_MODULES[ours]}")]
    else:
        names = [t.split(".")[-1] for t in targets or []]
    unknown = [n for n in names if n not in OUR_MODULES]
    if unknown or not names:
        raise ValueError(f"target_modules {targets!r}: PEFT import covers {', '.join(OUR_MODULES)}")
    return [OUR_MODULES[n] for n in names]


def _in_out(module: str, kernel_shape) -> tuple[int, int]:
    """Input and output widths of a stacked kernel: attention q/k/v (L, D, heads, Dh), o (L, heads,
    Dh, D), MLP (L, in, out)."""
    if module == "attn/o":
        return int(np.prod(kernel_shape[1:-1])), kernel_shape[-1]
    return kernel_shape[1], int(np.prod(kernel_shape[2:]))


def load_peft_adapter(model, directory: str, name: str = "default", *, rngs) -> list[str]:
    """Adds adapter ``name`` (``add_lora``) to the layers a PEFT LoRA adapter targets and fills it
    from ``adapter_model.safetensors`` (PEFT's default; a ``.bin`` adapter is not read). Returns
    the adapted paths. A tensor missing for any layer fails naming it, with the model unchanged."""
    from safetensors.numpy import load_file

    config = read_peft_config(directory)
    weights_path = os.path.join(directory, WEIGHTS_FILE)
    if not os.path.exists(weights_path):
        raise FileNotFoundError(f"{weights_path} does not exist (only safetensors adapters are read)")
    weights = {re.sub(r"\.default(\.weight)$", r"\1", k): v for k, v in load_file(weights_path).items()}
    rank = int(config["r"])
    alpha = float(config["lora_alpha"]) * (math.sqrt(rank) if config.get("use_rslora") else 1.0)
    modules = _target_modules(config)
    offsets, sizes = _segment_offsets(model), model.segment_sizes()
    _check_llama_layers(model, range(len(sizes)))
    kernels = {path_str(p[:-1]): node[...].shape for p, node in nnx.iter_graph(model)
               if isinstance(node, nnx.Param) and p[-1] == "kernel"}
    arrays, used = {}, set()
    for segment, (offset, size) in enumerate(zip(offsets, sizes)):
        for module in modules:
            d_in, d_out = _in_out(module, kernels[f"segments/{segment}/{module}"])
            pairs = []
            for i in range(offset, offset + size):
                prefix = f"base_model.model.model.layers.{i}.{HF_MODULES[module]}"
                names = (f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight")
                missing = [k for k in names if k not in weights]
                if missing:
                    raise KeyError(f"{weights_path} has no tensor {missing[0]!r} (every layer must carry the adapter)")
                a, b = (weights[k] for k in names)
                if a.shape != (rank, d_in) or b.shape != (d_out, rank):
                    raise ValueError(f"{weights_path}: {prefix} has lora_A {a.shape} and lora_B {b.shape}; this model "
                                     f"and r = {rank} need {(rank, d_in)} and {(d_out, rank)}")
                pairs.append((a, b))
                used.update(names)
            arrays[f"segments/{segment}/{module}"] = pairs
    unused = sorted(set(weights) - used)
    if unused:
        raise ValueError(f"{weights_path} holds tensors this LoRA reading does not use, e.g. {unused[0]!r} "
                         f"({len(unused)} in all): an adapter of another model or with parts not supported")
    pattern = r"^segments/\d+/(" + "|".join(re.escape(m) for m in modules) + r")$"
    paths = add_lora(model, LoraSpec(pattern, rank=rank, alpha=alpha, dropout=float(config.get("lora_dropout", 0.0))),
                     name=name, rngs=rngs)
    for path, layer in lora_layers(model):
        pairs = arrays.get(path_str(path))
        if pairs is None or name not in layer.lora:
            continue
        adapter = layer.lora[name]
        a_shape, b_shape = adapter.a[...].shape, adapter.b[...].shape
        adapter.a.set_value(np.stack([a.T for a, _ in pairs]).reshape(a_shape).astype(adapter.a[...].dtype))
        adapter.b.set_value(np.stack([b.T for _, b in pairs]).reshape(b_shape).astype(adapter.b[...].dtype))
    return paths
