"""Command round trip through the admin API, with a fleet connected.

    python scripts/bench_commands.py                      # 1,000 devices, 10 pings/s for 60 s
    python scripts/bench_commands.py --devices 5000 --rate 20 --duration 120 --json

Starts the real platform (`python -m iotbiz.broker`, HTTP and MQTT on port 0, the ports read back
from its log: scripts/soak.py's `Platform`) with a new store in a temporary folder, enrolls
`--devices` devices over the device API and connects them all as simulated devices
(scripts/fleet_sim.py's MQTT client): each subscribes to its `cmd` topic, says `online` (retained,
QoS 1, as the agent does), sends telemetry every `--telemetry-interval` seconds (QoS 1 as the agent
does, the first at a random phase so that the fleet's messages are spread) and answers every
command on `reply` the way the agent does: `ping` gets `{"id", "ok": true, "result": {"pong":
true, "ts"}}`, any other action `ok: false`, and an id seen before gets the same reply again
(the agent runs a command once).

Then, as an operator with the admin token (`admin.token` beside the store):

1. single pings: `POST /api/v1/admin/commands {"device": ..., "action": "ping"}` to a random
   connected device, `--rate` a second (open loop: on a fixed schedule, whatever the answers) for
   `--duration` seconds, each followed by `GET /api/v1/admin/commands/{id}?wait=30`. The round
   trip is from before the POST to the GET's answer. A command not final after that wait counts
   as `timeout` (and is looked at again at the end: done late, or still open); a POST or GET that
   fails counts as an HTTP error. Nothing is dropped from the counts.
2. one bulk ping: `POST {"customer_id": ..., "action": "ping"}` (every active device of the
   customer), then `GET /api/v1/admin/commands?batch=...&state=queued|sent&limit=1` every 0.1 s
   until none is open (or `--bulk-timeout`); then the whole batch is read and counted by state.

Also measured: when each command first reached its device (this process sees both ends), the
platform's CPU (per cent of one core) and RSS (psutil on the child, sampled every second) and this
process's CPU (the simulated fleet and the operator share the machine with the platform), the
share of the time the machine was short of CPU (Linux PSI, /proc/pressure/cpu: other work on the
same cores shows there), and the command dispatcher's counters from `/metrics`.

Exit status 0 when every command (single and bulk) ended `done`, 1 otherwise.

Bounded: enrollment and connecting by --setup-timeout, every HTTP request by a timeout, the bulk
wait by --bulk-timeout; the run ends within setup + duration + about 45 s + the bulk wait.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import struct
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fleet_sim import (
    Credentials,
    MqttClient,
    MqttError,
    SimDevice,
    add_customer,
    device_ids,
    device_topic,
    disconnect_all,
    encode_topic,
    enroll_devices,
    open_mqtt,
    percentile,
    raise_open_files_limit,
)
from soak import Platform

from iotbiz.agent.link import BACKOFF_CAP_S, BACKOFF_START_S
from tests.mqtt_wire import packet

CUSTOMER = "bench"
FINAL = ("done", "failed", "expired")
OPEN = ("queued", "sent")
WAIT_S = 30
DISPATCHER_COUNTERS = (
    "published",
    "failed_publishes",
    "finished",
    "expired",
    "ignored_replies",
    "malformed_replies",
    "dropped_replies",
)


# -- the simulated devices -----------------------------------------------------------------------


class AgentLikeDevice(SimDevice):
    """fleet_sim's device, answering as `iotbiz.agent.commands` does, and noting in `arrivals`
    when each command id first reached a device (`time.perf_counter()`)."""

    def __init__(
        self, credentials: Credentials, client: MqttClient, *, qos: int, arrivals: dict[str, float]
    ) -> None:
        super().__init__(credentials, client, qos=qos)
        self.repeats = 0  # a command id delivered again (answered from memory)
        self._arrivals = arrivals
        self._answered: dict[str, bytes] = {}
        self._reply_topic = encode_topic(device_topic(credentials.name, "reply"))
        self._status_topic = encode_topic(device_topic(credentials.name, "status"))

    def say_online(self) -> None:
        """The agent's first message on a connection: a retained `online` status, QoS 1."""
        body = {"state": "online", "agent_version": "bench", "ts": round(time.time(), 3)}
        packet_id = struct.pack("!H", self.client.next_packet_id())
        # PUBLISH, QoS 1, retain
        self.client.send(packet(0x33, self._status_topic + packet_id + json.dumps(body).encode()))

    def on_command(self, client: MqttClient, topic: str, payload: bytes, qos: int) -> None:
        arrived = time.perf_counter()
        try:
            command = json.loads(payload)
            command_id = command["id"]
        except (ValueError, KeyError, TypeError):
            self.bad_commands += 1
            return
        if not isinstance(command_id, str):
            self.bad_commands += 1
            return
        reply = self._answered.get(command_id)
        if reply is None:
            self._arrivals.setdefault(command_id, arrived)
            action = command.get("action")
            if action == "ping":
                body = {"id": command_id, "ok": True, "result": {"pong": True, "ts": time.time()}}
            else:
                body = {"id": command_id, "ok": False, "error": f"unknown action {action!r}"}
            reply = self._answered[command_id] = json.dumps(body).encode()
        else:
            self.repeats += 1
        if client.is_open:
            client.publish(self._reply_topic, reply, qos=1)
            self.replies += 1


