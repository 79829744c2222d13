"""Text windows for language models and the held-out document split."""
import numpy as np

from research.data.text import split_documents, token_windows


def test_token_windows_and_heldout_split():
    docs = [f"d{i}" for i in range(10)]
    train, heldout = split_documents(docs, 5)
    assert heldout == ["d4", "d9"] and len(train) == 8 and not set(train) & set(heldout)
    windows = token_windows(["abcde", "fg"], lambda s: [ord(c) for c in s], seq_len=2, separator=[0])
    np.testing.assert_array_equal(windows, [[97, 98, 99], [100, 101, 0], [102, 103, 0]])
    assert token_windows(["abcdefgh"], lambda s: [ord(c) for c in s], 1, max_windows=2).shape == (2, 2)
