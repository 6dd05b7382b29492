"""Text sources: documents (str) out of local or remote files and dataset libraries.

A source is named by one string, so the CLI, configs and manifests can all
record it::

    txt:/corpus/*.txt                      one document per file
    jsonl:/dclm/*.jsonl.zst?field=text     one document per line (.jsonl, .jsonl.gz, .jsonl.zst)
    parquet:gs://bucket/c4/*.parquet?field=text
    arrayrecord:/data/*.array_record       records are UTF-8 text, or JSON objects (?field=)
    tfds:my_corpus?data_dir=/tfds&split=train      (or tfds:/path/to/builder/dir)
    hf:wikitext?config=wikitext-103-raw-v1&split=test
    hf:json?data_files=/data/*.jsonl&split=train   (a save_to_disk dir works too)

Without a `kind:` prefix the kind comes from the file extension. Globs expand
in sorted path order, so a source always yields the same documents in the same
order: the data stream, and so every token budget cut from it, is reproducible.
`gs://` and other remote paths go through `etils.epath`.

Bad data never crashes a long run: empty documents and bytes that are not
valid UTF-8 (or lines that are not valid JSON) are skipped and counted in
`FileStats`. A record without its text field is a configuration mistake and an
error by default (`on_missing_field="skip"` counts and skips it instead).
Missing files are errors that name the pattern.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import gzip
import io
import json
import os
import re
import urllib.parse
from typing import Any, Iterable, Iterator

from maxprune.errors import MaxpruneError

# kind -> file suffixes (for inference and for expanding a directory)
SUFFIXES: dict[str, tuple[str, ...]] = {
    "txt": (".txt",),
    "jsonl": (".jsonl", ".jsonl.gz", ".jsonl.zst", ".jsonl.zstd"),
    "parquet": (".parquet",),
    "arrayrecord": (".array_record", ".arrayrecord"),
    "tfds": (),
    "hf": (),
}
ALIASES = {"array_record": "arrayrecord", "text": "txt", "json": "jsonl", "datasets": "hf"}
# kind -> accepted `?key=value` options and their defaults (None: unset)
OPTIONS: dict[str, dict[str, str | None]] = {
    "txt": {},
    "jsonl": {"field": "text"},
    "parquet": {"field": "text"},
    "arrayrecord": {"field": "text", "format": "auto"},
    "tfds": {"field": "text", "split": "train", "data_dir": None},
    "hf": {"field": "text", "split": "train", "config": None, "streaming": "false",
           "data_files": None, "data_dir": None, "cache_dir": None},
}
ON_MISSING_FIELD = ("error", "skip")
_DATASET_KINDS = ("tfds", "hf")  # one unit each, not files
_QUERY = re.compile(r"\w+=[^&]*(&\w+=[^&]*)*")
_PREFIX = re.compile(r"([A-Za-z_]\w*):(?!//)(.*)", re.S)
_BATCH = 1024  # records read per call from random-access sources


@dataclasses.dataclass(frozen=True)
class Document:
    text: str
    source: str  # the file (or dataset unit) it came from
    index: int  # 0-based position within `source`: line, row or record number


@dataclasses.dataclass
class FileStats:
    """What one file gave; prepare records it per file in the manifest."""

    documents: int = 0
    skipped_empty: int = 0
    skipped_undecodable: int = 0
    skipped_missing_field: int = 0


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    kind: str
    path: str  # a file, glob or directory; or a dataset name for tfds/hf
    options: tuple[tuple[str, str], ...] = ()  # explicitly given options, sorted

    def option(self, name: str) -> str | None:
        return dict(self.options).get(name, OPTIONS[self.kind].get(name))

    def with_options(self, **options: str | None) -> SourceSpec:
        """A copy with these options set (None values are ignored)."""
        merged = dict(self.options) | {k: str(v) for k, v in options.items() if v is not None}
        return _validated(self.kind, self.path, merged, str(self))

    def __str__(self) -> str:
        query = urllib.parse.urlencode(self.options, safe="/:*,.-_~[]")
        return f"{self.kind}:{self.path}" + (f"?{query}" if query else "")


# ------------------------------------------------------------------ parsing
def parse_source(spec: str | SourceSpec) -> SourceSpec:
    """`kind:path?key=value&...` (kind optional for files) -> SourceSpec; errors name the spec."""
    if isinstance(spec, SourceSpec):
        return spec
    text = spec.strip()
    base, sep, query = text.rpartition("?")
    if not (sep and _QUERY.fullmatch(query)):
        base, query = text, ""
    kind, path = _split_kind(base, spec)
    if not path:
        raise MaxpruneError(f"source {spec!r} names no path or dataset")
    return _validated(kind, path, dict(urllib.parse.parse_qsl(query, keep_blank_values=True)), spec)


def _split_kind(base: str, spec: str) -> tuple[str, str]:
    match = _PREFIX.fullmatch(base)
    if match:
        kind = ALIASES.get(match[1].lower(), match[1].lower())
        if kind not in SUFFIXES:
            raise MaxpruneError(f"unknown source kind {match[1]!r} in {spec!r}; valid: "
                                f"{', '.join(SUFFIXES)}")
        return kind, match[2]
    for kind, suffixes in SUFFIXES.items():
        if base.lower().endswith(suffixes):
            return kind, base
    raise MaxpruneError(f"cannot tell the kind of source {spec!r} from its extension; prefix it "
                        f"with one of {', '.join(k + ':' for k in SUFFIXES)}")


def _validated(kind: str, path: str, options: dict[str, str], spec: str) -> SourceSpec:
    unknown = sorted(set(options) - set(OPTIONS[kind]))
    if unknown:
        valid = ", ".join(OPTIONS[kind]) or "none"
        raise MaxpruneError(f"unknown option {unknown[0]!r} for {kind} source {spec!r}; valid: {valid}")
    if kind == "arrayrecord" and options.get("format", "auto") not in ("auto", "text", "json"):
        raise MaxpruneError(f"format={options['format']!r} in {spec!r} must be auto, text or json")
    if kind == "hf" and options.get("streaming", "false").lower() not in ("true", "false", "1", "0"):
        raise MaxpruneError(f"streaming={options['streaming']!r} in {spec!r} must be true or false")
    return SourceSpec(kind, path, tuple(sorted(options.items())))


# ------------------------------------------------------------------ listing
def list_files(spec: str | SourceSpec) -> list[str]:
    """The source's files in sorted order (its single unit for tfds/hf): the unit of parallelism."""
    spec = parse_source(spec)
    if spec.kind in _DATASET_KINDS:
        return [str(spec)]
    pattern = spec.path
    paths = _expand_remote(pattern) if "://" in pattern else _expand_local(pattern, SUFFIXES[spec.kind])
    if not paths:
        what = "no files match" if glob.has_magic(pattern) else "no such file or directory:"
        raise MaxpruneError(f"{what} {pattern} (source {spec})")
    return sorted(paths)


