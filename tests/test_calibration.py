"""Calibration sets: the Wanda/SparseGPT window recipe, .npy validation, prepared-dataset samples."""

import random

import numpy as np
import pytest

from maxprune.data.calibration import calibration_from_prepared, calibration_windows, load_calibration_npy
from maxprune.errors import MaxpruneError

BOS = 256


class ByteTokenizer:
    """One id per UTF-8 byte, BOS = 256: windows can be checked against the raw text."""

    vocab_size = 257
    bos_id = BOS

    def __init__(self):
        self.calls = 0

    def encode(self, text, bos=False, eos=False):
        self.calls += 1
        return [BOS] * bos + list(text.encode())


@pytest.fixture
def corpus(tmp_path):
    """Ten short documents (never usable at seq_len 32) and three long ones."""
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
    for i in range(10):
        (tmp_path / f"short{i:02d}.txt").write_text(f"tiny {i}")
    for i in range(3):
        (tmp_path / f"long{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(40 + 20 * i)))
    return f"txt:{tmp_path}/*.txt"


def reference_windows(texts, tokenizer, n_samples, seq_len, seed):
    """Wanda's get_c4 loop, verbatim but for the tokenizer call."""
    random.seed(seed)
    out = []
    for _ in range(n_samples):
        while True:
            i = random.randint(0, len(texts) - 1)
            ids = tokenizer.encode(texts[i], bos=True)
            if len(ids) > seq_len:
                break
        i = random.randint(0, len(ids) - seq_len - 1)
        out.append(ids[i:i + seq_len])
    return np.array(out, dtype=np.int32)


def test_windows_match_the_reference_draw_for_draw_and_are_real_substrings(corpus):
    from maxprune.data.sources import iter_documents

    texts = [d.text for d in iter_documents(corpus)]
    windows_NL = calibration_windows(corpus, ByteTokenizer(), n_samples=12, seq_len=32, seed=5)
    assert windows_NL.shape == (12, 32) and windows_NL.dtype == np.int32
    np.testing.assert_array_equal(windows_NL, reference_windows(texts, ByteTokenizer(), 12, 32, 5))
    long_docs = [[BOS] + list(t.encode()) for t in texts if len(t.encode()) + 1 > 32]
    assert len(long_docs) == 3
    for window in windows_NL.tolist():
        assert any(_contains(doc, window) for doc in long_docs)


def _contains(haystack, needle):
    return any(haystack[i:i + len(needle)] == needle for i in range(len(haystack) - len(needle) + 1))


def test_windows_are_deterministic_per_seed_and_differ_across_seeds(corpus):
    a = calibration_windows(corpus, ByteTokenizer(), 8, 32, seed=1)
    b = calibration_windows(corpus, ByteTokenizer(), 8, 32, seed=1)
    c = calibration_windows(corpus, ByteTokenizer(), 8, 32, seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_short_documents_are_never_tokenized(corpus):
    tokenizer = ByteTokenizer()
    calibration_windows(corpus, tokenizer, 50, 32, seed=0)
    assert tokenizer.calls <= 3  # only the three long documents, each once


def test_no_long_enough_document_is_an_error_not_an_endless_loop(corpus):
    with pytest.raises(MaxpruneError, match=r"0 of 13 documents .* seq_len=100000"):
        calibration_windows(corpus, ByteTokenizer(), 4, 100_000, seed=0)
    with pytest.raises(MaxpruneError, match=r"longest tokenized: \d+\)"):
        calibration_windows(corpus, _Compressing(), 4, 300, seed=0)


class _Compressing(ByteTokenizer):
    """A tokenizer whose ids are far fewer than bytes: passes the byte pre-check, fails the real one."""

    def encode(self, text, bos=False, eos=False):
        self.calls += 1
        return [BOS] * bos + [1] * (len(text) // 40)


def save(tmp_path, array, name="calib.npy"):
    path = tmp_path / name
    np.save(path, array)
    return path


def test_npy_good_file_is_cut_to_seq_len(tmp_path):
    tokens = np.arange(2 * 10).reshape(2, 10).astype(np.int64)
    out = load_calibration_npy(save(tmp_path, tokens), vocab_size=100, seq_len=8)
    assert out.dtype == np.int32 and out.shape == (2, 8)
    np.testing.assert_array_equal(out, tokens[:, :8])


@pytest.mark.parametrize("array, match", [
    (np.zeros((2, 8), np.float32), "dtype float32"),
    (np.zeros(16, np.int32), r"shape \(16,\)"),
    (np.full((2, 8), 100, np.int32), r"\[100, 100\].*\[0, 100\)"),
    (np.full((2, 8), -1, np.int32), r"\[-1, -1\]"),
    (np.zeros((2, 4), np.int32), "4 tokens per sample; seq_len=8"),
    (np.zeros((0, 8), np.int32), "non-empty"),
])
def test_npy_bad_files_are_refused(tmp_path, array, match):
    with pytest.raises(MaxpruneError, match=match):
        load_calibration_npy(save(tmp_path, array), vocab_size=100, seq_len=8)


def test_npy_missing_or_unreadable(tmp_path):
    with pytest.raises(MaxpruneError, match="does not exist"):
        load_calibration_npy(tmp_path / "nope.npy", vocab_size=10)
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(MaxpruneError, match="not a readable .npy"):
        load_calibration_npy(tmp_path / "junk.npy", vocab_size=10)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(MaxpruneError, match="obj.npy"):
        load_calibration_npy(tmp_path / "obj.npy", vocab_size=10)


class Rows:
    def __init__(self, n, seq_len):
        self.rows_NL = np.arange(n * seq_len, dtype=np.int32).reshape(n, seq_len)

    def __len__(self):
        return len(self.rows_NL)

    def __getitem__(self, i):
        return self.rows_NL[i]


def test_from_prepared_distinct_deterministic_rows():
    ds = Rows(50, 6)
    a, b = calibration_from_prepared(ds, 20, seed=3), calibration_from_prepared(ds, 20, seed=3)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (20, 6) and len({row[0] for row in a.tolist()}) == 20
    assert not np.array_equal(a, calibration_from_prepared(ds, 20, seed=4))
    with pytest.raises(MaxpruneError, match="n_samples=51 exceeds the 50"):
        calibration_from_prepared(ds, 51, seed=0)
