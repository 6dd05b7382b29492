"""The staging dir a prepare works in: resumed or discarded, then renamed into place.

`prepare` never writes into its output dir. It works in a hidden sibling
`.OUT.partial/` holding `prepare.json` (the arguments a resume must match) and
`files/` (the per-file token caches), and renames it into place only when it is
complete, so a killed prepare leaves no half-written dataset, and a re-run with
the same arguments picks up where it stopped.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from maxprune.fs.atomic import write_json
from maxprune.fs.staged import check_output_dir, staging_path, swap_in

STATE_FILE = "prepare.json"  # in the staging dir: the arguments a resume must match
FILES_DIR = "files"


def open_staging(out: Path, state: dict, progress: bool) -> Path:
    """The staging dir: resumed if it was made with the same arguments, else started afresh."""
    staging = staging_path(out)
    state_file = staging / STATE_FILE
    if staging.exists():
        previous = json.loads(state_file.read_text()) if state_file.is_file() else None
        if previous == json.loads(json.dumps(state)):
            say(f"resuming the interrupted prepare in {staging}", progress)
        else:
            say(f"discarding {staging}: it was started with other arguments or inputs", progress)
            shutil.rmtree(staging)
    (staging / FILES_DIR).mkdir(parents=True, exist_ok=True)
    if not state_file.is_file():
        write_json(state_file, state)
    return staging


def commit(staging: Path, out: Path, overwrite: bool) -> None:
    """Drop the caches and rename the finished staging dir into place (replacing `out` if asked)."""
    check_output_dir(out, overwrite)  # again: something may have appeared meanwhile
    shutil.rmtree(staging / FILES_DIR, ignore_errors=True)  # the state file stays until the rename: resumable
    swap_in(staging, out)
    (out / STATE_FILE).unlink(missing_ok=True)


def say(message: str, progress: bool) -> None:
    if progress:
        from tqdm import tqdm
        tqdm.write(f"maxprune: {message}", file=sys.stderr)