def _expand_local(pattern: str, suffixes: tuple[str, ...]) -> list[str]:
    if os.path.isdir(pattern):  # a directory: its files of this kind
        files = glob.glob(os.path.join(pattern, "*"))
        return [p for p in files if p.endswith(suffixes) and os.path.isfile(p)]
    return [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]


def _expand_remote(pattern: str) -> list[str]:
    from etils import epath

    magic = re.search(r"[*?\[]", pattern)
    if not magic:
        return [pattern] if epath.Path(pattern).exists() else []
    base, _, _ = pattern[:magic.start()].rpartition("/")
    return [os.fspath(p) for p in epath.Path(base).glob(pattern[len(base) + 1:])]


def file_info(path: str) -> tuple[int | None, int | None]:
    """(size in bytes, mtime in ns) of a local or remote file; (None, None) for a dataset unit."""
    if is_dataset_unit(path):
        return None, None
    if "://" in path:
        from etils import epath
        stat = epath.Path(path).stat()
        return int(stat.length), int(getattr(stat, "mtime", 0) * 1e9)
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


def is_dataset_unit(path: str) -> bool:
    return path.startswith(tuple(k + ":" for k in _DATASET_KINDS))


def open_binary(path: str):
    if "://" in path:
        from etils import epath
        return epath.Path(path).open("rb")
    return open(path, "rb")


