"""The process supervisor against real child programs that misbehave on purpose
(tests/agent/programs): one crashes on start, one ignores SIGTERM, one leaves a grandchild..."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import pytest_asyncio

from iotbiz.agent.applog import MAX_LINE_BYTES
from iotbiz.agent.supervisor import AppState, AppStatus, Supervisor
from iotbiz.settings import AppSettings, HealthSettings

PROGRAMS = Path(__file__).parent / "programs"

pytestmark = pytest.mark.timeout(30)


def program(name: str, *args: str) -> tuple[str, ...]:
    return (sys.executable, str(PROGRAMS / f"{name}.py"), *args)


def app(name: str, command: tuple[str, ...], **overrides: Any) -> AppSettings:
    values: dict[str, Any] = {
        "name": name,
        "command": command,
        "start_s": 0.3,
        "stop_timeout_s": 2.0,
        "backoff_s": 0.2,
        "backoff_max_s": 0.8,
    }
    values.update(overrides)
    return AppSettings(**values)


class Events:
    """The supervisor's events, each with the monotonic time it arrived."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, dict[str, Any]]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        self.seen.append((time.monotonic(), event))

    def states(self, name: str) -> list[tuple[str, str]]:
        return [
            (event["from"], event["to"])
            for _, event in self.seen
            if event["event"] == "app.state" and event["app"] == name
        ]

    def times_entering(self, name: str, state: AppState) -> list[float]:
        return [
            at
            for at, event in self.seen
            if event["event"] == "app.state" and event["app"] == name and event["to"] == state
        ]

    def named(self, kind: str) -> list[dict[str, Any]]:
        return [event for _, event in self.seen if event["event"] == kind]


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    return tmp_path / "logs"


@pytest_asyncio.fixture
async def make_supervisor(
    log_dir: Path, events: Events
) -> AsyncIterator[Callable[..., Supervisor]]:
    """Supervisors over tmp_path/logs reporting to `events`; all stopped after the test."""
    made: list[Supervisor] = []

    def make(*apps: AppSettings, log_max_bytes: int = 1 << 20, **options: Any) -> Supervisor:
        supervisor = Supervisor(
            apps,
            log_dir,
            log_max_bytes=log_max_bytes,
            log_backups=2,
            tail_lines=50,
            on_event=options.pop("on_event", events),
            **options,
        )
        made.append(supervisor)
        return supervisor

    yield make
    async with asyncio.timeout(20):
        for supervisor in made:
            await supervisor.stop_all()


async def until(check: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.02)


