"""Cut the cached token streams into seq_len-token sequences, written as ArrayRecord shards.

Shard `k` holds sequences `[k * per_shard, ...)` of the concatenated per-file
streams (`packing.py`), one record per sequence (seq_len little-endian uint32);
the final partial sequence is never written. Each shard job reads only its
slice of the cached files, so shards are written in parallel; each goes to a
temp name and is renamed, so a resumed prepare skips the shards already there
(and hashes them for the manifest).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from maxprune.data import pool as pool_lib
from maxprune.data.prepared import WRITER_OPTIONS
from maxprune.data.staging import FILES_DIR
from maxprune.fs import integrity

_SEQS_PER_READ = 256


@dataclasses.dataclass(frozen=True)
class _ShardJob:
    path: str
    first_sequence: int
    num_sequences: int
    seq_len: int
    files_dir: str
    file_tokens: tuple[int, ...]


def shard_name(index: int, num_shards: int) -> str:
    return f"seqs-{index:05d}-of-{num_shards:05d}.array_record"


def write_shards(pool, staging, file_tokens, num_sequences, seq_len, per_shard, progress) -> list[dict]:
    """Cut the stream into shards; each reads only its slice of the cached files, so they run in parallel."""
    from tqdm import tqdm

    num_shards = -(-num_sequences // per_shard)
    shards = [{"file": shard_name(k, num_shards), "first_sequence": k * per_shard,
               "num_sequences": min(per_shard, num_sequences - k * per_shard)} for k in range(num_shards)]
    jobs = [_ShardJob(str(staging / s["file"]), s["first_sequence"], s["num_sequences"], seq_len,
                      str(staging / FILES_DIR), tuple(file_tokens))
            for s in shards if not (staging / s["file"]).is_file()]
    digests = {}
    with tqdm(total=num_shards, initial=num_shards - len(jobs), desc="write", unit="shard",
              disable=not progress) as bar:
        for written in pool_lib.completed(pool, _write_shard, jobs):
            digests[written.pop("file")] = written
            bar.update(1)
    for s in shards:  # a shard an interrupted run wrote is hashed now
        s.update(digests.get(s["file"]) or integrity.digest(staging / s["file"]))
    return shards


def _write_shard(job: _ShardJob) -> dict:
    """Write one shard; returns its {file, size, sha256}, hashed while it is still in the page cache."""
    from array_record.python.array_record_module import ArrayRecordWriter

    tmp = f"{job.path}.tmp"
    writer = ArrayRecordWriter(tmp, WRITER_OPTIONS)
    stream = _TokenStream(job.files_dir, job.file_tokens)
    try:
        for first in range(job.first_sequence, job.first_sequence + job.num_sequences, _SEQS_PER_READ):
            count = min(_SEQS_PER_READ, job.first_sequence + job.num_sequences - first)
            tokens_NL = stream.read(first * job.seq_len, (first + count) * job.seq_len)
            for sequence_L in tokens_NL.reshape(count, job.seq_len):
                writer.write(sequence_L.tobytes())
    finally:
        writer.close()
    os.replace(tmp, job.path)
    return {"file": Path(job.path).name, **integrity.digest(job.path)}


class _TokenStream:
    """The concatenation of the cached per-file token arrays, read by global token offset."""

    def __init__(self, files_dir: str, file_tokens: Sequence[int]):
        self.files_dir = Path(files_dir)
        self.starts = np.concatenate([[0], np.cumsum(file_tokens)]).astype(np.int64)
        self.arrays: dict[int, np.ndarray] = {}

    def read(self, start: int, end: int) -> np.ndarray:
        parts = []
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        for index in range(first, len(self.starts) - 1):
            if self.starts[index] >= end:
                break
            lo, hi = max(start, self.starts[index]), min(end, self.starts[index + 1])
            if hi > lo:
                parts.append(self._array(index)[lo - self.starts[index]:hi - self.starts[index]])
        return np.concatenate(parts).astype("<u4", copy=False)

    def _array(self, index: int) -> np.ndarray:
        if index not in self.arrays:
            self.arrays[index] = np.memmap(self.files_dir / f"{index:05d}.u32", dtype="<u4", mode="r")
        return self.arrays[index]
