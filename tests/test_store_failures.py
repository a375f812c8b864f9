"""The store when SQLite fails: every driver error is a StoreError, and a failed write leaves no
transaction open behind it."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import inspect
import json
import logging
import os
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from iotbiz.errors import StoreError
from iotbiz.models import PresenceUpdate
from iotbiz.names import DeviceName
from iotbiz.presence import PresenceRecorder
from iotbiz.store import Store

NAME = DeviceName("abc123", "dev-1")


async def test_a_failed_commit_rolls_back(store: Store) -> None:
    """A COMMIT can fail (here a deferred foreign key; in life a busy or full disk): the
    transaction must end, or every later write fails with "cannot start a transaction within a
    transaction"."""

    def orphan_device(conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA defer_foreign_keys = ON")  # checked at COMMIT, not at INSERT
        conn.execute(
            "INSERT INTO devices (customer_id, device_id, state, created_at)"
            " VALUES ('nobody', 'dev-1', 'pending', 0)"
        )

    with pytest.raises(StoreError, match="FOREIGN KEY constraint failed") as raised:
        await store._write(orphan_device)
    assert isinstance(raised.value.__cause__, sqlite3.IntegrityError)
    await store.add_customer("abc123", 1, actor="test")  # the next write works
    assert [c.customer_id for c in await store.list_customers()] == ["abc123"]
    assert await store.list_devices() == []


async def test_driver_errors_are_store_errors_naming_the_store(store: Store, db_path: Path) -> None:
    with pytest.raises(StoreError, match=f"store {db_path} failed: no such table") as raised:
        await store._call(lambda conn: conn.execute("SELECT * FROM nothing_here").fetchall())
    assert isinstance(raised.value.__cause__, sqlite3.OperationalError)


async def test_a_closed_store_raises_store_error(db_path: Path) -> None:
    store = await Store.open(db_path)
    await store.close()
    await store.close()  # again: nothing happens
    with pytest.raises(StoreError, match="is closed"):
        await store.list_customers()


# -- a full disk ------------------------------------------------------------------------------


class SmallDisk:
    """A real 2 MiB filesystem (tmpfs) that the test fills up and empties again."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._filler = folder / "filler"

    def fill(self) -> None:
        """Write a file until the filesystem has not one byte left."""
        fd = os.open(self._filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for size in (65536, 4096, 1):
                with contextlib.suppress(OSError):
                    while os.write(fd, b"\0" * size):
                        pass
            with pytest.raises(OSError, match="No space left") as full:
                os.write(fd, b"\0")
            assert full.value.errno == errno.ENOSPC
        finally:
            os.close(fd)

    def make_room(self) -> None:
        self._filler.unlink()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    folder = tmp_path / "disk"
    folder.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
        check=False,
        timeout=10,
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mount.stderr.strip()}")
    try:
        yield SmallDisk(folder)
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False, timeout=10)


async def wait_until(
    condition: Callable[[], bool | Awaitable[bool]], timeout_s: float = 10.0
) -> None:
    """Poll `condition` (a function, or a coroutine function) until it holds."""
    async with asyncio.timeout(timeout_s):
        while True:
            result = condition()
            if await result if inspect.isawaitable(result) else result:
                return
            await asyncio.sleep(0.01)


async def active_device(store: Store) -> None:
    await store.add_customer("abc123", 5, actor="test")
    await store.register_device(NAME, b"$2b$06$x", ttl_s=60, actor="test")
    assert await store.activate_device(NAME, b"$2b$06$x", actor="test")


def big_telemetry(n: int) -> bytes:
    """Telemetry large enough that writing it needs new pages of the full disk."""
    return json.dumps({"n": n, "padding": "x" * 300_000}).encode()


async def test_a_full_disk_is_a_store_error(small_disk: SmallDisk) -> None:
    store = await Store.open(small_disk.folder / "iotbiz.db")
    try:
        await active_device(store)
        small_disk.fill()
        update = PresenceUpdate(NAME, 1.0, telemetry={"padding": "x" * 300_000})
        with pytest.raises(StoreError, match="full") as raised:
            await store.record_presence([update])
        assert isinstance(raised.value.__cause__, sqlite3.Error)
        assert (await store.get_device(NAME)) is not None  # reads still work
        small_disk.make_room()
        await store.record_presence([update])  # and writes once there is room again
        await store.add_customer("xyz", 1, actor="test")
    finally:
        await store.close()


async def test_presence_survives_a_full_disk_and_catches_up(
    small_disk: SmallDisk, caplog: pytest.LogCaptureFixture
) -> None:
    """Presence keeps running while the disk is full, keeps what it could not write (merged with
    newer updates), warns once, and records it all once the disk has room again."""
    caplog.set_level(logging.INFO, logger="iotbiz.presence")
    store = await Store.open(small_disk.folder / "iotbiz.db")
    presence = PresenceRecorder(store, flush_s=0.01, retry_s=(0.01, 0.05))
    task = asyncio.create_task(presence.run())
    try:
        await active_device(store)
        small_disk.fill()
        presence.connected(NAME)
        presence.telemetry_payload(NAME, big_telemetry(1))
        await wait_until(lambda: presence.failed_flushes >= 3)  # it tried, again and again
        presence.telemetry_payload(NAME, big_telemetry(2))  # a newer update meanwhile
        await wait_until(lambda: presence.failed_flushes >= 5)
        assert not task.done()
        warnings = [r for r in caplog.records if r.name == "iotbiz.presence" and r.levelno >= 30]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        assert presence.pending_devices == 1

        small_disk.make_room()

        async def recorded() -> bool:
            device = await store.get_device(NAME)
            return device is not None and device.telemetry is not None

        await wait_until(recorded)
        device = await store.get_device(NAME)
        assert device is not None
        assert device.online  # the first, failed batch was kept
        assert device.telemetry["n"] == 2  # merged with the newer one, the later value winning
        assert presence.pending_devices == 0
        assert any("recorded again" in r.getMessage() for r in caplog.records)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await store.close()


# The same failure for any user: a file size limit (RLIMIT_FSIZE) in a child process makes every
# write that grows a file fail with EFBIG, which SQLite reports as a disk I/O error.
FILE_SIZE_LIMITED = textwrap.dedent(
    """
    import asyncio, json, resource, signal, sys
    from pathlib import Path
    from iotbiz.errors import StoreError
    from iotbiz.names import DeviceName
    from iotbiz.presence import PresenceRecorder
    from iotbiz.store import Store

    NAME = DeviceName("abc123", "dev-1")

    async def main(folder):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a killed process
        store = await Store.open(folder / "iotbiz.db")
        await store.add_customer("abc123", 5, actor="test")
        await store.register_device(NAME, b"$2b$06$x", ttl_s=60, actor="test")
        assert await store.activate_device(NAME, b"$2b$06$x", actor="test")
        presence = PresenceRecorder(store)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        largest = max(path.stat().st_size for path in folder.iterdir())
        resource.setrlimit(resource.RLIMIT_FSIZE, (largest + 4096, hard))
        presence.connected(NAME)
        presence.telemetry_payload(NAME, json.dumps({"padding": "x" * 300_000}).encode())
        report = {"first_flush": await presence.flush(), "pending": presence.pending_devices}
        try:
            await store.add_customer("xyz", 1, actor="test")
        except StoreError as exc:
            report["error"] = [type(exc.__cause__).__name__, str(exc)]
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        report["second_flush"] = await presence.flush()
        device = await store.get_device(NAME)
        report["recorded"] = [device.online, device.telemetry is not None]
        await store.close()
        print(json.dumps(report))

    asyncio.run(main(Path(sys.argv[1])))
    """
)


def test_a_file_size_limit_is_a_store_error_and_presence_catches_up(tmp_path: Path) -> None:
    child = subprocess.run(
        [sys.executable, "-c", FILE_SIZE_LIMITED, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert child.returncode == 0, child.stderr
    report = json.loads(child.stdout)
    assert (report["first_flush"], report["pending"]) == (False, 1)
    assert report["error"] == [
        "OperationalError",
        f"store {tmp_path / 'iotbiz.db'} failed: disk I/O error",
    ]
    assert report["second_flush"] is True
    assert report["recorded"] == [True, True]
