"""The leader lock on both backends, and the leader's tasks: one process at a time leads; when
the leader dies (SIGKILL) or loses its database session, another takes over."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from iotbiz.leader import Leader
from iotbiz.store.leader import FileLeaderLock, LeaderLock
from iotbiz.store.postgres.leader import PostgresLeaderLock
from tests.services.postgres import PostgresServer

pytestmark = pytest.mark.timeout(90)

HOLDER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from iotbiz.store.leader import FileLeaderLock
    from iotbiz.store.postgres.leader import PostgresLeaderLock

    async def main() -> None:
        where = sys.argv[1]
        lock = PostgresLeaderLock(where) if "://" in where else FileLeaderLock(Path(where))
        assert await lock.try_acquire()
        print("held", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


async def wait_for(condition: Callable[[], bool], *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"condition not met within {timeout} s"
        await asyncio.sleep(0.02)


async def held_by_a_child(where: str) -> asyncio.subprocess.Process:
    """A child process holding the lock at `where` (a store file or a database URL)."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLDER, where, stdout=asyncio.subprocess.PIPE
    )
    assert child.stdout is not None
    line = await asyncio.wait_for(child.stdout.readline(), 30)
    assert line == b"held\n"
    return child


async def kill(child: asyncio.subprocess.Process) -> None:
    if child.returncode is None:
        os.kill(child.pid, signal.SIGKILL)
    await asyncio.wait_for(child.wait(), 30)


@pytest.fixture(params=["sqlite", "postgresql"])
def lock_place(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where the locks of a test meet: a store file's path, or a database URL."""
    if request.param == "sqlite":
        return str(tmp_path / "iotbiz.db")
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.url()


def make_lock(where: str) -> LeaderLock:
    return PostgresLeaderLock(where) if "://" in where else FileLeaderLock(Path(where))


async def test_one_holder_at_a_time_and_release_frees_it(lock_place: str) -> None:
    first, second = make_lock(lock_place), make_lock(lock_place)
    assert await first.try_acquire()
    assert await first.try_acquire()  # again: still its own
    assert not await second.try_acquire()
    assert await first.check()
    assert not await second.check()
    await first.release()
    await first.release()  # again: nothing happens
    assert not await first.check()
    assert await second.try_acquire()
    await second.release()


async def test_a_killed_holder_frees_the_lock_at_once(lock_place: str) -> None:
    child = await held_by_a_child(lock_place)
    successor = make_lock(lock_place)
    try:
        assert not await successor.try_acquire()
        await kill(child)
        started = time.monotonic()
        while not await successor.try_acquire():
            assert time.monotonic() - started < 10, "the dead holder's lock was never freed"
            await asyncio.sleep(0.1)
    finally:
        await kill(child)
        await successor.release()


async def test_a_lost_database_session_is_noticed_and_the_lock_moves(
    postgres_server: PostgresServer,
) -> None:
    """The server ends the leader's session (as a failover or a network cut would): its check
    says lost, and another process can take the lock."""
    url = postgres_server.url()
    leader, other = PostgresLeaderLock(url), PostgresLeaderLock(url)
    assert await leader.try_acquire()
    admin = await asyncpg.connect(url, timeout=10)
    try:
        ended = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = 'iotbiz-leader'"
        )
        assert ended == 1
    finally:
        await admin.close()
    assert not await leader.check()
    assert await other.try_acquire()
    assert not await leader.try_acquire()
    await other.release()


async def test_the_leader_runs_its_tasks_only_while_it_holds_the_lock(tmp_path: Path) -> None:
    where = str(tmp_path / "iotbiz.db")
    runs: list[str] = []
    failures: list[tuple[str, str]] = []

    def factory(name: str) -> Callable[[], Coroutine[Any, Any, None]]:
        async def work() -> None:
            runs.append(f"{name} started")
            try:
                await asyncio.Event().wait()
            finally:
                runs.append(f"{name} stopped")

        return work

    child = await held_by_a_child(where)
    leader = Leader(
        make_lock(where),
        {"presence": factory("presence"), "dispatch": factory("dispatch")},
        on_failure=lambda name, reason: failures.append((name, reason)),
        poll_s=0.05,
    )
    running = asyncio.create_task(leader.run())
    try:
        await asyncio.sleep(0.3)  # several tries while the child holds the lock
        assert (leader.leading, runs) == (False, [])
        await kill(child)
        await wait_for(lambda: leader.leading, timeout=10)
        await wait_for(lambda: len(runs) == 2, timeout=5)
        assert sorted(runs) == ["dispatch started", "presence started"]
        assert leader.elections == 1
        assert not await make_lock(where).try_acquire()
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await kill(child)
    assert sorted(runs[2:]) == ["dispatch stopped", "presence stopped"]
    assert failures == []
    assert not await make_lock(where).try_acquire()  # held until released: the last writes
    await leader.release()
    assert await make_lock(where).try_acquire()


async def test_a_leader_task_that_dies_is_a_failure(tmp_path: Path) -> None:
    failures: list[tuple[str, str]] = []

    async def broken() -> None:
        raise RuntimeError("boom")

    leader = Leader(
        make_lock(str(tmp_path / "iotbiz.db")),
        {"dispatch": broken},
        on_failure=lambda name, reason: failures.append((name, reason)),
        poll_s=0.05,
    )
    running = asyncio.create_task(leader.run())
    try:
        await wait_for(lambda: failures != [], timeout=10)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await leader.release()
    assert failures == [("dispatch", "RuntimeError: boom")]


async def test_a_leader_that_loses_its_session_stops_its_tasks(
    postgres_server: PostgresServer,
) -> None:
    url = postgres_server.url()
    stopped = asyncio.Event()

    async def work() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            stopped.set()

    changes: list[bool] = []

    async def changed(leading: bool) -> None:
        changes.append(leading)

    leader = Leader(
        PostgresLeaderLock(url),
        {"dispatch": work},
        on_failure=lambda name, reason: pytest.fail(f"{name} failed: {reason}"),
        on_change=changed,
        poll_s=0.05,
    )
    running = asyncio.create_task(leader.run())
    try:
        await wait_for(lambda: leader.leading, timeout=10)
        admin = await asyncpg.connect(url, timeout=10)
        try:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'iotbiz-leader'"
            )
        finally:
            await admin.close()
        await asyncio.wait_for(stopped.wait(), 10)
        await wait_for(lambda: leader.elections == 2, timeout=10)  # the lock was free: again
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await leader.release()
    assert changes[:3] == [True, False, True]
