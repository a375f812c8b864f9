"""SIGTERM always stops the agent, promptly, whatever it is doing (issue 8 fault 9), and a task
that dies stops it with a non-zero exit so that systemd restarts it.

Real agent processes (`python -m iotbiz.agent --config ...`) with real apps, against a real
platform (in this process, on ports 0), a registrar and a broker that accept connections and
never answer, and a port where nothing listens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import psutil
import pytest
import pytest_asyncio

from iotbiz.platform import Platform
from iotbiz.settings import Settings
from tests.agent.test_delivery_link import Proxy, started_platform

pytestmark = pytest.mark.timeout(120)

RUNNER = "import signal, sys, time\nsignal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n" + (
    "while True:\n    print('tick', flush=True)\n    time.sleep(0.2)\n"
)
STUBBORN = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n" + (
    "print('ignoring SIGTERM', flush=True)\ntime.sleep(3600)\n"
)
STOP_TIMEOUT_S = 0.5
BOUND_S = STOP_TIMEOUT_S + 5.0  # the issue's bound: the apps' stop timeouts plus a few seconds
STARTED_PID = re.compile(r": started pid (\d+)")


class Silent:
    """A TCP server on 127.0.0.1 port 0 that accepts connections and never answers."""

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._hold, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def connections(self) -> int:
        return len(self._writers)

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        while await reader.read(65536):
            pass

    async def close(self) -> None:
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()


@contextlib.contextmanager
def refusing_port() -> Iterator[int]:
    """A port bound on 127.0.0.1 (held for the test) where nothing listens: connections are
    refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


@pytest_asyncio.fixture
async def platform(make_settings: Callable[..., Settings]) -> AsyncIterator[Platform]:
    async with started_platform(make_settings(http={"host": "127.0.0.1"})) as started:
        await started.store.set_device_limit("abc123", 100, actor="test")
        yield started


@pytest_asyncio.fixture
async def proxy(platform: Platform) -> AsyncIterator[Proxy]:
    started = Proxy(platform.mqtt_port)
    await started.start()
    yield started
    await started.close()


@pytest_asyncio.fixture
async def silent() -> AsyncIterator[Silent]:
    server = Silent()
    await server.start()
    yield server
    await server.close()


def write_config(
    path: Path, *, registrar_url: str, broker_url: str, device_id: str, state_dir: Path
) -> Path:
    python = json.dumps(sys.executable)
    apps = ""
    for name, program in (("runner", RUNNER), ("stubborn", STUBBORN)):
        apps += (
            f'\n[[apps]]\nname = "{name}"\ncommand = [{python}, "-c", {json.dumps(program)}]\n'
            f"stop_timeout_s = {STOP_TIMEOUT_S}\n"
        )
    path.write_text(
        f'customer_id = "abc123"\ndevice_id = "{device_id}"\n'
        f'registrar_url = "{registrar_url}"\nbroker_url = "{broker_url}"\n'
        f'state_dir = "{state_dir}"\ntelemetry_interval_s = 1\nkeepalive_s = 5\n'
        f'log_level = "DEBUG"\n{apps}'
    )
    return path


