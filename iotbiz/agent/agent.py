"""The agent: supervises the device's apps, enrolls, stays connected, reports, obeys.

Apps start first and keep running whatever the network does; enrollment and the MQTT link follow
(retrying for ever); telemetry is queued in the outbox from the start and reaches the platform
when the link is up. SIGTERM: stop the apps, publish `offline`, disconnect, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from collections.abc import Coroutine
from typing import Any

from iotbiz import __version__, topics
from iotbiz.agent.commands import CommandHandler
from iotbiz.agent.files import make_private_dir
from iotbiz.agent.identity import Enrollment, resolve_device_id
from iotbiz.agent.link import Link, NotAuthorized
from iotbiz.agent.outbox import Message, Outbox
from iotbiz.agent.processes import become_subreaper
from iotbiz.agent.supervisor import Supervisor
from iotbiz.agent.systemd import keep_watchdog_fed, notify
from iotbiz.agent.telemetry import collect_system
from iotbiz.names import DeviceName
from iotbiz.settings import AgentSettings

log = logging.getLogger(__name__)

REFUSED_PAUSE_S = 30.0


class Agent:
    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.name = DeviceName(settings.customer_id, resolve_device_id(settings))
        make_private_dir(settings.state_dir)
        self.outbox = Outbox(settings.state_dir, settings.outbox_max_messages)
        self.supervisor = Supervisor(
            settings.apps,
            settings.state_dir / "logs",
            log_max_bytes=settings.log_max_bytes,
            log_backups=settings.log_backups,
            tail_lines=settings.log_tail_lines,
            on_event=self._on_app_event,
        )
        self.enrollment = Enrollment(settings, self.name.device_id)
        self.commands = CommandHandler(settings, self.supervisor, self._send_reply, self.report)
        self.link: Link | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def run(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set, then shut down cleanly."""
        await self.outbox.load()
        await self.commands.load()
        (self.settings.state_dir / "logs").mkdir(mode=0o700, exist_ok=True)
        await self.supervisor.start_all()
        self._spawn(self._report_every_interval(), "telemetry")
        self._spawn(self._stay_online(), "link")
        self._spawn(keep_watchdog_fed(), "watchdog")
        notify("READY=1")
        log.info(
            "agent %s running %d app(s) as %s", __version__, len(self.settings.apps), self.name
        )
        try:
            await stop.wait()
        finally:
            await self._shut_down()

    async def _shut_down(self) -> None:
        log.info("stopping")
        notify("STOPPING=1")
        await self.supervisor.stop_all()
        if self.link is not None:
            await self.link.close()
        await self.commands.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        log.info("stopped")

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    async def _stay_online(self) -> None:
        while True:
            credentials = await self.enrollment.credentials()
            self.link = Link(self.settings, credentials, self.outbox, self.commands.receive)
            try:
                await self.link.run()
            except NotAuthorized as exc:
                log.error("the broker refused %s: %s", credentials.name, exc)
                if not await self.enrollment.recheck(credentials):
                    await asyncio.sleep(REFUSED_PAUSE_S)

    # -- telemetry, events, replies ---------------------------------------------------------

    async def report(self) -> dict[str, Any]:
        """The telemetry message: system metrics, apps, and the agent's own state."""
        system = await asyncio.to_thread(collect_system, self.settings.state_dir)
        apps = await self.supervisor.sample()
        return {
            "ts": round(time.time(), 3),
            "agent_version": __version__,
            "system": system,
            "apps": [app.to_json() for app in apps],
            "outbox": {"queued": len(self.outbox), "dropped": self.outbox.dropped},
            "online": self.link is not None and self.link.connected.is_set(),
        }

    async def _report_every_interval(self) -> None:
        topic = topics.device_topic(self.name, topics.TELEMETRY)
        while True:
            await self.outbox.put(Message(topic, _json(await self.report())))
            await asyncio.sleep(self.settings.telemetry_interval_s)

    def _on_app_event(self, event: dict[str, Any]) -> None:
        topic = topics.device_topic(self.name, topics.EVENTS)
        self._spawn(self.outbox.put(Message(topic, _json(event))), "event")

    async def _send_reply(self, reply: dict[str, Any]) -> None:
        topic = topics.device_topic(self.name, topics.REPLY)
        await self.outbox.put(Message(topic, _json(reply)))


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


async def run_agent(settings: AgentSettings) -> None:
    """Run the agent until SIGTERM or SIGINT."""
    become_subreaper()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    agent = Agent(settings)
    with contextlib.suppress(asyncio.CancelledError):
        await agent.run(stop)
