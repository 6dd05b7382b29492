"""Documents as one token stream, cut into windows: the perplexity protocol, and Minitron's calibration.

The stream is BOS once at the very start, then each document encoded on its
own with the join text (default ``"\\n\\n"``, as the Wanda/SparseGPT and HF
perplexity recipes join WikiText) prepended to every document but the first;
``join="eos"`` puts the EOS token between documents instead. Encoding per
document lets a streamed source (C4) stop as soon as the stream is long enough.
`windows` cuts it into non-overlapping windows from the start, tail dropped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import numpy as np

if TYPE_CHECKING:
    from maxprune.data.tokenizer import Tokenizer

_DOCS_PER_BATCH = 256


def token_stream(documents: Iterator[str], tokenizer: Tokenizer, max_tokens: int,
                 join: str = "\n\n") -> tuple[np.ndarray, int]:
    """(BOS + the documents joined by `join`, cut at `max_tokens`; documents read)."""
    pieces, total, docs = [np.array([tokenizer.bos_id], np.int32)], 1, 0
    for batch in _batches(documents, _DOCS_PER_BATCH):
        if join == "eos":
            encoded = tokenizer.encode_batch(batch)
            encoded = [ids if docs + i == 0 else [tokenizer.eos_id, *ids] for i, ids in enumerate(encoded)]
        else:
            encoded = tokenizer.encode_batch([t if docs + i == 0 else join + t for i, t in enumerate(batch)])
        for ids in encoded:
            pieces.append(np.asarray(ids, np.int32))
            total, docs = total + len(ids), docs + 1
            if total >= max_tokens:
                return np.concatenate(pieces)[:max_tokens], docs
    return np.concatenate(pieces), docs


def _batches(documents: Iterator[str], size: int) -> Iterator[list[str]]:
    batch = []
    for doc in documents:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def windows(stream: np.ndarray, seq_len: int, n_seqs: int) -> np.ndarray:
    """[n, seq_len] non-overlapping windows from the start of `stream`, n <= n_seqs."""
    n = min(n_seqs, len(stream) // seq_len)
    return stream[:n * seq_len].reshape(n, seq_len)
