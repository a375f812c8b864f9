"""Crash-safe small files in the agent's state folder: written whole or not at all."""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

_locks_guard = threading.Lock()
_locks: dict[Path, threading.Lock] = {}


def _lock_for(path: Path) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(path, threading.Lock())


def make_private_dir(path: Path) -> None:
    """Create `path` (mode 0700) if missing."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def write_atomic(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replace `path` with `data` atomically: temp file (mode `mode`), fsync, rename, fsync the
    folder. A crash leaves either the old file or the new one, never a torn one. Each call has
    its own temporary file (mkstemp) and writes of the same path are serialised, so concurrent
    writers never collide. Blocking: call it in a thread from async code."""
    with _lock_for(path):
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        tmp = Path(name)
        try:
            with os.fdopen(fd, "wb") as stream:
                os.fchmod(stream.fileno(), mode)
                stream.write(data)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_json(path: Path, value: Any) -> None:
    write_atomic(path, json.dumps(value, sort_keys=True).encode())


def read_json(path: Path) -> Any:
    """The JSON in `path`, or None if the file is missing or unreadable (torn files cannot
    happen with write_atomic, but a hand-edited one can)."""
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
