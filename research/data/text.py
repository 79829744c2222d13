"""Text corpora for language-model experiments: documents -> token windows.

``kjv_chapters`` turns the offline King James Bible (one row per verse) into one document per
chapter; ``split_documents`` holds out every k-th document, so held-out text is never seen in
training; ``token_windows`` concatenates tokenised documents (separated by the tokenizer's
end-of-text id) and cuts the stream into non-overlapping windows of seq_len + 1 tokens: inputs
are window[:-1] and next-token labels window[1:].
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np

from research.core import config as config_lib
from research.data import sources


@dataclasses.dataclass(frozen=True)
class KJVWindows:
    """Training and held-out token windows of the King James Bible (the ``data`` section of
    configs/x_ecomla.py)."""
    source: Literal["auto", "offline"] = "auto"
    seq_len: int = 128
    heldout_every: int = 20        # every 20th chapter is held out
    eval_windows: int = 64         # held-out windows of seq_len tokens for perplexity
    calibration_windows: int = 8   # training windows for calibration (e.g. upcycling's 2-norm RoPE choice)
    max_train_windows: int = 0     # 0 = every training window

    def __post_init__(self):
        config_lib.check_fields(self)
        for name in ("seq_len", "eval_windows", "calibration_windows"):
            config_lib.require(self, name, getattr(self, name) > 0, "a positive int")
        config_lib.require(self, "heldout_every", self.heldout_every >= 2, "an int >= 2")
        config_lib.require(self, "max_train_windows", self.max_train_windows >= 0, "an int >= 0 (0 = all)")


def kjv_windows(spec: KJVWindows, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(train windows, held-out windows), each (N, seq_len + 1) int32, of KJV chapters."""
    train_docs, heldout_docs = split_documents(kjv_chapters(source=spec.source), spec.heldout_every)
    separator = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    train = token_windows(train_docs, tokenizer.encode, spec.seq_len, separator, spec.max_train_windows)
    heldout = token_windows(heldout_docs, tokenizer.encode, spec.seq_len, separator, spec.eval_windows)
    return train, heldout


def kjv_chapters(source: str = "auto", data_dir: str | None = None) -> list[str]:
    """One string per chapter (1,189 of them): "Book N" then its verses joined by spaces."""
    verses = sources.load("kjv", source=source, data_dir=data_dir)["train"]
    chapters: dict[tuple[str, int], list[str]] = {}
    for book, chapter, text in zip(verses["book"], verses["chapter"], verses["text"]):
        chapters.setdefault((book, chapter), []).append(text)
    return [f"{book} {chapter}\n" + " ".join(texts) for (book, chapter), texts in chapters.items()]


def split_documents(documents: Sequence[str], heldout_every: int) -> tuple[list[str], list[str]]:
    """(train, held out): document i is held out when i % heldout_every == heldout_every - 1."""
    if heldout_every < 2:
        raise ValueError(f"heldout_every must be >= 2, got {heldout_every}")
    heldout = [d for i, d in enumerate(documents) if i % heldout_every == heldout_every - 1]
    train = [d for i, d in enumerate(documents) if i % heldout_every != heldout_every - 1]
    return train, heldout


def token_windows(documents: Sequence[str], encode: Callable[[str], list[int]], seq_len: int,
                  separator: Sequence[int] = (), max_windows: int = 0) -> np.ndarray:
    """(N, seq_len + 1) int32 windows over the concatenated token stream (the tail is dropped).

    max_windows > 0 stops tokenising once that many windows exist."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    stream: list[int] = []
    need = max_windows * (seq_len + 1) if max_windows else None
    for doc in documents:
        stream.extend(encode(doc))
        stream.extend(separator)
        if need is not None and len(stream) >= need:
            break
    n = len(stream) // (seq_len + 1)
    if max_windows:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"the documents hold {len(stream)} tokens: not one window of {seq_len + 1}")
    return np.asarray(stream[: n * (seq_len + 1)], np.int32).reshape(n, seq_len + 1)
