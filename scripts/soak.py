"""Soak: the platform, a real agent and 1,000 simulated devices through a network that fails.

    python scripts/soak.py                                  # 1,000 devices, 10 minutes
    python scripts/soak.py --devices 200 --duration 120 --json

Every `--period` seconds (60) two things go wrong, on a schedule:
- the network is cut: a TCP proxy between the devices (the agent and the simulated fleet) and the
  platform closes every connection and refuses new ones for `--cut` seconds (5);
- the platform is killed (SIGKILL) and started again on the same ports and store.

The agent (`python -m iotbiz.agent`, with one app) sends telemetry every second through the
proxy; an operator account connected straight to the platform follows it and publishes a `ping`
on its `cmd` topic every few seconds (the broker's path), and the operator also sends a `ping`
through the admin API every few seconds (the product's path: stored, dispatched again after a
restart, answered once). The simulated devices (scripts/fleet_sim.py's MQTT client) send
telemetry and reconnect with jittered backoff after every loss.

At the end the network is left up until the agent's outbox is empty, then the agent and the
platform get SIGTERM. The report says whether anything the agent queued was lost (gaps in the
telemetry the operator received, the outbox's own drop counter), how many pings were answered,
whether every command the admin API accepted ended `done` and none ran twice,
whether every process ended in time with exit code 0 and left no child behind, and how the fleet
came back after each restart.

What the broker itself cannot promise: it keeps sessions in memory, so a message it acknowledged
but had not yet passed on when it was SIGKILLed is gone (as with mosquitto without persistence).
Such losses are reported apart from the agent's, by the time of the kill.

Bounded: every wait has a timeout; the run ends within duration + about two minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fleet_sim import (
    Credentials,
    Login,
    MqttClient,
    MqttError,
    add_account,
    add_customer,
    device_ids,
    device_topic,
    encode_topic,
    enroll_devices,
    http_ok,
    open_mqtt,
    percentile,
    raise_open_files_limit,
    telemetry_payload,
)

HOST = "127.0.0.1"
CUSTOMER = "soak"
AGENT_ID = "soak-agent"
HTTP_LISTENING = re.compile(rb"registrar listening on http://[^:]+:(\d+)")
MQTT_LISTENING = re.compile(rb"MQTT broker listening on mqtt://[^:]+:(\d+)")
APP = "import time\nwhile True:\n    print('tick', flush=True)\n    time.sleep(1)\n"


# -- the platform, killed and started again -----------------------------------------------------


class Platform:
    """`python -m iotbiz.broker` on loopback; the first start picks the ports, later ones reuse
    them (the proxy points at them)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.db = folder / "soak.db"
        self.http_port = 0
        self.mqtt_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts: list[float] = []  # seconds from exec to /healthz 200
        self.peak_rss = 0
        self._log_index = itertools.count()

    def start(self) -> None:
        log = self.folder / f"platform-{next(self._log_index)}.log"
        args = [
            *(sys.executable, "-m", "iotbiz.broker", "--db", str(self.db)),
            *("--http-port", str(self.http_port), "--mqtt-port", str(self.mqtt_port)),
        ]
        env = {
            **os.environ,
            "IOTBIZ_REGISTRAR_RATE_PER_IP": "0",
            "IOTBIZ_REGISTRAR_RATE_PER_CUSTOMER": "0",
        }
        began = time.monotonic()
        with log.open("wb") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = began + 60
        while time.monotonic() < deadline:
            text = log.read_bytes()
            http, mqtt = HTTP_LISTENING.search(text), MQTT_LISTENING.search(text)
            if http and mqtt:
                self.http_port, self.mqtt_port = int(http.group(1)), int(mqtt.group(1))
                if http_ok(f"http://{HOST}:{self.http_port}/healthz"):
                    self.starts.append(time.monotonic() - began)
                    return
            if self.proc.poll() is not None:
                raise RuntimeError(f"platform exited ({self.proc.returncode}):\n{text[-2000:]!r}")
            time.sleep(0.1)
        raise RuntimeError("platform did not start within 60 s")

    def sample(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                self.peak_rss = max(self.peak_rss, psutil.Process(self.proc.pid).memory_info().rss)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=30)

    def stop(self, timeout_s: float) -> tuple[int | None, float]:
        """SIGTERM; (exit code or None if it had to be killed, seconds to exit)."""
        assert self.proc is not None
        began = time.monotonic()
        self.proc.terminate()
        try:
            code: int | None = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
            code = None
        return code, time.monotonic() - began


