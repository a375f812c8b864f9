"""Commands from the platform against a real Supervisor running a real app (a Python loop that
prints a line every 20 ms): every action, every error reply, and replies remembered by id.

These tests call the CommandHandler and take its replies from the real replies Outbox, as the
link does. Delivery (bursts, re-deliveries, replies too big for a packet, restarts) is tested
through a whole agent and a real broker in test_delivery_commands.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from iotbiz.agent.commands import CommandHandler, Reply, StatusReport
from iotbiz.agent.outbox import Message, Outbox
from iotbiz.agent.supervisor import AppState, Supervisor
from iotbiz.settings import AgentSettings, AppSettings, load_agent_settings

pytestmark = pytest.mark.timeout(30)

TICKER = (
    "import itertools, time\n"
    "for n in itertools.count():\n"
    "    print(f'tick {n}', flush=True)\n"
    "    time.sleep(0.02)\n"
)
LINES_ERROR = "args.lines must be a whole number from 1 to 1000"
NAME_ERROR = "args.name must be the name of an app"


async def until(check: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.02)


class Commands:
    """One CommandHandler whose replies go into a real Outbox, as in the agent; `replies` are
    those taken from the outbox so far, as the link's sender takes them."""

    def __init__(
        self,
        settings: AgentSettings,
        supervisor: Supervisor,
        status_report: StatusReport | None = None,
    ) -> None:
        self.replies: list[Reply] = []
        self.outbox = Outbox(
            settings.state_dir,
            settings.replies_max_messages,
            name="outbox-replies",
            max_message_bytes=settings.max_message_bytes,
        )
        self.handler = CommandHandler(
            settings, supervisor, self._send_reply, status_report or _no_status
        )

    async def _send_reply(self, reply: Reply) -> None:
        await self.outbox.put(Message("devices/abc123/cmd-1/reply", json.dumps(reply).encode()))

    async def deliver(self, command: dict[str, Any] | bytes) -> None:
        payload = command if isinstance(command, bytes) else json.dumps(command).encode()
        await self.handler.receive(payload)

    async def wait_replies(self, count: int) -> list[Reply]:
        deadline = time.monotonic() + 5.0
        while len(self.replies) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {count} replies")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.outbox.available.wait(), left)
            entries = self.outbox.head(100)
            self.replies.extend(json.loads(entry.message.payload) for entry in entries)
            await self.outbox.done([entry.id for entry in entries])
        return self.replies

    async def ask(self, command: dict[str, Any]) -> Reply:
        """Deliver `command` and return its reply (the next one to arrive)."""
        before = len(self.replies)
        await self.deliver(command)
        return (await self.wait_replies(before + 1))[before]


async def _no_status() -> dict[str, Any]:
    return {}


@pytest.fixture
def settings(tmp_path: Path) -> AgentSettings:
    loaded = load_agent_settings(
        None,
        environ={},
        overrides={"customer_id": "abc123", "device_id": "cmd-1", "state_dir": tmp_path},
    )
    ticker = AppSettings(
        name="ticker",
        command=(sys.executable, "-c", TICKER),
        start_s=0.2,
        stop_timeout_s=2.0,
        backoff_s=0.2,
        backoff_max_s=0.5,
    )
    return dataclasses.replace(loaded, apps=(ticker,))


@pytest.fixture
def events() -> list[dict[str, Any]]:
    return []


@pytest_asyncio.fixture
async def supervisor(
    settings: AgentSettings, events: list[dict[str, Any]]
) -> AsyncIterator[Supervisor]:
    """The settings' apps, started and RUNNING; all stopped after the test."""
    started = Supervisor(
        settings.apps,
        settings.state_dir / "logs",
        log_max_bytes=settings.log_max_bytes,
        log_backups=settings.log_backups,
        tail_lines=settings.log_tail_lines,
        on_event=events.append,
    )
    try:
        await started.start_all()
        await until(lambda: running(started), "the app to run")
        yield started
    finally:
        async with asyncio.timeout(20):
            await started.stop_all()


@pytest_asyncio.fixture
async def make_commands(
    settings: AgentSettings, supervisor: Supervisor
) -> AsyncIterator[Callable[..., Awaitable[Commands]]]:
    """CommandHandlers with their replies outboxes, loaded; closed after the test."""
    made: list[Commands] = []

    async def make(status_report: StatusReport | None = None) -> Commands:
        commands = Commands(settings, supervisor, status_report)
        await commands.outbox.load()
        await commands.handler.load()
        made.append(commands)
        return commands

    yield make
    for commands in made:
        await commands.handler.close()


@pytest_asyncio.fixture
async def commands(make_commands: Callable[..., Awaitable[Commands]]) -> Commands:
    return await make_commands()