@dataclass
class Fleet:
    """Connects devices the way the agent does: a refused or failed connect (CONNACK 3 while the
    platform's password checks are busy, as in a cold connect storm) is tried again after a
    jittered backoff (the agent's: 1 s doubling to 60 s), until the setup time is up. Each
    device sends telemetry from the moment it is connected, as the agent does (an idle one would
    be dropped by the broker's keep-alive check while the rest of the fleet is still connecting).
    A device whose connection is lost later is not connected again: `still_connected` says."""

    port: int
    arrivals: dict[str, float]
    telemetry_rate: float
    devices: list[AgentLikeDevice] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)  # telemetry, cancelled at end
    refusals: Counter[str] = field(default_factory=Counter)
    gave_up: int = 0
    seconds: float = 0.0

    async def connect(self, enrolled: Sequence[Credentials], limit_s: float) -> None:
        began = time.monotonic()
        deadline = began + limit_s
        await asyncio.gather(*(self._connect_one(c, deadline) for c in enrolled))
        self.seconds = time.monotonic() - began

    async def _connect_one(self, credentials: Credentials, deadline: float) -> None:
        backoff = BACKOFF_START_S
        while True:
            client: MqttClient | None = None
            try:
                client = await open_mqtt(self.port, credentials.login(), keepalive_s=60)
                device = AgentLikeDevice(credentials, client, qos=1, arrivals=self.arrivals)
                code = await client.subscribe(device_topic(credentials.name, "cmd"), 1, 30)
                if code == 0x80:
                    raise MqttError(f"{credentials.name}: SUBACK refused")
                device.say_online()
                self.devices.append(device)
                stop_at = time.monotonic() + 24 * 3600  # the task is cancelled instead
                self.tasks.append(asyncio.create_task(device.run(self.telemetry_rate, stop_at, 60)))
                return
            except MqttError as exc:
                # "NAME: CONNACK refused with code 3", "NAME: cannot connect (...)", ...
                self.refusals[str(exc).split(": ", 1)[-1].split(" (")[0]] += 1
                if client is not None:
                    client.abort()
            delay = random.uniform(backoff / 2, backoff)
            if time.monotonic() + delay > deadline:
                self.gave_up += 1
                return
            await asyncio.sleep(delay)
            backoff = min(backoff * 2, BACKOFF_CAP_S)


# -- measuring the platform ----------------------------------------------------------------------


