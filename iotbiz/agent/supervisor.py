"""The agent's process supervisor: runs the configured apps and keeps them running.

States (supervisord's) and every edge, all made by `Supervisor._transition` and listed in `EDGES`:

    STOPPED/EXITED/FATAL -> STARTING   start requested
    STARTING -> RUNNING                the process stayed up `start_s` seconds
    STARTING/RUNNING -> BACKOFF        it exited (before `start_s`: a failed start); the policy
                                       restarts it after a delay
    STARTING/RUNNING -> EXITED         it exited; the policy does not restart it
    STARTING -> FATAL                  it could not be spawned and the policy is "never", or it
                                       never can be (a user a non-root agent cannot become)
    STARTING/RUNNING -> STOPPING       stop requested, or (RUNNING) the health check failed
    STOPPING -> STOPPED                stopped by request: not restarted
    STOPPING -> BACKOFF                stopped because it was unhealthy: restarted
    BACKOFF -> STARTING                the delay is over (an automatic restart, counted)
    BACKOFF -> FATAL                   more than `start_retries` failed starts in a row: given up
    BACKOFF/STARTING -> STOPPED        stop requested while no process runs
    EXITED/FATAL -> STOPPED            an operator's stop of an app that is not running

Restart policy: "always" restarts after any exit, "on-failure" after a non-zero exit, a death by
signal or a failed spawn, "never" not at all; an unhealthy app is restarted whatever its policy.
Start retries (supervisord's startretries): after a failed start (an exit before `start_s`, or a
failed spawn) and `start_retries` failed retries in a row (-1: no limit), the app is FATAL until
an operator starts it; reaching RUNNING resets the count. The n-th consecutive restart waits
min(backoff_s * 2**(n-1), backoff_max_s) times a random factor in [0.5, 1] (so delays grow until
the cap and a fleet does not restart in step); that count goes back to zero when a process had
been up for max(start_s, RESET_AFTER_S) seconds. Operator stops outlive the agent: `stop` writes
the app's name to `state_file` (atomically, first), `start` and `restart` take it out, and
`start_all` leaves the apps it names STOPPED.

Release apps (`release = true`): their `cwd` is the `current` symlink of their releases
(`updates.release_cwd`); while it does not lead to an installed release, a start leaves the app
STOPPED ("no release installed"). `listen` lets the updater follow one app's transitions during an
update's trial; `halt` stops an app without remembering it as an operator's stop (a rollback to
no release at all).

Processes: each app runs in its own session and process group, stdin from /dev/null, stdout and
stderr into one pipe read by `applog.AppLog`. On Linux the app's process gets SIGKILL when the
agent dies and `become_subreaper` makes orphaned grandchildren the agent's, which reaps them
(`processes`). An app with a health check is watched by `health.watch_health` while RUNNING. A
stop sends SIGTERM to the group, then SIGKILL after `stop_timeout_s`; once the leader is gone,
whatever is left of its group is SIGKILLed, also when it exits by itself (an app must not
daemonize). Every process is awaited: no zombies. An app with a `user` runs as that user
(`processes.spawn`); its output log is still written by the agent.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import random
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from iotbiz.agent.applog import AppLog
from iotbiz.agent.files import read_json, write_json
from iotbiz.agent.health import watch_health
from iotbiz.agent.processes import (
    KILL_WAIT_S,
    ProcessUsage,
    UserSwitchRefused,
    cancel,
    clear_group,
    describe_exit,
    reap_orphans,
    spawn,
    terminate_group,
    wait_event,
)
from iotbiz.agent.processes import become_subreaper as become_subreaper  # re-exported
from iotbiz.settings import AppSettings

log = logging.getLogger(__name__)

RESET_AFTER_S = 10.0  # a process up this long (at least start_s) resets the backoff
OUTPUT_DRAIN_S = 1.0  # how long the output pipe may stay open after the process group is gone
REAP_INTERVAL_S = 5.0  # how often adopted orphans are looked for


class AppState(enum.StrEnum):
    STOPPED = "STOPPED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    BACKOFF = "BACKOFF"
    STOPPING = "STOPPING"
    EXITED = "EXITED"
    FATAL = "FATAL"


_S = AppState
EDGES: dict[AppState, frozenset[AppState]] = {
    _S.STOPPED: frozenset({_S.STARTING}),  # STOPPED -> STARTING
    _S.EXITED: frozenset({_S.STARTING, _S.STOPPED}),  # EXITED -> STARTING, -> STOPPED (operator)
    _S.FATAL: frozenset({_S.STARTING, _S.STOPPED}),  # FATAL -> STARTING, -> STOPPED (operator)
    _S.STARTING: frozenset(
        {
            _S.RUNNING,  # STARTING -> RUNNING: up for start_s
            _S.BACKOFF,  # STARTING -> BACKOFF: failed start, to be retried
            _S.EXITED,  # STARTING -> EXITED: exited, not to be restarted
            _S.FATAL,  # STARTING -> FATAL: cannot be spawned, policy never; or never can be
            _S.STOPPING,  # STARTING -> STOPPING: stop requested
            _S.STOPPED,  # STARTING -> STOPPED: stop requested, the spawn had failed
        }
    ),
    _S.RUNNING: frozenset(
        {
            _S.BACKOFF,  # RUNNING -> BACKOFF: exited, to be restarted
            _S.EXITED,  # RUNNING -> EXITED: exited, not to be restarted
            _S.STOPPING,  # RUNNING -> STOPPING: stop requested or unhealthy
        }
    ),
    _S.BACKOFF: frozenset(
        {
            _S.STARTING,  # BACKOFF -> STARTING: the delay is over
            _S.FATAL,  # BACKOFF -> FATAL: more than start_retries failed starts in a row
            _S.STOPPED,  # BACKOFF -> STOPPED: stop requested
        }
    ),
    _S.STOPPING: frozenset({_S.STOPPED, _S.BACKOFF}),  # STOPPING -> STOPPED, -> BACKOFF (unhealthy)
}


@dataclass(frozen=True, slots=True)
class AppStatus:
    """One app as the operator sees it. `exit_code` is the last exit status, negative when the
    process was killed by a signal; `cpu_percent` (100 = one core) and `rss_bytes` cover the app's
    process tree and are only set by `Supervisor.sample`; `reason` says why the app is in its state
    ("gave up after 4 failed starts, last: exit 1", "stopped by operator")."""

    name: str
    state: AppState
    pid: int | None
    restarts: int
    exit_code: int | None
    started_at: float | None
    cpu_percent: float | None
    rss_bytes: int | None
    version: str | None
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        """Every field, in order, under its own name; the state as its name."""
        fields = {name: getattr(self, name) for name in self.__slots__}
        return {**fields, "state": self.state.value}


EventSink = Callable[[dict[str, Any]], None]


@dataclass(frozen=True, slots=True)
class _Outcome:
    """How one run of an app's process ended."""

    reason: str  # "exit 1", "killed by SIGKILL", "cannot start: ..."
    failed: bool  # a failure for the on-failure policy
    spawned: bool
    ran_s: float
    unhealthy: bool = False
    started: bool = False  # it reached RUNNING: not a failed start
    hopeless: bool = False  # it can never be spawned (a user the agent cannot become)