# -- the network: a proxy that can be cut --------------------------------------------------------


class Proxy:
    """Forwards a local port to the platform's; `cut` closes every connection, `hold` refuses new
    ones until `release`."""

    def __init__(self, upstream: Platform, which: str) -> None:
        self._upstream = upstream
        self._which = which
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._open = True
        self.port = 0
        self.cut_connections = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, HOST, 0, backlog=4096)
        self.port = self._server.sockets[0].getsockname()[1]

    def hold(self) -> None:
        self._open = False

    def release(self) -> None:
        self._open = True

    def cut(self) -> None:
        self._open = False
        for writer in list(self._pipes):
            writer.transport.abort()
            self.cut_connections += 1
        self._pipes.clear()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.cut()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=10)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        this = asyncio.current_task()
        if this is not None:
            self._handlers.add(this)
            this.add_done_callback(self._handlers.discard)
        if not self._open:
            writer.transport.abort()
            return
        port = self._upstream.http_port if self._which == "http" else self._upstream.mqtt_port
        try:
            async with asyncio.timeout(5):
                up_reader, up_writer = await asyncio.open_connection(HOST, port)
        except (OSError, TimeoutError):
            writer.transport.abort()
            return
        self._pipes.update((writer, up_writer))
        try:
            await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
        finally:
            for end in (writer, up_writer):
                self._pipes.discard(end)
                end.transport.abort()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.transport.abort()


# -- the simulated fleet -------------------------------------------------------------------------


@dataclass
class Fleet:
    proxy: Proxy
    rate: float
    connected: set[str] = field(default_factory=set)
    connects: int = 0
    failed_connects: int = 0
    sent: int = 0

    async def run_device(self, credentials: Credentials, stop: asyncio.Event) -> None:
        """Connect, send telemetry at `rate`, and after any loss reconnect with backoff."""
        name = credentials.name
        login = Login(name, name, credentials.password)
        topic = encode_topic(device_topic(name, "telemetry"))
        backoff = 1.0
        while not stop.is_set():
            try:
                client = await open_mqtt(self.proxy.port, login, keepalive_s=30, wait_s=20)
            except MqttError:
                self.failed_connects += 1
                await _sleep_or_stop(stop, random.uniform(backoff / 2, backoff))
                backoff = min(backoff * 2, 30.0)
                continue
            backoff = 1.0
            self.connects += 1
            self.connected.add(name)
            try:
                while client.is_open and not stop.is_set():
                    client.publish(topic, telemetry_payload(self.sent), 0)
                    self.sent += 1
                    await _sleep_or_stop(stop, random.expovariate(self.rate))
                    client.ping_if_idle(30)
            finally:
                self.connected.discard(name)
                client.abort()


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()


# -- the operator: follows the agent, sends it pings ---------------------------------------------


