"""Passwords: bcrypt off the event loop, in threads that yield to the loop and the store."""

from __future__ import annotations

import os
import threading

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