def gone(pid: int) -> bool:
    """No such process, or only a zombie that its (foreign) parent has yet to reap."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return all(gone(proc.pid) for proc in psutil.process_iter() if _pgid(proc.pid) == pgid)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def in_state(supervisor: Supervisor, name: str, *states: AppState) -> Callable[[], bool]:
    return lambda: supervisor.status(name).state in states


async def test_app_runs_and_stops(make_supervisor: Callable[..., Supervisor]) -> None:
    supervisor = make_supervisor(app("web", program("runs")))
    await supervisor.start_all()
    assert supervisor.status("web").state is AppState.STARTING
    await until(in_state(supervisor, "web", AppState.RUNNING), "RUNNING")
    status = supervisor.status("web")
    assert status.pid is not None
    assert status.started_at is not None
    assert psutil.Process(status.pid).cmdline()[-1].endswith("runs.py")

    stopped = await supervisor.stop("web")

    assert stopped.state is AppState.STOPPED
    assert stopped.pid is None
    assert stopped.exit_code == 0  # runs.py exits 0 on SIGTERM
    assert stopped.restarts == 0
    assert gone(status.pid)
    output = supervisor.tail("web", 50)
    assert output[:2] == ["line 0", "err 0"]  # stdout and stderr, in the order written
    assert group_gone(status.pid)


async def test_state_events_carry_each_transition(
    make_supervisor: Callable[..., Supervisor], events: Events, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="iotbiz.agent.supervisor")
    supervisor = make_supervisor(app("web", program("runs")))
    await supervisor.start("web")
    await until(in_state(supervisor, "web", AppState.RUNNING), "RUNNING")
    await supervisor.stop("web")

    assert events.states("web") == [
        ("STOPPED", "STARTING"),
        ("STARTING", "RUNNING"),
        ("RUNNING", "STOPPING"),
        ("STOPPING", "STOPPED"),
    ]
    last = events.named("app.state")[-1]
    assert last["app"] == "web"
    assert last["exit_code"] == 0
    assert last["restarts"] == 0
    assert abs(last["ts"] - time.time()) < 5
    assert "web: STARTING -> RUNNING (up 0.3 s)" in caplog.messages
    assert "web: STOPPING -> STOPPED (stopped by operator)" in caplog.messages


@pytest.mark.parametrize("policy", ["always", "on-failure"])
async def test_crash_on_start_is_retried_with_growing_backoff(
    make_supervisor: Callable[..., Supervisor],
    events: Events,
    caplog: pytest.LogCaptureFixture,
    policy: str,
) -> None:
    caplog.set_level(logging.INFO, logger="iotbiz.agent.supervisor")
    supervisor = make_supervisor(
        app("bad", program("crashes"), restart=policy, start_s=0.5, start_retries=-1)
    )
    await supervisor.start_all()
    await until(lambda: supervisor.status("bad").restarts >= 5, "5 restarts", timeout_s=10)

    starts = events.times_entering("bad", AppState.STARTING)
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    # Delays 0.2, 0.4, 0.8 (the cap), 0.8 ... each times a factor in [0.5, 1], plus the time
    # the program takes to start and crash (a Python start: up to a second and more on a busy
    # machine, seen 0.68 s over a 0.4 s delay under a fuzz run and three test runs).
    for gap, delay in zip(gaps, [0.2, 0.4, 0.8, 0.8, 0.8], strict=False):
        assert 0.5 * delay <= gap <= delay + 1.5, gaps
    assert gaps[0] < gaps[2], gaps
    transitions = events.states("bad")
    assert transitions[:5] == [
        ("STOPPED", "STARTING"),
        ("STARTING", "BACKOFF"),
        ("BACKOFF", "STARTING"),
        ("STARTING", "BACKOFF"),
        ("BACKOFF", "STARTING"),
    ]
    status = supervisor.status("bad")
    assert status.exit_code == 1
    assert status.restarts == len(starts) - 1
    assert "bad: STARTING -> BACKOFF (exit 1)" in caplog.messages

    await until(in_state(supervisor, "bad", AppState.BACKOFF), "BACKOFF")
    began = time.monotonic()
    stopped = await supervisor.stop("bad")
    assert time.monotonic() - began < 0.5
    assert stopped.state is AppState.STOPPED
    assert events.states("bad")[-1] == ("BACKOFF", "STOPPED")


async def test_crash_with_policy_never_exits(
    make_supervisor: Callable[..., Supervisor], events: Events
) -> None:
    supervisor = make_supervisor(
        app("bad", program("crashes", "3"), restart="never"),
        # Crashes alike, on the same backoff, but is restarted: its restarts show that "bad"
        # would have been restarted by now.
        app("witness", program("crashes", "3"), restart="always", start_retries=-1),
    )
    await supervisor.start_all()
    await until(in_state(supervisor, "bad", AppState.EXITED), "EXITED")
    await until(lambda: supervisor.status("witness").restarts >= 2, "the witness's restarts")

    status = supervisor.status("bad")
    assert status.state is AppState.EXITED
    assert status.exit_code == 3
    assert status.restarts == 0
    assert events.states("bad") == [("STOPPED", "STARTING"), ("STARTING", "EXITED")]
    assert supervisor.tail("bad", 5) == ["crashing"]


@pytest.mark.parametrize(("policy", "restarted"), [("on-failure", False), ("always", True)])
async def test_clean_exit_restarts_only_with_policy_always(
    make_supervisor: Callable[..., Supervisor], events: Events, policy: str, restarted: bool
) -> None:
    supervisor = make_supervisor(
        app("job", program("runs", "3"), restart=policy, start_s=0.1),
        # Exits alike, on the same backoff, with policy always: see test_crash_with_policy_never
        app("witness", program("runs", "3"), restart="always", start_s=0.1),
    )
    await supervisor.start_all()
    if restarted:
        await until(lambda: supervisor.status("job").restarts >= 1, "a restart")
        assert ("RUNNING", "BACKOFF") in events.states("job")
    else:
        await until(in_state(supervisor, "job", AppState.EXITED), "EXITED")
        await until(lambda: supervisor.status("witness").restarts >= 2, "the witness's restarts")
        assert supervisor.status("job").restarts == 0
        assert events.states("job")[-1] == ("RUNNING", "EXITED")
    assert supervisor.status("job").exit_code == 0


async def test_program_that_cannot_be_spawned(
    make_supervisor: Callable[..., Supervisor], events: Events, tmp_path: Path
) -> None:
    missing = str(tmp_path / "no-such-program")
    supervisor = make_supervisor(
        app("never", (missing,), restart="never"), app("always", (missing,), restart="always")
    )
    await supervisor.start_all()
    await until(in_state(supervisor, "never", AppState.FATAL), "FATAL")
    await until(lambda: supervisor.status("always").restarts >= 1, "a retry")
    fatal = [event for event in events.named("app.state") if event["to"] == "FATAL"]
    assert fatal[0]["app"] == "never"
    assert fatal[0]["reason"].startswith("cannot start: [Errno 2]")
    assert supervisor.status("never").exit_code is None
    stopped = await supervisor.stop("always")
    assert stopped.state is AppState.STOPPED


async def test_stop_kills_a_program_that_ignores_sigterm(
    make_supervisor: Callable[..., Supervisor],
) -> None:
    supervisor = make_supervisor(app("stubborn", program("ignores_term"), stop_timeout_s=1.0))
    await supervisor.start_all()
    await until(lambda: supervisor.tail("stubborn", 1) == ["ignoring SIGTERM"], "its first line")
    pid = supervisor.status("stubborn").pid
    assert pid is not None

    began = time.monotonic()
    stopped = await supervisor.stop("stubborn")
    took = time.monotonic() - began

    assert 0.9 <= took <= 3.0
    assert stopped.state is AppState.STOPPED
    assert stopped.exit_code == -signal.SIGKILL
    assert gone(pid)


async def test_stop_kills_the_whole_process_group(
    make_supervisor: Callable[..., Supervisor],
) -> None:
    supervisor = make_supervisor(app("parent", program("spawns_grandchild")))
    await supervisor.start_all()
    await until(lambda: bool(supervisor.tail("parent", 1)), "the grandchild's pid")
    grandchild = int(supervisor.tail("parent", 1)[0].split()[1])
    pid = supervisor.status("parent").pid
    assert pid is not None
    assert os.getpgid(grandchild) == pid

    await supervisor.stop("parent")

    await until(lambda: gone(grandchild), "the grandchild to go", timeout_s=2)
    assert group_gone(pid)


async def test_group_does_not_outlive_a_leader_that_exits(
    make_supervisor: Callable[..., Supervisor],
) -> None:
    supervisor = make_supervisor(
        app("parent", program("spawns_grandchild", "exit"), restart="never")
    )
    await supervisor.start_all()
    await until(in_state(supervisor, "parent", AppState.EXITED), "EXITED")
    grandchild = int(supervisor.tail("parent", 1)[0].split()[1])
    await until(lambda: gone(grandchild), "the grandchild to go", timeout_s=2)


async def test_stop_all_stops_everything_even_a_stubborn_app(
    make_supervisor: Callable[..., Supervisor],
) -> None:
    supervisor = make_supervisor(
        app("web", program("runs")),
        app("stubborn", program("ignores_term"), stop_timeout_s=1.0),
        app("parent", program("spawns_grandchild")),
        app("bad", program("crashes"), start_retries=-1),
    )
    await supervisor.start_all()
    await until(in_state(supervisor, "stubborn", AppState.RUNNING), "RUNNING")
    await until(lambda: bool(supervisor.tail("parent", 1)), "the grandchild's pid")
    pids = [status.pid for status in supervisor.statuses() if status.pid is not None]
    pids.append(int(supervisor.tail("parent", 1)[0].split()[1]))

    began = time.monotonic()
    await supervisor.stop_all()

    assert time.monotonic() - began < 3.0  # concurrently: about one stop_timeout_s
    assert [status.state for status in supervisor.statuses()] == [AppState.STOPPED] * 4
    await until(lambda: all(gone(pid) for pid in pids), "every process to go", timeout_s=2)
    assert not [child for child in psutil.Process().children() if not gone(child.pid)]


async def test_operator_restart_is_not_counted(
    make_supervisor: Callable[..., Supervisor],
) -> None:
    supervisor = make_supervisor(app("web", program("runs")))
    await supervisor.start_all()
    await until(in_state(supervisor, "web", AppState.RUNNING), "RUNNING")
    first = supervisor.status("web").pid
    assert first is not None

    restarted = await supervisor.restart("web")

    assert restarted.state is AppState.STARTING
    assert restarted.pid != first
    assert restarted.restarts == 0
    assert gone(first)
    assert (await supervisor.start("web")).pid == restarted.pid  # already running: no-op


@pytest.fixture
def reserved_port() -> Iterator[int]:
    """A port of 127.0.0.1 held for the whole test: bound (SO_REUSEPORT) but not listening, so
    that connections go only to the program that binds it too (health_server.py) and nothing
    else can take it meanwhile."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.mark.parametrize("kind", ["http", "command"])
