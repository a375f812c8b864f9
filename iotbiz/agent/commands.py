"""Commands from the platform (`cmd`), each answered exactly once on `reply`.

A command is `{"id", "action", "args", "expires_at"}`. The reply is `{"id", "ok": true,
"result"}` or `{"id", "ok": false, "error"}`. Replies are remembered by id (the last
`REMEMBERED` of them, on disk too), so a re-delivered command gets the same reply again and is
not run twice, even across an agent restart. Unknown actions and bad arguments are answered with
an error, never a crash.

Every reply fits in one MQTT message of `max_message_bytes` (the broker closes the connection on
a bigger packet): an `app.logs` reply that would not fit loses its oldest lines and says
`"truncated": true`; any other reply that would not fit becomes the error "reply too large".
`config.get` never shows the apps' environment values (secrets live there), only their names.

`update` and `rollback` go to the `Updater` (none: those actions are unknown); an update is
answered when it ends (committed, rolled back or refused), which may be after an agent restart:
the updater then calls `answer` with the outcome of the command it recovered.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from iotbiz.agent.files import read_json, write_json
from iotbiz.agent.releases import UpdateError
from iotbiz.agent.supervisor import Supervisor
from iotbiz.agent.updates import Updater
from iotbiz.settings import AgentSettings

log = logging.getLogger(__name__)

REMEMBERED = 256
MAX_LOG_LINES = 1000
REPLY_TOPIC_ALLOWANCE = 512  # the reply topic and the PUBLISH header, within max_message_bytes

Reply = dict[str, Any]
SendReply = Callable[[Reply], Awaitable[None]]
StatusReport = Callable[[], Awaitable[dict[str, Any]]]


class CommandError(Exception):
    """A command that cannot be carried out; the message is the reply's `error`."""


