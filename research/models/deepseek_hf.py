"""An MLA Llama in DeepSeek-V3's Hugging Face format, both ways: a checkpoint stock transformers
loads (``AutoModelForCausalLM``, no ``trust_remote_code``) with the same logits, and such a
checkpoint loaded back into research.models.llama.

    save_deepseek_v3(student, "export/", tokenizer)      # config.json, safetensors, tokenizer, SERVING.md
    config, model = load_deepseek_v3("export/")          # any dense DeepSeek-V3-format checkpoint

What the format fixes (transformers' ``modeling_deepseek_v3``): every layer MLA at one
(r_kv, d_n, d_r, d_v, r_q), one shared RoPE key (``qk_rope_head_dim``), an RMSNorm on the latents
with eps 1e-6, no biases, softmax scale (d_n + d_r)^-1/2, and RoPE in interleaved pairs: HF's
row 2p and 2p + 1 of a RoPE block are our rows p and p + d_r / 2 (we rotate halves, as Llama
does). The frequencies must be a standard RoPE at one theta (optionally Llama-3-scaled): the
student's are matched against theta and theta^(d_r / d_h) of the teacher's (the upcycling RoPE
modes "uniform" / "split" and "high"); anything else fails naming the layer. The dense MLP is
written in every layer (``first_k_dense_replace`` = layers; the MoE fields are integer
placeholders no layer reads) and ``lm_head`` is always written, since vLLM never ties it.

Tensor names (HF (out, in) weights; ours are (in, out) with the heads split out):
``model.layers.{i}.self_attn.{q_proj | q_a_proj, q_a_layernorm, q_b_proj, kv_a_proj_with_mqa,
kv_a_layernorm, kv_b_proj, o_proj}``, the Llama names for norms and MLP, ``model.embed_tokens``,
``model.norm``, ``lm_head``.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator

import numpy as np
from flax import nnx

from research.attention.mla import LATENT_NORM_EPS, MLAConfig, MLAttention
from research.attention.rope import Llama3RopeScaling, inverse_frequencies
from research.core.params import set_param, zeros_module
from research.core.records import folder_written_whole, write_json_atomic
from research.models.llama import Llama, LlamaConfig
from research.models.llama_hf import safetensors_reader

SHARD_BYTES = 2 * 1024 ** 3
# (kv_lora_rank, qk_rope_head_dim) that vLLM's compressed MLA backends were written for (read from
# vLLM's sources; not run here).
VLLM_MLA_SIZES = ((512, 64), (256, 64))

# Our path inside a segment -> HF name inside model.layers.{i} for the tensors copied as they are
# (transposed when a kernel); the attention projections are handled in ``_attention_tensors``.
DENSE_TENSORS = {
    ("attn_norm", "scale"): "input_layernorm.weight",
    ("mlp_norm", "scale"): "post_attention_layernorm.weight",
    ("mlp", "gate", "kernel"): "mlp.gate_proj.weight",
    ("mlp", "up", "kernel"): "mlp.up_proj.weight",
    ("mlp", "down", "kernel"): "mlp.down_proj.weight",
}


def interleave_order(rope_dim: int) -> np.ndarray:
    """HF's interleaved RoPE row j holds our rotate-half row ``order[j]``: [0, n, 1, n + 1, ...]."""
    n = rope_dim // 2
    return np.stack([np.arange(n), np.arange(n) + n], axis=1).reshape(-1)


# ----------------------------------------------------------------------------- what can be exported
def _mla_layout(model: Llama) -> MLAConfig:
    """The one MLAConfig of every layer; ValueError naming what stock DeepSeek-V3 cannot run."""
    if set(model.layer_kinds) != {"mla"} or len(model.segments) != 1:
        raise ValueError("DeepSeek-V3 export needs every layer MLA at one rank (one segment); this model has layer "
                         f"kinds {sorted(set(model.layer_kinds))} in {len(model.segments)} segment(s): upcycle with "
                         "UpcycleConfig(target='deepseek_v3')")
    mla = model.segments[0].attn.mla
    if mla.rope_heads != 1:
        raise ValueError(f"DeepSeek-V3 has one shared RoPE key per token; this model has rope_heads={mla.rope_heads} "
                         "(upcycle with rope_key 'shared' or 'shared_fit')")
    if not mla.latent_norm:
        raise ValueError("DeepSeek-V3 always normalises the latent (kv_a_layernorm); this model has no latent norm: "
                         "upcycle with UpcycleConfig(target='deepseek_v3')")
    if mla.latent_norm_eps != LATENT_NORM_EPS:
        raise ValueError(f"the latent norm eps is {mla.latent_norm_eps}; transformers fixes it at {LATENT_NORM_EPS}")
    return mla