class AgentProcess:
    def __init__(self, config: Path, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "iotbiz.agent", "--config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=config.parent,
                env={**os.environ, **(env or {})},
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def catches_sigterm(self) -> bool:
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return False
        caught = next(line for line in status.splitlines() if line.startswith("SigCgt:"))
        return bool(int(caught.split()[1], 16) & (1 << (signal.SIGTERM - 1)))

    async def wait_for(self, check: Callable[[], bool], what: str, timeout_s: float = 20) -> None:
        deadline = time.monotonic() + timeout_s
        while not check():
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited ({self.proc.returncode}):\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n{self.log()}")
            await asyncio.sleep(0.01)

    async def wait_logged(self, text: str, timeout_s: float = 20) -> None:
        await self.wait_for(lambda: text in self.log(), repr(text), timeout_s)

    async def exit_code(self, timeout_s: float) -> int:
        try:
            return await asyncio.to_thread(self.proc.wait, timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(
                f"agent still running {timeout_s} s after SIGTERM:\n{self.log()[-4000:]}"
            ) from None

    async def wait_gone(self, pids: list[int], timeout_s: float = 5) -> None:
        """Until none of `pids` runs (they die with the agent: SIGKILL on its death)."""
        for _ in range(int(timeout_s / 0.05)):
            if not any(alive(pid) for pid in pids):
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"apps still running: {[pid for pid in pids if alive(pid)]}")

    def app_pids(self) -> list[int]:
        return [int(pid) for pid in STARTED_PID.findall(self.log())]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# (kind, what the agent is doing when SIGTERM arrives)
KINDS = [
    "just started",  # the signal handler is installed; apps may not be started yet
    "enrolling",  # the registrar accepts the connection and never answers
    "apps running",  # enrolling with the real registrar, right after the apps started
    "connected",  # online, telemetry flowing
    "broker silent",  # connected by TCP, the CONNACK never comes
    "broker refused",  # nothing listens on the broker's port
    "connection lost",  # the broker drops the connection as SIGTERM arrives
]


async def test_twenty_sigterms_each_stop_the_agent_promptly(
    tmp_path: Path, platform: Platform, silent: Silent, proxy: Proxy
) -> None:
    registrar = f"http://127.0.0.1:{platform.http_port}"
    broker = f"mqtt://127.0.0.1:{platform.mqtt_port}"
    timings: list[tuple[str, float]] = []
    with refusing_port() as refused:
        for cycle in range(20):
            kind = KINDS[cycle % len(KINDS)]
            device_id = f"cycle-{cycle}" if kind in ("apps running", "enrolling") else "steady"
            urls = {"registrar_url": registrar, "broker_url": broker}
            if kind == "enrolling":
                urls["registrar_url"] = f"http://127.0.0.1:{silent.port}"
            elif kind == "broker silent":
                urls["broker_url"] = f"mqtt://127.0.0.1:{silent.port}"
            elif kind == "broker refused":
                urls["broker_url"] = f"mqtt://127.0.0.1:{refused}"
            elif kind == "connection lost":
                urls["broker_url"] = f"mqtt://127.0.0.1:{proxy.port}"
            config = write_config(
                tmp_path / f"agent-{cycle}.toml",
                device_id=device_id,
                state_dir=tmp_path / f"state-{device_id}",
                **urls,
            )
            held = silent.connections
            agent = AgentProcess(config, tmp_path / f"agent-{cycle}.log")
            try:
                if kind == "just started":
                    await agent.wait_for(agent.catches_sigterm, "the SIGTERM handler")
                elif kind == "apps running":
                    await agent.wait_logged("running 2 app(s)")
                elif kind in ("connected", "connection lost"):
                    await agent.wait_logged("connected to mqtt://")
                elif kind in ("enrolling", "broker silent"):
                    await agent.wait_for(lambda: silent.connections > held, kind)  # noqa: B023
                else:
                    await agent.wait_logged("MQTT link down")
                if kind == "connection lost":
                    proxy.drop()
                    await asyncio.sleep(0.003 * cycle)  # now before, now after the loss is seen
                started = time.monotonic()
                agent.proc.send_signal(signal.SIGTERM)
                code = await agent.exit_code(BOUND_S + 10)
                took = time.monotonic() - started
                timings.append((kind, round(took, 2)))
                assert code == 0, agent.log()[-4000:]
                assert took < BOUND_S, (kind, took, agent.log()[-4000:])
                assert not any(alive(pid) for pid in agent.app_pids()), kind
                assert "Traceback" not in agent.log(), agent.log()
            finally:
                agent.kill()
    print("SIGTERM -> exit (s):", timings)


async def test_a_second_sigterm_during_the_shutdown_exits_at_once(
    tmp_path: Path, platform: Platform
) -> None:
    config = write_config(
        tmp_path / "agent.toml",
        registrar_url=f"http://127.0.0.1:{platform.http_port}",
        broker_url=f"mqtt://127.0.0.1:{platform.mqtt_port}",
        device_id="second",
        state_dir=tmp_path / "state",
    )
    config.write_text(config.read_text().replace("stop_timeout_s = 0.5", "stop_timeout_s = 60"))
    agent = AgentProcess(config, tmp_path / "agent.log")
    try:
        await agent.wait_logged("connected to mqtt://")
        await agent.wait_logged("stubborn: STARTING -> RUNNING")
        agent.proc.send_signal(signal.SIGTERM)
        await agent.wait_logged("stopping")  # the stubborn app holds the shutdown for 60 s
        started = time.monotonic()
        agent.proc.send_signal(signal.SIGTERM)
        code = await agent.exit_code(5)
        assert time.monotonic() - started < 3
        assert code == 128 + signal.SIGTERM
        assert "SIGTERM again during the shutdown" in agent.log()
        pids = agent.app_pids()
        assert len(pids) == 2
        await agent.wait_gone(pids)
    finally:
        agent.kill()


async def test_a_task_that_dies_stops_the_agent_with_exit_1(
    tmp_path: Path, platform: Platform
) -> None:
    """The outbox file becomes unwritable (here: a directory in its place): the telemetry task
    or the link's sender dies; the agent must exit non-zero (systemd restarts it), not go on
    running without telemetry, and systemd's watchdog is no longer fed from that moment."""
    state = tmp_path / "state"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.setblocking(False)
    systemd = {"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "200000"}
    config = write_config(
        tmp_path / "agent.toml",
        registrar_url=f"http://127.0.0.1:{platform.http_port}",
        broker_url=f"mqtt://127.0.0.1:{platform.mqtt_port}",
        device_id="dies",
        state_dir=state,
    )
    messages: list[str] = []

    async def read_like_systemd() -> None:
        loop = asyncio.get_running_loop()
        while True:
            messages.append((await loop.sock_recv(notify, 4096)).decode())

    reader = asyncio.create_task(read_like_systemd())
    agent = AgentProcess(config, tmp_path / "agent.log", env=systemd)
    try:
        await agent.wait_logged("connected to mqtt://")
        outbox = state / "outbox.jsonl"
        await agent.wait_for(outbox.exists, "the outbox file")
        outbox.unlink()
        outbox.mkdir()
        code = await agent.exit_code(15)
        assert code == 1
        assert "stopping the agent (exit 1) so that it is restarted" in agent.log()
        assert not any(alive(pid) for pid in agent.app_pids())
        for _ in range(100):  # the last datagrams may still be in the socket
            if "STOPPING=1" in messages:
                break
            await asyncio.sleep(0.02)
        assert messages[0] == "READY=1"
        assert "WATCHDOG=1" in messages  # fed while the agent was healthy
        stopping = messages.index("STOPPING=1")
        assert "WATCHDOG=1" not in messages[stopping:]  # and never once the task was dead
    finally:
        agent.kill()
        reader.cancel()
        notify.close()


async def test_a_notify_socket_nobody_reads_blocks_nothing(
    tmp_path: Path, platform: Platform
) -> None:
    """systemd busy (its notify socket full: 10 datagrams by default): sd_notify sent from the
    event loop blocked the whole agent, which then never stopped on SIGTERM."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))  # never read
    config = write_config(
        tmp_path / "agent.toml",
        registrar_url=f"http://127.0.0.1:{platform.http_port}",
        broker_url=f"mqtt://127.0.0.1:{platform.mqtt_port}",
        device_id="busy-systemd",
        state_dir=tmp_path / "state",
    )
    systemd = {"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "100000"}
    agent = AgentProcess(config, tmp_path / "agent.log", env=systemd)
    try:
        # the watchdog pings every 0.05 s: the socket is full after 10, and the agent goes on
        await agent.wait_for(
            lambda: agent.log().count("sd_notify WATCHDOG=1 failed") >= 10, "pings refused"
        )
        await agent.wait_logged("connected to mqtt://")
        started = time.monotonic()
        agent.proc.send_signal(signal.SIGTERM)
        assert await agent.exit_code(BOUND_S + 10) == 0
        assert time.monotonic() - started < BOUND_S
    finally:
        agent.kill()
        notify.close()
