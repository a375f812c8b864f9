"""The agent: supervises the device's apps, enrolls, stays connected, reports, obeys.

Apps start first and keep running whatever the network does; enrollment and the MQTT link follow
(retrying for ever); telemetry is queued in the outbox from the start and reaches the platform
when the link is up. Command replies have their own queue (`outbox-replies.jsonl`), sent before
telemetry, so that a flood of telemetry never pushes a reply out.

SIGTERM or SIGINT: stop the apps, publish `offline`, disconnect, exit 0. The shutdown is bounded:
the apps' stop timeouts, then at most `SHUTDOWN_GRACE_S` for the agent's own tasks; a task still
running then is logged with its stack and the process exits 1 at once. A second SIGTERM/SIGINT
during the shutdown kills the apps' process groups and exits at once (128 + the signal).

Every long-lived task (telemetry, link, watchdog) is owned here: one that dies, or ends when it
should run for ever, is logged and stops the agent with exit code 1, so that systemd restarts it;
from that moment the systemd watchdog is no longer fed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Coroutine, Sequence
from dataclasses import replace
from typing import Any

from iotbiz import __version__, topics
from iotbiz.agent.commands import CommandHandler
from iotbiz.agent.files import make_private_dir
from iotbiz.agent.identity import Enrollment, resolve_device_id
from iotbiz.agent.link import Link, NotAuthorized
from iotbiz.agent.outbox import Message, Outbox
from iotbiz.agent.processes import become_subreaper
from iotbiz.agent.supervisor import Supervisor
from iotbiz.agent.systemd import keep_watchdog_fed, notify, watchdog_interval_s
from iotbiz.agent.telemetry import collect_system
from iotbiz.agent.updates import Updater, release_cwd
from iotbiz.names import DeviceName
from iotbiz.settings import AgentSettings

log = logging.getLogger(__name__)

REFUSED_PAUSE_S = 30.0
SHUTDOWN_GRACE_S = 3.0  # for the agent's own tasks to end once cancelled


class Agent:
    def __init__(self, settings: AgentSettings) -> None:
        # a release app runs in its `current` release
        apps = tuple(
            replace(app, cwd=release_cwd(settings.state_dir, app.name)) if app.release else app
            for app in settings.apps
        )
        settings = replace(settings, apps=apps)
        self.settings = settings
        self.name = DeviceName(settings.customer_id, resolve_device_id(settings))
        make_private_dir(settings.state_dir)
        self.outbox = Outbox(
            settings.state_dir,
            settings.outbox_max_messages,
            max_message_bytes=settings.max_message_bytes,
        )
        self.replies = Outbox(
            settings.state_dir,
            settings.replies_max_messages,
            name="outbox-replies",
            max_message_bytes=settings.max_message_bytes,
        )
        self.supervisor = Supervisor(
            settings.apps,
            settings.state_dir / "logs",
            log_max_bytes=settings.log_max_bytes,
            log_backups=settings.log_backups,
            tail_lines=settings.log_tail_lines,
            on_event=self._on_app_event,
            state_file=settings.state_dir / "supervisor.json",
        )
        self.enrollment = Enrollment(settings, self.name.device_id)
        self.updater = Updater(settings, self.supervisor, self._on_app_event, self._device_login)
        self.commands = CommandHandler(
            settings, self.supervisor, self._send_reply, self.report, self.updater
        )
        self.link: Link | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._lasting: set[asyncio.Task[Any]] = set()  # tasks meant to run until the shutdown
        self._stop = asyncio.Event()
        self._stopping = False
        self.exit_code = 0
        self.stuck: list[asyncio.Task[Any]] = []  # tasks that outlived SHUTDOWN_GRACE_S

    async def run(self, stop: asyncio.Event) -> int:
        """Run until `stop` is set (or a task dies), then shut down; return the exit code."""
        self._stop = stop
        try:
            await self.outbox.load()
            await self.replies.load()
            await self.commands.load()
            (self.settings.state_dir / "logs").mkdir(mode=0o700, exist_ok=True)
            if stop.is_set():  # a signal arrived while the agent was starting
                return self.exit_code
            # before the apps start: an update cut short is finished or rolled back
            await self.updater.recover()
            await self.supervisor.start_all()
            self._spawn(self.updater.resume(self.commands.answer), "updates")
            self._spawn(self._report_every_interval(), "telemetry", lasting=True)
            self._spawn(self._stay_online(), "link", lasting=True)
            if watchdog_interval_s() > 0:
                self._spawn(keep_watchdog_fed(self.healthy), "watchdog", lasting=True)
            notify("READY=1")
            log.info(
                "agent %s running %d app(s) as %s", __version__, len(self.settings.apps), self.name
            )
            await stop.wait()
        finally:
            await self._shut_down()
        return self.exit_code

    def healthy(self) -> bool:
        """True while every long-lived task runs (the watchdog is fed only then)."""
        return self.exit_code == 0 and all(not task.done() for task in self._lasting)

    async def _shut_down(self) -> None:
        self._stopping = True
        log.info("stopping")
        notify("STOPPING=1")
        await self.updater.close()  # first: a trial must not take the apps' stop for a crash
        await self.supervisor.stop_all()
        if self.link is not None:
            await self.link.close()
        await self.commands.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=SHUTDOWN_GRACE_S)
            if pending:
                self.stuck = sorted(pending, key=lambda task: task.get_name())
                for task in self.stuck:
                    log.error(
                        "task %s did not stop within %.0f s of its cancellation:\n%s",
                        task.get_name(),
                        SHUTDOWN_GRACE_S,
                        _stack(task),
                    )
                self.exit_code = 1
        log.info("stopped")

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str, *, lasting: bool = False) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        if lasting:
            self._lasting.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        """The one place that notices a task's end: an error, or the end of a task that should
        run until the shutdown, stops the agent with exit code 1."""
        self._tasks.discard(task)
        if self._stopping:
            if not task.cancelled() and task.exception() is not None:
                log.warning(
                    "task %s failed while stopping", task.get_name(), exc_info=task.exception()
                )
            return
        if task.cancelled():
            error = "cancelled"
        elif task.exception() is not None:
            error = "failed"
        elif task in self._lasting:
            error = "ended"
        else:
            return  # a short task (an app event) that did its work
        log.error(
            "task %s %s: stopping the agent (exit 1) so that it is restarted",
            task.get_name(),
            error,
            exc_info=None if task.cancelled() else task.exception(),
        )
        self.exit_code = 1
        self._stop.set()

    async def _stay_online(self) -> None:
        while True:
            credentials = await self.enrollment.credentials()
            self.link = Link(
                self.settings, credentials, [self.replies, self.outbox], self.commands.receive
            )
            try:
                await self.link.run()
            except NotAuthorized as exc:
                log.error("the broker refused %s: %s", credentials.name, exc)
                if not await self.enrollment.recheck(credentials):
                    await asyncio.sleep(REFUSED_PAUSE_S)

    async def _device_login(self) -> tuple[str, str]:
        """The device's own credentials (basic auth of release downloads)."""
        credentials = await self.enrollment.credentials()
        return str(credentials.name), credentials.password

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
            "replies": {"queued": len(self.replies), "dropped": self.replies.dropped},
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
        await self.replies.put(Message(topic, _json(reply)))


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _stack(task: asyncio.Task[Any]) -> str:
    frames = task.get_stack()
    return "".join(
        f"  {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}\n"
        for frame in frames
    )


async def run_agent(settings: AgentSettings, early_signals: Sequence[int] = ()) -> int:
    """Run the agent until SIGTERM or SIGINT; return the exit code. `early_signals`: those that
    arrived before the event loop's handlers were installed (the agent then stops at once)."""
    become_subreaper()
    stop = asyncio.Event()
    agent = Agent(settings)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _on_signal, signum, stop, agent)
    if early_signals:
        log.info("signal %d during start-up: stopping", early_signals[0])
        stop.set()
    code = await agent.run(stop)  # the top-level task: nobody above it cancels it
    if agent.stuck:
        # asyncio.run would wait for ever for a task that does not end: leave now
        logging.shutdown()
        os._exit(code)
    return code


def _on_signal(signum: int, stop: asyncio.Event, agent: Agent) -> None:
    name = signal.Signals(signum).name
    if not stop.is_set():
        log.info("%s: shutting down", name)
        stop.set()
        return
    # A second signal during the shutdown: the user wants out now.
    log.warning("%s again during the shutdown: killing the apps and exiting now", name)
    for status in agent.supervisor.statuses():
        if status.pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(status.pid, signal.SIGKILL)
    logging.shutdown()
    sys.stderr.flush()
    os._exit(128 + signum)
