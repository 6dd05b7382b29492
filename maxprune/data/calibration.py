"""Calibration token sets for the pruners: int32 [n_samples, seq_len].

Four ways to get one:
- `calibration_windows`: the Wanda/SparseGPT recipe (their `get_c4`/`get_wikitext2`
  loaders), reproduced draw for draw with Python's `random` so a seed means what it
  means there: pick a random document, retry until it is longer than seq_len
  tokens (tokenized with BOS, as the Llama tokenizer does by default), then take a
  random window of it.
- `calibration_stream`: the first windows of the documents joined as one stream
  (Minitron's scripts, which score WikiText-103 like a perplexity corpus).
- `load_calibration_npy`: a user's own token array, validated before a pruner
  runs for an hour on garbage.
- `calibration_from_prepared`: random packed sequences of a prepared dataset (the
  MaxText way: calibrate on what the model trains on).
"""

from __future__ import annotations

import os
import random

import numpy as np

from maxprune.config import at_least
from maxprune.data.sources import iter_documents
from maxprune.data.stream import token_stream, windows
from maxprune.errors import MaxpruneError


def calibration_windows(source_spec, tokenizer, n_samples: int, seq_len: int, seed: int) -> np.ndarray:
    """`n_samples` random `seq_len`-token windows of the source's long documents, int32 [n, L].

    Mirrors the reference loop exactly::

        random.seed(seed)
        for _ in range(n_samples):
            while True:
                i = random.randint(0, len(docs) - 1)
                ids = tokenize(docs[i])
                if len(ids) > seq_len: break
            j = random.randint(0, len(ids) - seq_len - 1)
            take ids[j:j + seq_len]

    Documents are tokenized only when drawn (a C4 shard has 356k of them); one that
    cannot reach seq_len tokens even at one byte per token is never tokenized.
    """

    _check_positive(n_samples=n_samples, seq_len=seq_len)
    texts = [document.text for document in iter_documents(source_spec)]
    if not texts:
        raise MaxpruneError(f"source {source_spec} has no documents")
    windows = _WindowDrawer(texts, tokenizer, seq_len, source_spec)
    rng = random.Random(seed)
    return np.stack([windows.draw(rng) for _ in range(n_samples)]).astype(np.int32)


def calibration_stream(source_spec, tokenizer, n_samples: int, seq_len: int) -> np.ndarray:
    """The first `n_samples` `seq_len`-token windows of the source's joined stream, int32 [n, L].

    How Minitron's scripts draw their calibration set: the documents joined as a
    perplexity stream (`maxprune.data.stream`: BOS once, ``"\\n\\n"`` between
    documents) and cut into consecutive windows. Short-document corpora such as
    WikiText-103, whose rows cannot fill a random 8192-token window, work this way.
    """

    _check_positive(n_samples=n_samples, seq_len=seq_len)
    stream, _ = token_stream((d.text for d in iter_documents(source_spec)), tokenizer, n_samples * seq_len)
    if len(stream) < n_samples * seq_len:
        raise MaxpruneError(f"source {source_spec} gives a stream of {len(stream):,} tokens, fewer than the "
                            f"{n_samples} x {seq_len} = {n_samples * seq_len:,} that prune.n_samples x prune.seq_len "
                            f"need; lower either or give a larger source")
    return windows(stream, seq_len, n_samples).astype(np.int32)


class _WindowDrawer:
    """The reference's inner loop, with a cache of tokenized documents and a dead-end check.

    The reference loops forever when no document is long enough; here, once every
    document has been drawn and none qualified, it is an error that says so.
    """

    def __init__(self, texts: list[str], tokenizer, seq_len: int, source_spec):
        self.texts, self.tokenizer, self.seq_len = texts, tokenizer, seq_len
        self.source_spec = source_spec
        self.ids: dict[int, np.ndarray] = {}
        # A byte-level BPE token covers >= 1 byte, so this bounds a document's length.
        self.possible = sum(len(text.encode()) + 1 > seq_len for text in texts)
        self.tried = self.qualifying = 0  # among the possible ones
        if not self.possible:
            self._fail()

    def draw(self, rng: random.Random) -> np.ndarray:
        while True:
            i = rng.randint(0, len(self.texts) - 1)
            ids = self._tokens(i)
            if len(ids) > self.seq_len:
                break
            if self.qualifying == 0 and self.tried == self.possible:
                self._fail()
        j = rng.randint(0, len(ids) - self.seq_len - 1)
        return ids[j:j + self.seq_len]

    def _tokens(self, i: int) -> np.ndarray:
        if i not in self.ids:
            text = self.texts[i]
            ids = np.zeros(0, np.int32)
            if len(text.encode()) + 1 > self.seq_len:
                ids = np.asarray(self.tokenizer.encode(text, bos=True), np.int32)
                self.tried += 1
                self.qualifying += len(ids) > self.seq_len
            self.ids[i] = ids
        return self.ids[i]

    def _fail(self):
        longest = max((len(ids) for ids in self.ids.values()), default=0)
        raise MaxpruneError(
            f"0 of {len(self.texts)} documents in {self.source_spec} are longer than "
            f"seq_len={self.seq_len} tokens (longest tokenized: {longest}); use a smaller "
            f"seq_len or a source with longer documents")


def load_calibration_npy(path: str | os.PathLike, vocab_size: int, seq_len: int | None = None) -> np.ndarray:
    """A user's int token array [n, L] from a .npy file, checked; int32 [n, seq_len or L].

    With `seq_len`, rows must have at least that many tokens and are cut to it.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MaxpruneError(f"calibration file {path} does not exist")
    try:
        tokens = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise MaxpruneError(f"calibration file {path} is not a readable .npy array: {e}") from e
    if not np.issubdtype(tokens.dtype, np.integer):
        raise MaxpruneError(f"calibration file {path} has dtype {tokens.dtype}; token ids must be "
                            f"an integer dtype (e.g. int32)")
    if tokens.ndim != 2 or 0 in tokens.shape:
        raise MaxpruneError(f"calibration file {path} has shape {tokens.shape}; expected a "
                            f"non-empty 2-D [n_samples, seq_len] array")
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab_size:
        raise MaxpruneError(f"calibration file {path} has token ids in [{low}, {high}]; they must "
                            f"be in [0, {vocab_size}) for vocab_size={vocab_size}")
    if seq_len is not None:
        if tokens.shape[1] < seq_len:
            raise MaxpruneError(f"calibration file {path} has {tokens.shape[1]} tokens per sample; "
                                f"seq_len={seq_len} needs at least that many")
        tokens = tokens[:, :seq_len]
    return tokens.astype(np.int32)


def calibration_from_prepared(dataset, n_samples: int, seed: int) -> np.ndarray:
    """`n_samples` distinct random packed sequences of a PreparedDataset, int32 [n, L]."""
    _check_positive(n_samples=n_samples)
    if n_samples > len(dataset):
        raise MaxpruneError(f"n_samples={n_samples} exceeds the {len(dataset)} sequences of the "
                            f"prepared dataset")
    picks = np.random.default_rng(seed).choice(len(dataset), size=n_samples, replace=False)
    return np.stack([np.asarray(dataset[int(i)]) for i in picks]).astype(np.int32)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        at_least(f"{name}", value, 1)