def rope_theta_of(model: Llama, mla: MLAConfig) -> float:
    """The theta of the standard d_r-dim RoPE (with the model's Llama-3 scaling, if any) that every
    layer's frequencies equal; ValueError naming the first layer that matches none."""
    c = model.config
    freqs = np.asarray(model.segments[0].attn.rope_inv_freq[...], np.float64)   # (L, R, d_r / 2)
    candidates = (c.rope_theta, c.rope_theta ** (mla.rope_dim / c.head_dim))  # uniform / split; high
    for theta in candidates:
        want = inverse_frequencies(mla.rope_dim, theta, c.rope_scaling)
        bad = [i for i, f in enumerate(freqs) if not np.allclose(f, want, rtol=1e-5, atol=0)]
        if not bad:
            return float(theta)
    raise ValueError(f"layer {bad[0]}'s RoPE frequencies are no standard RoPE at theta {candidates[0]:g} or "
                     f"{candidates[1]:g}: DeepSeek-V3 needs one theta for every layer "
                     "(rope_mode uniform, high or split)")


def deepseek_v3_config(model: Llama, *, max_position_embeddings: int = 8192, bos_id: int | None = None,
                       eos_id: int | None = None) -> dict:
    """The config.json of ``model`` as a dense DeepSeek-V3 (transformers 4.51+ and 5.x keys)."""
    c, mla = model.config, _mla_layout(model)
    theta = rope_theta_of(model, mla)
    if c.rope_scaling is None:
        rope = {"rope_type": "default", "rope_theta": theta}
        legacy_scaling = None
    else:
        s = c.rope_scaling
        legacy_scaling = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                          "high_freq_factor": s.high_freq_factor,
                          "original_max_position_embeddings": s.original_max_position}
        rope = {**legacy_scaling, "rope_theta": theta}
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": c.vocab_size, "hidden_size": c.dim, "intermediate_size": c.mlp_dim,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_heads,
        "kv_lora_rank": mla.kv_rank, "q_lora_rank": mla.q_rank or None, "qk_rope_head_dim": mla.rope_dim,
        "qk_nope_head_dim": mla.nope_dim, "v_head_dim": mla.v_dim,
        "hidden_act": "silu", "rms_norm_eps": c.rms_eps, "max_position_embeddings": max_position_embeddings,
        "rope_parameters": rope, "rope_theta": theta, "rope_scaling": legacy_scaling, "rope_interleave": True,
        "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": False,
        # Dense in every layer: the MoE fields are placeholders (integers, as engines expect) no layer reads.
        "first_k_dense_replace": c.num_layers, "moe_intermediate_size": c.mlp_dim, "n_routed_experts": 1,
        "n_shared_experts": 1, "num_experts_per_tok": 1, "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0,
        "norm_topk_prob": True, "num_nextn_predict_layers": 0,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "torch_dtype": "float32", "use_cache": True,
    }


# ----------------------------------------------------------------------------- our tensors -> HF
def _attention_tensors(attn: dict, mla: MLAConfig, heads: int, q_gain: float) -> dict[str, np.ndarray]:
    """One layer's attention in HF names and (out, in) layout, RoPE rows interleaved and the
    attention-scale ratio ``q_gain`` folded into the query."""
    dn, dr, r = mla.nope_dim, mla.rope_dim, mla.kv_rank
    qk_order = np.concatenate([np.arange(dn), dn + interleave_order(dr)])
    out = {}
    if mla.q_rank:
        out["q_a_proj.weight"] = attn["q_a"]["kernel"].T
        out["q_a_layernorm.weight"] = attn["q_norm"]["scale"]
        q_b = attn["q_b"]["kernel"][:, :, qk_order] * q_gain                  # (r_q, H, d_n + d_r)
        out["q_b_proj.weight"] = q_b.reshape(mla.q_rank, -1).T
    else:
        q = attn["q"]["kernel"][:, :, qk_order] * q_gain                      # (D, H, d_n + d_r)
        out["q_proj.weight"] = q.reshape(q.shape[0], -1).T
    kv_a = attn["kv_a"]["kernel"]                                             # (D, r_kv + d_r)
    out["kv_a_proj_with_mqa.weight"] = np.concatenate([kv_a[:, :r], kv_a[:, r:][:, interleave_order(dr)]], 1).T
    out["kv_a_layernorm.weight"] = attn["kv_norm"]["scale"]
    out["kv_b_proj.weight"] = attn["kv_b"]["kernel"].reshape(r, -1).T        # (H (d_n + d_v), r_kv)
    out["o_proj.weight"] = attn["o"]["kernel"].reshape(heads * mla.v_dim, -1).T
    return out


