"""The platform owns its long-lived tasks: one that dies stops the platform, which exits 1, and
`stop()` stops the broker and closes the store whatever went wrong before it."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from iotbiz.errors import StoreError
from iotbiz.platform import Platform
from iotbiz.presence import PresenceRecorder
from iotbiz.settings import Settings
from tests.processes import PlatformProcess


class Crash(RuntimeError):
    pass


def crash_presence_when(
    monkeypatch: pytest.MonkeyPatch, trigger: asyncio.Event, died: asyncio.Event
) -> None:
    """The presence writer dies (raises) once `trigger` is set: the way a bug would kill it."""

    async def run(self: PresenceRecorder) -> None:
        await trigger.wait()
        died.set()
        raise Crash("presence writer crashed on purpose")

    monkeypatch.setattr(PresenceRecorder, "run", run)


def refuses(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(5)
        return probe.connect_ex(("127.0.0.1", port)) != 0


async def test_stop_after_a_task_died_stops_the_broker_and_closes_the_store(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    trigger, died = asyncio.Event(), asyncio.Event()
    crash_presence_when(monkeypatch, trigger, died)
    platform = Platform(make_settings(http={"host": "127.0.0.1"}))
    await platform.start()
    store, mqtt_port, http_port = platform.store, platform.mqtt_port, platform.http_port
    try:
        assert not refuses(mqtt_port)
        assert platform.leader is not None
        [presence] = [task for task in platform.leader.tasks if task.get_name() == "presence"]
        trigger.set()
        await asyncio.wait([presence], timeout=5)
        assert died.is_set()
        assert presence.done()
    finally:
        problems = await platform.stop()  # must not raise the task's error, nor stop early
    assert problems == []
    assert refuses(mqtt_port), "the broker still listens"
    assert refuses(http_port), "the registrar still listens"
    with pytest.raises(StoreError, match="is closed"):
        await store.list_customers()


async def test_a_task_that_dies_sets_failed_and_names_itself(
    make_settings: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    trigger, died = asyncio.Event(), asyncio.Event()
    crash_presence_when(monkeypatch, trigger, died)
    platform = Platform(make_settings(http={"host": "127.0.0.1"}))
    await platform.start()
    try:
        assert not platform.failed.is_set()
        trigger.set()
        async with asyncio.timeout(5):
            await platform.failed.wait()
    finally:
        await platform.stop()
    assert platform.failures == ["task presence died (Crash: presence writer crashed on purpose)"]
    [record] = [r for r in caplog.records if "RUNNING -> FAILED" in r.getMessage()]
    assert record.exc_info is not None  # logged with its traceback


async def test_tasks_cancelled_by_stop_are_not_failures(
    make_settings: Callable[..., Settings],
) -> None:
    platform = Platform(make_settings(http={"host": "127.0.0.1"}))
    await platform.start()
    names = sorted(task.get_name() for task in platform._tasks)
    assert names == ["event-loop-lag", "leader", "refusal-audit", "service-client", "store-changes"]
    assert platform.leader is not None
    assert platform.leader.leading  # alone: it leads from the start
    assert sorted(task.get_name() for task in platform.leader.tasks) == [
        "command-expiry",
        "command-replies",
        "dispatch",
        "presence",
        "retention",
        "rollouts",
    ]
    assert await platform.stop() == []
    assert not platform.failed.is_set()
    assert await platform.stop() == []  # again: nothing left to stop


# The real platform process, with its presence writer made to crash a moment after the start.
CRASHING_PLATFORM = textwrap.dedent(
    """
    import asyncio, sys
    from iotbiz.cli import main
    from iotbiz.presence import PresenceRecorder

    async def run(self):
        await asyncio.sleep(0.5)
        raise RuntimeError("presence writer crashed on purpose")

    PresenceRecorder.run = run
    sys.exit(main(["serve", *sys.argv[1:]], prog="python -m iotbiz.broker"))
    """
)


def test_the_process_exits_1_when_a_task_dies(tmp_path: Path) -> None:
    log_path = tmp_path / "platform.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("IOTBIZ_CONFIG", None)
    args = ["--db", str(tmp_path / "platform.db"), "--http-port", "0", "--mqtt-port", "0"]
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-c", CRASHING_PLATFORM, *args],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
        )
    platform = PlatformProcess(proc, log_path)  # type: ignore[arg-type]
    try:
        platform.wait_started()
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the platform kept running with a dead task:\n{platform.log()}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    log = platform.log()
    assert code == 1, log
    assert "task presence: RUNNING -> FAILED (RuntimeError: presence writer crashed" in log
    assert log.strip().splitlines()[-1] == (
        "python -m iotbiz.broker: task presence died"
        " (RuntimeError: presence writer crashed on purpose)"
    )
    assert refuses(platform.http_port)
    assert refuses(platform.mqtt_port)
