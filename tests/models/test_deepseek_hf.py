"""DeepSeek-V3 export: stock transformers loads an upcycled model with our logits and greedy tokens,
a wrong RoPE row order is caught by that check, and the checkpoint loads back into our MLA Llama."""
import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

from research.attention.rope import Llama3RopeScaling
from research.models import deepseek_hf
from research.models.deepseek_hf import load_deepseek_v3, save_deepseek_v3
from research.models.generate import generate
from research.models.llama import first_layers
from research.upcycling import UpcycleConfig, upcycle_gqa_to_mla
from tests.models.tiny_llama import TINY, random_llama

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOKENS = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 24))


def upcycled(rope_mode="uniform", q_rank=0, config=TINY):
    teacher = random_llama(config)
    cfg = UpcycleConfig(kv_rank=12, rope_dim=4, rope_mode=rope_mode, q_rank=q_rank, rope_key="shared_fit",
                        activation_aware=True, target="deepseek_v3")
    return upcycle_gqa_to_mla(teacher, cfg, TOKENS)[0]


def hf_logits(directory, tokens):
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.numpy(), model


def relative_error(ours, theirs):
    return float(np.abs(ours - theirs).max() / np.abs(ours).max())


@pytest.mark.parametrize("rope_mode,q_rank,scaled", [("uniform", 0, False), ("high", 16, False), ("split", 0, False),
                                                     ("uniform", 0, True)],
                         ids=["uniform", "high_q_rank", "split", "uniform_llama3_rope"])
def test_transformers_loads_the_export_with_our_logits(tmp_path, rope_mode, q_rank, scaled):
    config = dataclasses.replace(TINY, rope_scaling=Llama3RopeScaling(original_max_position=16)) if scaled else TINY
    student = upcycled(rope_mode, q_rank, config)
    out = save_deepseek_v3(student, str(tmp_path / "export"))
    theirs, _ = hf_logits(out, TOKENS)
    assert relative_error(np.asarray(student(jnp.asarray(TOKENS))[0]), theirs) <= 1e-5


def test_another_attention_scale_is_folded_into_q_and_a_sharded_export_loads_the_same(tmp_path):
    from flax import nnx

    from research.attention.mla import MLAttention

    student = upcycled("high", q_rank=16)
    for _, node in nnx.iter_graph(student):
        if isinstance(node, MLAttention):
            node.mla = dataclasses.replace(node.mla, scale=0.2)          # not (d_n + d_r)^-1/2 = 0.354
    out = save_deepseek_v3(student, str(tmp_path / "export"), shard_bytes=20_000)
    assert (tmp_path / "export" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "export").glob("model-*-of-*.safetensors"))) > 1
    theirs, _ = hf_logits(out, TOKENS)
    assert relative_error(np.asarray(student(jnp.asarray(TOKENS))[0]), theirs) <= 1e-5


def test_a_wrong_rope_row_order_fails_the_logit_check(tmp_path, monkeypatch):
    student = upcycled()
    monkeypatch.setattr(deepseek_hf, "interleave_order", lambda d: np.arange(d))  # rotate-half rows left as they are
    out = save_deepseek_v3(student, str(tmp_path / "export"))
    theirs, _ = hf_logits(out, TOKENS)
    assert relative_error(np.asarray(student(jnp.asarray(TOKENS))[0]), theirs) > 1e-3


def test_transformers_greedy_generate_with_its_latent_cache_gives_our_tokens(tmp_path):
    student = upcycled()
    out = save_deepseek_v3(student, str(tmp_path / "export"))
    _, model = hf_logits(out, TOKENS[:1, :4])
    prompt = TOKENS[0, :6]
    with torch.no_grad():
        theirs = model.generate(torch.as_tensor(prompt[None]), max_new_tokens=12, do_sample=False, use_cache=True,
                                pad_token_id=0)[0, len(prompt):].numpy()
    ours = generate(student, [list(prompt)], 12)[0]
    np.testing.assert_array_equal(ours, theirs)


def test_config_reads_back_under_transformers_with_the_legacy_keys(tmp_path):
    student = upcycled("high")
    out = save_deepseek_v3(student, str(tmp_path / "export"))
    raw = json.loads((tmp_path / "export" / "config.json").read_text())
    assert raw["model_type"] == "deepseek_v3" and "auto_map" not in raw
    assert raw["first_k_dense_replace"] == TINY.num_layers and raw["num_nextn_predict_layers"] == 0
    theta = TINY.rope_theta ** (4 / TINY.head_dim)                     # "high": theta^(d_r / d_h)
    assert raw["rope_theta"] == pytest.approx(theta) and raw["rope_scaling"] is None
    hf = transformers.AutoConfig.from_pretrained(out)
    assert hf.rope_parameters["rope_theta"] == pytest.approx(theta) and hf.rope_interleave
    assert (hf.kv_lora_rank, hf.qk_rope_head_dim, hf.q_lora_rank) == (12, 4, None)
    assert not hf.tie_word_embeddings and (tmp_path / "export" / "SERVING.md").exists()


def test_export_then_import_gives_our_logits_exactly(tmp_path):
    student = upcycled("high", q_rank=16)
    _, back = load_deepseek_v3(save_deepseek_v3(student, str(tmp_path / "export")))
    np.testing.assert_array_equal(np.asarray(back(jnp.asarray(TOKENS))[0]), np.asarray(student(jnp.asarray(TOKENS))[0]))


@pytest.mark.slow  # about 15 s: SmolLM2's 49k-token embeddings written twice and read by transformers
def test_smollm2_first_layers_upcycled_and_exported_give_our_logits(tmp_path, smollm2, smollm2_tokenizer):
    teacher = first_layers(smollm2[1], 2)
    tokens = np.asarray([smollm2_tokenizer.encode("In the beginning God created the heaven and the earth. "
                                                  "And the earth was without form, and void.")])
    student, _ = upcycle_gqa_to_mla(teacher, UpcycleConfig(kv_rank=56, rope_dim=4, rope_mode="uniform",
                                                           rope_key="shared_fit", target="deepseek_v3"), tokens)
    out = save_deepseek_v3(student, str(tmp_path / "export"), smollm2_tokenizer)
    theirs, _ = hf_logits(out, tokens)
    assert relative_error(np.asarray(student(jnp.asarray(tokens))[0]), theirs) <= 1e-5
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tokenizer.encode("God created", add_special_tokens=False) == smollm2_tokenizer.encode("God created")


def test_what_stock_deepseek_cannot_run_fails_naming_it(tmp_path):
    native = upcycle_gqa_to_mla(random_llama(), UpcycleConfig(kv_rank=12, rope_dim=4, rope_mode="uniform",
                                                              rope_key="shared"))[0]
    with pytest.raises(ValueError, match="latent norm"):
        save_deepseek_v3(native, str(tmp_path / "a"))
    with pytest.raises(ValueError, match="rope_key"):
        UpcycleConfig(rope_key="per_kv_head", target="deepseek_v3")
    with pytest.raises(ValueError, match="rope_mode"):
        UpcycleConfig(rope_mode="2norm", target="deepseek_v3")
    assert not (tmp_path / "a").exists()


def test_moe_checkpoints_are_refused_naming_the_field():
    config = {"num_hidden_layers": 4, "first_k_dense_replace": 1, "num_attention_heads": 2}
    with pytest.raises(ValueError, match="first_k_dense_replace"):
        deepseek_hf.config_from_deepseek_v3(config)
