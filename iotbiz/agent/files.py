"""Crash-safe small files in the agent's state folder: written whole or not at all."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def make_private_dir(path: Path) -> None:
    """Create `path` (mode 0700) if missing."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def write_atomic(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replace `path` with `data` atomically: temp file (mode `mode`), fsync, rename, fsync the
    folder. A crash leaves either the old file or the new one, never a torn one. Blocking: call
    it in a thread from async code."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as stream:
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
