"""Tokenize a source once into fixed-length sequences: the stream every token budget is cut from.

The stream is `BOS doc EOS BOS doc EOS ...` over the source's documents in
sorted-file order, split into `seq_len`-token sequences; the final partial
sequence is dropped (and counted). Sequence `i` of the stream is global index
`i`, so budgets are plain index ranges (`budgets.py`) and "disjoint" and
"union" mean exactly that.

Output dir::

    seqs-00000-of-000NN.array_record   records = one sequence, seq_len little-endian uint32
    manifest.json                      sizes, tokenizer identity, per-file provenance, per-shard
                                       size and sha256; "complete" last

Work happens in a hidden sibling `.OUT.partial/` that is renamed into place
only when complete. It is resumable: each source file's tokens are cached there
(`files/NNNNN.u32` + `.json`) and each shard is written to a temp name and
renamed, so a killed prepare re-run with the same arguments redoes only the
unfinished files and shards. Files are tokenized in parallel, but the stream
order is the sorted file order whatever the worker scheduling.

Integrity: `open_prepared` checks each shard's size against the manifest
(cheap; catches truncation), a corrupt record (riegeli's chunk checksums) is a
`MaxpruneError` naming its shard at read time, and `PreparedDataset.verify`
(`maxprune data inspect --verify`) hashes every shard in full, which is too slow
to do at every open at paper scale. Datasets prepared before shard hashes were
recorded open with no shard checks.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import contextlib
import dataclasses
import datetime
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from maxprune import __version__, integrity
from maxprune.data import sources
from maxprune.data.tokenizer import Tokenizer
from maxprune.errors import MaxpruneError

MANIFEST_FILE = "manifest.json"
STATE_FILE = "prepare.json"  # in the staging dir: the arguments a resume must match
FILES_DIR = "files"
DTYPE = "uint32"
WRITER_OPTIONS = "group_size:1"  # one record per chunk: cheap random access (zstd by default)
SHARD_BYTES = 1 << 30  # default shard size: ~1 GiB of tokens
_DOCS_PER_BATCH = 1024
_CHARS_PER_BATCH = 8 << 20
_SEQS_PER_READ = 256
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


# ====================================================================== prepare
def prepare(source_spec: str | sources.SourceSpec, tokenizer: Tokenizer, out_dir: str | os.PathLike,
            seq_len: int, *, workers: int | None = None, overwrite: bool = False,
            on_missing_field: str = "error", text_field: str | None = None,
            sequences_per_shard: int | None = None, progress: bool = True) -> Manifest:
    """Tokenize `source_spec` into `out_dir` as seq_len-token ArrayRecord sequences; resumable.

    workers: processes tokenizing files (and writing shards) in parallel;
    default one per CPU, at most one per file. sequences_per_shard: default ~1 GiB.
    """
    spec = _check_args(source_spec, text_field, seq_len, on_missing_field, workers, sequences_per_shard)
    out = Path(out_dir).absolute()
    _check_output(out, overwrite)
    paths = [_absolute(p) for p in sources.list_files(spec)]
    per_shard = sequences_per_shard or max(1, SHARD_BYTES // (4 * seq_len))
    state = {"source": str(spec), "tokenizer": tokenizer.hash, "seq_len": seq_len,
             "on_missing_field": on_missing_field, "sequences_per_shard": per_shard,
             "code_version": __version__, "files": [[p, *sources.file_info(p)] for p in paths]}
    staging = _open_staging(out, state, progress)
    if not _is_complete(staging):
        workers = min(workers or os.cpu_count() or 1, len(paths))
        with _executor(workers, tokenizer) as pool:
            manifest = _build(pool, spec, paths, tokenizer, staging, seq_len, per_shard, on_missing_field,
                              progress)
        _write_json(staging / MANIFEST_FILE, manifest.to_dict())
    _commit(staging, out, overwrite)
    return _read_manifest(out)


def _build(pool, spec, paths, tokenizer, staging, seq_len, per_shard, on_missing_field, progress) -> Manifest:
    """Tokenize the files, then cut their concatenated streams into shards."""
    files = _tokenize_files(pool, spec, paths, tokenizer, staging, on_missing_field, progress)
    total = sum(f["tokens"] for f in files)
    num_sequences = total // seq_len
    if num_sequences == 0:
        raise MaxpruneError(f"source {spec} gives {total} tokens, fewer than one sequence of "
                            f"seq_len={seq_len}")
    shards = _write_shards(pool, staging, [f["tokens"] for f in files], num_sequences, seq_len, per_shard,
                           progress)
    return Manifest(seq_len=seq_len, num_sequences=num_sequences, num_tokens=num_sequences * seq_len,
                    tokens_dropped=total - num_sequences * seq_len, dtype=DTYPE, tokenizer=tokenizer.info(),
                    source=str(spec), files=files, shards=shards, created=_now(), code_version=__version__,
                    complete=True)


def _check_args(source_spec, text_field, seq_len, on_missing_field, workers, sequences_per_shard):
    spec = sources.parse_source(source_spec)
    if text_field is not None:
        if "field" not in sources.OPTIONS[spec.kind]:
            raise MaxpruneError(f"--text-field does not apply to {spec.kind} source {spec}")
        spec = spec.with_options(field=text_field)
    if not isinstance(seq_len, int) or seq_len <= 1:
        raise MaxpruneError(f"seq_len={seq_len} must be an integer > 1 (the paper uses 8192)")
    if on_missing_field not in sources.ON_MISSING_FIELD:
        raise MaxpruneError(f"on_missing_field={on_missing_field!r} must be one of "
                            f"{', '.join(sources.ON_MISSING_FIELD)}")
    if workers is not None and workers < 1:
        raise MaxpruneError(f"workers={workers} must be >= 1")
    if sequences_per_shard is not None and sequences_per_shard < 1:
        raise MaxpruneError(f"sequences_per_shard={sequences_per_shard} must be >= 1")
    return spec


# ---------------------------------------------------------------- staging / commit
def staging_path(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def _check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise MaxpruneError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MaxpruneError(f"output dir {out} exists and is not empty; pass --overwrite to replace it")


def _open_staging(out: Path, state: dict, progress: bool) -> Path:
    """The staging dir: resumed if it was made with the same arguments, else started afresh."""
    staging = staging_path(out)
    state_file = staging / STATE_FILE
    if staging.exists():
        previous = json.loads(state_file.read_text()) if state_file.is_file() else None
        if previous == json.loads(json.dumps(state)):
            _say(f"resuming the interrupted prepare in {staging}", progress)
        else:
            _say(f"discarding {staging}: it was started with other arguments or inputs", progress)
            shutil.rmtree(staging)
    (staging / FILES_DIR).mkdir(parents=True, exist_ok=True)
    if not state_file.is_file():
        _write_json(state_file, state)
    return staging


def _is_complete(staging: Path) -> bool:
    manifest = staging / MANIFEST_FILE
    return manifest.is_file() and json.loads(manifest.read_text()).get("complete") is True


def _commit(staging: Path, out: Path, overwrite: bool) -> None:
    """Drop the caches and rename the finished staging dir into place (replacing `out` if asked)."""
    _check_output(out, overwrite)  # again: something may have appeared meanwhile
    shutil.rmtree(staging / FILES_DIR, ignore_errors=True)  # the state file stays until the rename: resumable
    old = out.parent / f".{out.name}.old"
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    staging.rename(out)
    (out / STATE_FILE).unlink(missing_ok=True)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- tokenize files
@dataclasses.dataclass(frozen=True)
class _FileJob:
    index: int
    path: str
    spec: str
    files_dir: str
    on_missing_field: str
    tokenizer: Tokenizer | None  # None in a worker process: it has `_worker_tokenizer`


def _tokenize_files(pool, spec, paths, tokenizer, staging, on_missing_field, progress) -> list[dict]:
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
        for record in _completed(pool, _tokenize_file, todo):
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
            stream = pack_documents(job.tokenizer or _worker_tokenizer, [d.text for d in batch])
            stream.tofile(f)
            tokens += stream.size
    tmp.replace(stem.with_suffix(".u32"))
    size, _ = sources.file_info(job.path)
    record = {"index": job.index, "path": job.path, "size": size, "sha256": _sha256(job.path),
              "tokens": tokens, **dataclasses.asdict(stats)}
    _write_json(stem.with_suffix(".json"), record)
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


# ---------------------------------------------------------------- write shards
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


def _write_shards(pool, staging, file_tokens, num_sequences, seq_len, per_shard, progress) -> list[dict]:
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
        for written in _completed(pool, _write_shard, jobs):
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


# ---------------------------------------------------------------- executors
_worker_tokenizer: Tokenizer | None = None  # in a worker process, set once by _init_worker


def _executor(workers: int, tokenizer: Tokenizer):
    """Processes for workers > 1, else None (inline).

    Spawned, not forked: the parent may be running JAX threads. Callers of
    `prepare` with workers > 1 from a script need the `if __name__ == "__main__":` guard.
    """
    if workers == 1:
        return contextlib.nullcontext(None)
    return concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
        initargs=(tokenizer,))


def _init_worker(tokenizer: Tokenizer) -> None:
    """Runs once per worker: the tokenizer (~9 MB for Llama-3) is shipped once, not with every file."""
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    _worker_tokenizer = tokenizer


def _completed(pool, fn, jobs) -> Iterator[Any]:
    """fn(job) for each job, in completion order; inline when `pool` is None. A failure cancels the rest."""
    if pool is None:
        yield from map(fn, jobs)
        return
    futures = [pool.submit(fn, job) for job in jobs]
    try:
        for future in concurrent.futures.as_completed(futures):
            yield future.result()
    finally:
        for future in futures:
            future.cancel()


# ====================================================================== reading
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
    manifest = _read_manifest(path)
    missing = [s["file"] for s in manifest.shards if not (path / s["file"]).is_file()]
    if missing:
        raise MaxpruneError(f"prepared dataset {path} is missing shard {missing[0]} "
                            f"({len(missing)} of {len(manifest.shards)} missing)")
    for shard in manifest.shards:
        if "size" in shard:  # absent in datasets prepared before shard sizes were recorded
            integrity.check(path, shard["file"], shard, WHAT, content=False)
    return PreparedDataset(path, manifest)


def _read_manifest(path: Path) -> Manifest:
    file = path / MANIFEST_FILE
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        data = {}
    if data.get("complete") is not True:
        raise MaxpruneError(f"incomplete prepared dataset {path}: {MANIFEST_FILE} is missing or not "
                            f"marked complete (was its prepare interrupted?)")
    return Manifest.from_dict(data)


# ---------------------------------------------------------------- helpers
def _write_json(path: Path, data: dict) -> None:
    """Write-then-rename, so a reader never sees half a JSON file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def _absolute(path: str) -> str:
    return path if "://" in path or sources.is_dataset_unit(path) else os.path.abspath(path)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _say(message: str, progress: bool) -> None:
    if progress:
        from tqdm import tqdm
        tqdm.write(f"maxprune: {message}", file=sys.stderr)