@dataclass
class Witness:
    platform: Platform
    login: Login
    telemetry: list[dict[str, Any]] = field(default_factory=list)
    pings_sent: dict[str, float] = field(default_factory=dict)
    replies: dict[str, int] = field(default_factory=dict)  # id -> times received
    online_at: list[float] = field(default_factory=list)  # the agent's `online` statuses' ts
    subscribed: asyncio.Event = field(default_factory=asyncio.Event)
    client: MqttClient | None = None

    def on_message(self, client: MqttClient, topic: str, payload: bytes, qos: int) -> None:
        try:
            body = json.loads(payload)
        except ValueError:
            return
        if topic.endswith("/telemetry") and isinstance(body, dict):
            self.telemetry.append(body)
        elif topic.endswith("/reply") and isinstance(body, dict):
            command_id = str(body.get("id"))
            self.replies[command_id] = self.replies.get(command_id, 0) + 1
        elif (
            topic.endswith("/status")
            and isinstance(body, dict)
            and body.get("state") == "online"
            and isinstance(body.get("ts"), int | float)
        ):
            self.online_at.append(float(body["ts"]))

    async def follow(self, stop: asyncio.Event) -> None:
        agent = f"{CUSTOMER}/{AGENT_ID}"
        stopped = asyncio.ensure_future(stop.wait())
        while not stop.is_set():
            self.subscribed.clear()
            try:
                client = await open_mqtt(
                    self.platform.mqtt_port, self.login, wait_s=10, on_publish=self.on_message
                )
                code = await client.subscribe(f"devices/{agent}/#", 1, 10)
            except MqttError:
                await _sleep_or_stop(stop, 0.5)
                continue
            if code == 0x80:
                raise RuntimeError("the operator may not subscribe to the agent's topics")
            self.client = client
            self.subscribed.set()
            await asyncio.wait([client.closed, stopped], return_when=asyncio.FIRST_COMPLETED)
            self.client = None
            client.abort()

    async def ping_every(self, seconds: float, stop: asyncio.Event) -> None:
        topic = encode_topic(device_topic(f"{CUSTOMER}/{AGENT_ID}", "cmd"))
        for n in itertools.count():
            await _sleep_or_stop(stop, seconds)
            if stop.is_set():
                return
            client = self.client
            if client is None or not client.is_open:
                continue
            command_id = f"soak-{n}"
            body = {"id": command_id, "action": "ping", "args": {}, "expires_at": time.time() + 600}
            client.publish(topic, json.dumps(body).encode(), 1)
            self.pings_sent[command_id] = time.time()


class Operator:
    """Commands the product's way: `POST /api/v1/admin/commands`, stored by the platform and
    dispatched (again after a restart) until the agent answers. A POST while the platform is
    down is refused and counted; every accepted command must end `done`, run once."""

    def __init__(self, platform: Platform, token: str) -> None:
        self._platform = platform
        self._headers = {"Authorization": f"Bearer {token}"}
        self.accepted: list[str] = []
        self.refused = 0

    def _url(self, path: str) -> str:
        return f"http://{HOST}:{self._platform.http_port}/api/v1/admin{path}"

    async def send_every(self, seconds: float, stop: asyncio.Event) -> None:
        body = {"device": f"{CUSTOMER}/{AGENT_ID}", "action": "ping", "expires_in_s": 3600}
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(headers=self._headers, timeout=timeout) as http:
            while not stop.is_set():
                await _sleep_or_stop(stop, seconds)
                try:
                    async with http.post(self._url("/commands"), json=body) as response:
                        if response.status != 201:
                            self.refused += 1
                            continue
                        self.accepted += [c["id"] for c in (await response.json())["commands"]]
                except (aiohttp.ClientError, TimeoutError):
                    self.refused += 1

    async def states(self) -> dict[str, str]:
        found: dict[str, str] = {}
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(headers=self._headers, timeout=timeout) as http:
            for command_id in self.accepted:
                async with http.get(self._url(f"/commands/{command_id}")) as response:
                    found[command_id] = (await response.json())["state"]
        return found


def runs_per_command(agent_log: Path) -> dict[str, int]:
    """How often the agent carried out each command id (its log says so once per run)."""
    runs: dict[str, int] = {}
    for match in re.finditer(r"command (\S+) \(ping\) done", agent_log.read_text()):
        runs[match.group(1)] = runs.get(match.group(1), 0) + 1
    return runs


# -- the agent -----------------------------------------------------------------------------------


