"""Passwords: bcrypt off the event loop, in threads that yield to the loop and the store."""

from __future__ import annotations

import asyncio
import os
import threading
import time

from iotbiz.passwords import PasswordHasher, generate_password


async def test_hash_and_check_run_in_low_priority_threads() -> None:
    hasher = PasswordHasher(4, threads=2)
    try:
        password = generate_password()
        hashed = await hasher.hash(password)
        assert await hasher.check(password, hashed)
        assert not await hasher.check(password + "x", hashed)
        assert not await hasher.check(password, b"not a bcrypt hash")
        workers = [t for t in threading.enumerate() if t.name.startswith("bcrypt")]
        assert workers
        mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        for worker in workers:
            assert worker.native_id is not None
            assert os.getpriority(os.PRIO_PROCESS, worker.native_id) == min(mine + 10, 19)
    finally:
        hasher.close()


async def _admitted_check(
    hasher: PasswordHasher, order: list[int], index: int, jobs_seen: list[int], wait_s: float
) -> bool:
    if not await hasher.admit(0.5, wait_s):
        return False
    jobs_seen.append(hasher.jobs)  # before this caller's own job starts
    order.append(index)
    return await hasher.check("x", None) is False


async def test_admit_serves_callers_beyond_the_share_in_arrival_order() -> None:
    """Beyond the share (here 1 job of the bound of 2) callers wait their turn instead of being
    refused; they start in arrival order, and the jobs never exceed the share."""
    hasher = PasswordHasher(4, threads=1, max_queued=1)
    try:
        order: list[int] = []
        jobs_seen: list[int] = []
        calls = [_admitted_check(hasher, order, i, jobs_seen, 10.0) for i in range(30)]
        results = await asyncio.gather(*calls)
        assert results == [True] * 30
        assert order == list(range(30))
        assert max(jobs_seen) == 0  # each started only once the one before it had finished
        assert hasher.waiting == 0
        assert hasher.jobs == 0
    finally:
        hasher.close()


async def test_admit_refuses_at_once_when_the_expected_wait_is_too_long() -> None:
    hasher = PasswordHasher(4, threads=1, max_queued=1)
    try:
        hasher.seconds_per_job = 2.0  # as if each check took 2 s
        first = asyncio.create_task(_admitted_check(hasher, [], 0, [], 10.0))
        await asyncio.sleep(0)  # its job is running
        assert hasher.jobs == 1
        assert hasher.would_refuse(0.5, 1.0)
        started = time.monotonic()
        assert await hasher.admit(0.5, 1.0) is False
        assert time.monotonic() - started < 0.1  # at once, without waiting
        assert await hasher.admit(0.5, 0) is False  # 0: never wait
        assert await first
    finally:
        hasher.close()


async def test_admit_gives_up_after_its_wait_and_passes_on_a_cancelled_turn() -> None:
    hasher = PasswordHasher(12, threads=1, max_queued=1)  # one check takes ~0.2 s or more
    try:
        hasher.seconds_per_job = 0.001  # the estimate admits; the real wait is longer
        slow = asyncio.create_task(hasher.check("x", None))
        await asyncio.sleep(0)
        started = time.monotonic()
        assert await hasher.admit(0.5, 0.05) is False  # waited its 0.05 s in vain
        assert 0.04 < time.monotonic() - started < 1.0
        assert hasher.waiting == 0
        cancelled = asyncio.create_task(hasher.admit(0.5, 30.0))
        later = asyncio.create_task(hasher.admit(0.5, 30.0))
        await asyncio.sleep(0)
        assert hasher.waiting == 2
        cancelled.cancel()
        await asyncio.gather(cancelled, return_exceptions=True)
        assert hasher.waiting == 1
        await slow  # a job not admitted by `admit` (the registrar's) frees the room too
        assert await asyncio.wait_for(later, 5.0) is True
        assert hasher.waiting == 0
    finally:
        hasher.close()


async def test_the_time_per_job_is_measured() -> None:
    hasher = PasswordHasher(4, threads=1)
    try:
        hasher.seconds_per_job = 10.0
        for _ in range(20):
            await hasher.check("x", None)
        assert hasher.seconds_per_job < 10.0 * (1 - 0.05) ** 20 + 0.5
    finally:
        hasher.close()