async def test_unhealthy_app_is_restarted(
    make_supervisor: Callable[..., Supervisor],
    events: Events,
    tmp_path: Path,
    reserved_port: int,
    kind: str,
) -> None:
    sick, checked = tmp_path / "sick", tmp_path / "checked"
    checks: dict[str, Any] = {"interval_s": 0.2, "timeout_s": 1.0, "failures": 2, "grace_s": 0.2}
    if kind == "http":
        health = HealthSettings(http=f"http://127.0.0.1:{reserved_port}/", **checks)
    else:
        probe = (  # counts its healthy answers in `checked`
            f"import os, sys; sick = os.path.exists({str(sick)!r}); "
            f"sick or open({str(checked)!r}, 'a').write('healthy\\n'); sys.exit(sick)"
        )
        health = HealthSettings(command=(sys.executable, "-c", probe), **checks)
    supervisor = make_supervisor(
        app("svc", program("health_server", str(reserved_port), str(sick)), health=health)
    )
    await supervisor.start_all()
    await until(in_state(supervisor, "svc", AppState.RUNNING), "RUNNING")
    first = supervisor.status("svc").pid

    def healthy_checks() -> int:
        if kind == "http":  # the server logs each request
            return sum('"GET / HTTP/1.1" 200' in line for line in supervisor.tail("svc", 50))
        return checked.read_text().count("healthy") if checked.exists() else 0

    await until(lambda: healthy_checks() >= 3, "three healthy checks")
    assert supervisor.status("svc").restarts == 0
    assert not events.named("app.unhealthy")

    sick.touch()
    await until(lambda: bool(events.named("app.unhealthy")), "app.unhealthy")
    sick.unlink()
    await until(in_state(supervisor, "svc", AppState.RUNNING), "RUNNING again")

    (unhealthy,) = events.named("app.unhealthy")
    assert unhealthy["app"] == "svc"
    assert unhealthy["reason"].startswith("2 failed health checks, last: ")
    assert unhealthy["reason"].endswith("HTTP 503" if kind == "http" else "command exit 1")
    status = supervisor.status("svc")
    assert status.restarts == 1
    assert status.pid != first
    assert events.states("svc")[2:] == [
        ("RUNNING", "STOPPING"),
        ("STOPPING", "BACKOFF"),
        ("BACKOFF", "STARTING"),
        ("STARTING", "RUNNING"),
    ]


