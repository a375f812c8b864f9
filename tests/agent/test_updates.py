"""Updates of a release app, end to end: a real platform (broker and registrar, in this process
on ports 0), a whole Agent (in this process) running a real child program from its release, an
operator publishing `update` and `rollback` commands over MQTT, and a real HTTP server serving
the artifacts with Range support (`ReleaseServer`, standing in for the platform's download route
until that lands; it forwards enrollment to the real registrar and checks the device's basic
auth against the password the agent holds).

A good release commits (and two are kept, and `rollback` goes back); a release that crashes on
start and one that fails its health check roll back by themselves; a tampered artifact and a
badly signed one are refused before anything changes; a download cut in the middle resumes
where it stopped; an artifact that cannot fit is refused before a byte is fetched.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
import pytest_asyncio
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from iotbiz import topics
from iotbiz.agent.agent import Agent
from iotbiz.agent.supervisor import AppState
from iotbiz.names import DeviceName
from iotbiz.platform import Platform
from iotbiz.settings import (
    AgentSettings,
    AppSettings,
    HealthSettings,
    Settings,
    load_agent_settings,
)
from tests.agent.test_delivery_link import operator_device, started_platform
from tests.mqtt_device import PahoDevice

pytestmark = pytest.mark.timeout(90)

AGENT = DeviceName("abc123", "upd-1")
PREFIX = f"devices/{AGENT}/"
APP = "web"
# The release's program: prints its version and runs until SIGTERM.
GOOD = (
    "import pathlib, signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
    "print('version', pathlib.Path('VERSION').read_text(), flush=True)\n"
    "while True:\n    time.sleep(0.1)\n"
)
CRASHES = "import sys\nprint('boom', flush=True)\nsys.exit(3)\n"
HEALTHY = "import sys\nsys.exit(0)\n"
SICK = "import sys\nprint('sick')\nsys.exit(1)\n"


def release_artifact(version: str, program: str = GOOD, check: str = HEALTHY) -> bytes:
    """A .tar.gz release: app.py, check.py (its health check) and VERSION."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, text in (("app.py", program), ("check.py", check), ("VERSION", version)):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            archive.addfile(info, io.BytesIO(data))
        padding = tarfile.TarInfo("data/padding.bin")  # big enough to be cut in the middle
        seed = hashlib.sha256(version.encode()).digest()
        blob = b"".join(hashlib.sha256(seed + n.to_bytes(4)).digest() for n in range(8192))
        padding.size = len(blob)
        archive.addfile(padding, io.BytesIO(blob))
    return buffer.getvalue()


@dataclass
class Served:
    """What the release server sent for one request."""

    range: str | None
    status: int
    sent: int
    authorization: tuple[str, str] | None


@dataclass
class ReleaseServer:
    """Serves `GET /api/v1/releases/{app}/{version}` with Range support on 127.0.0.1 port 0;
    forwards every other request (enrollment) to the platform's registrar."""

    platform_url: str
    state_dir: Path
    artifacts: dict[tuple[str, str], bytes] = field(default_factory=dict)
    requests: list[Served] = field(default_factory=list)
    cut_at: int | None = None  # the first request ending past this byte is cut off there
    stall_at: int | None = None  # the first request past this byte stops sending there
    stalled: asyncio.Event = field(default_factory=asyncio.Event)  # set once it stopped
    _closing: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0
    _runner: web.AppRunner | None = None
    _session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/api/v1/releases/{app}/{version}", self._release)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._session = aiohttp.ClientSession()
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def close(self) -> None:
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add(self, version: str, data: bytes) -> dict[str, Any]:
        """Serve `data` as release `version` of APP: the args of its update command."""
        self.artifacts[(APP, version)] = data
        return update_args(version, data)

    async def _release(self, request: web.Request) -> web.StreamResponse:
        login = _basic_auth(request.headers.get("Authorization"))
        record = Served(request.headers.get("Range"), 0, 0, login)
        self.requests.append(record)
        credentials = json.loads((self.state_dir / "credentials.json").read_text())
        if login != (str(AGENT), credentials["password"]):
            record.status = 401
            raise web.HTTPUnauthorized()
        data = self.artifacts.get((request.match_info["app"], request.match_info["version"]))
        if data is None:
            record.status = 404
            raise web.HTTPNotFound()
        start = 0
        if record.range is not None:
            start = int(record.range.removeprefix("bytes=").removesuffix("-"))
        response = web.StreamResponse(status=206 if start else 200)
        response.content_length = len(data) - start
        if start:
            response.headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        record.status = response.status
        await response.prepare(request)
        end = len(data)
        cut = self.cut_at is not None and start < self.cut_at < end
        if cut:
            assert self.cut_at is not None
            end = self.cut_at
            self.cut_at = None
        stall = self.stall_at is not None and start < self.stall_at < end
        if stall:
            assert self.stall_at is not None
            end = self.stall_at
            self.stall_at = None
        for offset in range(start, end, 16384):
            chunk = data[offset : min(offset + 16384, end)]
            await response.write(chunk)
            record.sent += len(chunk)
        if stall:  # hold the connection open, sending nothing more, until the client goes
            self.stalled.set()
            await self._closing.wait()
            assert request.transport is not None
            request.transport.abort()
            return response
        if cut:
            await asyncio.sleep(0.1)  # let the bytes leave, then break the connection
            assert request.transport is not None
            request.transport.abort()
            return response
        await response.write_eof()
        return response

    async def _forward(self, request: web.Request) -> web.Response:
        assert self._session is not None
        async with self._session.request(
            request.method,
            self.platform_url + request.path_qs,
            data=await request.read(),
            headers={"Content-Type": request.headers.get("Content-Type", "application/json")},
        ) as answer:
            return web.Response(
                status=answer.status,
                body=await answer.read(),
                content_type=answer.content_type,
            )


