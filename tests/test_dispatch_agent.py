"""Commands end to end: a real platform (in-process, ports 0) and a real agent process.

A ping to an online agent is done with its reply's result; a command sent while the agent is
offline waits and is done after it connects; a command the agent gets only after its expiry is
expired and the agent's late "expired" answer changes nothing; an `app.restart` re-delivered (by
the dispatcher's resend, or by a platform restarted between send and reply) restarts the app
once: the app writes its pid to a file each time it starts.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest

from iotbiz.models import CommandState
from iotbiz.names import DeviceName
from iotbiz.platform import Platform
from iotbiz.settings import Settings

NAME = DeviceName("abc123", "agent-1")
# An app that notes its pid at every start; `stubborn` ignores SIGTERM, so stopping it takes its
# stop_timeout_s (the agent then kills it).
APP = """
import os, signal, sys, time
if sys.argv[2] == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
with open(sys.argv[1], "a") as starts:
    starts.write(f"{os.getpid()}\\n")
while True:
    time.sleep(0.2)
"""


def agent_config(tmp_path: Path, platform: Platform, *, stubborn: bool = False) -> Path:
    program = tmp_path / "app.py"
    program.write_text(APP)
    kind = "stubborn" if stubborn else "polite"
    command = [sys.executable, str(program), str(tmp_path / "starts.txt"), kind]
    config = tmp_path / "agent.toml"
    config.write_text(
        f'customer_id = "{NAME.customer_id}"\ndevice_id = "{NAME.device_id}"\n'
        f'registrar_url = "http://127.0.0.1:{platform.http_port}"\n'
        f'broker_url = "mqtt://127.0.0.1:{platform.mqtt_port}"\n'
        f'state_dir = "{tmp_path / "agent-state"}"\n'
        'telemetry_interval_s = 1\nkeepalive_s = 5\nlog_level = "DEBUG"\n'
        f'\n[[apps]]\nname = "app"\ncommand = {json.dumps(command)}\nstop_timeout_s = 3.0\n'
    )
    return config


@contextmanager
def agent_process(tmp_path: Path, config: Path) -> Iterator[subprocess.Popen[bytes]]:
    with (tmp_path / "agent.log").open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "iotbiz.agent", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait(timeout=10)


@asynccontextmanager
async def running_platform(settings: Settings) -> AsyncIterator[Platform]:
    platform = Platform(settings)
    await platform.start()
    try:
        yield platform
    finally:
        assert await platform.stop() == []
    assert not platform.failed.is_set()


async def until(check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


async def online(platform: Platform, want: bool = True) -> bool:
    device = await platform.store.get_device(NAME)
    return device is not None and device.online is want


def starts(tmp_path: Path) -> list[int]:
    path = tmp_path / "starts.txt"
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def settings_for(make_settings: Callable[..., Settings], **commands: Any) -> Settings:
    return make_settings(http={"host": "127.0.0.1"}, commands={"poll_s": 0.1, **commands})


@pytest.mark.timeout(120)
async def test_ping_online_and_a_command_queued_while_offline(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    async with running_platform(settings_for(make_settings)) as platform:
        await platform.store.add_customer(NAME.customer_id, 5, actor="test")
        config = agent_config(tmp_path, platform)
        with agent_process(tmp_path, config) as agent:
            await until(lambda: online(platform), 30, "the agent online")
            _, [ping] = await platform.dispatcher.send([NAME], "ping", actor="op")
            done = await platform.dispatcher.wait(ping.command_id, timeout_s=20)
            assert done.state is CommandState.DONE
            assert done.result["pong"] is True
            agent.send_signal(signal.SIGTERM)
            assert agent.wait(timeout=30) == 0
        await until(lambda: online(platform, want=False), 10, "the agent offline")

        _, [status] = await platform.dispatcher.send([NAME], "status", actor="op")
        waited = await platform.dispatcher.wait(status.command_id, timeout_s=1)
        assert waited.state is CommandState.QUEUED
        with agent_process(tmp_path, config):
            done = await platform.dispatcher.wait(status.command_id, timeout_s=30)
        assert done.state is CommandState.DONE
        assert [app["name"] for app in done.result["apps"]] == ["app"]


@pytest.mark.timeout(120)
async def test_a_command_that_arrives_after_its_expiry_stays_expired(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    """The agent is frozen (SIGSTOP) while its command is published and expires; thawed, it
    answers "expired before it arrived", which is ignored: expired is final."""
    async with running_platform(settings_for(make_settings)) as platform:
        await platform.store.add_customer(NAME.customer_id, 5, actor="test")
        with agent_process(tmp_path, agent_config(tmp_path, platform)) as agent:
            await until(lambda: online(platform), 30, "the agent online")
            agent.send_signal(signal.SIGSTOP)
            try:
                _, [command] = await platform.dispatcher.send(
                    [NAME], "ping", expires_in_s=1, actor="op"
                )
                sent = await until(
                    lambda: platform.store.get_command(command.command_id), 5, "the command"
                )
                await until(lambda: platform.dispatcher.published >= 1, 5, "the command sent")
                expired = await platform.dispatcher.wait(command.command_id, timeout_s=10)
                assert expired.state is CommandState.EXPIRED
                assert sent.command_id == command.command_id
            finally:
                agent.send_signal(signal.SIGCONT)
            await until(lambda: platform.dispatcher.ignored_replies >= 1, 20, "the late reply")
            final = await platform.store.get_command(command.command_id)
            assert final is not None
            assert (final.state, final.result) == (CommandState.EXPIRED, None)
        log = (tmp_path / "agent.log").read_text()
        assert "expired before it arrived" in log


@pytest.mark.timeout(120)
async def test_an_app_restart_resent_while_it_runs_restarts_the_app_once(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    """The restart takes 3 s (the app ignores SIGTERM); the dispatcher sends the unanswered
    command again every second meanwhile: the agent carries it out once."""
    settings = settings_for(make_settings, resend_after_s=1.0)
    async with running_platform(settings) as platform:
        await platform.store.add_customer(NAME.customer_id, 5, actor="test")
        with agent_process(tmp_path, agent_config(tmp_path, platform, stubborn=True)):
            await until(lambda: online(platform), 30, "the agent online")
            await until(lambda: len(starts(tmp_path)) == 1, 20, "the app started")
            _, [command] = await platform.dispatcher.send(
                [NAME], "app.restart", {"name": "app"}, actor="op"
            )
            done = await platform.dispatcher.wait(command.command_id, timeout_s=30)
            assert done.state is CommandState.DONE, done
            assert platform.dispatcher.published >= 2  # the same id went out again
            await assert_restarted_once(platform, tmp_path, command.command_id)


async def assert_restarted_once(platform: Platform, tmp_path: Path, command_id: str) -> None:
    """The app started twice in all (first start, one restart), and a later `status` (which the
    agent gets after every repeat of the restart) shows it running with the second pid."""
    await until(lambda: len(starts(tmp_path)) >= 2, 20, "the app started again")
    _, [status] = await platform.dispatcher.send([NAME], "status", actor="op")
    done = await platform.dispatcher.wait(status.command_id, timeout_s=20)
    assert done.state is CommandState.DONE, done
    [app] = done.result["apps"]
    first, second = starts(tmp_path)
    assert (app["state"], app["pid"]) in (("STARTING", second), ("RUNNING", second))
    assert first != second
    log = (tmp_path / "agent.log").read_text()
    assert log.count(f"command {command_id} (app.restart) done") == 1


@pytest.mark.timeout(150)
async def test_an_app_restart_survives_a_platform_restart_between_send_and_reply(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    """The command is published to a frozen agent; the platform stops and a new one starts on
    the same ports and store; thawed, the agent carries the command out (its reply reaching the
    new platform from its outbox, and the new platform sending the still-open command again on
    connect): done, and the app restarted once."""
    settings = settings_for(make_settings)
    with agent_process_holder() as holder:
        async with running_platform(settings) as first:
            await first.store.add_customer(NAME.customer_id, 5, actor="test")
            ports = {"http": first.http_port, "mqtt": first.mqtt_port}
            holder.start(tmp_path, agent_config(tmp_path, first))
            await until(lambda: online(first), 30, "the agent online")
            await until(lambda: len(starts(tmp_path)) == 1, 20, "the app started")
            holder.proc.send_signal(signal.SIGSTOP)
            _, [command] = await first.dispatcher.send(
                [NAME], "app.restart", {"name": "app"}, actor="op"
            )
            await until(lambda: first.dispatcher.published >= 1, 10, "the command published")
        again = make_settings(
            http={"host": "127.0.0.1", "port": ports["http"]},
            mqtt={"port": ports["mqtt"]},
            commands={"poll_s": 0.1},
        )
        async with running_platform(again) as second:
            sent = await second.store.get_command(command.command_id)
            assert sent is not None
            assert sent.state is CommandState.SENT
            holder.proc.send_signal(signal.SIGCONT)
            done = await second.dispatcher.wait(command.command_id, timeout_s=60)
            assert done.state is CommandState.DONE, done
            await until(lambda: online(second), 30, "the agent online again")
            await assert_restarted_once(second, tmp_path, command.command_id)


class _Holder:
    proc: subprocess.Popen[bytes]

    def start(self, tmp_path: Path, config: Path) -> None:
        self._context = agent_process(tmp_path, config)
        self.proc = self._context.__enter__()

    def close(self) -> None:
        if hasattr(self, "_context"):
            self._context.__exit__(None, None, None)


@contextmanager
def agent_process_holder() -> Iterator[_Holder]:
    """An agent process that outlives the platform it was started against."""
    holder = _Holder()
    try:
        yield holder
    finally:
        holder.close()


def test_the_app_program_notes_its_pid(tmp_path: Path) -> None:
    """The helper app itself: it writes its pid once per start."""
    program = tmp_path / "app.py"
    program.write_text(APP)
    proc = subprocess.Popen([sys.executable, str(program), str(tmp_path / "starts.txt"), "polite"])
    try:
        deadline = time.monotonic() + 10
        while not starts(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert starts(tmp_path) == [proc.pid]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert os.path.exists(tmp_path / "starts.txt")
