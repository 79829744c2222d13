"""Llama: logits equal transformers' PyTorch model on the same tiny random checkpoint."""
import numpy as np
import pytest

import jax.numpy as jnp

from research.models.llama_hf import load_hf_llama

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}


def save_tiny_llama(directory, *, tie: bool, rope_scaling=None, seed: int = 0, max_shard_size=None):
    """A random transformers LlamaForCausalLM saved with save_pretrained (safetensors)."""
    config = transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie, rope_scaling=rope_scaling,
        rope_theta=500.0)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger than the 0.02 init, so that every term matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(directory, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return model


@pytest.mark.parametrize("tie,rope_scaling", [(True, None), (False, LLAMA3_SCALING)], ids=["tied", "llama3_rope"])
def test_logits_match_transformers(tmp_path, tie, rope_scaling):
    reference = save_tiny_llama(tmp_path, tie=tie, rope_scaling=rope_scaling)
    config, model = load_hf_llama(str(tmp_path))
    assert config.tie_embeddings == tie and (config.rope_scaling is not None) == (rope_scaling is not None)
    tokens = np.random.RandomState(0).randint(0, 100, (2, 40))
    with torch.no_grad():
        expected = reference(torch.tensor(tokens)).logits.numpy()
    logits, _ = model(jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=0)


def test_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_llama(str(tmp_path))


def test_sharded_checkpoint_loads_the_same(tmp_path):
    reference = save_tiny_llama(tmp_path, tie=False, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    _, model = load_hf_llama(str(tmp_path))
    tokens = np.arange(12)[None] % 100
    with torch.no_grad():
        expected = reference(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))[0]), expected, atol=1e-4, rtol=0)
