"""The model directory: the one artefact every stage reads and writes.

Layout::

    arch.json          the Arch
    params/            orbax checkpoint of the params pytree
    masks/             orbax checkpoint of the masks pytree (sparse models only)
    provenance.json    parent, method, pattern, ratio, tokens seen, config, code version
    tokenizer/         tokenizer files, when known (optional)
    manifest.json      {"files": {relative path: {size, sha256}}} of every file above; written last

A model dir is written into a hidden sibling and renamed into place at the
end, so an interrupted write never leaves something that looks complete.
Loading restores each array straight into its sharding on a given mesh, so
no host ever holds the whole model first.

Integrity: `load_model_dir` checks every file against manifest.json (a
truncated, edited, missing or stray file is an error naming it); `read_arch`
and `read_provenance` check their one file. Dirs written before manifests
existed have no manifest.json and load unchecked. Extra files written with
the model (`extra_files`, e.g. prune_report.json) are covered; files added
next to a finished model later are not, and allowed; an unlisted file inside
params/, masks/ or tokenizer/ is an error.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from maxprune import __version__, sharding
from maxprune.errors import MaxpruneError
from maxprune.fs import integrity
from maxprune.fs.staged import check_output_dir, commit_dir, staging_dir, sync
from maxprune.model import masks as masks_lib
from maxprune.model.arch import Arch

ARCH_FILE = "arch.json"
PROVENANCE_FILE = "provenance.json"
PARAMS_DIR = "params"
MASKS_DIR = "masks"
TOKENIZER_DIR = "tokenizer"
WHAT = "model dir"  # how integrity errors name the thing


@dataclasses.dataclass
class ModelDir:
    arch: Arch
    params: dict
    masks: dict | None
    provenance: dict[str, Any]
    path: Path

    @property
    def tokenizer_dir(self) -> Path | None:
        tok = self.path / TOKENIZER_DIR
        return tok if tok.is_dir() else None


# -------------------------------------------------------------------- outputs
def _write_json(path: Path, data: dict) -> None:
    if jax.process_index() == 0:
        path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


# ---------------------------------------------------------------------- save
def save_model_dir(path: str | os.PathLike, arch: Arch, params: dict, masks: dict | None = None,
                   provenance: dict | None = None, overwrite: bool = False,
                   tokenizer_dir: str | os.PathLike | None = None, extra_files: dict[str, str] | None = None) -> Path:
    """Write a model dir; refuses a non-empty `path` unless `overwrite`.

    `extra_files` ({name: text}, e.g. a pruning report) are written into the
    staging dir too, so they are covered by the manifest and the atomic rename.
    """
    path = check_output_dir(path, overwrite).absolute()
    masks_lib.validate_masks(params, masks)
    tmp = staging_dir(path)
    try:
        _write_contents(tmp, arch, params, masks, provenance, tokenizer_dir, extra_files or {})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_dir(tmp, path)
    return path


def _write_contents(tmp: Path, arch, params, masks, provenance, tokenizer_dir, extra_files) -> None:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp / PARAMS_DIR, params)
    if masks:
        checkpointer.save(tmp / MASKS_DIR, masks)
    checkpointer.wait_until_finished()
    _write_json(tmp / ARCH_FILE, arch.to_dict())
    record = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "code_version": __version__, **(provenance or {})}
    _write_json(tmp / PROVENANCE_FILE, record)
    if tokenizer_dir is not None and jax.process_index() == 0:
        shutil.copytree(tokenizer_dir, tmp / TOKENIZER_DIR)
    for name, text in extra_files.items():
        if jax.process_index() == 0:
            (tmp / name).write_text(text)
    sync("maxprune-written")  # every host's orbax files are in place before process 0 hashes them
    if jax.process_index() == 0:
        integrity.write(tmp)  # last: a staging dir with a manifest is otherwise complete


# ---------------------------------------------------------------------- load
def read_arch(path: str | os.PathLike) -> Arch:
    """The Arch of a model dir; arch.json is checked against the manifest, if any (cheap)."""
    path = _require_model_dir(path)
    _check_one(path, ARCH_FILE)
    try:
        data = json.loads((path / ARCH_FILE).read_text())
    except json.JSONDecodeError as e:
        raise MaxpruneError(f"{path / ARCH_FILE} is not valid JSON: {e}") from None
    return Arch.from_dict(data)


def read_provenance(path: str | os.PathLike) -> dict:
    file = Path(path) / PROVENANCE_FILE
    _check_one(file.parent, PROVENANCE_FILE)
    return json.loads(file.read_text()) if file.exists() else {}


def load_model_dir(path: str | os.PathLike, mesh: jax.sharding.Mesh | None = None,
                   as_numpy: bool = False, verify: bool = True) -> ModelDir:
    """Load a model dir: onto `mesh` (sharded by logical axes), as host numpy, or onto device 0.

    verify: first check every file's size and sha256 against manifest.json
    (~10 s for an 8B model); a dir without one (written before manifests)
    loads unchecked. arch.json and provenance.json are checked either way.
    """
    path = _require_model_dir(path)
    if verify:
        verify_model_dir(path)
    arch = read_arch(path)
    params = _restore(path / PARAMS_DIR, mesh, as_numpy)
    masks = _restore(path / MASKS_DIR, mesh, as_numpy) if (path / MASKS_DIR).exists() else None
    masks_lib.validate_masks(params, masks)
    return ModelDir(arch, params, masks, read_provenance(path), path)


def verify_model_dir(path: str | os.PathLike) -> bool:
    """Check a model dir against its manifest; False if it has none (written before manifests)."""
    files = integrity.read(path, WHAT)
    if files is not None:
        integrity.verify(path, files, WHAT)
    return files is not None


def _check_one(path: Path, name: str) -> None:
    files = integrity.read(path, WHAT)
    if files is not None and name in files:
        integrity.check(path, name, files[name], WHAT)


def _require_model_dir(path) -> Path:
    path = Path(path)
    if path.is_file():
        raise MaxpruneError(f"model dir {path} is a file, not a directory")
    if not path.is_dir():
        raise MaxpruneError(f"model dir {path} does not exist")
    missing = [n for n in (ARCH_FILE, PARAMS_DIR) if not (path / n).exists()]
    if missing:
        raise MaxpruneError(f"{path} is not a model dir: missing {', '.join(missing)}")
    return path.absolute()


def _restore(ckpt: Path, mesh, as_numpy: bool):
    checkpointer = ocp.StandardCheckpointer()
    try:
        meta = checkpointer.metadata(ckpt).item_metadata.tree
    except Exception as e:  # orbax raises various types for unreadable dirs
        raise MaxpruneError(f"cannot read checkpoint {ckpt}: {e}") from None
    if as_numpy:
        args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), meta)
        return ocp.PyTreeCheckpointer().restore(ckpt, restore_args=args)
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
    else:
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), meta)
        shardings = sharding.tree_shardings(abstract, mesh)
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract, shardings)
    return checkpointer.restore(ckpt, target)