# ------------------------------------------------------------------ iteration
def iter_documents(spec: str | SourceSpec, *, on_missing_field: str = "error",
                   stats: dict[str, FileStats] | None = None) -> Iterator[Document]:
    """Every document of the source, files in sorted order; `stats` (if given) gets one entry per file."""
    spec = parse_source(spec)
    for path in list_files(spec):
        file_stats = FileStats() if stats is None else stats.setdefault(path, FileStats())
        yield from iter_file(spec, path, stats=file_stats, on_missing_field=on_missing_field)


def iter_file(spec: str | SourceSpec, path: str, *, stats: FileStats | None = None,
              on_missing_field: str = "error") -> Iterator[Document]:
    """The documents of one file (as listed by `list_files`), counting skips into `stats`."""
    spec = parse_source(spec)
    if on_missing_field not in ON_MISSING_FIELD:
        raise MaxpruneError(f"on_missing_field={on_missing_field!r} must be one of {ON_MISSING_FIELD}")
    stats = FileStats() if stats is None else stats
    reader = _READERS[spec.kind]
    texts = reader(spec, path, _FieldPolicy(spec.option("field") or "", on_missing_field, stats))
    for index, text in texts:
        if text is None:
            continue
        if not isinstance(text, str):
            text = _decode(text, stats)
            if text is None:
                continue
        elif not _is_encodable(text):  # lone surrogates, e.g. from JSON "\udc80" escapes
            stats.skipped_undecodable += 1
            continue
        if not text.strip():
            stats.skipped_empty += 1
            continue
        stats.documents += 1
        yield Document(text, path, index)


def _decode(data: bytes, stats: FileStats) -> str | None:
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        stats.skipped_undecodable += 1
        return None


def _is_encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


@dataclasses.dataclass
class _FieldPolicy:
    """Takes the text field out of a record, applying `on_missing_field`."""

    field: str
    on_missing: str
    stats: FileStats

    def text(self, record: Any, where: str) -> str | bytes | None:
        value = record.get(self.field) if isinstance(record, dict) else None
        if isinstance(value, (str, bytes)):
            return value
        if self.on_missing == "skip":
            self.stats.skipped_missing_field += 1
            return None
        keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
        raise MaxpruneError(f"{where}: no text field {self.field!r} (record has: {keys}); set "
                            f"?field=NAME in the source, or skip such records with on_missing_field=skip")


# ------------------------------------------------------------------ readers: yield (index, str|bytes|None)
def _read_txt(spec, path, policy) -> Iterator[tuple[int, Any]]:
    with open_binary(path) as f:
        yield 0, f.read()


def _read_jsonl(spec, path, policy) -> Iterator[tuple[int, Any]]:
    with open_binary(path) as raw, _decompressed(raw, path) as lines:
        for index, line in enumerate(_guarded(lines, path)):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:  # invalid JSON or invalid UTF-8 (UnicodeDecodeError is a ValueError)
                policy.stats.skipped_undecodable += 1
                continue
            yield index, policy.text(record, f"{path}:{index + 1}")


def _decompressed(raw, path: str):
    if path.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)
    if path.endswith((".zst", ".zstd")):
        import zstandard
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True))
    return contextlib.nullcontext(raw)


def _guarded(lines: Iterable[bytes], path: str) -> Iterator[bytes]:
    """Lines of a possibly compressed file; a corrupt stream is an error naming the file."""
    try:
        yield from lines
    except (OSError, EOFError) as e:  # gzip.BadGzipFile and zstandard.ZstdError are OSErrors
        raise MaxpruneError(f"{path} is corrupt or truncated: {e}") from e


def _read_parquet(spec, path, policy) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    with open_binary(path) as raw:
        table = pq.ParquetFile(raw)
        if policy.field not in table.schema_arrow.names:
            raise MaxpruneError(f"{path} has no column {policy.field!r} (columns: "
                                f"{', '.join(table.schema_arrow.names)}); set ?field=NAME in the source")
        index = 0
        for batch in table.iter_batches(batch_size=_BATCH, columns=[policy.field]):
            for value in batch.column(0).to_pylist():
                yield index, _count_null(value, policy.stats)
                index += 1


