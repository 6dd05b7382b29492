"""Tokenize a prepare's source files into their cached `BOS doc EOS` token streams.

Each source file `i` becomes `files/NNNNN.u32` in the staging dir (its documents
packed by `pack_documents`, little-endian uint32) plus `files/NNNNN.json`, its
provenance record {path, size, sha256, tokens, skip counts}, written last so it
marks the file done: a resumed prepare reads those records back instead of
re-tokenizing. Files run in parallel on `pool`; `shards.py` then cuts their
concatenation into sequences.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from maxprune.data import pool as pool_lib
from maxprune.data import sources
from maxprune.data.staging import FILES_DIR
from maxprune.data.tokenizer import Tokenizer
from maxprune.fs.atomic import write_json

_DOCS_PER_BATCH = 1024
_CHARS_PER_BATCH = 8 << 20


@dataclasses.dataclass(frozen=True)
class _FileJob:
    index: int
    path: str
    spec: str
    files_dir: str
    on_missing_field: str
    tokenizer: Tokenizer | None  # None in a worker process: it has `pool.worker_tokenizer()`


def tokenize_files(pool, spec, paths, tokenizer, staging, on_missing_field, progress) -> list[dict]:
    """Per-file records in sorted-file order; cached files are read back, not redone."""
    from tqdm import tqdm

    files_dir = staging / FILES_DIR
    records: list[dict | None] = [_cached(files_dir, i) for i in range(len(paths))]
    inline = tokenizer if pool is None else None  # workers got theirs once, at start
    todo = [_FileJob(i, p, str(spec), str(files_dir), on_missing_field, inline)
            for i, p in enumerate(paths) if records[i] is None]
    bar = tqdm(total=len(paths), initial=len(paths) - len(todo), desc="tokenize", unit="file",
               disable=not progress)
    tokens = sum(r["tokens"] for r in records if r)
    with bar:
        for record in pool_lib.completed(pool, _tokenize_file, todo):
            records[record["index"]] = record
            tokens += record["tokens"]
            bar.update(1)
            bar.set_postfix(tokens=f"{tokens:,}")
    return [{k: v for k, v in r.items() if k != "index"} for r in records]


def _cached(files_dir: Path, index: int) -> dict | None:
    record = files_dir / f"{index:05d}.json"
    return json.loads(record.read_text()) if record.is_file() else None


def _tokenize_file(job: _FileJob) -> dict:
    """Tokenize one file into files/NNNNN.u32 (its BOS doc EOS stream); the .json, written last, marks it
    done."""
    stats = sources.FileStats()
    stem = Path(job.files_dir) / f"{job.index:05d}"
    tmp = stem.with_suffix(".u32.tmp")
    tokens = 0
    docs = sources.iter_file(job.spec, job.path, stats=stats, on_missing_field=job.on_missing_field)
    with open(tmp, "wb") as f:
        for batch in _batches(docs):
            stream = pack_documents(job.tokenizer or pool_lib.worker_tokenizer(), [d.text for d in batch])
            stream.tofile(f)
            tokens += stream.size
    tmp.replace(stem.with_suffix(".u32"))
    size, _ = sources.file_info(job.path)
    record = {"index": job.index, "path": job.path, "size": size, "sha256": _sha256(job.path),
              "tokens": tokens, **dataclasses.asdict(stats)}
    write_json(stem.with_suffix(".json"), record)
    return record


def _batches(docs: Iterator[sources.Document]) -> Iterator[list[sources.Document]]:
    """Groups of documents sized for one `encode_batch` call (bounded in count and characters)."""
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc.text)
        if len(batch) >= _DOCS_PER_BATCH or chars >= _CHARS_PER_BATCH:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def pack_documents(tokenizer: Tokenizer, texts: Sequence[str]) -> np.ndarray:
    """`BOS ids EOS` for each text, concatenated: uint32 [sum(len(ids) + 2)]."""
    encoded = tokenizer.encode_batch(texts)
    lengths = np.array([len(ids) + 2 for ids in encoded], dtype=np.int64)
    ends = np.cumsum(lengths)
    stream = np.empty(int(ends[-1]) if len(ends) else 0, dtype="<u4")
    body = np.ones(stream.size, dtype=bool)
    body[ends - lengths] = body[ends - 1] = False
    stream[ends - lengths] = tokenizer.bos_id
    stream[ends - 1] = tokenizer.eos_id
    stream[body] = np.fromiter(itertools.chain.from_iterable(encoded), dtype="<u4",
                               count=int(stream.size - 2 * len(encoded)))
    return stream


def _sha256(path: str) -> str | None:
    if sources.is_dataset_unit(path):
        return None  # a dataset library's unit, not one file
    digest = hashlib.sha256()
    with sources.open_binary(path) as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()
