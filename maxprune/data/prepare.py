"""Tokenize a source once into fixed-length sequences: the stream every token budget is cut from.

The stream is `BOS doc EOS BOS doc EOS ...` over the source's documents in
sorted-file order, split into `seq_len`-token sequences; the final partial
sequence is dropped (and counted). Sequence `i` of the stream is global index
`i`, so budgets are plain index ranges (`budgets.py`) and "disjoint" and
"union" mean exactly that.

`prepare` runs the flow; each step lives in its own module:

    staging.py    open the hidden `.OUT.partial/` work dir (resumed if the arguments match)
    packing.py    tokenize each source file into a cached `files/NNNNN.u32` token stream
    shards.py     cut the concatenated streams into ArrayRecord shards of seq_len sequences
    prepared.py   manifest.json, and `open_prepared` / `PreparedDataset` to read the result
    pool.py       the spawned worker processes files and shards run on

It is resumable: each source file's tokens are cached in the staging dir and
each shard is written to a temp name and renamed, so a killed prepare re-run
with the same arguments redoes only the unfinished files and shards; the staging
dir is renamed into place only when complete. Files are tokenized in parallel,
but the stream order is the sorted file order whatever the worker scheduling.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

from maxprune import __version__
from maxprune.config import at_least
from maxprune.data import pool as pool_lib
from maxprune.data import sources
from maxprune.data.packing import tokenize_files
from maxprune.data.prepared import (
    DTYPE,
    MANIFEST_FILE,
    Manifest,
    read_manifest,
)
from maxprune.data.shards import write_shards
from maxprune.data.staging import commit, open_staging
from maxprune.data.tokenizer import Tokenizer
from maxprune.errors import MaxpruneError
from maxprune.fs.atomic import write_json
from maxprune.fs.staged import check_output_dir

SHARD_BYTES = 1 << 30  # default shard size: ~1 GiB of tokens


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
    check_output_dir(out, overwrite)
    paths = [_absolute(p) for p in sources.list_files(spec)]
    per_shard = sequences_per_shard or max(1, SHARD_BYTES // (4 * seq_len))
    state = {"source": str(spec), "tokenizer": tokenizer.hash, "seq_len": seq_len,
             "on_missing_field": on_missing_field, "sequences_per_shard": per_shard,
             "code_version": __version__, "files": [[p, *sources.file_info(p)] for p in paths]}
    staging = open_staging(out, state, progress)
    if not _is_complete(staging):
        workers = min(workers or os.cpu_count() or 1, len(paths))
        with pool_lib.executor(workers, tokenizer) as pool:
            manifest = _build(pool, spec, paths, tokenizer, staging, seq_len, per_shard, on_missing_field,
                              progress)
        write_json(staging / MANIFEST_FILE, manifest.to_dict())
    commit(staging, out, overwrite)
    return read_manifest(out)


def _build(pool, spec, paths, tokenizer, staging, seq_len, per_shard, on_missing_field, progress) -> Manifest:
    """Tokenize the files, then cut their concatenated streams into shards."""
    files = tokenize_files(pool, spec, paths, tokenizer, staging, on_missing_field, progress)
    total = sum(f["tokens"] for f in files)
    num_sequences = total // seq_len
    if num_sequences == 0:
        raise MaxpruneError(f"source {spec} gives {total} tokens, fewer than one sequence of "
                            f"seq_len={seq_len}")
    shards = write_shards(pool, staging, [f["tokens"] for f in files], num_sequences, seq_len, per_shard,
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
    if workers is not None:
        at_least("workers", workers, 1)
    if sequences_per_shard is not None:
        at_least("sequences_per_shard", sequences_per_shard, 1)
    return spec


def _is_complete(staging: Path) -> bool:
    manifest = staging / MANIFEST_FILE
    return manifest.is_file() and json.loads(manifest.read_text()).get("complete") is True


def _absolute(path: str) -> str:
    return path if "://" in path or sources.is_dataset_unit(path) else os.path.abspath(path)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