class CommandHandler:
    def __init__(
        self,
        settings: AgentSettings,
        supervisor: Supervisor,
        send_reply: SendReply,
        status_report: StatusReport,
        updater: Updater | None = None,
    ) -> None:
        self._settings = settings
        self._supervisor = supervisor
        self._send_reply = send_reply
        self._status_report = status_report
        self._path: Path = settings.state_dir / "replies.json"
        self._max_reply_bytes = settings.max_message_bytes - REPLY_TOPIC_ALLOWANCE
        self._write_lock = asyncio.Lock()
        self._replies: OrderedDict[str, Reply] = OrderedDict()
        self._running: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._actions: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]] = {
            "ping": self._ping,
            "status": self._status,
            "app.start": self._app_start,
            "app.stop": self._app_stop,
            "app.restart": self._app_restart,
            "app.logs": self._app_logs,
            "config.get": self._config_get,
        }
        self._updater = updater
        # actions that are given the command's id too (the update journal records it)
        self._actions_with_id: dict[str, Callable[[dict[str, Any], str], Awaitable[Any]]] = {}
        if updater is not None:
            self._actions_with_id = {"update": self._update, "rollback": self._rollback}

    async def load(self) -> None:
        saved = await asyncio.to_thread(read_json, self._path)
        if isinstance(saved, list):
            for reply in saved[-REMEMBERED:]:
                if isinstance(reply, dict) and isinstance(reply.get("id"), str):
                    self._replies[reply["id"]] = reply

    async def receive(self, payload: bytes) -> None:
        """Take a command from the link; it runs in its own task so the link keeps reading."""
        task = asyncio.create_task(self._handle(payload))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def answer(self, command_id: str, result: Any) -> None:
        """Reply to `command_id` with `result`, unless it was answered or is being run (the
        outcome of an update that the agent finished after a restart)."""
        if command_id in self._replies or command_id in self._running:
            return
        reply = self._fit({"id": command_id, "ok": True, "result": result})
        log.info("command %s answered after recovery", command_id)
        self._remember(reply)
        await self._save()
        await self._send_reply(reply)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, payload: bytes) -> None:
        try:
            command = json.loads(payload)
        except (ValueError, RecursionError):
            command = None
        raw_id = command.get("id") if isinstance(command, dict) else None
        if not isinstance(raw_id, str | int) or isinstance(raw_id, bool) or raw_id == "":
            log.warning("ignored a command without an id: %.200r", payload)
            return
        command_id = str(raw_id)
        assert isinstance(command, dict)  # noqa: S101 - checked with raw_id above
        remembered = self._replies.get(command_id)
        if remembered is not None:
            log.info("command %s delivered again: sending the same reply", command_id)
            await self._send_reply(remembered)
            return
        if command_id in self._running:
            return  # the same command is being carried out; its reply comes once
        self._running.add(command_id)
        try:
            reply = self._fit(await self._run(command_id, command))
            self._remember(reply)
            await self._save()
            await self._send_reply(reply)
        finally:
            self._running.discard(command_id)

    async def _run(self, command_id: str, command: dict[str, Any]) -> Reply:
        action, args = command.get("action"), command.get("args", {})
        expires_at = command.get("expires_at")
        try:
            if isinstance(expires_at, int | float) and expires_at < time.time():
                raise CommandError("command expired before it arrived")
            known = action in self._actions or action in self._actions_with_id
            if not isinstance(action, str) or not known:
                raise CommandError(f"unknown action {action!r}")
            if args is None:
                args = {}
            if not isinstance(args, dict):
                raise CommandError("args must be an object")
            if action in self._actions_with_id:
                result = await self._actions_with_id[action](args, command_id)
            else:
                result = await self._actions[action](args)
        except (CommandError, UpdateError) as exc:
            log.info("command %s (%s) failed: %s", command_id, action, exc)
            return {"id": command_id, "ok": False, "error": str(exc)}
        except Exception:  # a bug must not take the agent down; the platform gets an answer
            log.exception("command %s (%s) crashed", command_id, action)
            return {"id": command_id, "ok": False, "error": "internal error in the agent"}
        log.info("command %s (%s) done", command_id, action)
        return {"id": command_id, "ok": True, "result": result}

    async def _save(self) -> None:
        """Write the remembered replies; one write at a time, each of the latest state, so that
        concurrent commands never leave an older list on disk."""
        async with self._write_lock:
            await asyncio.to_thread(write_json, self._path, list(self._replies.values()))

    def _fit(self, reply: Reply) -> Reply:
        """`reply`, made to fit in one MQTT message (see the module docstring)."""
        if _size(reply) <= self._max_reply_bytes:
            return reply
        result = reply.get("result")
        if isinstance(result, dict) and isinstance(result.get("lines"), list):
            lines: list[Any] = result["lines"]
            room = self._max_reply_bytes - _size({**reply, "result": {**result, "lines": []}})
            kept = 0
            for line in reversed(lines):
                room -= _size(line) + 1  # the line and its comma
                if room < 0:
                    break
                kept += 1
            trimmed = {**reply, "result": {**result, "lines": lines[len(lines) - kept :]}}
            trimmed["result"]["truncated"] = True
            log.info(
                "command %s: reply cut to its last %d of %d lines", reply["id"], kept, len(lines)
            )
            if _size(trimmed) <= self._max_reply_bytes:
                return trimmed
        log.warning("command %s: reply of %d bytes too large", reply["id"], _size(reply))
        return {"id": reply["id"], "ok": False, "error": "reply too large"}

    def _remember(self, reply: Reply) -> None:
        self._replies[reply["id"]] = reply
        while len(self._replies) > REMEMBERED:
            self._replies.popitem(last=False)

    # -- actions --------------------------------------------------------------------------------

    async def _ping(self, args: dict[str, Any]) -> Any:
        return {"pong": True, "ts": time.time()}

    async def _status(self, args: dict[str, Any]) -> Any:
        return await self._status_report()

    async def _app_start(self, args: dict[str, Any]) -> Any:
        return (await self._supervisor.start(self._app_name(args))).to_json()

    async def _app_stop(self, args: dict[str, Any]) -> Any:
        return (await self._supervisor.stop(self._app_name(args))).to_json()

    async def _app_restart(self, args: dict[str, Any]) -> Any:
        return (await self._supervisor.restart(self._app_name(args))).to_json()

    async def _app_logs(self, args: dict[str, Any]) -> Any:
        name = self._app_name(args)
        lines = args.get("lines", 100)
        if not isinstance(lines, int) or isinstance(lines, bool) or not 1 <= lines <= MAX_LOG_LINES:
            raise CommandError(f"args.lines must be a whole number from 1 to {MAX_LOG_LINES}")
        return {"app": name, "lines": self._supervisor.tail(name, lines), "truncated": False}

    async def _config_get(self, args: dict[str, Any]) -> Any:
        return settings_to_json(self._settings)

    async def _update(self, args: dict[str, Any], command_id: str) -> Any:
        assert self._updater is not None  # noqa: S101 - only registered with an updater
        return await self._updater.update(args, command_id)

    async def _rollback(self, args: dict[str, Any], command_id: str) -> Any:
        assert self._updater is not None  # noqa: S101 - only registered with an updater
        return await self._updater.rollback(args)

    def _app_name(self, args: dict[str, Any]) -> str:
        name = args.get("name")
        if not isinstance(name, str):
            raise CommandError("args.name must be the name of an app")
        if name not in self._supervisor.names():
            raise CommandError(f"no app named {name!r}")
        return name


def _size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":")).encode())


def settings_to_json(settings: AgentSettings) -> dict[str, Any]:
    """The agent's settings as JSON, without secrets: the password is in state_dir, and of the
    apps' `env` only the names are shown, never the values."""

    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, tuple | list):
            return [plain(item) for item in value]
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        return value

    config = {key: plain(value) for key, value in dataclasses.asdict(settings).items()}
    for app in config["apps"]:
        app["env"] = sorted(app["env"]) if app.get("env") else []
    return config
