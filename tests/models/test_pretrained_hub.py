"""``model.path`` as a Hugging Face hub id: read from the Hugging Face cache offline, and one line
naming the id and the cache when it is not there."""
import os

import jax.numpy as jnp
import numpy as np
import pytest

from research.core.config import PathNotFoundError
from research.models.pretrained import load_pretrained_llama
from tests.models.test_llama import save_tiny_llama

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
hub = pytest.importorskip("huggingface_hub")


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An offline Hugging Face cache holding one snapshot of "tiny-org/tiny-llama" (the hub's layout)."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--tiny-org--tiny-llama" / "snapshots" / "0123abc"
    reference = save_tiny_llama(snapshot, tie=True)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=_word_tokenizer())
    tokenizer.save_pretrained(snapshot)
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
