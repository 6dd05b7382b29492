"""One writer per directory: an exclusive lock file for trainers and study runners.

`dir_lock(path, what)` takes `path/.lock` with `flock`, so a process that dies
(even by `kill -9`) frees its lock at once and a stale lock cannot block. On
filesystems without `flock` (some network mounts) it falls back to a lock file
created with O_EXCL that names its holder; a holder on this host that is no
longer alive is detected and its lock taken over. A second writer gets a
one-line error naming the holder, also within one process. Only process 0 of a multi-host job locks: the
hosts of one job are one writer.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from maxprune.errors import MaxpruneError

LOCK_FILE = ".lock"


def _holder_record() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _describe(text: str) -> str:
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on {h['host']} (since {h['since']})"
    except (ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def dir_lock(path: str | os.PathLike, what: str):
    """Hold the lock of directory `path` (created if missing); `what` names it in errors."""
    import jax  # only to know the process index; imported late to keep this module light

    if jax.process_index() != 0:
        yield
        return
    path = Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    release = _acquire(path / LOCK_FILE, what)
    try:
        yield
    finally:
        release()


def _acquire(lock: Path, what: str):
    handle = open(lock, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = _describe(handle.read())
        handle.close()
        raise MaxpruneError(f"{what} is in use by {holder}; wait for it or stop it first") from None
    except OSError as e:
        handle.close()
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
        return _acquire_exclusive_file(lock.with_name(LOCK_FILE + ".pid"), what)
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps(_holder_record()))
    handle.flush()

    def release():
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
    return release


def _acquire_exclusive_file(lock: Path, what: str):
    """Fallback without flock: O_EXCL creation; a dead holder on this host is stale."""
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            text = lock.read_text() if lock.exists() else ""
            if _is_stale(text):
                lock.unlink(missing_ok=True)
                continue
            raise MaxpruneError(f"{what} is in use by {_describe(text)}; wait for it or stop it first "
                                f"(if that process is gone, delete {lock})") from None
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(_holder_record()))
        return lambda: lock.unlink(missing_ok=True)
    raise MaxpruneError(f"cannot take the lock {lock} for {what}")


def _is_stale(text: str) -> bool:
    try:
        h = json.loads(text)
        pid, host = int(h["pid"]), h["host"]
    except (ValueError, KeyError, TypeError):
        return False
    if host != socket.gethostname():
        return False  # cannot tell from here
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