def cpu_pressure_us() -> int | None:
    """Linux PSI: microseconds so far in which some runnable task waited for a CPU (None where
    /proc/pressure/cpu is missing). Over a phase, the share of time the machine was short of CPU:
    other work on the same cores, which this benchmark cannot see otherwise."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    return int(line.rpartition("total=")[2])


class Meter:
    """CPU (per cent of one core) and RSS of a process over a phase, RSS sampled every second;
    and the machine's CPU pressure over the phase (per cent of the time)."""

    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)
        self._began = 0.0
        self._cpu = 0.0
        self._pressure: int | None = None
        self.rss: list[int] = []

    def _cpu_s(self) -> float:
        times = self._process.cpu_times()
        return float(times.user + times.system)

    def begin(self) -> None:
        self._began, self._cpu, self.rss = time.monotonic(), self._cpu_s(), []
        self._pressure = cpu_pressure_us()

    def sample(self) -> None:
        with contextlib.suppress(psutil.Error):
            self.rss.append(self._process.memory_info().rss)

    def end(self) -> dict[str, float | None]:
        self.sample()
        wall = time.monotonic() - self._began
        pressure, now = self._pressure, cpu_pressure_us()
        return {
            "cpu_percent": round(100 * (self._cpu_s() - self._cpu) / wall, 1),
            "machine_cpu_pressure_percent": None
            if pressure is None or now is None
            else round((now - pressure) / 1e4 / wall, 1),
            "rss_mb_mean": round(sum(self.rss) / len(self.rss) / 2**20, 1),
            "rss_mb_max": round(max(self.rss) / 2**20, 1),
        }


async def sample_every(meters: Sequence[Meter], seconds: float) -> None:
    while True:
        await asyncio.sleep(seconds)
        for meter in meters:
            meter.sample()


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {name or name{labels}: value}."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                values[name] = float(value)
    return values


# -- the operator --------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One single-device command, from before its POST to the answer of its GET ?wait=30."""

    name: str
    began: float
    command_id: str | None = None
    state: str = "not sent"  # done, failed, expired, timeout (still open), http error
    post_s: float | None = None
    seconds: float | None = None


