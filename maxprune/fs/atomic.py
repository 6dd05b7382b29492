"""Write-then-rename: a reader, or a kill, never sees half a file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """`data` into `path` through a hidden ``.NAME.tmp`` sibling renamed over it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, data: Any, sort_keys: bool = False,
               default: Callable[[Any], Any] | None = None) -> None:
    """Indented JSON and a final newline (the format of every JSON file maxprune writes)."""
    write_text(path, json.dumps(data, indent=2, sort_keys=sort_keys, default=default) + "\n")
