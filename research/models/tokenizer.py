"""Text <-> token ids for the language models, on the ``tokenizers`` library.

    tok = tokenizer_from_gguf(smollm2_gguf_path())       # or tokenizer_from_hf(directory)
    tok = tokenizer_from_gguf(path, cache_dir=DIR)       # parsed once per file, then read from DIR
    ids = tok.encode("The capital of Germany is")       # list[int], no BOS unless add_bos=True
    tok.decode(ids)                                      # -> "The capital of Germany is"

A GGUF carries no ``tokenizer.json``: for ``tokenizer.ggml.model == "gpt2"`` it stores the byte-level
BPE vocabulary (tokens already spelled in GPT-2's byte alphabet, "Ġ" for a space), the merges, the
token types and the special ids, and names the pre-tokenizer in ``tokenizer.ggml.pre``. We rebuild
the tokenizer from those, with the pre-tokenizer llama.cpp uses for that name. For SmolLM2
("smollm", as StarCoder) that is: every digit on its own, then GPT-2's regex split.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence

from research.core.records import temp_dir_beside

# GPT-2's split, used by ByteLevel(use_regex=True):
#   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "codeshell")
_GPT2 = ("gpt-2",)
_LLAMA3 = ("llama-bpe", "llama3", "llama-v3")
SUPPORTED_PRE = _DIGITS_THEN_GPT2 + _GPT2 + _LLAMA3
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types


class Tokenizer:
    """A ``tokenizers.Tokenizer`` with the model's special ids. Special tokens in the text (e.g.
    ``<|im_start|>``) encode to their single id; BOS is only added when asked for."""

    def __init__(self, backend, *, bos_id: int | None, eos_id: int | None, pad_id: int | None, source: str = ""):
        self.backend = backend
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.source = source

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_bos:
            if self.bos_id is None:
                raise ValueError(f"tokenizer from {self.source} has no BOS token")
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def token(self, i: int) -> str | None:
        """The vocabulary entry of id i (byte-level spelling, e.g. "ĠBerlin")."""
        return self.backend.id_to_token(int(i))

    def __repr__(self) -> str:
        return (f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, pad_id={self.pad_id})")


def _pre_tokenizer(name: str | None, path: str):
    from tokenizers import Regex, pre_tokenizers as pt

    if name in _DIGITS_THEN_GPT2:
        return pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False, use_regex=True)])
    if name in _GPT2:
        return pt.ByteLevel(add_prefix_space=False, use_regex=True)
    if name in _LLAMA3:
        return pt.Sequence([pt.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                            pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise ValueError(f"{path}: tokenizer.ggml.pre {name!r} is unsupported; supported: {', '.join(SUPPORTED_PRE)}")


def tokenizer_from_gguf(source, cache_dir: str = "") -> Tokenizer:
    """The byte-level BPE tokenizer described by a GGUF's ``tokenizer.ggml.*`` metadata; ``source``
    is a path or an open ``gguf.GGUFReader``. With ``cache_dir`` and a path, the tokenizer is kept
    there per GGUF file (by name, size and modification time) and later calls read it instead of
    parsing the file's metadata, which takes 4-10 s for SmolLM2's 49,152 tokens and merges."""
    cached = _cache_folder(source, cache_dir)
    if cached and os.path.isdir(cached):
        return _load_cached(cached)
    tokenizer = _parse_gguf_tokenizer(source)
    if cached:
        _save_cached(tokenizer, cached)
    return tokenizer


def _cache_folder(source, cache_dir: str) -> str:
    if not cache_dir or not isinstance(source, (str, os.PathLike)) or not os.path.exists(source):
        return ""
    stat = os.stat(source)
    name = os.path.splitext(os.path.basename(os.fspath(source)))[0]
    return os.path.join(cache_dir, f"{name}-{stat.st_size}-{stat.st_mtime_ns}")


def _save_cached(tokenizer: Tokenizer, folder: str) -> None:
    """Written whole or not at all: a temporary folder renamed into place (another process may win)."""
    tmp = temp_dir_beside(folder)
    tokenizer.backend.save(os.path.join(tmp, "tokenizer.json"))
    with open(os.path.join(tmp, "special_ids.json"), "w") as f:
        json.dump({"bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id,
                   "source": tokenizer.source}, f)
    try:
        os.rename(tmp, folder)
    except OSError:  # the folder exists: another process cached the same file first
        shutil.rmtree(tmp, ignore_errors=True)


def _load_cached(folder: str) -> Tokenizer:
    from tokenizers import Tokenizer as Backend

    with open(os.path.join(folder, "special_ids.json")) as f:
        ids = json.load(f)
    return Tokenizer(Backend.from_file(os.path.join(folder, "tokenizer.json")), bos_id=ids["bos_id"],
                     eos_id=ids["eos_id"], pad_id=ids["pad_id"], source=ids["source"])


def _parse_gguf_tokenizer(source) -> Tokenizer:
    from tokenizers import AddedToken, Tokenizer as Backend, decoders, models

    from research.models.llama_gguf import open_gguf

    reader, path = open_gguf(source)

    def get(key, default=None):
        f = reader.fields.get(f"tokenizer.ggml.{key}")
        return default if f is None else f.contents()

    kind = get("model")
    if kind != "gpt2":
        raise ValueError(f"{path}: tokenizer.ggml.model is {kind!r}; only 'gpt2' (byte-level BPE) is supported")
    tokens, merges = get("tokens"), get("merges")
    if tokens is None or merges is None:
        raise KeyError(f"{path}: tokenizer.ggml.tokens or tokenizer.ggml.merges is missing")
    types = get("token_type") or [1] * len(tokens)
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"{path}: tokenizer.ggml.tokens has {len(tokens) - len(vocab)} duplicate entries")
    # Byte-level spelling has no literal spaces, so the space separates the pair.
    backend = Backend(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], fuse_unk=False))
    backend.pre_tokenizer = _pre_tokenizer(get("pre"), path)
    backend.decoder = decoders.ByteLevel()
    # llama.cpp matches control and user-defined tokens whole in the text; so must we.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, k in zip(tokens, types) if k == CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, k in zip(tokens, types) if k == USER_DEFINED])
    return Tokenizer(backend, bos_id=_int(get("bos_token_id")), eos_id=_int(get("eos_token_id")),
                     pad_id=_int(get("padding_token_id")), source=path)


def tokenizer_from_hf(directory: str) -> Tokenizer:
    """The tokenizer of an HF checkpoint directory: ``tokenizer.json``, with the special tokens named
    in ``tokenizer_config.json`` (falling back to the ids in ``config.json``)."""
    from tokenizers import Tokenizer as Backend

    path = os.path.join(directory, "tokenizer.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: expected a Hugging Face tokenizer directory")
    backend = Backend.from_file(path)
    names = _read_json(os.path.join(directory, "tokenizer_config.json"))
    ids = _read_json(os.path.join(directory, "config.json"))

    def special(name: str) -> int | None:
        token = names.get(f"{name}_token")
        if isinstance(token, dict):  # older files store an AddedToken as a dict
            token = token.get("content")
        if token is not None and backend.token_to_id(token) is not None:
            return backend.token_to_id(token)
        return _int(ids.get(f"{name}_token_id"))

    return Tokenizer(backend, bos_id=special("bos"), eos_id=special("eos"), pad_id=special("pad"), source=directory)


def save_hf_tokenizer(tokenizer: Tokenizer, directory: str) -> None:
    """Writes ``tokenizer`` as transformers reads it: tokenizer.json (the ``tokenizers`` backend) and
    tokenizer_config.json naming its special tokens (``PreTrainedTokenizerFast``)."""
    tokenizer.backend.save(os.path.join(directory, "tokenizer.json"))
    names = {f"{kind}_token": tokenizer.token(i) for kind, i in
             (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id), ("pad", tokenizer.pad_id)) if i is not None}
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False, **names}, f,
                  indent=2)


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _int(x) -> int | None:
    if isinstance(x, list):  # config.json may list several EOS ids; the first is the canonical one
        x = x[0] if x else None
    return None if x is None else int(x)