def _count_null(value, stats: FileStats):
    if value is None:
        stats.skipped_empty += 1
    return value


def _read_arrayrecord(spec, path, policy) -> Iterator[tuple[int, Any]]:
    from array_record.python.array_record_module import ArrayRecordReader

    fmt = spec.option("format")
    reader = ArrayRecordReader(path)
    try:
        total = reader.num_records()
        for start in range(0, total, _BATCH):
            for offset, record in enumerate(reader.read(start, min(start + _BATCH, total))):
                yield start + offset, _record_text(record, fmt, policy, f"{path}#{start + offset}")
    finally:
        reader.close()


def _record_text(record: bytes, fmt: str, policy: _FieldPolicy, where: str):
    """A record's text: raw UTF-8 (format=text), a JSON object's field (json), or either (auto)."""
    if fmt == "text" or (fmt == "auto" and not record.lstrip()[:1] == b"{"):
        return record
    try:
        parsed = json.loads(record)
    except ValueError:
        if fmt == "auto":
            return record  # text that merely starts with "{"
        policy.stats.skipped_undecodable += 1
        return None
    if fmt == "auto" and not isinstance(parsed, dict):
        return record
    return policy.text(parsed, where)


def _read_tfds(spec, path, policy) -> Iterator[tuple[int, Any]]:
    source = _tfds_source(spec)
    features = getattr(getattr(source, "dataset_info", None), "features", None)
    if features is not None and policy.field not in features:
        raise MaxpruneError(f"TFDS source {spec} has no feature {policy.field!r} (features: "
                            f"{', '.join(sorted(features))}); set ?field=NAME in the source")
    for start in range(0, len(source), _BATCH):
        batch = source.__getitems__(range(start, min(start + _BATCH, len(source))))
        for offset, example in enumerate(batch):
            yield start + offset, policy.text(example, f"{spec}#{start + offset}")


def _tfds_source(spec: SourceSpec):
    import tensorflow_datasets as tfds

    split, data_dir = spec.option("split"), spec.option("data_dir")
    try:
        if os.path.isdir(spec.path) or "://" in spec.path:  # a prepared builder directory
            return tfds.builder_from_directory(spec.path).as_data_source(split=split)
        return tfds.data_source(spec.path, split=split, data_dir=data_dir)
    except Exception as e:  # tfds raises many kinds; all mean "cannot load this dataset"
        raise MaxpruneError(f"cannot load TFDS source {spec}: {_first_line(e)} (TFDS without "
                            f"TensorFlow needs file_format=array_record)") from e


def _read_hf(spec, path, policy) -> Iterator[tuple[int, Any]]:
    dataset = _hf_dataset(spec)
    columns = getattr(dataset, "column_names", None)
    if columns is not None and policy.field not in columns:
        raise MaxpruneError(f"HF source {spec} has no column {policy.field!r} (columns: "
                            f"{', '.join(columns)}); set ?field=NAME in the source")
    for index, row in enumerate(dataset):
        yield index, policy.text(row, f"{spec}#{index}")


def _hf_dataset(spec: SourceSpec):
    import datasets

    split = spec.option("split")
    try:
        if os.path.isdir(spec.path) and any(os.path.exists(os.path.join(spec.path, name))
                                            for name in ("dataset_dict.json", "state.json")):
            dataset = datasets.load_from_disk(spec.path)  # a save_to_disk directory
            return dataset[split] if isinstance(dataset, datasets.DatasetDict) else dataset
        return datasets.load_dataset(
            spec.path, name=spec.option("config"), split=split,
            streaming=spec.option("streaming").lower() in ("true", "1"),
            data_files=spec.option("data_files"), data_dir=spec.option("data_dir"),
            cache_dir=spec.option("cache_dir"))
    except MaxpruneError:
        raise
    except Exception as e:  # hub, cache and format errors all mean "cannot load this dataset"
        raise MaxpruneError(f"cannot load HF source {spec}: {_first_line(e)}") from e


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


_READERS = {"txt": _read_txt, "jsonl": _read_jsonl, "parquet": _read_parquet,
            "arrayrecord": _read_arrayrecord, "tfds": _read_tfds, "hf": _read_hf}
