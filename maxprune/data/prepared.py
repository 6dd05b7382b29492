"""A prepared dataset on disk: its manifest, and random access to its sequences.

Output dir of `prepare`::

    seqs-00000-of-000NN.array_record   records = one sequence, seq_len little-endian uint32
    manifest.json                      sizes, tokenizer identity, per-file provenance, per-shard
                                       size and sha256; "complete" last

Integrity: `open_prepared` checks each shard's size against the manifest
(cheap; catches truncation), a corrupt record (riegeli's chunk checksums) is a
`MaxpruneError` naming its shard at read time, and `PreparedDataset.verify`
(`maxprune data inspect --verify`) hashes every shard in full, which is too slow
to do at every open at paper scale. Datasets prepared before shard hashes were
recorded open with no shard checks.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from maxprune.data.tokenizer import Tokenizer
from maxprune.errors import MaxpruneError
from maxprune.fs import integrity
from maxprune.fs.staged import staging_path

MANIFEST_FILE = "manifest.json"
DTYPE = "uint32"
WRITER_OPTIONS = "group_size:1"  # one record per chunk: cheap random access (zstd by default)
WHAT = "prepared dataset"  # how integrity errors name the thing
_READ_ERRORS = (RuntimeError, OSError)  # what the ArrayRecord reader raises for a corrupt or unreadable shard


@dataclasses.dataclass
class Manifest:
    """manifest.json: what a prepared dataset holds and where it came from.

    `files`: per source file {path, size, sha256, documents, tokens, skipped_empty,
    skipped_undecodable, skipped_missing_field}. `shards`: {file, num_sequences,
    first_sequence, size, sha256} in stream order (no size/sha256 in datasets
    prepared before they were recorded).
    """

    seq_len: int
    num_sequences: int
    num_tokens: int  # num_sequences * seq_len
    tokens_dropped: int  # the final partial sequence
    dtype: str
    tokenizer: dict[str, Any]  # {name, hash, vocab_size, bos_id, eos_id}
    source: str
    files: list[dict[str, Any]]
    shards: list[dict[str, Any]]
    created: str
    code_version: str
    writer_options: str = WRITER_OPTIONS
    complete: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # field order keeps "complete" last

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @property
    def documents(self) -> int:
        return sum(f["documents"] for f in self.files)


class PreparedDataset:
    """Random access to a prepared dataset's sequences by global index: int32 [seq_len].

    Picklable (readers reopen lazily), with `__getitems__` for batched reads, so it
    serves directly as a grain `RandomAccessDataSource`.
    """

    def __init__(self, path: str | os.PathLike, manifest: Manifest):
        self.path = Path(path)
        self.manifest = manifest
        self._source = None

    @property
    def seq_len(self) -> int:
        return self.manifest.seq_len

    @property
    def shard_paths(self) -> list[Path]:
        return [self.path / s["file"] for s in self.manifest.shards]

    def __len__(self) -> int:
        return self.manifest.num_sequences

    def __getitem__(self, index: int) -> np.ndarray:
        index = self._checked(index)
        try:
            record = self._reader()[index]
        except _READ_ERRORS as e:
            raise self._corrupt(index, str(e)) from e
        return self._decode(record, index)

    def __getitems__(self, indices: Sequence[int]) -> list[np.ndarray]:
        indices = [self._checked(i) for i in indices]
        try:
            records = self._reader().__getitems__(indices)
        except _READ_ERRORS:
            for index in indices:  # one at a time, to name the shard that fails
                self[index]
            raise
        return [self._decode(r, i) for r, i in zip(records, indices)]

    def verify(self) -> int:
        """Check every shard's size and full sha256 against the manifest (reads the whole dataset).

        Returns how many shards were checked: 0 for a dataset prepared before shard hashes were recorded.
        """
        files = {s["file"]: s for s in self.manifest.shards if "sha256" in s}
        integrity.verify(self.path, files, WHAT)
        return len(files)

    def check_tokenizer(self, tokenizer: str | Tokenizer) -> None:
        """Refuse a model whose tokenizer differs from the one that made these ids."""
        expected = tokenizer.hash if isinstance(tokenizer, Tokenizer) else tokenizer
        have = self.manifest.tokenizer["hash"]
        if have != expected:
            raise MaxpruneError(f"prepared dataset {self.path} was tokenized with tokenizer {have[:8]} "
                                f"({self.manifest.tokenizer['name']}) but the model uses {expected[:8]}")

    def __getstate__(self):
        return {"path": self.path, "manifest": self.manifest}

    def __setstate__(self, state):
        self.__init__(state["path"], state["manifest"])

    def __repr__(self) -> str:
        return (f"PreparedDataset({str(self.path)!r}, {len(self)} x {self.seq_len} tokens, "
                f"tokenizer {self.manifest.tokenizer['name']})")

    def _checked(self, index: int) -> int:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"sequence {index} out of range for {len(self)} sequences in {self.path}")
        return index % len(self)

    def _reader(self):
        if self._source is None:
            from array_record.python.array_record_data_source import ArrayRecordDataSource
            # "path[0:n]" tells the reader each shard's size, so opening reads no file.
            self._source = ArrayRecordDataSource(
                [f"{self.path / s['file']}[0:{s['num_sequences']}]" for s in self.manifest.shards])
        return self._source

    def _decode(self, record: bytes, index: int) -> np.ndarray:
        tokens_L = np.frombuffer(record, dtype="<u4")
        if tokens_L.size != self.seq_len:
            raise self._corrupt(index, f"the record holds {tokens_L.size} tokens, not seq_len={self.seq_len}")
        return tokens_L.astype(np.int32)

    def _corrupt(self, index: int, why: str) -> MaxpruneError:
        starts = [s["first_sequence"] for s in self.manifest.shards]
        shard = self.manifest.shards[bisect.bisect_right(starts, index) - 1]["file"]
        return MaxpruneError(f"prepared dataset shard {self.path / shard} is corrupt: {why} (reading "
                             f"sequence {index}; `maxprune data inspect --verify {self.path}` checks all shards)")


def open_prepared(path: str | os.PathLike) -> PreparedDataset:
    """Open a complete prepared dataset; an interrupted or foreign dir, a missing shard or one whose size
    differs from the manifest (truncated?) is an error that says so."""
    path = Path(path)
    if not path.is_dir():
        hint = (f"; an interrupted prepare left {staging_path(path.absolute())}: rerun the same "
                f"`maxprune data prepare` to resume it" if staging_path(path.absolute()).exists() else "")
        raise MaxpruneError(f"no prepared dataset at {path}{hint}")
    manifest = read_manifest(path)
    missing = [s["file"] for s in manifest.shards if not (path / s["file"]).is_file()]
    if missing:
        raise MaxpruneError(f"prepared dataset {path} is missing shard {missing[0]} "
                            f"({len(missing)} of {len(manifest.shards)} missing)")
    for shard in manifest.shards:
        if "size" in shard:  # absent in datasets prepared before shard sizes were recorded
            integrity.check(path, shard["file"], shard, WHAT, content=False)
    return PreparedDataset(path, manifest)


def read_manifest(path: Path) -> Manifest:
    file = path / MANIFEST_FILE
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        data = {}
    if data.get("complete") is not True:
        raise MaxpruneError(f"incomplete prepared dataset {path}: {MANIFEST_FILE} is missing or not "
                            f"marked complete (was its prepare interrupted?)")
    return Manifest.from_dict(data)
