"""Text corpora for language-model experiments: documents -> token windows.

A ``TextWindows`` section names a mix of sources (research.data.english: KJV chapters, handbook
sections, Jargon File entries, fortunes) and their sampling weights. Per source,
``split_documents`` holds out every k-th document, and trains instead on any held-out document that
shares 13 consecutive words with a training document (the overlap test of Brown et al., 2020,
"Language Models are Few-Shot Learners", App. C), so held-out text is never seen in training.
``token_windows`` concatenates tokenised documents (separated by the tokenizer's end-of-text id)
and cuts the stream into non-overlapping windows of seq_len + 1 tokens: inputs are window[:-1]
and next-token labels window[1:].
"""
from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Sequence

import numpy as np

from research.core import config as config_lib
from research.data import english
from research.data.english import kjv_chapters  # noqa: F401 (one source's documents, for notebooks)


@dataclasses.dataclass(frozen=True)
class TextWindows:
    """Training and held-out token windows of a mix of text sources (the ``data`` section of
    configs/x_ecomla.py). Training windows are drawn source by source with probabilities
    ``weights`` (equal when empty); held-out figures are per source."""
    sources: tuple[str, ...] = ("kjv", "handbook", "jargon", "fortunes")
    weights: tuple[float, ...] = ()
    seq_len: int = 128
    heldout_every: int = 20        # every 20th document of each source is held out
    eval_windows: int = 32         # held-out windows of seq_len tokens per source, for perplexity
    calibration_windows: int = 8   # training windows spread over the sources, for calibration
    max_train_windows: int = 0     # per source; 0 = every training window

    def __post_init__(self):
        config_lib.check_fields(self)
        config_lib.require(self, "sources", len(self.sources) > 0 and set(self.sources) <= set(english.TEXT_SOURCES)
                           and len(set(self.sources)) == len(self.sources),
                           f"distinct names among {', '.join(english.TEXT_SOURCES)}")
        config_lib.require(self, "weights", not self.weights or (
            len(self.weights) == len(self.sources) and min(self.weights) >= 0 and sum(self.weights) > 0),
            "empty (equal weights) or one weight >= 0 per source, not all 0")
        for name in ("seq_len", "eval_windows", "calibration_windows"):
            config_lib.require(self, name, getattr(self, name) > 0, "a positive int")
        config_lib.require(self, "heldout_every", self.heldout_every >= 2, "an int >= 2")
        config_lib.require(self, "max_train_windows", self.max_train_windows >= 0, "an int >= 0 (0 = all)")


@dataclasses.dataclass(frozen=True)
class WindowMix:
    """Token windows of several sources. train: (N, seq_len + 1) int32, source after source;
    source_of: (N,) each training window's source index; heldout: name -> (M, seq_len + 1)."""
    names: tuple[str, ...]
    weights: np.ndarray            # (S,) summing to 1
    train: np.ndarray
    source_of: np.ndarray
    heldout: dict[str, np.ndarray]

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n training rows: source s with probability weights[s], then one of its windows uniformly."""
        counts = np.bincount(self.source_of, minlength=len(self.names))
        p = self.weights[self.source_of] / counts[self.source_of]
        return rng.choice(len(self.train), n, replace=len(self.train) < n, p=p / p.sum())

    def spread(self, n: int, seed: int = 0) -> np.ndarray:
        """n distinct training rows in proportion to the weights (largest remainder), each source's
        chosen at random, shuffled together: the calibration and layer-wise fitting sets."""
        exact = n * self.weights
        take = np.floor(exact).astype(int)
        take[np.argsort(take - exact, kind="stable")[: n - take.sum()]] += 1
        rng = np.random.default_rng(seed)
        rows = []
        for s, k in enumerate(take):
            own = np.flatnonzero(self.source_of == s)
            if k > len(own):
                raise ValueError(f"{k} training windows of {self.names[s]!r} asked for; it holds {len(own)}")
            rows.append(rng.choice(own, k, replace=False))
        return rng.permutation(np.concatenate(rows))

    def tokens(self) -> dict[str, dict[str, int]]:
        """{source: {"train": tokens, "heldout": tokens}} (seq_len input tokens per window)."""
        seq_len = self.train.shape[1] - 1
        return {name: {"train": int((self.source_of == s).sum()) * seq_len,
                       "heldout": int(len(self.heldout[name])) * seq_len} for s, name in enumerate(self.names)}


def text_windows(spec: TextWindows, tokenizer) -> WindowMix:
    """The mix's training and held-out windows, the tokenizer's end-of-text id between documents."""
    separator = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    trains, heldout = [], {}
    for name in spec.sources:
        train_docs, heldout_docs = _split(name, spec.heldout_every)
        trains.append(token_windows(train_docs, tokenizer.encode, spec.seq_len, separator, spec.max_train_windows))
        heldout[name] = token_windows(heldout_docs, tokenizer.encode, spec.seq_len, separator, spec.eval_windows)
    weights = np.asarray(spec.weights or [1.0] * len(spec.sources), np.float64)
    return WindowMix(tuple(spec.sources), weights / weights.sum(), np.concatenate(trains),
                     np.repeat(np.arange(len(trains)), [len(t) for t in trains]), heldout)


@functools.lru_cache(maxsize=8)
def _split(name: str, heldout_every: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """One source's split, computed once per process (the overlap test reads every document)."""
    train, heldout = split_documents(english.documents(name), heldout_every)
    return tuple(train), tuple(heldout)


def split_documents(documents: Sequence[str], heldout_every: int, overlap_words: int = 13
                    ) -> tuple[list[str], list[str]]:
    """(train, held out): document i is held out when i % heldout_every == heldout_every - 1,
    unless it shares ``overlap_words`` consecutive words (case-folded) with a training document;
    such a document is trained on instead (``overlap_words=0`` turns the test off)."""
    if heldout_every < 2:
        raise ValueError(f"heldout_every must be >= 2, got {heldout_every}")
    heldout = [d for i, d in enumerate(documents) if i % heldout_every == heldout_every - 1]
    train = [d for i, d in enumerate(documents) if i % heldout_every != heldout_every - 1]
    if overlap_words:
        seen = set().union(*(word_ngrams(d, overlap_words) for d in train))
        overlapping = [d for d in heldout if word_ngrams(d, overlap_words) & seen]
        heldout = [d for d in heldout if not word_ngrams(d, overlap_words) & seen]
        train += overlapping
    return train, heldout


def word_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """The text's runs of n consecutive case-folded words."""
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


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