async def test_output_tail_and_rotating_log(
    make_supervisor: Callable[..., Supervisor], log_dir: Path
) -> None:
    supervisor = make_supervisor(app("noisy", program("noisy", "200", "100")), log_max_bytes=4096)
    await supervisor.start_all()
    await until(lambda: "bad" in "".join(supervisor.tail("noisy", 1)), "the last full line")
    await supervisor.stop("noisy")  # the last line has no newline: it comes at end of file

    last = supervisor.tail("noisy", 3)
    assert last == ["y" * MAX_LINE_BYTES, "bad \ufffd\ufffd bytes", "no newline"]
    assert supervisor.tail("noisy", 0) == []
    assert len(supervisor.tail("noisy", 1000)) == 50  # tail_lines
    assert supervisor.tail("noisy", 4)[0] == "000199 " + "x" * 100

    files = sorted(path.name for path in log_dir.iterdir())
    assert files == ["noisy.log", "noisy.log.1", "noisy.log.2"]
    assert (log_dir / "noisy.log").read_text(errors="replace").endswith("bytes\nno newline\n")
    for path in log_dir.iterdir():
        size = path.stat().st_size
        assert size <= 4096 or path.read_bytes().startswith(b"y" * MAX_LINE_BYTES), path


async def test_sample_measures_running_apps(make_supervisor: Callable[..., Supervisor]) -> None:
    supervisor = make_supervisor(app("web", program("runs")), app("idle", program("runs")))
    await supervisor.start("web")
    await until(in_state(supervisor, "web", AppState.RUNNING), "RUNNING")

    first = await supervisor.sample()
    printed = len(supervisor.tail("web", 50))
    await until(lambda: len(supervisor.tail("web", 50)) >= printed + 2, "the app to run on")
    second = {status.name: status for status in await supervisor.sample()}

    assert [status.name for status in first] == ["web", "idle"]
    assert first[0].cpu_percent is None  # the first look at a process has no CPU figure
    assert first[0].rss_bytes is not None
    assert first[0].rss_bytes > 1_000_000
    web = second["web"]
    assert web.cpu_percent is not None
    assert web.cpu_percent >= 0.0
    assert second["idle"] == AppStatus(
        "idle", AppState.STOPPED, None, 0, None, None, None, None, None
    )
    assert web.to_json() == {
        "name": "web",
        "state": "RUNNING",
        "pid": web.pid,
        "restarts": 0,
        "exit_code": None,
        "started_at": web.started_at,
        "cpu_percent": web.cpu_percent,
        "rss_bytes": web.rss_bytes,
        "version": None,
        "reason": "up 0.3 s",
    }


