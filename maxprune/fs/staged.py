"""Output dirs written in a hidden sibling ``.NAME.partial`` and swapped into place when complete.

A killed writer leaves the sibling (removed, or resumed by `maxprune data
prepare`, on the next run), never a dir that looks complete. Every process of a
multi-host job calls `staging_dir` / `commit_dir` (they synchronise); process 0
does the file system work.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import jax

from maxprune.errors import MaxpruneError


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse to write into an existing non-empty dir unless `overwrite`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MaxpruneError(f"output path {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise MaxpruneError(f"output dir {path} exists and is not empty; pass --overwrite to replace it")
    return path


def staging_path(path: Path) -> Path:
    return path.parent / f".{path.name}.partial"


def staging_dir(path: Path) -> Path:
    """A fresh (emptied) staging sibling of `path` to write into before `commit_dir`."""
    tmp = staging_path(path)
    if jax.process_index() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    sync("maxprune-staging")
    return tmp


def commit_dir(tmp: Path, path: Path) -> None:
    """Move a finished staging dir into place (replacing `path` if present), on every process."""
    sync("maxprune-commit")
    if jax.process_index() == 0:
        swap_in(tmp, path)
    sync("maxprune-committed")


def swap_in(tmp: Path, path: Path) -> None:
    """Rename `tmp` to `path`; an existing `path` is renamed aside first and removed after."""
    old = path.parent / f".{path.name}.old"
    if path.exists():
        if old.exists():
            shutil.rmtree(old)
        path.rename(old)
    tmp.rename(path)
    if old.exists():
        shutil.rmtree(old)


def sync(name: str) -> None:
    """A barrier across the processes of a multi-host job (nothing on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