def _basic_auth(header: str | None) -> tuple[str, str] | None:
    if header is None or not header.startswith("Basic "):
        return None
    user, _, password = base64.b64decode(header[6:]).decode().partition(":")
    return user, password


def update_args(version: str, data: bytes, signature: str | None = None) -> dict[str, Any]:
    return {
        "app": APP,
        "version": version,
        "url": f"/api/v1/releases/{APP}/{version}",
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "signature": signature,
        "force": False,
    }


class Operator:
    """An operator on MQTT: sends commands to the agent, collects its replies and events."""

    def __init__(self, device: PahoDevice) -> None:
        self.device = device
        self.replies: dict[str, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self._ids = 0

    async def send(self, action: str, args: dict[str, Any]) -> str:
        self._ids += 1
        command_id = f"c{self._ids}-{time.monotonic_ns()}"
        body = {"id": command_id, "action": action, "args": args}
        await self.device.publish(PREFIX + "cmd", json.dumps(body))
        return command_id

    async def _read_until(self, check: Callable[[], bool], what: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not check():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {what} within {timeout_s} s")
            message = await self.device.next_message(timeout=min(left, 0.5))
            if message is None:
                continue
            payload = json.loads(message.payload)
            if message.topic == PREFIX + topics.REPLY:
                self.replies[payload["id"]] = payload
            elif message.topic == PREFIX + topics.EVENTS and payload.get("type") == "update":
                self.events.append(payload)

    async def reply(self, command_id: str, timeout_s: float = 45.0) -> dict[str, Any]:
        await self._read_until(
            lambda: command_id in self.replies, f"reply to {command_id}", timeout_s
        )
        return self.replies[command_id]

    async def states_of(self, version: str, final: str, timeout_s: float = 10.0) -> list[str]:
        """The update states announced for `version`, once the last one is `final`."""
        await self._read_until(
            lambda: self.states(version)[-1:] == [final], f"event {final} of {version}", timeout_s
        )
        return self.states(version)

    async def ask(self, action: str, args: dict[str, Any]) -> dict[str, Any]:
        return await self.reply(await self.send(action, args))

    def states(self, version: str) -> list[str]:
        return [
            event["state"]
            for event in self.events
            if event["version"] == version and "bytes" not in event
        ]


async def until(check: Callable[[], Any], what: str, timeout_s: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.05)
    return value


def app_settings(*, health: bool = False) -> AppSettings:
    return AppSettings(
        name=APP,
        command=(sys.executable, "app.py"),
        release=True,
        start_s=0.3,
        stop_timeout_s=2.0,
        backoff_s=0.2,
        backoff_max_s=0.5,
        health=HealthSettings(command=(sys.executable, "check.py"), interval_s=0.3, grace_s=0.2)
        if health
        else None,
    )


def make_agent_settings(
    state_dir: Path, server: ReleaseServer, platform: Platform, **extra: Any
) -> AgentSettings:
    loaded = load_agent_settings(
        None,
        environ={},
        overrides={
            "customer_id": AGENT.customer_id,
            "device_id": AGENT.device_id,
            "state_dir": state_dir,
            "registrar_url": server.url,
            "broker_url": f"mqtt://127.0.0.1:{platform.mqtt_port}",
            "keepalive_s": 5,
            "update_trial_s": 1.0,
            **extra,
        },
    )
    return dataclasses.replace(loaded, apps=(app_settings(health=True),))


@contextlib.asynccontextmanager
async def agent_running(settings: AgentSettings) -> AsyncIterator[Agent]:
    """A whole agent in this process, until the block ends (then stopped as by SIGTERM)."""
    agent = Agent(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await until(lambda: agent.link is not None and agent.link.connected.is_set(), "online")
        yield agent
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 20) == 0


@pytest_asyncio.fixture
async def platform(make_settings: Callable[..., Settings]) -> AsyncIterator[Platform]:
    async with started_platform(make_settings(http={"host": "127.0.0.1"})) as started:
        yield started


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "agent"


@pytest_asyncio.fixture
async def server(platform: Platform, state_dir: Path) -> AsyncIterator[ReleaseServer]:
    started = ReleaseServer(f"http://127.0.0.1:{platform.http_port}", state_dir)
    await started.start()
    yield started
    await started.close()


@pytest_asyncio.fixture
async def operator(platform: Platform) -> AsyncIterator[Operator]:
    async with operator_device(platform) as device:
        yield Operator(device)


@pytest_asyncio.fixture
async def agent(state_dir: Path, server: ReleaseServer, platform: Platform) -> AsyncIterator[Agent]:
    async with agent_running(make_agent_settings(state_dir, server, platform)) as started:
        yield started


def running_in(agent: Agent, state_dir: Path, version: str) -> int | None:
    """The app's pid when it is RUNNING in release `version`, else None."""
    status = agent.supervisor.status(APP)
    if status.state is not AppState.RUNNING or status.pid is None:
        return None
    try:
        cwd = psutil.Process(status.pid).cwd()
    except psutil.Error:
        return None
    expected = state_dir / "apps" / APP / "releases" / version
    return status.pid if Path(cwd) == expected.resolve() else None


def release_folders(state_dir: Path) -> list[str]:
    return sorted(path.name for path in (state_dir / "apps" / APP / "releases").iterdir())


def journal(state_dir: Path) -> dict[str, Any]:
    return dict(json.loads((state_dir / "updates" / f"{APP}.json").read_text()))


FLOW = ["downloading", "verified", "staged", "switching", "trial", "committed"]


async def test_a_good_release_commits_two_are_kept_and_rollback_goes_back(
    agent: Agent, operator: Operator, server: ReleaseServer, state_dir: Path
) -> None:
    assert agent.supervisor.status(APP).state is AppState.STOPPED  # no release yet
    assert agent.supervisor.status(APP).reason == "no release installed"
    reply = await operator.ask("update", server.add("1.0", release_artifact("1.0")))
    assert reply["ok"] is True, reply
    assert reply["result"] == {
        "outcome": "committed",
        "app": APP,
        "version": "1.0",
        "reason": None,
        "previous": None,
    }
    assert await operator.states_of("1.0", "committed") == FLOW
    assert running_in(agent, state_dir, "1.0")
    assert agent.supervisor.status(APP).version == "1.0"  # in telemetry too
    assert [r.authorization for r in server.requests] == [
        (str(AGENT), json.loads((state_dir / "credentials.json").read_text())["password"])
    ]
    for version, previous in (("2.0", "1.0"), ("3.0", "2.0")):
        reply = await operator.ask("update", server.add(version, release_artifact(version)))
        assert reply["result"]["outcome"] == "committed", reply
        assert reply["result"]["previous"] == previous
        assert running_in(agent, state_dir, version)
        assert release_folders(state_dir) == [previous, version]  # two kept
    assert list((state_dir / "downloads").iterdir()) == []
    # The same version again: nothing to do.
    again = await operator.ask("update", server.add("3.0", release_artifact("3.0")))
    assert again["result"]["outcome"] == "committed"
    assert again["result"]["reason"] == "already running"
    # The operator's rollback: back to 2.0, 3.0 kept (not marked bad).
    back = await operator.ask("rollback", {"app": APP})
    assert back["result"] == {
        "outcome": "rolled_back",
        "app": APP,
        "version": "3.0",
        "reason": "rollback requested by the operator",
        "previous": "2.0",
    }
    await until(lambda: running_in(agent, state_dir, "2.0"), "2.0 running again")
    assert release_folders(state_dir) == ["2.0", "3.0"]
    assert journal(state_dir)["bad"] == []


async def test_a_release_that_crashes_on_start_rolls_back_and_is_not_retried(
    agent: Agent, operator: Operator, server: ReleaseServer, state_dir: Path
) -> None:
    assert (await operator.ask("update", server.add("1.0", release_artifact("1.0"))))["ok"]
    pid = await until(lambda: running_in(agent, state_dir, "1.0"), "1.0 running")
    crashing = server.add("2.0", release_artifact("2.0", CRASHES))
    reply = await operator.ask("update", crashing)
    assert reply["result"]["outcome"] == "rolled_back", reply
    assert reply["result"]["reason"] == "crashed on start: exit 3"
    assert reply["result"]["previous"] == "1.0"
    assert await operator.states_of("2.0", "rolled_back") == [
        *FLOW[:5],
        "rolling_back",
        "rolled_back",
    ]
    new_pid = await until(lambda: running_in(agent, state_dir, "1.0"), "1.0 running again")
    assert new_pid != pid  # restarted in its old release
    assert release_folders(state_dir) == ["1.0"]  # the bad one removed
    assert journal(state_dir)["bad"] == ["2.0"]
    # Marked bad: refused unless forced.
    requests = len(server.requests)
    refused = await operator.ask("update", crashing)
    assert refused["result"]["outcome"] == "refused"
    assert refused["result"]["reason"] == "2.0 was rolled back before: send it with force to retry"
    assert len(server.requests) == requests
    forced = await operator.ask("update", {**crashing, "force": True})
    assert forced["result"]["outcome"] == "rolled_back"
    assert len(server.requests) == requests + 1
    await until(lambda: running_in(agent, state_dir, "1.0"), "1.0 running after the retry")


async def test_a_release_that_fails_its_health_check_rolls_back(
    agent: Agent, operator: Operator, server: ReleaseServer, state_dir: Path
) -> None:
    assert (await operator.ask("update", server.add("1.0", release_artifact("1.0"))))["ok"]
    await until(lambda: running_in(agent, state_dir, "1.0"), "1.0 running")
    reply = await operator.ask("update", server.add("2.0", release_artifact("2.0", check=SICK)))
    assert reply["result"]["outcome"] == "rolled_back", reply
    assert reply["result"]["reason"] == "health check failed in the trial: command exit 1"
    await until(lambda: running_in(agent, state_dir, "1.0"), "1.0 running again")
    assert release_folders(state_dir) == ["1.0"]


async def test_a_first_release_that_crashes_leaves_the_app_stopped(
    agent: Agent, operator: Operator, server: ReleaseServer, state_dir: Path
) -> None:
    reply = await operator.ask("update", server.add("1.0", release_artifact("1.0", CRASHES)))
    assert reply["result"]["outcome"] == "rolled_back"
    assert reply["result"]["previous"] is None
    status = agent.supervisor.status(APP)
    assert (status.state, status.reason) == (AppState.STOPPED, "no release installed")
    assert not (state_dir / "apps" / APP / "current").exists()


async def test_a_tampered_artifact_is_refused_before_anything_changes(
    agent: Agent, operator: Operator, server: ReleaseServer, state_dir: Path
) -> None:
    assert (await operator.ask("update", server.add("1.0", release_artifact("1.0"))))["ok"]
    pid = await until(lambda: running_in(agent, state_dir, "1.0"), "1.0 running")
    args = server.add("2.0", release_artifact("2.0"))
    tampered = bytearray(release_artifact("2.0"))
    tampered[len(tampered) // 2] ^= 0xFF
    server.artifacts[(APP, "2.0")] = bytes(tampered)  # same size, other bytes
    reply = await operator.ask("update", args)
    assert reply["result"]["outcome"] == "refused"
    assert reply["result"]["reason"].startswith("sha256 mismatch")
    assert await operator.states_of("2.0", "refused") == ["downloading", "refused"]
    assert running_in(agent, state_dir, "1.0") == pid  # not even restarted
    assert release_folders(state_dir) == ["1.0"]
    assert list((state_dir / "downloads").iterdir()) == []  # not kept to be resumed


def write_public_key(path: Path) -> Ed25519PrivateKey:
    key = Ed25519PrivateKey.generate()
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return key


async def test_signed_releases_and_a_badly_signed_one_refused(
    tmp_path: Path,
    state_dir: Path,
    server: ReleaseServer,
    platform: Platform,
    operator: Operator,
) -> None:
    key = write_public_key(tmp_path / "release-signing.pub")
    stranger = Ed25519PrivateKey.generate()
    settings = make_agent_settings(
        state_dir, server, platform, release_public_key=str(tmp_path / "release-signing.pub")
    )

    def signed(version: str, signer: Ed25519PrivateKey) -> dict[str, Any]:
        args = server.add(version, release_artifact(version))
        signature = signer.sign(bytes.fromhex(args["sha256"]))
        return {**args, "signature": base64.b64encode(signature).decode()}

    async with agent_running(settings) as agent:
        reply = await operator.ask("update", signed("1.0", key))
        assert reply["result"]["outcome"] == "committed", reply
        pid = await until(lambda: running_in(agent, state_dir, "1.0"), "1.0 running")
        requests = len(server.requests)
        for args, reason in (
            (signed("2.0", stranger), "bad signature: not made with this device's release key"),
            ({**signed("2.0", key), "signature": None}, "not signed"),
        ):
            reply = await operator.ask("update", args)
            assert reply["result"]["outcome"] == "refused"
            assert reason in reply["result"]["reason"]
        assert len(server.requests) == requests  # refused before a byte was fetched
        assert running_in(agent, state_dir, "1.0") == pid
        assert release_folders(state_dir) == ["1.0"]


async def test_a_download_cut_in_the_middle_resumes_where_it_stopped(
    agent: Agent, operator: Operator, server: ReleaseServer, state_dir: Path
) -> None:
    data = release_artifact("1.0")
    server.cut_at = len(data) // 2
    reply = await operator.ask("update", server.add("1.0", data))
    assert reply["result"]["outcome"] == "committed", reply
    first, second = server.requests
    assert (first.range, first.status, first.sent) == (None, 200, len(data) // 2)
    assert (second.range, second.status) == (f"bytes={len(data) // 2}-", 206)
    assert second.sent == len(data) - len(data) // 2
    assert first.sent + second.sent == len(data)  # no byte sent twice
    assert running_in(agent, state_dir, "1.0")


async def test_an_artifact_that_cannot_fit_is_refused_before_the_download(
    agent: Agent, operator: Operator, server: ReleaseServer, state_dir: Path
) -> None:
    args = server.add("1.0", release_artifact("1.0"))
    args["size"] = shutil.disk_usage(state_dir).free  # the disk cannot hold it
    reply = await operator.ask("update", args)
    assert reply["result"]["outcome"] == "refused"
    assert reply["result"]["reason"].startswith("not enough disk space")
    assert server.requests == []
    assert await operator.states_of("1.0", "refused") == ["refused"]
    assert agent.supervisor.status(APP).state is AppState.STOPPED


async def test_a_release_the_registrar_does_not_offer_is_refused(
    agent: Agent, operator: Operator, server: ReleaseServer, state_dir: Path
) -> None:
    args = update_args("1.0", release_artifact("1.0"))  # not served: 404
    reply = await operator.ask("update", args)
    assert reply["result"]["outcome"] == "refused"
    assert reply["result"]["reason"] == "download refused: HTTP 404"
    assert [(r.status, r.sent) for r in server.requests] == [(404, 0)]  # not retried
    assert agent.supervisor.status(APP).state is AppState.STOPPED


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ({"app": "nope", "version": "1"}, "args.app must be the name of an app with release"),
        ({"version": ".."}, "args.version must be 1 to 64 of"),
        ({"url": "http://elsewhere/x"}, "args.url must be a path on the registrar"),
        ({"url": "//elsewhere/x"}, "args.url must be a path on the registrar"),
        ({"sha256": "abc"}, "args.sha256 must be 64 hex digits"),
        ({"size": -1}, "args.size must be a positive whole number"),
    ],
)
async def test_bad_update_args_are_an_error_reply(
    agent: Agent, operator: Operator, args: dict[str, Any], error: str
) -> None:
    good = update_args("1.0", b"x")
    reply = await operator.ask("update", {**good, **args})
    assert reply == {"id": reply["id"], "ok": False, "error": error + reply["error"][len(error) :]}
    assert reply["error"].startswith(error)


def test_a_public_key_without_cryptography_is_a_one_line_start_up_error(tmp_path: Path) -> None:
    """cryptography made unimportable (a package of that name that raises ImportError, first on
    the path): the agent says what to install, in one line, and exits 1."""
    shadow = tmp_path / "shadow" / "cryptography"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('no cryptography here')\n")
    write_public_key(tmp_path / "release-signing.pub")
    config = tmp_path / "agent.toml"
    config.write_text(
        'customer_id = "abc123"\ndevice_id = "sig-1"\n'
        f'state_dir = "{tmp_path / "state"}"\n'
        f'release_public_key = "{tmp_path / "release-signing.pub"}"\n'
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'shadow'}:{Path.cwd()}"}
    result = subprocess.run(
        [sys.executable, "-m", "iotbiz.agent", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr == (
        "iotbiz-agent: release_public_key is set but the cryptography library is missing:"
        " pip install 'iotbiz[signing]'\n"
    )