def running(supervisor: Supervisor) -> bool:
    return supervisor.status("ticker").state is AppState.RUNNING


def stops(events: list[dict[str, Any]]) -> int:
    """How many times the app went to STOPPED: one per app.stop or app.restart carried out."""
    return sum(1 for event in events if event.get("to") == AppState.STOPPED)


def failed(command_id: str, error: str) -> Reply:
    return {"id": command_id, "ok": False, "error": error}


# -- actions --------------------------------------------------------------------------------------


async def test_ping(commands: Commands) -> None:
    before = time.time()
    reply = await commands.ask({"id": "c1", "action": "ping", "args": {}})
    assert reply == {"id": "c1", "ok": True, "result": {"pong": True, "ts": reply["result"]["ts"]}}
    assert before <= reply["result"]["ts"] <= time.time()


async def test_args_may_be_missing_or_null(commands: Commands) -> None:
    missing = await commands.ask({"id": "c1", "action": "ping"})
    null = await commands.ask({"id": "c2", "action": "ping", "args": None})
    assert (missing["ok"], null["ok"]) == (True, True)


async def test_a_numeric_id_is_answered_as_a_string(commands: Commands) -> None:
    reply = await commands.ask({"id": 7, "action": "ping"})
    assert (reply["id"], reply["ok"]) == ("7", True)


async def test_status_is_the_status_report(
    make_commands: Callable[..., Awaitable[Commands]], supervisor: Supervisor
) -> None:
    async def status_report() -> dict[str, Any]:
        return {"apps": [status.to_json() for status in supervisor.statuses()]}

    commands = await make_commands(status_report)
    reply = await commands.ask({"id": "s1", "action": "status"})
    assert reply["ok"] is True
    assert [app["name"] for app in reply["result"]["apps"]] == ["ticker"]
    assert reply["result"]["apps"][0]["state"] == "RUNNING"
    assert reply["result"]["apps"][0]["pid"] == supervisor.status("ticker").pid


async def test_a_crashing_action_is_an_internal_error(
    make_commands: Callable[..., Awaitable[Commands]],
) -> None:
    async def broken_report() -> dict[str, Any]:
        raise RuntimeError("secret detail")

    commands = await make_commands(broken_report)
    reply = await commands.ask({"id": "s1", "action": "status"})
    assert reply == failed("s1", "internal error in the agent")


async def test_app_stop_start_and_restart(
    commands: Commands, supervisor: Supervisor, events: list[dict[str, Any]]
) -> None:
    first_pid = supervisor.status("ticker").pid
    assert first_pid is not None

    stopped = await commands.ask({"id": "a1", "action": "app.stop", "args": {"name": "ticker"}})
    assert stopped["ok"] is True
    assert stopped["result"]["name"] == "ticker"
    assert (stopped["result"]["state"], stopped["result"]["pid"]) == ("STOPPED", None)
    assert supervisor.status("ticker").state is AppState.STOPPED

    again = await commands.ask({"id": "a2", "action": "app.stop", "args": {"name": "ticker"}})
    assert (again["ok"], again["result"]["state"]) == (True, "STOPPED")  # stopping twice is fine

    started = await commands.ask({"id": "a3", "action": "app.start", "args": {"name": "ticker"}})
    assert started["ok"] is True
    assert started["result"]["state"] in ("STARTING", "RUNNING")
    await until(lambda: running(supervisor), "the app to run again")
    second_pid = supervisor.status("ticker").pid
    assert second_pid not in (None, first_pid)

    restarted = await commands.ask(
        {"id": "a4", "action": "app.restart", "args": {"name": "ticker"}}
    )
    assert restarted["ok"] is True
    assert restarted["result"]["state"] in ("STARTING", "RUNNING")
    # `restarts` counts the supervisor's own (automatic) restarts, not the operator's.
    assert restarted["result"]["restarts"] == 0
    await until(lambda: running(supervisor), "the app to run after the restart")
    assert supervisor.status("ticker").pid not in (None, first_pid, second_pid)
    assert stops(events) == 2  # app.stop and app.restart; the second app.stop had nothing to do


async def test_app_logs(commands: Commands, supervisor: Supervisor) -> None:
    await until(lambda: len(supervisor.tail("ticker", 3)) == 3, "three lines of output")

    default = await commands.ask({"id": "l1", "action": "app.logs", "args": {"name": "ticker"}})
    assert default["ok"] is True
    assert default["result"]["app"] == "ticker"
    lines = default["result"]["lines"]
    assert 3 <= len(lines) <= 100
    assert all(line.startswith("tick ") for line in lines)

    two = await commands.ask(
        {"id": "l2", "action": "app.logs", "args": {"name": "ticker", "lines": 2}}
    )
    assert two["ok"] is True
    assert len(two["result"]["lines"]) == 2
    numbers = [int(line.removeprefix("tick ")) for line in two["result"]["lines"]]
    assert numbers[1] == numbers[0] + 1
    assert numbers[1] >= int(lines[-1].removeprefix("tick "))  # the most recent lines