async def test_unknown_app_is_a_key_error(make_supervisor: Callable[..., Supervisor]) -> None:
    supervisor = make_supervisor(app("web", program("runs")))
    assert supervisor.names() == ["web"]
    with pytest.raises(KeyError):
        supervisor.status("nope")
    with pytest.raises(KeyError):
        supervisor.tail("nope", 5)
    with pytest.raises(KeyError):
        await supervisor.start("nope")
    with pytest.raises(KeyError):
        await supervisor.stop("nope")
    with pytest.raises(KeyError):
        await supervisor.restart("nope")


async def test_a_failing_event_sink_does_not_stop_supervision(log_dir: Path) -> None:
    def broken(event: dict[str, Any]) -> None:
        raise RuntimeError("sink is broken")

    supervisor = Supervisor(
        [app("web", program("runs"))],
        log_dir,
        log_max_bytes=1 << 20,
        log_backups=1,
        tail_lines=10,
        on_event=broken,
    )
    try:
        await supervisor.start_all()
        await until(in_state(supervisor, "web", AppState.RUNNING), "RUNNING")
    finally:
        await supervisor.stop_all()
    assert supervisor.status("web").state is AppState.STOPPED


class Driver:
    """tests/agent/programs/driver.py: a Supervisor in a process the test can SIGKILL."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def line(self) -> str:
        assert self.proc.stdout is not None
        async with asyncio.timeout(10):
            return (await self.proc.stdout.readline()).decode().strip()

    async def send(self, line: str) -> str:
        """Send one command line ("stop", "start"): the driver's answer."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{line}\n".encode())
        await self.proc.stdin.drain()
        return await self.line()


@pytest_asyncio.fixture
async def start_driver(log_dir: Path) -> AsyncIterator[Callable[..., Any]]:
    started: list[asyncio.subprocess.Process] = []

    async def start(*command: str) -> Driver:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(PROGRAMS / "driver.py"),
            str(log_dir),
            *command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        started.append(proc)
        return Driver(proc)

    yield start
    for proc in started:
        if proc.returncode is None:
            proc.kill()
        async with asyncio.timeout(10):
            await proc.wait()


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux only")
async def test_apps_die_with_a_killed_agent(start_driver: Callable[..., Any]) -> None:
    # An app that kept writing would die of a broken pipe anyway: this one writes one line.
    driver = await start_driver(*program("ignores_term"))
    assert await driver.line() == "subreaper True"
    app_pid = int((await driver.line()).split()[1])
    assert not gone(app_pid)

    driver.proc.send_signal(signal.SIGKILL)
    await driver.proc.wait()

    await until(lambda: gone(app_pid), "the app to die with its agent", timeout_s=5)


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_CHILD_SUBREAPER is Linux only")
async def test_orphans_adopted_by_the_agent_are_reaped(
    start_driver: Callable[..., Any], log_dir: Path
) -> None:
    driver = await start_driver(*program("orphans"))
    assert await driver.line() == "subreaper True"
    await driver.line()  # "app PID"
    log_file = log_dir / "app.log"
    await until(lambda: log_file.exists() and log_file.read_text().startswith("orphan "), "the log")
    orphan = int(log_file.read_text().split()[1])

    # The orphan exits 0.3 s after it was made; as a zombie of the (subreaper) driver it would
    # keep its pid until the driver reaps it.
    await until(lambda: not psutil.pid_exists(orphan), "the orphan to be reaped", timeout_s=5)
