"""Device passwords: generated with `secrets`, stored only as bcrypt hashes, hashed off the loop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import bcrypt

PASSWORD_BYTES = 24  # 192 random bits, 32 URL-safe characters (bcrypt reads up to 72 bytes)
JOB_TIME_WEIGHT = 0.05  # of the latest job in the average time per job


def generate_password() -> str:
    return secrets.token_urlsafe(PASSWORD_BYTES)


class PasswordHasher:
    """Runs bcrypt in its own small thread pool (bcrypt releases the GIL), never on the loop.

    `busy` tells callers when more jobs are waiting than `max_queued`, so that a flood of requests
    is answered with 429 instead of growing an unbounded queue. One hasher serves the registrar
    and MQTT logins; `busy_at(share)` lets a caller stop at a share of that bound and leave the
    rest to the others (MQTT logins stop at half, so a login flood cannot starve enrollment).

    `admit(share, max_wait_s)` is the waiting form of that bound: beyond the share a caller
    queues (first come, first served) for room instead of being turned away, as long as its
    expected wait, from the measured time per job, is within `max_wait_s`; a caller refused by
    `admit` is one that would have waited longer. A reconnect storm of thousands of devices is
    then served at bcrypt's pace instead of being refused and coming back after the devices'
    backoff, while the share still bounds what logins take of the threads and the queue.
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
        started = time.perf_counter()
        self._decoy = bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(rounds=cost))
        # seconds of one job on a thread (an average of the latest), for `admit`'s estimate
        self.seconds_per_job = time.perf_counter() - started
        # callers of `admit` in arrival order (those that gave up stay, done, until reached)
        self._waiters: deque[tuple[asyncio.Future[None], int]] = deque()
        self._waiting = 0  # of them, those still waiting
        self._woken = 0  # admitted waiters that have not started their job yet

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
        return self._jobs + self._woken >= self._limit(share)

    @property
    def waiting(self) -> int:
        """Callers of `admit` waiting for room."""
        return self._waiting

    def _limit(self, share: float) -> int:
        return max(1, int(self._max_jobs * share))

    def expected_wait(self) -> float:
        """Seconds a caller of `admit` arriving now would wait before its job starts: every job
        running, queued or admitted ahead of it, at the measured time per job, over the
        threads."""
        ahead = self._jobs + self._woken + self._waiting
        return max(0, ahead + 1 - self.threads) * self.seconds_per_job / self.threads

    def would_refuse(self, share: float, max_wait_s: float) -> bool:
        """True if `admit(share, max_wait_s)` called now would refuse at once."""
        if not self._waiting and not self.busy_at(share):
            return False
        return max_wait_s <= 0 or self.expected_wait() > max_wait_s

    async def admit(self, share: float, max_wait_s: float) -> bool:
        """Wait, in arrival order, until the jobs fill less than `share` of the bound; True then,
        and the caller's next `hash` or `check` (called without awaiting anything else first)
        takes that room. False at once when the expected wait exceeds `max_wait_s` (0: never
        wait), or after waiting `max_wait_s` in vain."""
        if self.would_refuse(share, max_wait_s):
            return False
        if not self._waiting and not self.busy_at(share):
            return True
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (turn, self._limit(share))
        self._waiters.append(entry)
        self._waiting += 1
        try:
            async with asyncio.timeout(max_wait_s):
                await turn
        except TimeoutError:
            self._give_up(entry)
            return False
        except BaseException:
            self._give_up(entry)
            raise
        self._woken -= 1
        return True

    def _give_up(self, entry: tuple[asyncio.Future[None], int]) -> None:
        """A waiter leaves (timed out or cancelled); if it was woken meanwhile, the room it was
        handed goes to the next one."""
        turn = entry[0]
        if turn.done() and not turn.cancelled():
            self._woken -= 1
            self._wake()
            return
        turn.cancel()  # `_wake` drops it when it reaches it
        self._waiting -= 1

    def _wake(self) -> None:
        """Hand the room jobs have left to the waiters at the head of the line."""
        while self._waiters:
            turn, limit = self._waiters[0]
            if turn.done():
                self._waiters.popleft()
                continue
            if self._jobs + self._woken >= limit:
                return
            self._waiters.popleft()
            self._waiting -= 1
            self._woken += 1
            turn.set_result(None)

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
            result, seconds = await loop.run_in_executor(self._executor, _timed, func, *args)
            self.operations += 1
            self.seconds_per_job += (seconds - self.seconds_per_job) * JOB_TIME_WEIGHT
            return result
        finally:
            self._jobs -= 1
            if self._waiting:
                self._wake()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _timed(func: Callable[..., Any], *args: bytes) -> tuple[Any, float]:
    """`func(*args)` on a bcrypt thread, and the seconds it took there."""
    started = time.perf_counter()
    result = func(*args)
    return result, time.perf_counter() - started


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