def deepseek_v3_tensors(model: Llama) -> Iterator[tuple[str, np.ndarray]]:
    """(DeepSeek-V3 name, float32 array in HF's (out, in) layout) of every tensor of ``model``, one
    layer at a time: e.g. ``self_attn.kv_a_proj_with_mqa.weight`` (r_kv + d_r, D),
    ``self_attn.kv_b_proj.weight`` (H (d_n + d_v), r_kv), ``self_attn.o_proj.weight`` (D, H d_v)."""
    c, mla = model.config, _mla_layout(model)
    params = nnx.state(model, nnx.Param).to_pure_dict()
    layers = params["segments"][0]
    # HF scales scores by (d_n + d_r)^-1/2; a model with another scale has it folded into q.
    q_gain = mla.attention_scale() / mla.qk_dim ** -0.5

    def out(name, w):
        return name, np.ascontiguousarray(np.asarray(w), np.float32)

    for i in range(c.num_layers):
        layer = _index_tree(layers, i)
        prefix = f"model.layers.{i}."
        for path, name in DENSE_TENSORS.items():
            w = _at(layer, path)
            yield out(prefix + name, w.T if path[-1] == "kernel" else w)
        for name, w in _attention_tensors(layer["attn"], mla, c.num_heads, q_gain).items():
            yield out(prefix + "self_attn." + name, w)
    embed = params["embed"]["embedding"]
    yield out("model.embed_tokens.weight", embed)
    yield out("model.norm.weight", params["norm"]["scale"])
    yield out("lm_head.weight", embed if c.tie_embeddings else np.asarray(params["lm_head"]["kernel"]).T)


def _index_tree(tree, i: int):
    return {k: _index_tree(v, i) if isinstance(v, dict) else np.asarray(v[i]) for k, v in tree.items()}


def _at(tree, path):
    for key in path:
        tree = tree[key]
    return tree


# ----------------------------------------------------------------------------- writing
def save_deepseek_v3(model: Llama, directory: str, tokenizer=None, *, max_position_embeddings: int = 8192,
                     shard_bytes: int = SHARD_BYTES, force: bool = False) -> str:
    """Writes ``model`` to ``directory`` as a DeepSeek-V3 checkpoint: config.json, safetensors
    shards with their index, the tokenizer (a research.models.tokenizer.Tokenizer; optional) and
    SERVING.md. Written under a temporary name and renamed when complete. Returns the path."""
    from safetensors.numpy import save_file

    from research.models.tokenizer import save_hf_tokenizer

    directory = os.path.abspath(directory)
    config = deepseek_v3_config(model, max_position_embeddings=max_position_embeddings,
                                bos_id=getattr(tokenizer, "bos_id", None), eos_id=getattr(tokenizer, "eos_id", None))
    with folder_written_whole(directory, force=force) as tmp:
        # One shard in memory at a time, written under a provisional name, renamed once the count is known.
        files, weight_map, shard, size, total = [], {}, {}, 0, 0

        def flush():
            files.append(f"shard-{len(files)}")
            save_file(shard, os.path.join(tmp, files[-1]), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, files[-1]))
            shard.clear()

        for name, w in deepseek_v3_tensors(model):
            if shard and size + w.nbytes > shard_bytes:
                flush()
                size = 0
            shard[name] = w
            size += w.nbytes
            total += w.nbytes
        flush()
        final = {f: "model.safetensors" if len(files) == 1 else f"model-{k + 1:05d}-of-{len(files):05d}.safetensors"
                 for k, f in enumerate(files)}
        for provisional, name in final.items():
            os.rename(os.path.join(tmp, provisional), os.path.join(tmp, name))
        if len(files) > 1:
            write_json_atomic(os.path.join(tmp, "model.safetensors.index.json"), {
                "metadata": {"total_size": total}, "weight_map": {n: final[f] for n, f in weight_map.items()}})
        write_json_atomic(os.path.join(tmp, "config.json"), config)
        write_json_atomic(os.path.join(tmp, "generation_config.json"),
                    {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]})
        if tokenizer is not None:
            save_hf_tokenizer(tokenizer, tmp)
        with open(os.path.join(tmp, "SERVING.md"), "w") as f:
            f.write(serving_notes(config))
    return directory