def agent_config(folder: Path, http: Proxy, mqtt: Proxy) -> Path:
    app = folder / "app.py"
    app.write_text(APP)
    config = folder / "agent.toml"
    config.write_text(
        f"""customer_id = "{CUSTOMER}"
device_id = "{AGENT_ID}"
registrar_url = "http://{HOST}:{http.port}"
broker_url = "mqtt://{HOST}:{mqtt.port}"
state_dir = "{folder / "agent-state"}"
telemetry_interval_s = 1
keepalive_s = 10

[[apps]]
name = "ticker"
command = ["{sys.executable}", "{app}"]
stop_timeout_s = 5
"""
    )
    return config


def start_agent(folder: Path, http: Proxy, mqtt: Proxy) -> subprocess.Popen[bytes]:
    config = agent_config(folder, http, mqtt)
    with (folder / "agent.log").open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "iotbiz.agent", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def telemetry_gaps(samples: Sequence[dict[str, Any]], interval_s: float) -> tuple[int, int]:
    """(distinct messages, messages missing between the first and the last) by their `ts`."""
    stamps = sorted({float(s["ts"]) for s in samples if isinstance(s.get("ts"), int | float)})
    missing = sum(max(0, round((b - a) / interval_s) - 1) for a, b in itertools.pairwise(stamps))
    return len(stamps), missing


# -- the run -------------------------------------------------------------------------------------


