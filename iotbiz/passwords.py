"""Device passwords: generated with `secrets`, stored only as bcrypt hashes, hashed off the loop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import bcrypt

PASSWORD_BYTES = 24  # 192 random bits, 32 URL-safe characters (bcrypt reads up to 72 bytes)


def generate_password() -> str:
    return secrets.token_urlsafe(PASSWORD_BYTES)


class PasswordHasher:
    """Runs bcrypt in its own small thread pool (bcrypt releases the GIL), never on the loop.

    `busy` tells callers when more jobs are waiting than `max_queued`, so that a flood of requests
    is answered with 429 instead of growing an unbounded queue. One hasher serves the registrar
    and MQTT logins; `busy_at(share)` lets a caller stop at a share of that bound and leave the
    rest to the others (MQTT logins stop at half, so a login flood cannot starve enrollment).
    """

    def __init__(self, cost: int, *, threads: int = 0, max_queued: int = 256) -> None:
        self.cost = cost
        self.threads = threads or os.cpu_count() or 1
        self._max_jobs = self.threads + max_queued
        self._jobs = 0
        self.operations = 0  # bcrypt hashes and checks done: a cost figure for tests and metrics
        self._executor = ThreadPoolExecutor(
            self.threads, thread_name_prefix="bcrypt", initializer=_yield_to_other_threads
        )
        # a hash of a random password no one knows, for checks without a real hash (`check`)
        self._decoy = bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(rounds=cost))

    @property
    def busy(self) -> bool:
        return self._jobs >= self._max_jobs

    @property
    def jobs(self) -> int:
        """bcrypt jobs running or waiting for a thread."""
        return self._jobs

    @property
    def max_jobs(self) -> int:
        """The bound on `jobs` (threads + max_queued) at which `busy` turns true."""
        return self._max_jobs

    def busy_at(self, share: float) -> bool:
        """True when running and waiting jobs fill `share` (0..1] of the bound."""
        return self._jobs >= max(1, int(self._max_jobs * share))

    async def hash(self, password: str) -> bytes:
        salt = bcrypt.gensalt(rounds=self.cost)
        result: bytes = await self._run(bcrypt.hashpw, password.encode(), salt)
        return result

    async def check(self, password: str, password_hash: bytes | None) -> bool:
        """True if `password` matches `password_hash`. With None (no such device, or one that
        may not log in), a check against a decoy hash of the same cost, which takes the same
        time and is False: the answer's timing does not tell whether the device exists."""
        if password_hash is None:
            password_hash = self._decoy
        result: bool = await self._run(_checkpw, password.encode("utf-8", "replace"), password_hash)
        return result and password_hash is not self._decoy

    async def _run(self, func: Callable[..., Any], *args: bytes) -> Any:
        self._jobs += 1
        try:
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(self._executor, func, *args)
            self.operations += 1
            return result
        finally:
            self._jobs -= 1

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _yield_to_other_threads() -> None:
    """Run this bcrypt thread at a lower priority (10 nicer than the process; Linux: per thread).

    bcrypt keeps every core busy during an enrollment or reconnect storm; the event loop and the
    store's thread then waited for a core after every wake-up (a one-row read took 2.4 ms). At a
    lower priority bcrypt takes only what they leave, and the rate it sets is unchanged.
    """
    with contextlib.suppress(OSError, AttributeError):  # not Linux, or not allowed
        thread = threading.get_native_id()
        niceness = os.getpriority(os.PRIO_PROCESS, thread)  # inherited from the process
        os.setpriority(os.PRIO_PROCESS, thread, min(niceness + 10, 19))


def _checkpw(password: bytes, password_hash: bytes) -> bool:
    try:
        return bool(bcrypt.checkpw(password, password_hash))
    except ValueError:  # a malformed stored hash never matches
        return False