def serving_notes(config: dict) -> str:
    """SERVING.md: which engines serve this checkpoint with its compressed cache, and the flags."""
    r, dr = config["kv_lora_rank"], config["qk_rope_head_dim"]
    cached, per_head = r + dr, config["num_attention_heads"] * (config["qk_nope_head_dim"] + dr + config["v_head_dim"])
    fits = (r, dr) in VLLM_MLA_SIZES
    vllm = ("a size its MLA backends were written for (512 + 64, 256 + 64): served with the compressed cache"
            if fits else
            f"its MLA backends were written for kv_lora_rank + qk_rope_head_dim = 512 + 64 or 256 + 64; for "
            f"{r} + {dr} start it with `VLLM_MLA_DISABLE=1`, which caches full per-head keys and values "
            f"({per_head} numbers per token and layer instead of {cached})")
    scaled = ("- The RoPE is Llama-3-scaled; vLLM turns any non-default RoPE type of a DeepSeek model into\n"
              "  deepseek_yarn, which is another function: check the logits before serving with it.\n"
              if config["rope_scaling"] is not None else "")
    return f"""# Serving this checkpoint

A dense DeepSeek-V3-format model (`model_type: deepseek_v3`, every layer dense, no `auto_map`):
multi-head latent attention caching kv_lora_rank {r} + qk_rope_head_dim {dr} = {cached} numbers per
token and layer.

| engine | how |
|---|---|
| transformers (4.51 or later) | `AutoModelForCausalLM.from_pretrained(DIR)`: the framework's logits (float32) |
| vLLM | {vllm} |
| SGLang | `--attention-backend triton` masks any latent size and serves it compressed |

Notes:
- The transformers row is tested; the vLLM and SGLang rows come from reading their sources and
  were not run (a vLLM release that requires a MoE layer in every DeepSeek model refuses this one).
- `max_position_embeddings` is {config["max_position_embeddings"]} (engines cap the context there).
- Weights are float32; engines cast them (`--dtype bfloat16`).
- vLLM reads the latent norms' eps from `rms_norm_eps` ({config["rms_norm_eps"]:g}); transformers and
  the framework use 1e-6. The difference moves a latent by about eps / (2 mean(c^2)) of itself.
{scaled}"""