async def soak(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    platform = Platform(folder)
    add_customer(platform.db, CUSTOMER, args.devices + 10)
    operator_password = add_account(platform.db, "soak-operator")
    await asyncio.to_thread(platform.start)
    http, mqtt = Proxy(platform, "http"), Proxy(platform, "mqtt")
    await http.start()
    await mqtt.start()
    stop_fleet, stop_witness = asyncio.Event(), asyncio.Event()

    enrolled = await enroll_devices(
        f"http://{HOST}:{platform.http_port}",
        CUSTOMER,
        device_ids(args.devices),
        concurrency=4,
        limit_s=300,
    )
    fleet = Fleet(mqtt, args.rate)
    witness = Witness(platform, Login("soak-operator", "soak-operator", operator_password))
    tasks = [asyncio.create_task(fleet.run_device(c, stop_fleet)) for c in enrolled.credentials]
    tasks.append(asyncio.create_task(witness.follow(stop_witness)))
    tasks.append(asyncio.create_task(witness.ping_every(args.ping_s, stop_witness)))
    operator = Operator(platform, (folder / "admin.token").read_text().strip())
    tasks.append(asyncio.create_task(operator.send_every(args.ping_s, stop_witness)))
    await asyncio.wait_for(witness.subscribed.wait(), 30)

    agent = await asyncio.to_thread(start_agent, folder, http, mqtt)
    events: list[dict[str, Any]] = []
    began = time.monotonic()
    end_at = began + args.duration
    cycle = 0
    while time.monotonic() < end_at:
        cycle += 1
        cycle_start = began + (cycle - 1) * args.period
        # the network cut, half-way through the period
        await _until(cycle_start + args.period / 2, end_at)
        if time.monotonic() >= end_at:
            break
        before = len(fleet.connected)
        http.cut()
        mqtt.cut()
        await asyncio.sleep(args.cut)
        http.release()
        mqtt.release()
        events.append({"t": round(time.monotonic() - began, 1), "event": "cut", "fleet": before})
        # the kill, at the end of the period
        await _until(cycle_start + args.period - 2, end_at)
        if time.monotonic() >= end_at:
            break
        platform.sample()
        http.hold()
        mqtt.hold()
        killed_at = time.time()
        await asyncio.to_thread(platform.kill)
        witness.subscribed.clear()
        http.cut()
        mqtt.cut()
        await asyncio.to_thread(platform.start)
        await asyncio.wait_for(witness.subscribed.wait(), 30)  # before any device is let in
        http.release()
        mqtt.release()
        back = await _wait_for_fleet(fleet, len(enrolled.credentials), 60)
        events.append(
            {
                "t": round(time.monotonic() - began, 1),
                "event": "kill",
                "killed_at": killed_at,
                "restart_s": round(platform.starts[-1], 2),
                "fleet_back_s": back,
            }
        )

    # Network up for good: wait until the agent's outbox is empty and its telemetry current.
    http.release()
    mqtt.release()
    drained_at = time.time()
    drain_deadline = time.monotonic() + 120
    while time.monotonic() < drain_deadline:
        last = witness.telemetry[-1] if witness.telemetry else {}
        queued = (last.get("outbox") or {}).get("queued")
        if float(last.get("ts", 0)) >= drained_at and isinstance(queued, int) and queued <= 1:
            break
        await asyncio.sleep(0.5)
    await asyncio.sleep(args.ping_s + 5)  # the last pings' replies
    stop_witness.set()  # no new commands; the stored ones must all end done
    command_deadline = time.monotonic() + 60
    states = await operator.states()
    while time.monotonic() < command_deadline and any(v != "done" for v in states.values()):
        await asyncio.sleep(1)
        states = await operator.states()
    platform.sample()

    last = witness.telemetry[-1] if witness.telemetry else {}
    app_pids = [a.get("pid") for a in last.get("apps", []) if isinstance(a.get("pid"), int)]
    agent_began = time.monotonic()
    agent.terminate()
    try:
        agent_code: int | None = await asyncio.to_thread(agent.wait, 30)
    except subprocess.TimeoutExpired:
        agent.kill()
        agent.wait(timeout=30)
        agent_code = None
    agent_stop_s = time.monotonic() - agent_began
    stop_fleet.set()
    await asyncio.wait(tasks, timeout=30)
    platform_code, platform_stop_s = await asyncio.to_thread(platform.stop, 30)
    await http.close()
    await mqtt.close()

    leftovers = [p.pid for p in psutil.Process().children(recursive=True)]
    apps_alive = [pid for pid in app_pids if psutil.pid_exists(pid)]
    received, missing = telemetry_gaps(witness.telemetry, 1.0)
    kills = [e["killed_at"] for e in events if e["event"] == "kill"]
    unanswered = [i for i in witness.pings_sent if i not in witness.replies]

    # Lost with the broker's memory, not by the agent: queued in a session that a kill ended, or
    # sent after a kill before the agent was back (the new broker had no session to queue in).
    def with_broker(sent_at: float) -> bool:
        for k in kills:
            back = min((t for t in witness.online_at if t >= k), default=float("inf"))
            if 0 <= k - sent_at <= 15 or k <= sent_at < back:
                return True
        return False

    near_kill = [i for i in unanswered if with_broker(witness.pings_sent[i])]
    backs = [e["fleet_back_s"] for e in events if e["event"] == "kill"]
    runs = runs_per_command(folder / "agent.log")
    return {
        "devices": args.devices,
        "enrolled": len(enrolled.credentials),
        "duration_s": args.duration,
        "cuts": sum(1 for e in events if e["event"] == "cut"),
        "kills": len(kills),
        "agent": {
            "telemetry_received": received,
            "telemetry_missing": missing,
            "outbox_dropped": (last.get("outbox") or {}).get("dropped"),
            "pings_sent": len(witness.pings_sent),
            "pings_answered": len(witness.pings_sent) - len(unanswered),
            "pings_lost_with_a_killed_broker": len(near_kill),
            "replies_seen_twice": sum(1 for n in witness.replies.values() if n > 1),
            "stored_commands_accepted": len(operator.accepted),
            "stored_commands_refused_while_down": operator.refused,
            "stored_commands_done": sum(1 for v in states.values() if v == "done"),
            "stored_commands_not_done": {k: v for k, v in states.items() if v != "done"},
            "commands_run_twice": sorted(k for k, n in runs.items() if n > 1),
            "sigterm_exit_code": agent_code,
            "sigterm_exit_s": round(agent_stop_s, 2),
            "apps_left_running": apps_alive,
        },
        "platform": {
            "restart_s": [round(s, 2) for s in platform.starts],
            "peak_rss_mb": round(platform.peak_rss / 2**20, 1),
            "sigterm_exit_code": platform_code,
            "sigterm_exit_s": round(platform_stop_s, 2),
        },
        "fleet": {
            "connects": fleet.connects,
            "failed_connects": fleet.failed_connects,
            "telemetry_sent": fleet.sent,
            "back_after_kill_s_p50": percentile([b for b in backs if b is not None], 50),
            "back_after_kill_s_max": max((b for b in backs if b is not None), default=None),
            "not_back_after_a_kill": sum(1 for b in backs if b is None),
        },
        "processes_left": leftovers,
        "events": events,
    }


async def _until(deadline: float, end_at: float) -> None:
    await asyncio.sleep(max(0.0, min(deadline, end_at) - time.monotonic()))


async def _wait_for_fleet(fleet: Fleet, count: int, limit_s: float) -> float | None:
    """Seconds until `count` devices are connected again, or None after `limit_s`."""
    began = time.monotonic()
    while len(fleet.connected) < count:
        if time.monotonic() - began > limit_s:
            return None
        await asyncio.sleep(0.2)
    return round(time.monotonic() - began, 2)


def verdict(report: dict[str, Any]) -> list[str]:
    """What went wrong, in words; empty when the soak passed."""
    agent, platform = report["agent"], report["platform"]
    problems = []
    if agent["telemetry_missing"] or agent["outbox_dropped"]:
        problems.append(
            f"agent telemetry lost: {agent['telemetry_missing']} missing, "
            f"{agent['outbox_dropped']} dropped by the outbox"
        )
    if agent["sigterm_exit_code"] != 0 or agent["apps_left_running"]:
        problems.append(f"agent did not stop cleanly: {agent}")
    if platform["sigterm_exit_code"] != 0:
        problems.append(f"platform did not stop cleanly: {platform}")
    if report["processes_left"]:
        problems.append(f"processes left running: {report['processes_left']}")
    if report["fleet"]["not_back_after_a_kill"]:
        problems.append("the fleet did not come back within 60 s after a kill")
    if agent["stored_commands_not_done"] or agent["commands_run_twice"]:
        problems.append(
            f"stored commands not done: {agent['stored_commands_not_done']}; "
            f"run twice: {agent['commands_run_twice']}"
        )
    unexplained = agent["pings_sent"] - agent["pings_answered"]
    unexplained -= agent["pings_lost_with_a_killed_broker"]
    if unexplained:
        problems.append(f"{unexplained} pings unanswered away from any kill")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000, help="simulated devices (1000)")
    parser.add_argument("--duration", type=float, default=600, help="seconds of faults (600)")
    parser.add_argument("--period", type=float, default=60, help="seconds between faults (60)")
    parser.add_argument("--cut", type=float, default=5, help="seconds the network is cut (5)")
    parser.add_argument("--rate", type=float, default=0.2, help="telemetry/s per device (0.2)")
    parser.add_argument("--ping-s", type=float, default=5, help="seconds between pings (5)")
    parser.add_argument("--keep", type=Path, help="keep the logs and store in this folder")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if args.devices < 1 or args.duration <= 0 or args.period < 10:
        parser.error("--devices and --duration must be positive, --period at least 10")
    raise_open_files_limit()
    with contextlib.ExitStack() as stack:
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            folder = args.keep
        else:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="soak-")))
        report = asyncio.run(soak(args, folder))
    problems = verdict(report)
    report["problems"] = problems
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key in ("devices", "enrolled", "duration_s", "cuts", "kills"):
            print(f"{key:>12}: {report[key]}")
        for part in ("agent", "platform", "fleet"):
            print(f"{part}:")
            for key, value in report[part].items():
                print(f"    {key}: {value}")
        print("problems:", "none" if not problems else "")
        for problem in problems:
            print("   ", problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
