"""The general-English sources: what each reader keeps, and held-out text that never reaches a
training window (word-level 13-grams, with a word tokenizer standing in for the model's)."""
import re

import numpy as np
import pytest

from research.core.config import DataSourceError
from research.data import english
from research.data.text import TextWindows, split_documents, text_windows, word_ngrams


def _installed(name):
    try:
        return english.documents(name)
    except DataSourceError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def corpora():
    return {}


def _docs(corpora, name):
    if name not in corpora:
        corpora[name] = _installed(name)
    return corpora[name]


class WordTokenizer:
    """Case-folded words -> ids, 0 between documents: 13 tokens are 13 words."""
    eos_id = 0

    def __init__(self):
        self.ids = {}

    def encode(self, text):
        return [self.ids.setdefault(w, len(self.ids) + 1) for w in re.findall(r"\w+", text.lower())]


def _ngram_keys(windows: np.ndarray, n: int) -> set[bytes]:
    """Every run of n tokens inside one document (no end-of-text id) of each window, as bytes."""
    keys = set()
    for row in windows:
        runs = np.lib.stride_tricks.sliding_window_view(row, n)
        keys.update(r.tobytes() for r in runs[~(runs == 0).any(1)])
    return keys


@pytest.mark.parametrize("name", list(english.TEXT_SOURCES))
def test_heldout_windows_share_no_13_words_with_training_windows(corpora, name):
    _docs(corpora, name)
    mix = text_windows(TextWindows(sources=(name,), seq_len=64, eval_windows=1000), WordTokenizer())
    heldout = _ngram_keys(mix.heldout[name], 13)
    assert len(heldout) > 1000  # a held-out set worth measuring
    assert not heldout & _ngram_keys(mix.train, 13)


def test_the_overlap_test_moves_shared_text_to_training():
    verse = "and it came to pass in those days that there went out a decree from caesar augustus"
    docs = [f"{verse} one", f"{verse} two", "other words", "more words"]
    train, heldout = split_documents(docs, 2)
    assert heldout == ["more words"] and f"{verse} two" in train
    assert split_documents(docs, 2, overlap_words=0)[1] == [f"{verse} two", "more words"]
    assert len(word_ngrams(verse, 13)) == len(verse.split()) - 12


@pytest.mark.parametrize("name, kept, left_out", [
    ("handbook", "dpkg", r"Product Site|\bPrev\b"),  # prose of the manual, not its navigation bar
    ("jargon", "hacker", r"00-database"),            # entries, not the dictionary's own header
    ("fortunes", "Mark Twain", r"(?m)^%$"),          # one cookie per document, no separator lines
])
def test_readers_keep_prose_and_drop_markup(corpora, name, kept, left_out):
    docs = _docs(corpora, name)
    assert any(kept in d for d in docs) and not any(re.search(left_out, d) for d in docs)
    assert len(docs) == len({d.lower() for d in docs})  # no duplicates


def test_mix_draws_by_weight_and_spreads_calibration_over_sources():
    names = ("a", "b", "c")
    source_of = np.repeat(np.arange(3), [100, 10, 50])
    mix = _mix(names, [0.5, 0.5, 0.0], source_of)
    counts = np.bincount(mix.source_of[mix.draw(np.random.default_rng(0), 4000)], minlength=3)
    assert counts[2] == 0 and abs(counts[0] - counts[1]) < 300  # weight, not size, decides
    rows = mix.spread(9, seed=1)
    assert len(set(rows)) == 9 and sorted(np.bincount(mix.source_of[rows], minlength=3)) == [0, 4, 5]
    with pytest.raises(ValueError, match="'b'"):
        _mix(names, [0.1, 0.9, 0.0], source_of).spread(30)


def _mix(names, weights, source_of):
    from research.data.text import WindowMix
    train = np.arange(len(source_of) * 3).reshape(-1, 3)
    return WindowMix(names, np.asarray(weights), train, source_of, {n: train[:1] for n in names})


@pytest.mark.parametrize("override, key", [({"sources": ("kjv", "novels")}, "sources"),
                                           ({"sources": ("kjv", "kjv")}, "sources"),
                                           ({"weights": (1.0,)}, "weights"),
                                           ({"weights": (0.0, 0.0, 0.0, 0.0)}, "weights")])
def test_a_bad_mix_names_its_key(override, key):
    with pytest.raises(ValueError, match=f"data.{key}|{key}"):
        TextWindows(**override)
