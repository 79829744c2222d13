"""Pretrained Llama loading: a hub id read from the Hugging Face cache offline (one line when it is
not there), a converted copy per file version, and damaged weights refused naming the parameter."""
import os

import jax.numpy as jnp
import numpy as np
import pytest

from research.core.config import PathNotFoundError
from research.models.pretrained import LlamaSource, load_llama, load_pretrained_llama
from tests.models.test_llama import save_tiny_llama

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
hub = pytest.importorskip("huggingface_hub")


def save_checkpoint(directory, seed=0):
    """A tiny random transformers Llama with a word-level tokenizer, as an HF directory."""
    reference = save_tiny_llama(directory, tie=True, seed=seed)
    transformers.PreTrainedTokenizerFast(tokenizer_object=_word_tokenizer()).save_pretrained(directory)
    return reference


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An offline Hugging Face cache holding one snapshot of "tiny-org/tiny-llama" (the hub's layout)."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--tiny-org--tiny-llama" / "snapshots" / "0123abc"
    reference = save_checkpoint(snapshot)
    (cache / "models--tiny-org--tiny-llama" / "refs").mkdir()
    (cache / "models--tiny-org--tiny-llama" / "refs" / "main").write_text("0123abc")
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)
    return reference


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(100)} | {"[UNK]": 99}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return backend


def test_a_hub_id_loads_from_the_offline_cache(offline_cache):
    config, model, tokenizer = load_pretrained_llama("hf", "tiny-org/tiny-llama")
    tokens = np.arange(10)[None] % 100
    with torch.no_grad():
        expected = offline_cache(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))[0]), expected, atol=1e-4, rtol=0)
    assert tokenizer.encode("w3 w7") == [3, 7] and os.path.isdir(tokenizer.source)


def test_a_hub_id_missing_from_the_offline_cache_fails_in_one_line(offline_cache):
    with pytest.raises(PathNotFoundError) as error:
        load_pretrained_llama("hf", "tiny-org/other-model")
    message = str(error.value)
    assert "\n" not in message and "tiny-org/other-model" in message and "HF_HUB_OFFLINE" in message


def test_another_checkpoint_of_the_same_name_is_converted_anew_not_read_from_the_cache(tmp_path):
    tokens = np.arange(10)[None] % 100
    logits = []
    for seed, parent in enumerate(("a", "b")):
        reference = save_checkpoint(tmp_path / parent / "tiny", seed=seed)
        _, model, _ = load_llama(LlamaSource(source="hf", path=str(tmp_path / parent / "tiny")),
                                 default_cache_root=str(tmp_path / "cache"))
        with torch.no_grad():
            expected = reference(torch.as_tensor(tokens)).logits.numpy()
        logits.append(np.asarray(model(jnp.asarray(tokens))[0]))
        np.testing.assert_allclose(logits[-1], expected, atol=1e-4, rtol=0)
    assert not np.allclose(*logits) and len(os.listdir(tmp_path / "cache" / "llama")) == 2


def test_non_finite_weights_fail_naming_the_parameter(tmp_path):
    from safetensors.numpy import load_file, save_file

    save_checkpoint(tmp_path / "tiny")
    tensors = load_file(str(tmp_path / "tiny" / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight"][:3] = np.nan
    save_file(tensors, str(tmp_path / "tiny" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"segments/0/mlp/up/kernel' \(decoder layer 1\) has 96 non-finite values"):
        load_pretrained_llama("hf", str(tmp_path / "tiny"))


def test_the_architecture_alone_is_the_loaded_models_and_a_mistyped_local_path_is_no_hub_id(tmp_path):
    from research.models.pretrained import llama_architecture

    save_checkpoint(tmp_path / "tiny")
    config, tokenizer = llama_architecture(LlamaSource(source="hf", path=str(tmp_path / "tiny"), num_layers=2))
    loaded, _, _ = load_pretrained_llama("hf", str(tmp_path / "tiny"), num_layers=2)
    assert config == loaded and tokenizer.encode("w5") == [5]
    with pytest.raises(PathNotFoundError, match="does not exist"):
        load_pretrained_llama("hf", str(tmp_path / "tiny-typo"))  # an absolute path: never a hub lookup


def test_the_converted_copys_name_changes_when_a_file_of_the_same_name_changes(tmp_path):
    from research.models.pretrained import converted_name

    for parent in ("a", "b"):
        (tmp_path / parent).mkdir()
    (tmp_path / "a" / "model.gguf").write_bytes(b"x" * 10)
    (tmp_path / "b" / "model.gguf").write_bytes(b"y" * 11)
    first = converted_name(str(tmp_path / "a" / "model.gguf"))
    assert first.startswith("model-") and first != converted_name(str(tmp_path / "b" / "model.gguf"))
    (tmp_path / "a" / "model.gguf").write_bytes(b"z" * 10)                  # rewritten in place, same size
    os.utime(tmp_path / "a" / "model.gguf", ns=(1, 1))
    assert converted_name(str(tmp_path / "a" / "model.gguf")) != first


def test_a_truncated_weights_file_fails_in_one_line_naming_it(tmp_path):
    from research.core.config import DamagedFileError

    save_checkpoint(tmp_path / "tiny")
    weights = tmp_path / "tiny" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(DamagedFileError, match="model.safetensors") as error:
        load_pretrained_llama("hf", str(tmp_path / "tiny"))
    assert "\n" not in str(error.value)
