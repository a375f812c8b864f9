"""The leader lock: which of the platform processes sharing a store runs the work that must run
once (presence, command dispatch, retention, rollouts; see `iotbiz.leader`).

A lock is held by a process for as long as it lives and can reach the store; the operating
system or the database server releases it when the process dies, so a successor never waits
for a dead leader to say goodbye:

- SQLite: an exclusive `flock` on `<store file>.leader` (mode 0600), released by the kernel when
  the process ends. Only processes on one machine share a SQLite file, and flock is local.
- PostgreSQL: a session advisory lock on a connection of its own
  (`iotbiz.store.postgres.leader`), released by the server when that session ends.

`try_acquire()` takes the lock if it is free (never waits); `check()` says whether it is still
held (False: lost, stop leading at once); `release()` lets it go (again: nothing happens).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from pathlib import Path
from typing import Protocol

from iotbiz.errors import StoreError


class LeaderLock(Protocol):
    name: str

    async def try_acquire(self) -> bool: ...
    async def check(self) -> bool: ...
    async def release(self) -> None: ...


class FileLeaderLock:
    """The SQLite store's leader lock: `flock` on a file beside the store file."""

    def __init__(self, store_path: Path) -> None:
        self.path = store_path.with_name(store_path.name + ".leader")
        self.name = str(self.path)
        self._fd: int | None = None

    async def try_acquire(self) -> bool:
        if self._fd is not None:
            return True
        self._fd = await asyncio.to_thread(_lock_file, self.path)
        return self._fd is not None

    async def check(self) -> bool:
        return self._fd is not None  # a held flock cannot be taken away while the fd is open

    async def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the lock


def _lock_file(path: Path) -> int | None:
    """A descriptor holding an exclusive flock on `path`, or None when another process holds
    it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StoreError(f"cannot open the leader lock file {path}: {exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError as exc:
        os.close(fd)
        raise StoreError(f"cannot lock {path}: {exc}") from exc
    return fd