@dataclass
class Operator:
    http: aiohttp.ClientSession
    outcomes: list[Outcome] = field(default_factory=list)

    async def metrics(self) -> dict[str, float]:
        async with self.http.get("/metrics") as response:
            assert response.status == 200, await response.text()
            return parse_metrics(await response.text())

    async def ping(self, name: str) -> None:
        outcome = Outcome(name, time.perf_counter())
        self.outcomes.append(outcome)
        try:
            body = {"device": name, "action": "ping"}
            async with self.http.post("/api/v1/admin/commands", json=body) as response:
                if response.status != 201:
                    outcome.state = f"http error (POST {response.status})"
                    return
                outcome.command_id = (await response.json())["commands"][0]["id"]
            outcome.post_s = time.perf_counter() - outcome.began
            path = f"/api/v1/admin/commands/{outcome.command_id}"
            async with self.http.get(path, params={"wait": str(WAIT_S)}) as response:
                if response.status != 200:
                    outcome.state = f"http error (GET {response.status})"
                    return
                state = (await response.json())["state"]
            outcome.seconds = time.perf_counter() - outcome.began
            outcome.state = state if state in FINAL else "timeout"
        except (aiohttp.ClientError, TimeoutError) as exc:
            outcome.state = f"http error ({type(exc).__name__})"

    async def pings(self, names: Sequence[str], rate: float, duration_s: float) -> float:
        """`rate` pings a second on a fixed schedule for `duration_s`; waits for all; the
        seconds the sending took (longer than `duration_s` if this process fell behind)."""
        tasks: list[asyncio.Task[None]] = []
        began = time.perf_counter()
        for n in range(round(rate * duration_s)):
            await asyncio.sleep(max(0.0, began + n / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(self.ping(random.choice(names))))
        sending_s = time.perf_counter() - began
        if tasks:
            await asyncio.wait(tasks)
        return sending_s

    async def state(self, command_id: str) -> str:
        async with self.http.get(f"/api/v1/admin/commands/{command_id}") as response:
            return str((await response.json())["state"]) if response.status == 200 else "?"

    async def batch(self, batch_id: str) -> list[dict[str, Any]]:
        commands: list[dict[str, Any]] = []
        params = {"batch": batch_id, "limit": "1000"}
        while True:
            async with self.http.get("/api/v1/admin/commands", params=params) as response:
                assert response.status == 200, await response.text()
                page = await response.json()
            commands += page["commands"]
            if page["next_cursor"] is None:
                return commands
            params["cursor"] = page["next_cursor"]

    async def open_in_batch(self, batch_id: str) -> bool:
        for state in OPEN:
            params = {"batch": batch_id, "state": state, "limit": "1"}
            async with self.http.get("/api/v1/admin/commands", params=params) as response:
                assert response.status == 200, await response.text()
                if (await response.json())["commands"]:
                    return True
        return False


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def spread(values: Sequence[float]) -> dict[str, float | None]:
    return {
        "p50_ms": ms(percentile(values, 50)),
        "p90_ms": ms(percentile(values, 90)),
        "p99_ms": ms(percentile(values, 99)),
        "max_ms": ms(max(values, default=None)),
    }


def slowest(
    outcomes: Sequence[Outcome], arrivals: dict[str, float], count: int
) -> list[dict[str, Any]]:
    """The `count` slowest commands (unanswered ones first): when each began (seconds into the
    phase) and where its time went."""
    if not outcomes:
        return []
    start = min(o.began for o in outcomes)
    ranked = sorted(outcomes, key=lambda o: -(o.seconds if o.seconds is not None else 1e9))
    return [
        {
            "at_s": round(o.began - start, 2),
            "state": o.state,
            "round_trip_ms": ms(o.seconds),
            "post_ms": ms(o.post_s),
            "to_device_ms": ms(arrivals[o.command_id] - o.began)
            if o.command_id in arrivals
            else None,
        }
        for o in ranked[:count]
    ]


def counter_deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    def total(values: dict[str, float], name: str) -> float:
        return values.get(f"iotbiz_commands_{name}_total", 0.0)

    return {name: round(total(after, name) - total(before, name)) for name in DISPATCHER_COUNTERS}


# -- the run -------------------------------------------------------------------------------------


async def single_phase(
    operator: Operator,
    names: Sequence[str],
    arrivals: dict[str, float],
    args: argparse.Namespace,
    meters: tuple[Meter, Meter],
) -> dict[str, Any]:
    before = await operator.metrics()
    for meter in meters:
        meter.begin()
    sending_s = await operator.pings(names, args.rate, args.duration)
    platform, bench = (meter.end() for meter in meters)
    after = await operator.metrics()
    outcomes = operator.outcomes
    states = Counter(o.state for o in outcomes)
    done = [o.seconds for o in outcomes if o.state == "done" and o.seconds is not None]
    reached = [
        arrivals[o.command_id] - o.began
        for o in outcomes
        if o.command_id is not None and o.command_id in arrivals
    ]
    late = Counter(
        [
            await operator.state(o.command_id)
            for o in outcomes
            if o.state == "timeout" and o.command_id
        ]
    )
    return {
        "sent": len(outcomes),
        "sending_s": round(sending_s, 1),
        "states": dict(states),
        "timeouts_later": dict(late),
        "round_trip_done": spread(done),
        "post": spread([o.post_s for o in outcomes if o.post_s is not None]),
        "to_device": spread(reached),
        "reached_a_device": len(reached),
        "slowest": slowest(outcomes, arrivals, 10),
        "platform": platform,
        "bench_process": bench,
        "dispatcher": counter_deltas(before, after),
        "event_loop_lag_max_ms": ms(after.get("iotbiz_event_loop_lag_max_seconds")),
    }


async def bulk_phase(
    operator: Operator,
    arrivals: dict[str, float],
    args: argparse.Namespace,
    meters: tuple[Meter, Meter],
) -> dict[str, Any]:
    before = await operator.metrics()
    for meter in meters:
        meter.begin()
    began = time.perf_counter()
    body = {"customer_id": CUSTOMER, "action": "ping"}
    async with operator.http.post("/api/v1/admin/commands", json=body) as response:
        assert response.status == 201, await response.text()
        answer = await response.json()
    post_s = time.perf_counter() - began
    batch_id, count = answer["batch_id"], len(answer["commands"])
    all_final_s = None
    while time.perf_counter() - began < args.bulk_timeout:
        if not await operator.open_in_batch(batch_id):
            all_final_s = time.perf_counter() - began
            break
        await asyncio.sleep(0.1)
    platform, bench = (meter.end() for meter in meters)
    after = await operator.metrics()
    commands = await operator.batch(batch_id)
    reached = [arrivals[c["id"]] - began for c in commands if c["id"] in arrivals]
    return {
        "commands": count,
        "post_ms": ms(post_s),
        "all_final_s": None if all_final_s is None else round(all_final_s, 2),
        "states": dict(Counter(c["state"] for c in commands)),
        "reached_a_device": len(reached),
        "to_device": spread(reached),
        "platform": platform,
        "bench_process": bench,
        "dispatcher": counter_deltas(before, after),
        "event_loop_lag_max_ms": ms(after.get("iotbiz_event_loop_lag_max_seconds")),
    }


async def wait_all_online(operator: Operator, count: int, limit_s: float) -> float | None:
    """Seconds until the store has `count` devices of the customer online, None after limit_s."""
    began = time.monotonic()
    params = {"customer": CUSTOMER, "online": "true", "limit": "1"}
    while time.monotonic() - began < limit_s:
        async with operator.http.get("/api/v1/admin/devices", params=params) as response:
            if (await response.json())["total"] >= count:
                return round(time.monotonic() - began, 2)
        await asyncio.sleep(0.2)
    return None


async def bench(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    platform = Platform(folder)
    add_customer(platform.db, CUSTOMER, args.devices)
    await asyncio.to_thread(platform.start)
    assert platform.proc is not None
    report: dict[str, Any] = {
        "devices": args.devices,
        "cpus": psutil.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    tasks: list[asyncio.Task[None]] = []
    devices: list[AgentLikeDevice] = []
    try:
        url = f"http://127.0.0.1:{platform.http_port}"
        enrolled = await enroll_devices(
            url,
            CUSTOMER,
            device_ids(args.devices),
            concurrency=4,
            limit_s=args.setup_timeout,
        )
        report["enroll"] = {
            "enrolled": len(enrolled.credentials),
            "seconds": round(enrolled.seconds, 1),
            "errors": dict(enrolled.errors),
        }
        arrivals: dict[str, float] = {}
        rate = 1 / args.telemetry_interval if args.telemetry_interval > 0 else 0.0
        fleet = Fleet(platform.mqtt_port, arrivals, rate)
        tasks = fleet.tasks
        devices = fleet.devices  # filled as they connect
        await fleet.connect(enrolled.credentials, args.setup_timeout)
        report["connect"] = {
            "connected": len(devices),
            "seconds": round(fleet.seconds, 1),
            "refused_attempts": dict(fleet.refusals),
            "gave_up": fleet.gave_up,
        }
        meters = (Meter(platform.proc.pid), Meter(psutil.Process().pid))
        tasks.append(asyncio.create_task(sample_every(meters, 1.0)))

        token = (folder / "admin.token").read_text().strip()
        headers = {"Authorization": f"Bearer {token}"}
        timeout = aiohttp.ClientTimeout(total=WAIT_S + 15)
        connector = aiohttp.TCPConnector(limit=2000)
        async with aiohttp.ClientSession(
            url, headers=headers, timeout=timeout, connector=connector
        ) as http:
            operator = Operator(http)
            report["all_online_s"] = await wait_all_online(operator, len(devices), 60)
            names = [d.credentials.name for d in devices]
            report["single"] = await single_phase(operator, names, arrivals, args, meters)
            report["bulk"] = await bulk_phase(operator, arrivals, args, meters)
        report["fleet"] = {
            "still_connected": sum(d.client.is_open for d in devices),
            "telemetry_sent": sum(d.sent for d in devices),
            "replies_sent": sum(d.replies for d in devices),
            "commands_delivered_again": sum(d.repeats for d in devices),
            "bad_commands": sum(d.bad_commands for d in devices),
        }
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await disconnect_all([d.client for d in devices])
        code, stop_s = await asyncio.to_thread(platform.stop, 30)
        report["platform_sigterm"] = {"exit_code": code, "seconds": round(stop_s, 2)}
        report["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return report


def print_report(report: dict[str, Any], args: argparse.Namespace) -> None:
    single, bulk, fleet = report["single"], report["bulk"], report["fleet"]
    connect = report["connect"]
    print(
        f"{report['devices']} devices enrolled ({report['enroll']['enrolled']} in"
        f" {report['enroll']['seconds']} s), {connect['connected']} connected and subscribed"
        f" in {connect['seconds']} s (failed attempts, retried with backoff:"
        f" {connect['refused_attempts'] or 'none'}; gave up: {connect['gave_up']}), all online"
        f" in the store after {report['all_online_s']} s more; telemetry every"
        f" {args.telemetry_interval} s (QoS 1); {report['cpus']} CPUs shared by the platform and"
        " this simulator"
    )
    states = single["states"]
    other = {k: v for k, v in states.items() if k not in ("done", *FINAL, "timeout")}
    rt = single["round_trip_done"]
    print(
        f"\nsingle pings: {args.rate}/s to random devices for {args.duration} s"
        f" (sending took {single['sending_s']} s)"
    )
    print(
        "| sent | done | failed | expired | timeout | http errors | p50 ms | p90 ms | p99 ms |"
        " max ms | platform CPU % | platform RSS MB mean (max) | bench CPU % |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {single['sent']} | {states.get('done', 0)} | {states.get('failed', 0)}"
        f" | {states.get('expired', 0)} | {states.get('timeout', 0)} | {sum(other.values())}"
        f" | {rt['p50_ms']} | {rt['p90_ms']} | {rt['p99_ms']} | {rt['max_ms']}"
        f" | {single['platform']['cpu_percent']} | {single['platform']['rss_mb_mean']}"
        f" ({single['platform']['rss_mb_max']}) | {single['bench_process']['cpu_percent']} |"
    )
    print(
        f"  of which POST p50 {single['post']['p50_ms']} ms p99 {single['post']['p99_ms']} ms;"
        f" POST to device p50 {single['to_device']['p50_ms']} ms p99"
        f" {single['to_device']['p99_ms']} ms; event loop lag max"
        f" {single['event_loop_lag_max_ms']} ms; the machine short of CPU"
        f" {single['platform']['machine_cpu_pressure_percent']} % of the time (PSI)"
    )
    if other:
        print(f"  http errors: {other}")
    if single["timeouts_later"]:
        print(f"  timeouts, their state at the end: {single['timeouts_later']}")
    print(f"  dispatcher: {single['dispatcher']}")
    to_device = bulk["to_device"]
    print(
        f"\nbulk ping to customer {CUSTOMER}: {bulk['commands']} commands, POST {bulk['post_ms']}"
        f" ms, all final after {bulk['all_final_s']} s: {bulk['states']};"
        f" reached {bulk['reached_a_device']} devices, p50 {to_device['p50_ms']} ms"
        f" p99 {to_device['p99_ms']} ms max {to_device['max_ms']} ms after the POST;"
        f" platform CPU {bulk['platform']['cpu_percent']} %, RSS max"
        f" {bulk['platform']['rss_mb_max']} MB; bench CPU {bulk['bench_process']['cpu_percent']} %;"
        f" the machine short of CPU {bulk['platform']['machine_cpu_pressure_percent']} %"
        " of the time"
    )
    print(f"  dispatcher: {bulk['dispatcher']}")
    print(f"\nfleet: {fleet}; platform SIGTERM: {report['platform_sigterm']}")
    print(
        f"load average (1, 5, 15 min) at start {report['load_average_at_start']},"
        f" at end {report['load_average_at_end']}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000, help="simulated devices (1000)")
    parser.add_argument("--rate", type=float, default=10, help="single pings a second (10)")
    parser.add_argument("--duration", type=float, default=60, help="seconds of pings (60)")
    parser.add_argument(
        "--telemetry-interval", type=float, default=10, help="seconds between a device's (10)"
    )
    parser.add_argument("--bulk-timeout", type=float, default=120, help="seconds (120)")
    parser.add_argument("--setup-timeout", type=float, default=300, help="seconds (300)")
    parser.add_argument("--keep", type=Path, help="keep the log and store in this folder")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if args.devices < 1 or args.rate <= 0 or args.duration <= 0 or args.telemetry_interval < 0:
        parser.error("--devices, --rate and --duration must be positive")
    raise_open_files_limit()
    with contextlib.ExitStack() as stack:
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            folder = args.keep
        else:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-cmd-")))
        report = asyncio.run(bench(args, folder))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report, args)
    single, bulk = report["single"], report["bulk"]
    complete = single["states"].get("done", 0) == single["sent"]
    return 0 if complete and bulk["states"].get("done", 0) == bulk["commands"] else 1


if __name__ == "__main__":
    sys.exit(main())