# ----------------------------------------------------------------------------- reading
def config_from_deepseek_v3(hf: dict) -> tuple[LlamaConfig, MLAConfig]:
    """(LlamaConfig, MLAConfig) of a dense DeepSeek-V3 config.json; ValueError naming a field the
    framework's MLA Llama cannot run (MoE layers, biases, YaRN RoPE, grouped heads)."""
    layers = hf["num_hidden_layers"]
    if (hf.get("first_k_dense_replace") or 0) < layers:
        raise ValueError(f"first_k_dense_replace = {hf.get('first_k_dense_replace')} < num_hidden_layers = {layers}: "
                         "MoE layers are not supported, only dense DeepSeek-V3 checkpoints")
    if hf.get("attention_bias"):
        raise ValueError("attention_bias = true is not supported (no biases in the MLA layer)")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act = {hf['hidden_act']!r} is not supported (the MLP is SwiGLU: silu)")
    heads = hf["num_attention_heads"]
    if (hf.get("num_key_value_heads") or heads) != heads:
        raise ValueError(f"num_key_value_heads = {hf['num_key_value_heads']} must equal num_attention_heads = {heads}")
    rope = dict(hf.get("rope_parameters") or {})
    rope.update({k: v for k, v in (hf.get("rope_scaling") or {}).items() if k not in rope})
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise ValueError(f"RoPE type {kind!r} is not supported; supported: default, llama3")
    scaling = None if kind == "default" else Llama3RopeScaling(
        factor=rope["factor"], low_freq_factor=rope["low_freq_factor"], high_freq_factor=rope["high_freq_factor"],
        original_max_position=rope["original_max_position_embeddings"])
    if not hf.get("rope_interleave", True):
        raise ValueError("rope_interleave = false is not supported (DeepSeek checkpoints interleave)")
    dn, dr, dv = hf["qk_nope_head_dim"], hf["qk_rope_head_dim"], hf["v_head_dim"]
    config = LlamaConfig(vocab_size=hf["vocab_size"], dim=hf["hidden_size"], num_layers=layers, num_heads=heads,
                         num_kv_heads=heads, head_dim=dn + dr, mlp_dim=hf["intermediate_size"],
                         rms_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
                         tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
    mla = MLAConfig(kv_rank=hf["kv_lora_rank"], rope_dim=dr, nope_dim=dn, v_dim=dv, q_rank=hf.get("q_lora_rank") or 0,
                    latent_norm=True, latent_norm_eps=LATENT_NORM_EPS)
    return config, mla


def fill_from_deepseek_v3(model: Llama, read: Callable[[str], np.ndarray]) -> Llama:
    """Copies every parameter of an all-MLA ``model`` from ``read(name)`` (HF names and layout)."""
    c, mla = model.config, model.segments[0].attn.mla
    dn, dr, r = mla.nope_dim, mla.rope_dim, mla.kv_rank
    back = np.argsort(interleave_order(dr))                  # interleaved -> rotate-half rows
    qk_back = np.concatenate([np.arange(dn), dn + back])
    state = nnx.state(model, nnx.Param)
    segment = state["segments"][0]

    def per_layer(name):
        return [read(f"model.layers.{i}.{name}") for i in range(c.num_layers)]

    for path, name in DENSE_TENSORS.items():
        set_param(segment, path, np.stack([w.T if path[-1] == "kernel" else w for w in per_layer(name)]))
    qk = mla.qk_dim
    if mla.q_rank:
        set_param(segment, ("attn", "q_a", "kernel"), np.stack([w.T for w in per_layer("self_attn.q_a_proj.weight")]))
        set_param(segment, ("attn", "q_norm", "scale"), np.stack(per_layer("self_attn.q_a_layernorm.weight")))
        q_b = [w.T.reshape(mla.q_rank, c.num_heads, qk)[:, :, qk_back] for w in per_layer("self_attn.q_b_proj.weight")]
        set_param(segment, ("attn", "q_b", "kernel"), np.stack(q_b))
    else:
        q = [w.T.reshape(c.dim, c.num_heads, qk)[:, :, qk_back] for w in per_layer("self_attn.q_proj.weight")]
        set_param(segment, ("attn", "q", "kernel"), np.stack(q))
    kv_a = [np.concatenate([w.T[:, :r], w.T[:, r:][:, back]], axis=1)
            for w in per_layer("self_attn.kv_a_proj_with_mqa.weight")]
    set_param(segment, ("attn", "kv_a", "kernel"), np.stack(kv_a))
    set_param(segment, ("attn", "kv_norm", "scale"), np.stack(per_layer("self_attn.kv_a_layernorm.weight")))
    set_param(segment, ("attn", "kv_b", "kernel"), np.stack([w.T for w in per_layer("self_attn.kv_b_proj.weight")]))
    set_param(segment, ("attn", "o", "kernel"), np.stack([w.T for w in per_layer("self_attn.o_proj.weight")]))
    set_param(state, ("embed", "embedding"), read("model.embed_tokens.weight"))
    set_param(state, ("norm", "scale"), read("model.norm.weight"))
    if not c.tie_embeddings:
        set_param(state, ("lm_head", "kernel"), read("lm_head.weight").T)
    nnx.update(model, state)
    return model


def mla_llama(config: LlamaConfig, mla: MLAConfig) -> Llama:
    """A zero-filled all-MLA Llama (one scanned segment), built without running initialisers; its
    RoPE frequencies are the standard d_r-dim ones of ``config``'s theta and scaling."""
    def make():
        segment = Llama.stacked_layers(config, lambda r: MLAttention(config, mla, rngs=r), config.num_layers,
                                       nnx.Rngs(0))
        return Llama(config, rngs=nnx.Rngs(0), segments=[segment], layer_kinds=["mla"] * config.num_layers)

    model = zeros_module(make)
    freqs = inverse_frequencies(mla.rope_dim, config.rope_theta, config.rope_scaling)
    model.segments[0].attn.rope_inv_freq[...] = np.tile(freqs.astype(np.float32), (config.num_layers, 1, 1))
    return model


def load_deepseek_v3(directory: str, **overrides) -> tuple[LlamaConfig, Llama]:
    """(config, model) from a dense DeepSeek-V3 checkpoint directory; ``overrides`` replace
    LlamaConfig fields (``dtype``, ``attention_impl``)."""
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: expected a Hugging Face checkpoint directory")
    with open(path) as f:
        hf = json.load(f)
    if hf.get("model_type") != "deepseek_v3":
        raise ValueError(f"{path}: model_type is {hf.get('model_type')!r}, not deepseek_v3")
    config, mla = config_from_deepseek_v3(hf)
    config = dataclasses.replace(config, **overrides)
    return config, fill_from_deepseek_v3(mla_llama(config, mla), safetensors_reader(directory))