class _App:
    """The run-time record of one app; used from the event loop only."""

    def __init__(self, settings: AppSettings, output: AppLog) -> None:
        self.settings = settings
        self.output = output
        self.state = AppState.STOPPED
        self.pid: int | None = None
        self.started_at: float | None = None
        self.exit_code: int | None = None
        self.restarts = 0  # automatic restarts since the agent started
        self.failures = 0  # consecutive restarts, for the backoff
        self.failed_starts = 0  # consecutive failed starts, for start_retries
        self.reason: str | None = None  # that of the last transition
        self.stop_reason = "stopped"  # the STOPPED transition's, once a stop is requested
        self.runner: asyncio.Task[None] | None = None
        self.stop_requested = asyncio.Event()
        self.lock = asyncio.Lock()  # one operator action (start, stop, restart) at a time


class Supervisor:
    """Runs `apps`, writing their output under `log_dir`, reporting state changes to `on_event`,
    remembering operator stops in `state_file` (none: not remembered)."""

    def __init__(
        self,
        apps: Sequence[AppSettings],
        log_dir: Path,
        *,
        log_max_bytes: int,
        log_backups: int,
        tail_lines: int,
        on_event: EventSink | None = None,
        state_file: Path | None = None,
    ) -> None:
        self._apps: dict[str, _App] = {}
        for settings in apps:
            if settings.name in self._apps:
                raise ValueError(f"app {settings.name!r} is configured twice")
            output = AppLog(
                log_dir / f"{settings.name}.log",
                max_bytes=log_max_bytes,
                backups=log_backups,
                tail_lines=tail_lines,
            )
            self._apps[settings.name] = _App(settings, output)
        self._on_event = on_event
        self._state_file = state_file
        self._held: set[str] = set()  # apps stopped by an operator
        self._state_lock = asyncio.Lock()  # one write of state_file at a time, in order
        self._listeners: list[EventSink] = []
        self._usage = ProcessUsage()
        self._sample_lock = asyncio.Lock()
        self._reaper: asyncio.Task[None] | None = None

    # -- the public surface --------------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self._apps)

    def status(self, name: str) -> AppStatus:
        return self._status(self._app(name))

    def statuses(self) -> list[AppStatus]:
        return [self._status(app) for app in self._apps.values()]

    async def sample(self) -> list[AppStatus]:
        """The statuses with each running app's CPU and memory use, measured in a thread."""
        async with self._sample_lock:
            leaders = [app.pid for app in self._apps.values() if app.pid is not None]
            usage = await asyncio.to_thread(self._usage.measure, leaders)
        statuses = []
        for app in self._apps.values():
            cpu, rss = usage.get(app.pid, (None, None)) if app.pid is not None else (None, None)
            statuses.append(replace(self._status(app), cpu_percent=cpu, rss_bytes=rss))
        return statuses

    def tail(self, name: str, lines: int) -> list[str]:
        return self._app(name).output.tail(lines)

    async def start_all(self) -> None:
        """Start every app but those an operator stopped (before the agent last went down)."""
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap_periodically(), name="orphan reaper")
        if self._state_file is not None:
            held = await asyncio.to_thread(_read_held, self._state_file)
            self._held = held & self._apps.keys()
        for name, app in self._apps.items():
            async with app.lock:
                if name not in self._held:
                    self._start(app)
                elif app.state is AppState.STOPPED:
                    app.reason = "stopped by operator"
                    log.info("%s: left STOPPED (stopped by operator)", name)

    async def stop_all(self) -> None:
        """Stop every app because the agent is going down (not remembered as a stop)."""
        results = await asyncio.gather(
            *(self._stop_locked(app, "agent stopping") for app in self._apps.values()),
            return_exceptions=True,
        )
        for name, result in zip(self._apps, results, strict=True):
            if isinstance(result, Exception):
                log.error("%s: stop failed", name, exc_info=result)
        await cancel(self._reaper)
        self._reaper = None
        await asyncio.to_thread(reap_orphans)

    async def start(self, name: str) -> AppStatus:
        """The operator's start: also of a FATAL app, with its start retries renewed."""
        app = self._app(name)
        async with app.lock:
            await self._hold(name, held=False)
            self._start(app)
        return self._status(app)

    async def stop(self, name: str) -> AppStatus:
        """The operator's stop, remembered (first) until the operator's next start or restart."""
        app = self._app(name)
        async with app.lock:
            await self._hold(name, held=True)
            await self._stop(app, "stopped by operator")
            if app.state in (AppState.EXITED, AppState.FATAL):
                # EXITED/FATAL -> STOPPED
                self._transition(app, AppState.STOPPED, "stopped by operator")
        return self._status(app)

    async def restart(self, name: str) -> AppStatus:
        app = self._app(name)
        async with app.lock:
            await self._hold(name, held=False)
            await self._stop(app, "restart requested")
            self._start(app)
        return self._status(app)

    async def halt(self, name: str, reason: str) -> AppStatus:
        """Stop `name` and leave it STOPPED, without remembering it as an operator's stop."""
        app = self._app(name)
        async with app.lock:
            await self._stop(app, reason)
            if app.state in (AppState.EXITED, AppState.FATAL):
                # EXITED/FATAL -> STOPPED
                self._transition(app, AppState.STOPPED, reason)
        return self._status(app)

    def listen(self, sink: EventSink) -> Callable[[], None]:
        """Call `sink` with every event (as `on_event`) until the returned function is called."""
        self._listeners.append(sink)
        return lambda: self._listeners.remove(sink)

    # -- the state machine ---------------------------------------------------------------------

    def _transition(self, app: _App, new: AppState, reason: str) -> None:
        old, name = app.state, app.settings.name
        if new not in EDGES[old]:
            log.error("%s: unexpected transition %s -> %s", name, old, new)
        app.state, app.reason = new, reason
        log.info("%s: %s -> %s (%s)", name, old, new, reason)
        self._emit(
            {
                "event": "app.state",
                "app": name,
                "from": old.value,
                "to": new.value,
                "reason": reason,
                "exit_code": app.exit_code,
                "restarts": app.restarts,
                "ts": time.time(),
            }
        )

    def _start(self, app: _App) -> None:
        if app.runner is not None and not app.runner.done():
            return  # STARTING, RUNNING, BACKOFF or STOPPING: already being run
        settings = app.settings
        if settings.release and (settings.cwd is None or not settings.cwd.is_dir()):
            if app.state is not AppState.STOPPED:
                # EXITED/FATAL -> STOPPED: its release is gone
                self._transition(app, AppState.STOPPED, "no release installed")
            elif app.reason != "no release installed":
                app.reason = "no release installed"
                log.info("%s: left STOPPED (no release installed)", settings.name)
            return
        app.stop_requested.clear()
        app.failures = app.failed_starts = 0
        # STOPPED/EXITED/FATAL -> STARTING
        self._transition(app, AppState.STARTING, "start requested")
        app.runner = asyncio.create_task(self._run(app), name=f"app {app.settings.name}")

    async def _stop_locked(self, app: _App, reason: str) -> None:
        async with app.lock:
            await self._stop(app, reason)

    async def _stop(self, app: _App, reason: str) -> None:
        runner = app.runner
        if runner is None or runner.done():
            return
        app.stop_reason = reason
        app.stop_requested.set()
        # The runner's own waits are bounded; this bound is a backstop against a bug.
        limit = app.settings.stop_timeout_s + 2 * KILL_WAIT_S + OUTPUT_DRAIN_S + 1.0
        done, _ = await asyncio.wait({runner}, timeout=limit)
        if not done:
            log.error("%s: not stopped after %.0f s, cancelling", app.settings.name, limit)
            runner.cancel()
            await asyncio.wait({runner}, timeout=KILL_WAIT_S + OUTPUT_DRAIN_S)

    async def _run(self, app: _App) -> None:
        """Run `app` (already STARTING) until it is stopped or its policy lets it rest."""
        name = app.settings.name
        try:
            while True:
                outcome = await self._run_once(app)
                if app.stop_requested.is_set():
                    # STOPPING -> STOPPED; STARTING -> STOPPED when the spawn had failed
                    self._transition(app, AppState.STOPPED, app.stop_reason)
                    return
                if outcome.hopeless or not self._wants_restart(app.settings, outcome):
                    # STARTING/RUNNING -> EXITED; STARTING -> FATAL (could not be spawned)
                    final = AppState.EXITED if outcome.spawned else AppState.FATAL
                    self._transition(app, final, outcome.reason)
                    return
                if not outcome.started:
                    app.failed_starts += 1
                delay = self._next_delay(app, outcome)
                # STARTING/RUNNING -> BACKOFF; STOPPING -> BACKOFF (unhealthy)
                self._transition(app, AppState.BACKOFF, outcome.reason)
                retries = app.settings.start_retries
                if 0 <= retries < app.failed_starts:
                    count = app.failed_starts
                    starts = "start" if count == 1 else "starts"
                    reason = f"gave up after {count} failed {starts}, last: {outcome.reason}"
                    self._transition(app, AppState.FATAL, reason)  # BACKOFF -> FATAL
                    return
                log.info("%s: restarting in %.1f s", name, delay)
                if await wait_event(app.stop_requested, delay):
                    # BACKOFF -> STOPPED
                    self._transition(app, AppState.STOPPED, app.stop_reason)
                    return
                app.restarts += 1
                # BACKOFF -> STARTING
                self._transition(app, AppState.STARTING, f"restart {app.restarts}")
        except Exception:
            log.exception("%s: supervisor error", name)
            self._transition(app, AppState.FATAL, "supervisor error")

    @staticmethod
    def _wants_restart(settings: AppSettings, outcome: _Outcome) -> bool:
        if outcome.unhealthy or settings.restart == "always":
            return True
        return settings.restart == "on-failure" and outcome.failed

    @staticmethod
    def _next_delay(app: _App, outcome: _Outcome) -> float:
        settings = app.settings
        if outcome.ran_s >= max(settings.start_s, RESET_AFTER_S):
            app.failures = 0
        app.failures += 1
        delay = min(settings.backoff_s * 2.0 ** min(app.failures - 1, 32), settings.backoff_max_s)
        return delay * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not cryptography

    async def _run_once(self, app: _App) -> _Outcome:
        """Spawn the app's process and supervise it until it is gone and its output read."""
        settings = app.settings
        began = time.monotonic()
        read_fd, write_fd = os.pipe()
        try:
            proc = await spawn(
                settings.command,
                cwd=settings.cwd,
                env=settings.env,
                user=settings.user,
                output=write_fd,
            )
        except (OSError, LookupError, ValueError, subprocess.SubprocessError) as exc:
            os.close(read_fd)
            hopeless = isinstance(exc, UserSwitchRefused)
            reason = f"cannot start: {exc}"
            return _Outcome(reason, failed=True, spawned=False, ran_s=0.0, hopeless=hopeless)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        app.pid, app.started_at = proc.pid, time.time()  # exit_code: the last one, kept
        log.info("%s: started pid %d", settings.name, proc.pid)
        capture = asyncio.create_task(app.output.capture(read_fd))
        exited = asyncio.create_task(proc.wait())
        stop = asyncio.create_task(app.stop_requested.wait())
        health: asyncio.Task[str] | None = None
        unhealthy = started = False
        done: set[asyncio.Task[Any]]
        try:
            done, _ = await asyncio.wait({exited, stop}, timeout=settings.start_s)
            if not done:
                started, app.failed_starts = True, 0
                # STARTING -> RUNNING
                self._transition(app, AppState.RUNNING, f"up {settings.start_s:g} s")
                watched: set[asyncio.Task[Any]] = {exited, stop}
                if settings.health is not None:
                    health = asyncio.create_task(watch_health(settings, settings.health))
                    watched.add(health)
                done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
            if app.stop_requested.is_set():
                # STARTING/RUNNING -> STOPPING
                self._transition(app, AppState.STOPPING, "stop requested")
                await terminate_group(settings.name, proc.pid, exited, settings.stop_timeout_s)
            elif health is not None and health in done:
                unhealthy = True
                reason = health.result()
                event = {"event": "app.unhealthy", "app": settings.name, "reason": reason}
                self._emit({**event, "ts": time.time()})
                # RUNNING -> STOPPING
                self._transition(app, AppState.STOPPING, f"unhealthy: {reason}")
                await terminate_group(settings.name, proc.pid, exited, settings.stop_timeout_s)
        finally:
            await cancel(stop, health)
            await clear_group(proc.pid, exited, capture, OUTPUT_DRAIN_S)
            app.pid = app.started_at = None
        returncode = exited.result() if exited.done() else None
        app.exit_code = returncode
        return _Outcome(
            describe_exit(returncode),
            failed=returncode != 0,
            spawned=True,
            ran_s=time.monotonic() - began,
            unhealthy=unhealthy,
            started=started,
        )

    # -- helpers -------------------------------------------------------------------------------

    def _app(self, name: str) -> _App:
        try:
            return self._apps[name]
        except KeyError:
            raise KeyError(name) from None

    @staticmethod
    def _status(app: _App) -> AppStatus:
        return AppStatus(
            name=app.settings.name,
            state=app.state,
            pid=app.pid,
            restarts=app.restarts,
            exit_code=app.exit_code,
            started_at=app.started_at,
            cpu_percent=None,
            rss_bytes=None,
            version=_release_version(app.settings),
            reason=app.reason,
        )

    def _emit(self, event: dict[str, Any]) -> None:
        sinks = ([self._on_event] if self._on_event is not None else []) + self._listeners
        for sink in sinks:
            try:
                sink(event)
            except Exception:  # a broken sink must not stop supervision
                log.exception("event sink failed on %s", event.get("event"))

    async def _hold(self, name: str, *, held: bool) -> None:
        """Remember (or forget) the operator's stop of `name` in the state file. A failed write
        is logged: the operator's action still happens, it is only not remembered."""
        if self._state_file is None or (name in self._held) == held:
            return
        if held:
            self._held.add(name)
        else:
            self._held.discard(name)
        async with self._state_lock:
            content = {"stopped": sorted(self._held)}
            try:
                await asyncio.to_thread(write_json, self._state_file, content)
            except OSError as exc:
                what = "stop" if held else "start"
                log.error("cannot remember %s's %s in %s: %s", name, what, self._state_file, exc)

    async def _reap_periodically(self) -> None:
        while True:
            await asyncio.sleep(REAP_INTERVAL_S)
            reaped = await asyncio.to_thread(reap_orphans)
            if reaped:
                log.debug("reaped %d orphaned processes", reaped)


def _release_version(settings: AppSettings) -> str | None:
    """The version a release app's `current` link points at (None: not a release app, or no
    release installed)."""
    if not settings.release or settings.cwd is None:
        return None
    try:
        return Path(os.readlink(settings.cwd)).name
    except OSError:
        return None


def _read_held(path: Path) -> set[str]:
    """The apps an operator stopped, from `path` (in a thread); none if it is missing or bad."""
    if not path.exists():
        return set()
    content = read_json(path)
    stopped = content.get("stopped") if isinstance(content, dict) else None
    if not isinstance(stopped, list) or not all(isinstance(name, str) for name in stopped):
        log.warning("ignoring %s: not a list of stopped apps", path)
        return set()
    return set(stopped)