async def test_app_logs_default_is_100_lines(commands: Commands, supervisor: Supervisor) -> None:
    await until(lambda: len(supervisor.tail("ticker", 101)) == 101, "101 lines", timeout_s=10)
    reply = await commands.ask({"id": "l1", "action": "app.logs", "args": {"name": "ticker"}})
    assert len(reply["result"]["lines"]) == 100


@pytest.mark.parametrize("lines", [0, 1001, -1, "x", "10", 2.5, True, None])
async def test_app_logs_rejects_bad_line_counts(commands: Commands, lines: Any) -> None:
    command = {"id": "l1", "action": "app.logs", "args": {"name": "ticker", "lines": lines}}
    assert await commands.ask(command) == failed("l1", LINES_ERROR)


@pytest.mark.parametrize("action", ["app.start", "app.stop", "app.restart", "app.logs"])
async def test_app_actions_check_the_name(commands: Commands, action: str) -> None:
    unknown = await commands.ask({"id": "n1", "action": action, "args": {"name": "nope"}})
    missing = await commands.ask({"id": "n2", "action": action, "args": {}})
    not_text = await commands.ask({"id": "n3", "action": action, "args": {"name": 5}})
    assert unknown == failed("n1", "no app named 'nope'")
    assert missing == failed("n2", NAME_ERROR)
    assert not_text == failed("n3", NAME_ERROR)


@pytest.mark.parametrize("args", [[], ["ticker"], "ticker", 5, True])
async def test_args_must_be_an_object(
    commands: Commands, supervisor: Supervisor, args: Any
) -> None:
    reply = await commands.ask({"id": "x1", "action": "app.stop", "args": args})
    assert reply == failed("x1", "args must be an object")
    assert running(supervisor)


@pytest.mark.parametrize(
    ("command", "error"),
    [
        ({"id": "u1", "action": "reboot"}, "unknown action 'reboot'"),
        ({"id": "u1", "action": "__init__"}, "unknown action '__init__'"),
        ({"id": "u1", "action": 5}, "unknown action 5"),
        ({"id": "u1"}, "unknown action None"),
    ],
)
async def test_unknown_actions(commands: Commands, command: dict[str, Any], error: str) -> None:
    assert await commands.ask(command) == failed("u1", error)


async def test_config_get_is_json_without_secrets(
    commands: Commands, settings: AgentSettings, tmp_path: Path
) -> None:
    reply = await commands.ask({"id": "g1", "action": "config.get"})
    assert reply["ok"] is True
    config = reply["result"]
    assert json.loads(json.dumps(config)) == config  # plain JSON: no Path, no tuple
    assert config["customer_id"] == "abc123"
    assert config["device_id"] == "cmd-1"
    assert config["state_dir"] == str(tmp_path)
    assert config["apps"][0]["name"] == "ticker"
    assert config["apps"][0]["command"] == list(settings.apps[0].command)
    assert set(config) == {field.name for field in dataclasses.fields(AgentSettings)}
    assert "password" not in json.dumps(config).lower()
    assert config["apps"][0]["env"] == []


async def test_config_get_shows_the_names_of_environment_variables_never_the_values(
    settings: AgentSettings, supervisor: Supervisor
) -> None:
    """Issue 8 fault 8: config.get returned the apps' `env` (secrets live there) to any
    service-role account."""
    secret_app = dataclasses.replace(
        settings.apps[0], env={"API_KEY": "s3cr3t-value", "DB_URL": "postgres://u:pw@db/x"}
    )
    commands = Commands(dataclasses.replace(settings, apps=(secret_app,)), supervisor)
    await commands.outbox.load()
    try:
        reply = await commands.ask({"id": "g1", "action": "config.get"})
    finally:
        await commands.handler.close()
    assert reply["result"]["apps"][0]["env"] == ["API_KEY", "DB_URL"]
    text = json.dumps(reply)
    assert "s3cr3t-value" not in text
    assert "pw@db" not in text


# -- delivery ------------------------------------------------------------------------------------


async def test_an_expired_command_is_not_run(
    commands: Commands, supervisor: Supervisor, events: list[dict[str, Any]]
) -> None:
    expired = {
        "id": "e1",
        "action": "app.stop",
        "args": {"name": "ticker"},
        "expires_at": time.time() - 1,
    }
    assert await commands.ask(expired) == failed("e1", "command expired before it arrived")
    assert running(supervisor)
    assert stops(events) == 0

    current = {"id": "e2", "action": "ping", "expires_at": time.time() + 60}
    assert (await commands.ask(current))["ok"] is True
