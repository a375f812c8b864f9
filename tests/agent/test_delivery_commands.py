"""Commands delivered over MQTT: an operator publishes commands through a real platform (broker
and registrar, in this process on ports 0) to a whole Agent (in this process too, with real
apps); the replies come back through the agent's replies outbox, its link and the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from iotbiz import topics
from iotbiz.agent.agent import Agent
from iotbiz.agent.commands import Reply
from iotbiz.names import DeviceName
from iotbiz.platform import Platform
from iotbiz.settings import AgentSettings, AppSettings, Settings, load_agent_settings
from tests.agent.test_commands import TICKER, running, until
from tests.agent.test_delivery_link import operator_device, started_platform
from tests.mqtt_device import PahoDevice

pytestmark = pytest.mark.timeout(60)

AGENT = DeviceName("abc123", "cmd-1")
CMD = topics.device_topic(AGENT, topics.CMD)
REPLY_TOPIC = topics.device_topic(AGENT, topics.REPLY)
NOISY = (  # 200 lines of 8 KiB (a line is cut at 8 KiB), then quiet
    "import sys, time\n"
    "for n in range(200):\n"
    "    print(f'{n:04d}' + 'x' * 8187, flush=True)\n"
    "time.sleep(3600)\n"
)


class Operator:
    """An operator on MQTT: publishes commands to the agent, collects its replies by id."""

    def __init__(self, device: PahoDevice) -> None:
        self.device = device
        self.replies: list[Reply] = []

    async def send(self, command: dict[str, Any] | bytes) -> None:
        payload = command if isinstance(command, bytes) else json.dumps(command)
        await self.device.publish(CMD, payload)

    async def collect(self, check: Callable[[list[Reply]], bool], timeout_s: float = 15) -> None:
        deadline = time.monotonic() + timeout_s
        while not check(self.replies):
            left = deadline - time.monotonic()
            if left <= 0:
                ids = [reply.get("id") for reply in self.replies]
                raise AssertionError(f"timed out after {timeout_s} s; replies so far: {ids}")
            message = await self.device.next_message(timeout=min(left, 0.5))
            if message is not None and message.topic == REPLY_TOPIC:
                self.replies.append(json.loads(message.payload))

    def of(self, command_id: str) -> list[Reply]:
        return [reply for reply in self.replies if reply.get("id") == command_id]

    async def ask(self, command: dict[str, Any], timeout_s: float = 15) -> Reply:
        """Send `command` and return its reply (the first one with its id)."""
        command_id = str(command["id"])
        before = len(self.of(command_id))
        await self.send(command)
        await self.collect(lambda _: len(self.of(command_id)) > before, timeout_s)
        return self.of(command_id)[before]


@pytest_asyncio.fixture
async def platform(make_settings: Callable[..., Settings]) -> AsyncIterator[Platform]:
    async with started_platform(make_settings(http={"host": "127.0.0.1"})) as started:
        yield started


@pytest.fixture
def agent_settings(tmp_path: Path, platform: Platform) -> AgentSettings:
    loaded = load_agent_settings(
        None,
        environ={},
        overrides={
            "customer_id": AGENT.customer_id,
            "device_id": AGENT.device_id,
            "state_dir": tmp_path / "agent",
            "registrar_url": f"http://127.0.0.1:{platform.http_port}",
            "broker_url": f"mqtt://127.0.0.1:{platform.mqtt_port}",
            "keepalive_s": 5,
        },
    )
    ticker = AppSettings(
        name="ticker",
        command=(sys.executable, "-c", TICKER),
        start_s=0.2,
        stop_timeout_s=2.0,
        backoff_s=0.2,
        backoff_max_s=0.5,
    )
    noisy = AppSettings(name="noisy", command=(sys.executable, "-c", NOISY), start_s=0.2)
    return dataclasses.replace(loaded, apps=(ticker, noisy))


@contextlib.asynccontextmanager
async def agent_running(settings: AgentSettings) -> AsyncIterator[Agent]:
    """A whole agent in this process, until the block ends (then stopped as by SIGTERM)."""
    agent = Agent(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await until(lambda: agent.link is not None and agent.link.connected.is_set(), "online", 15)
        yield agent
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 20) == 0


@pytest_asyncio.fixture
async def operator(platform: Platform) -> AsyncIterator[Operator]:
    async with operator_device(platform) as device:
        yield Operator(device)


@pytest_asyncio.fixture
async def agent(agent_settings: AgentSettings) -> AsyncIterator[Agent]:
    async with agent_running(agent_settings) as started:
        yield started


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"",
        b"\xff\xfe",
        b"[1, 2]",
        b'"e1"',
        b'{"action": "ping"}',
        b'{"id": "", "action": "ping"}',
        b'{"id": null, "action": "ping"}',
        b'{"id": true, "action": "ping"}',
        b'{"id": ["e1"], "action": "ping"}',
        b"[" * 100_000,
    ],
)
async def test_no_reply_without_an_id(agent: Agent, operator: Operator, payload: bytes) -> None:
    await operator.send(payload)
    reply = await operator.ask({"id": "after", "action": "ping"})  # the agent still works
    # the reply to "after" comes through the same queue after anything sent before it
    assert operator.replies == [reply]
    assert reply["id"] == "after"


async def test_a_burst_of_commands_gets_every_reply_once(agent: Agent, operator: Operator) -> None:
    """Issue 8 fault 10: 8 pings in one burst got 3 replies (temporary files of concurrent
    writes of replies.json collided)."""
    ids = [f"b{i}" for i in range(50)]
    await asyncio.gather(*(operator.send({"id": i, "action": "ping"}) for i in ids))
    await operator.collect(lambda _: all(operator.of(i) for i in ids))
    await operator.ask({"id": "barrier", "action": "ping"})  # later than any duplicate
    assert sorted(r["id"] for r in operator.replies if r["id"] != "barrier") == sorted(ids)
    assert all(r["ok"] for r in operator.replies)


async def test_app_logs_too_long_for_one_message_is_cut_and_says_so(
    agent: Agent, operator: Operator
) -> None:
    """Issue 8 fault 6: 200 lines of 8 KiB did not fit in the broker's 256 KiB packets; the
    broker closed the connection and the agent resent the reply after every reconnect."""
    await until(lambda: len(agent.supervisor.tail("noisy", 200)) == 200, "200 long lines", 15)
    reply = await operator.ask(
        {"id": "big", "action": "app.logs", "args": {"name": "noisy", "lines": 200}}
    )
    assert reply["ok"] is True
    result = reply["result"]
    assert result["truncated"] is True
    assert 1 <= len(result["lines"]) < 200
    assert result["lines"][-1].startswith("0199")  # the newest lines are kept
    numbers = [int(line[:4]) for line in result["lines"]]
    assert numbers == list(range(200 - len(numbers), 200))
    assert len(json.dumps(reply)) <= agent.settings.max_message_bytes
    small = await operator.ask(
        {"id": "small", "action": "app.logs", "args": {"name": "noisy", "lines": 3}}
    )
    assert (small["result"]["truncated"], len(small["result"]["lines"])) == (False, 3)
    assert agent.link is not None
    assert agent.link.connections == 1  # the broker never closed the connection


async def test_a_redelivered_command_runs_once_and_gets_the_same_reply(
    agent: Agent, operator: Operator
) -> None:
    command = {"id": "d1", "action": "app.restart", "args": {"name": "ticker"}}
    first = await operator.ask(command)
    await until(lambda: running(agent.supervisor), "the app to run after the restart")
    pid = agent.supervisor.status("ticker").pid

    second = await operator.ask(command)
    assert second == first
    assert operator.of("d1") == [first, first]
    assert agent.supervisor.status("ticker").pid == pid


async def test_a_duplicate_in_flight_is_answered_once(agent: Agent, operator: Operator) -> None:
    pid = agent.supervisor.status("ticker").pid
    command = {"id": "d1", "action": "app.restart", "args": {"name": "ticker"}}
    await operator.send(command)
    await operator.send(command)  # while the first is still being carried out
    await operator.collect(lambda _: bool(operator.of("d1")))
    await operator.ask({"id": "barrier", "action": "ping"})
    assert len(operator.of("d1")) == 1
    await until(lambda: running(agent.supervisor), "the app to run after the restart")
    new_pid = agent.supervisor.status("ticker").pid
    assert new_pid not in (None, pid)
    assert agent.supervisor.status("ticker").restarts == 0


async def test_replies_are_remembered_across_a_restart(
    agent_settings: AgentSettings, operator: Operator
) -> None:
    restart = {"id": "r1", "action": "app.restart", "args": {"name": "ticker"}}
    ping = {"id": "r2", "action": "ping"}
    async with agent_running(agent_settings) as before:
        restarted = await operator.ask(restart)
        pinged = await operator.ask(ping)
        await until(lambda: running(before.supervisor), "the app to run after the restart")

    async with agent_running(agent_settings) as after:  # the same state_dir, as after a reboot
        pid = after.supervisor.status("ticker").pid
        assert await operator.ask(restart) == restarted
        assert await operator.ask(ping) == pinged  # the same ts: not run again
        assert after.supervisor.status("ticker").pid == pid
        fresh = await operator.ask({"id": "r3", "action": "ping"})
        assert fresh["result"]["ts"] > pinged["result"]["ts"]
