"""Content manifests: catch a truncated, edited, missing or stray file at load, not mid-run.

A model dir or prepared dataset is written once and then read by many jobs,
often on other machines after a copy. A copy cut short or a byte flipped on
disk would otherwise surface as a shape error, a NaN or a silently different
model hours into a run; checking sizes and sha256 hashes against a manifest
written at save time turns it into a one-line `MaxpruneError` naming the file.

A manifest is `{relative_path: {"size": int, "sha256": hex}}` over every
regular file under a dir, in sorted order.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
from pathlib import Path

from maxprune.errors import MaxpruneError
from maxprune.fs import atomic

MANIFEST_FILE = "manifest.json"
_CHUNK = 1 << 20
_EDITED = "content hash differs from the manifest (edited?)"
_THREADS = min(8, os.cpu_count() or 1)  # hashlib releases the GIL: threads hash files in parallel


def digest(path: str | os.PathLike) -> dict:
    """{"size", "sha256"} of one file, read in 1 MiB chunks."""
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": sha.hexdigest()}


def list_files(root: str | os.PathLike) -> list[str]:
    """Relative posix paths of the regular files under `root`, sorted; symlinked dirs not followed."""
    root = Path(root)
    found = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            if path.is_file():
                found.append(path.relative_to(root).as_posix())
    return sorted(found)


def compute(root: str | os.PathLike, exclude: tuple[str, ...] = (MANIFEST_FILE,)) -> dict[str, dict]:
    """The manifest of every file under `root` except `exclude` (the manifest itself)."""
    return _digests(root, [n for n in list_files(root) if n not in exclude])


def _digests(root, names: list[str]) -> dict[str, dict]:
    with concurrent.futures.ThreadPoolExecutor(_THREADS) as pool:
        return dict(zip(names, pool.map(digest, [Path(root) / n for n in names])))


def write(root: str | os.PathLike, name: str = MANIFEST_FILE) -> dict[str, dict]:
    """Hash everything under `root` into `root/name`, written to a temp name and renamed."""
    files = compute(root, exclude=(name,))
    atomic.write_json(Path(root) / name, {"files": files}, sort_keys=True)
    return files


def read(root: str | os.PathLike, what: str, name: str = MANIFEST_FILE) -> dict[str, dict] | None:
    """The manifest written by `write`, or None where there is none (a dir from before manifests)."""
    file = Path(root) / name
    if not file.is_file():
        return None
    try:
        files = json.loads(file.read_text())["files"]
        if not isinstance(files, dict):
            raise TypeError(f"'files' is a {type(files).__name__}, not a dict")
    except (ValueError, KeyError, TypeError) as e:
        raise _corrupt(what, root, name, f"is unreadable ({e!r})") from None
    return files


def check(root: str | os.PathLike, rel: str, expected: dict, what: str, content: bool = True) -> None:
    """Raise naming `rel` unless root/rel has the expected size and, if `content`, sha256."""
    path = Path(root) / rel
    if not path.is_file():
        raise _corrupt(what, root, rel, "is missing")
    size = path.stat().st_size
    if size != expected["size"]:
        hint = "truncated?" if size < expected["size"] else "appended to?"
        raise _corrupt(what, root, rel, f"is {size} bytes, expected {expected['size']} ({hint})")
    if content and digest(path)["sha256"] != expected["sha256"]:
        raise _corrupt(what, root, rel, _EDITED)


def verify(root: str | os.PathLike, files: dict[str, dict], what: str) -> None:
    """Check every listed file (sizes first: cheap), then report files the manifest does not list.

    A stray file is only an error inside a subdir the manifest covers (e.g. an
    orbax checkpoint, which would read it); top-level extras such as a report
    written next to the model are allowed.
    """
    for rel in files:
        check(root, rel, files[rel], what, content=False)
    stray = stray_files(root, files)
    if stray:
        raise _corrupt(what, root, stray[0], f"is not in its manifest ({len(stray)} unlisted file(s) "
                                             f"under a checked dir)")
    actual = _digests(root, list(files))
    for rel in files:  # first bad file in sorted order, whichever thread finished first
        if actual[rel]["sha256"] != files[rel]["sha256"]:
            raise _corrupt(what, root, rel, _EDITED)


def stray_files(root: str | os.PathLike, files: dict[str, dict]) -> list[str]:
    """Unlisted files inside a top-level subdir that the manifest lists files in."""
    covered = {rel.split("/", 1)[0] for rel in files if "/" in rel}
    return [rel for rel in list_files(root)
            if rel not in files and "/" in rel and rel.split("/", 1)[0] in covered]


def _corrupt(what: str, root, rel: str, why: str) -> MaxpruneError:
    return MaxpruneError(f"{what} {root} is corrupt: {rel} {why}")
