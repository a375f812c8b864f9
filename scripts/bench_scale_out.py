"""Scale-out benchmark: PostgreSQL, several platform processes and RabbitMQ, in one run.

    python scripts/bench_scale_out.py [--devices 2000] [--concurrency 50] [--rates 500,1000]
        [--phase-s 20] [--out result.json] [--quick]

Everything runs on this machine, private and on loopback, as the tests run it: a PostgreSQL
server (tests/services/postgres.py), a RabbitMQ node (tests/services/rabbitmq.py), platforms
as real child processes `python -m iotbiz.broker --config FILE` (tests/processes.py) and, in
front of several of them, the round-robin TCP balancer of tests/services/balancer.py in a child
process of its own (as nginx would be). The load (HTTP clients, raw asyncio MQTT devices from
scripts/fleet_sim.py, the paced publisher of scripts/bench.py) comes from this process.

1. Enrollment: register + activate of --devices devices with --concurrency clients, each
   setup on a new store: SQLite through one process; PostgreSQL through one process (direct,
   then through the balancer) and through two processes behind the balancer. Devices/s and
   the ratio of two processes to one.
2. Connect storm through RabbitMQ (`broker.mode = external`; RabbitMQ's HTTP auth backend
   asks the platform through the balancer): the devices of the two-process run connect at
   once and subscribe to their `cmd`, to a freshly started platform (cold: its credential
   cache is empty, each login is a bcrypt check in the /user callback), then all disconnect
   and connect again (warm: the cache answers). A refused or failed CONNECT is retried with
   the agent's backoff (1 s doubled up to 60 s, jittered) until --storm-limit-s. Beside the
   times: the platform's refused logins (its /metrics), the kernel's listen-queue overflows
   (machine-wide), and the peak of connections open to and queued at the balancer's and the
   platform's HTTP ports (RabbitMQ's HTTP backend opens a connection per concurrent callback).
3. Telemetry through RabbitMQ: the connected devices publish, round robin, at each total
   rate of --rates for --phase-s (after --warmup-s), QoS 0 then 1. What reached the platform
   is counted twice: by a superuser observer subscribed to `devices/+/+/telemetry` (rate,
   delivery p50/p99 from the send time in the payload, loss), and in the store (how many
   devices' last_telemetry is the last message they sent). CPU (psutil) of the platform,
   RabbitMQ (beam.smp), PostgreSQL and this process, per message and in cores.

CPU columns: platform, rabbitmq, postgres (the postmaster and its backends), balancer, load
(this process) and others: the rest of the machine's busy CPU meanwhile (the cores are shared).

Prints markdown tables; writes nothing outside a temporary folder unless --out (JSON). Every
wait is bounded and every process it starts is stopped on the way out. About 5 minutes on 2
cores at the default sizes; --quick is a smoke run (200 devices, 3 s phases).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
for folder in (ROOT, SCRIPTS):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from bench import Flow, bcrypt_pair_seconds, drive, listen_overflows, machine  # noqa: E402
from fleet_sim import (  # noqa: E402
    Credentials,
    EnrollReport,
    Login,
    MqttClient,
    MqttError,
    device_ids,
    device_topic,
    disconnect_all,
    enroll_devices,
    ms,
    open_mqtt,
    percentile,
    port_open,
    raise_open_files_limit,
)

from iotbiz.agent.link import BACKOFF_CAP_S, BACKOFF_START_S  # noqa: E402
from iotbiz.models import DeviceState  # noqa: E402
from iotbiz.names import DeviceName  # noqa: E402
from iotbiz.store.postgres import PostgresStore  # noqa: E402
from tests.processes import PlatformProcess, platform_process, run_cli  # noqa: E402
from tests.services.postgres import PostgresServer  # noqa: E402
from tests.services.rabbitmq import RabbitNode, free_port, rabbitmq_node  # noqa: E402

CUSTOMER = "bench"
OBSERVER = "bench-observer"
TELEMETRY_FILTER = "devices/+/+/telemetry"
KEEPALIVE_S = 300  # the run is shorter: no PINGREQ needed between phases
READY_S = 60.0  # a platform's /healthz (with its broker connection), the balancer's port
DRAIN_S = 10.0  # after a phase, for the last messages and the store's flush
MACHINE = "machine"  # the whole machine's busy CPU, in a Meter reading
BALANCER = """
import asyncio, sys
from tests.services.balancer import Balancer

async def main():
    balancer = Balancer(int(sys.argv[1]), backlog=int(sys.argv[3]))
    balancer.backends = [int(port) for port in sys.argv[2].split(",")]
    await balancer.start()
    await asyncio.Event().wait()

asyncio.run(main())
"""


# -- processes and their CPU ---------------------------------------------------------------------


@contextlib.contextmanager
def balancer(
    port: int, backends: Sequence[int], log: Path, backlog: int
) -> Iterator[subprocess.Popen[bytes]]:
    """tests/services/balancer.py on `port` in front of `backends`, as a child process."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", BALANCER, str(port), ",".join(map(str, backends)), str(backlog)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    try:
        deadline = time.monotonic() + READY_S
        while not port_open(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"balancer did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def beam_pids() -> list[int]:
    """RabbitMQ's Erlang VM among this process's descendants."""
    return [
        child.pid
        for child in psutil.Process().children(recursive=True)
        if child.name() == "beam.smp"
    ]


def postmaster_pid(server: PostgresServer) -> int:
    return int((server.data / "postmaster.pid").read_text().split()[0])


@dataclass
class Meter:
    """CPU seconds (user + system) of named groups of processes: each root, with its
    descendants where asked (PostgreSQL's backends come and go: a process born between two
    readings counts whole, one that ended meanwhile is missed)."""

    groups: dict[str, tuple[list[int], bool]] = field(default_factory=dict)

    def add(self, name: str, pids: Sequence[int], *, descendants: bool = False) -> None:
        self.groups[name] = (list(pids), descendants)

    def read(self) -> dict[str, dict[int, float]]:
        sample: dict[str, dict[int, float]] = {}
        for name, (roots, descendants) in self.groups.items():
            seconds: dict[int, float] = {}
            for pid in roots:
                with contextlib.suppress(psutil.Error):
                    root = psutil.Process(pid)
                    for proc in [root, *(root.children(recursive=True) if descendants else [])]:
                        with contextlib.suppress(psutil.Error):
                            times = proc.cpu_times()
                            seconds[proc.pid] = times.user + times.system
            sample[name] = seconds
        busy = psutil.cpu_times()
        # guest time is inside user and nice already; steal is not this machine's work
        sample[MACHINE] = {0: busy.user + busy.nice + busy.system + busy.irq + busy.softirq}
        return sample

    @staticmethod
    def spent(
        before: dict[str, dict[int, float]], after: dict[str, dict[int, float]]
    ) -> dict[str, float]:
        """CPU seconds of each group between two readings, and `others`: what the rest of
        the machine (other users of the shared cores) spent meanwhile."""
        spent = {
            name: sum(value - before.get(name, {}).get(pid, 0.0) for pid, value in now.items())
            for name, now in after.items()
        }
        machine = spent.pop(MACHINE)
        spent["others"] = max(0.0, machine - sum(spent.values()))
        return spent


def cores(spent: dict[str, float], seconds: float) -> dict[str, float]:
    return {name: round(value / seconds, 2) for name, value in spent.items()}


# -- configuration -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Run:
    """What every step needs."""

    args: argparse.Namespace
    folder: Path
    token: str = field(default_factory=lambda: secrets.token_urlsafe(16))


def write_config(
    run: Run, folder: Path, *, url: str = "", broker: dict[str, str] | None = None
) -> Path:
    """A platform TOML: the store (PostgreSQL `url`, else a SQLite file in `folder`), the bcrypt
    cost, no per-address or per-customer rate limit (every device comes from 127.0.0.1)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        "[store]",
        f'path = "{folder / "store.db"}"',
        *([f'url = "{url}"'] if url else []),
        "[admin]",
        f'token = "{run.token}"',
        "[http]",
        'host = "127.0.0.1"',
        "[registrar]",
        f"bcrypt_cost = {run.args.cost}",
        "rate_per_ip = 0.0",
        "rate_per_customer = 0.0",
    ]
    if broker:
        lines.append("[broker]")
        lines += [f'{key} = "{value}"' for key, value in broker.items()]
    config = folder / "platform.toml"
    config.write_text("\n".join(lines) + "\n")
    return config


def cli(config: Path, *args: str) -> str:
    done = run_cli(*args, "--config", str(config))
    if done.returncode != 0:
        raise RuntimeError(f"iotbiz {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def wait_healthy(platform: PlatformProcess) -> None:
    """Until /healthz says 200 (store and broker connection up); bounded."""
    deadline = time.monotonic() + READY_S
    while time.monotonic() < deadline:
        with (
            contextlib.suppress(urllib.error.URLError, OSError),
            urllib.request.urlopen(f"{platform.url}/healthz", timeout=2) as response,  # noqa: S310
        ):
            if response.status == 200:
                return
        if platform.proc.poll() is not None:
            break
        time.sleep(0.2)
    raise RuntimeError(f"platform not healthy within {READY_S} s:\n{platform.log()[-3000:]}")


def wait_logged(platform: PlatformProcess, text: str) -> None:
    deadline = time.monotonic() + READY_S
    while text not in platform.log():
        if time.monotonic() > deadline or platform.proc.poll() is not None:
            raise RuntimeError(f"platform never logged {text!r}:\n{platform.log()[-3000:]}")
        time.sleep(0.1)


def stop_platform(platform: PlatformProcess) -> None:
    with contextlib.suppress(subprocess.TimeoutExpired):
        platform.stop(signal.SIGTERM, timeout_s=20)


# -- 1: enrollment -------------------------------------------------------------------------------


def enrollment_row(
    label: str, processes: int, report: EnrollReport, spent: dict[str, float]
) -> dict[str, Any]:
    return {
        "setup": label,
        "processes": processes,
        "enrolled": len(report.credentials),
        "seconds": round(report.seconds, 2),
        "devices_per_s": round(report.rate, 1),
        "pair_p50_ms": ms(percentile(report.pair_seconds, 50)),
        "pair_p99_ms": ms(percentile(report.pair_seconds, 99)),
        "errors": dict(report.errors),
        "cpu_cores": cores(spent, report.seconds),
    }


def enroll(
    run: Run,
    label: str,
    name: str,
    *,
    url: str = "",
    processes: int = 1,
    via_balancer: bool = False,
    postgres: PostgresServer | None = None,
) -> tuple[dict[str, Any], list[Credentials]]:
    """One enrollment setup on a new store: `processes` platforms, directly or behind the
    balancer (each request to the balancer), --devices devices with --concurrency clients."""
    folder = run.folder / name
    configs = [write_config(run, folder / f"p{n}", url=url) for n in range(processes)]
    cli(configs[0], "customer", "add", CUSTOMER, "--limit", str(10 * run.args.devices))
    meter = Meter()
    with ExitStack() as stack:
        platforms = []
        for config in configs:
            platform = stack.enter_context(platform_process(config.parent, "--config", str(config)))
            stack.callback(stop_platform, platform)
            wait_healthy(platform)
            platforms.append(platform)
        meter.add("platform", [p.proc.pid for p in platforms])
        if postgres is not None:
            meter.add("postgres", [postmaster_pid(postgres)], descendants=True)
        target = platforms[0].url
        if via_balancer:
            port = free_port()
            proc = stack.enter_context(
                balancer(
                    port,
                    [p.http_port for p in platforms],
                    folder / "balancer.log",
                    run.args.backlog,
                )
            )
            meter.add("balancer", [proc.pid])
            target = f"http://127.0.0.1:{port}"
        meter.add("load", [os.getpid()])
        before = meter.read()
        report = asyncio.run(
            enroll_devices(
                target,
                CUSTOMER,
                device_ids(run.args.devices, prefix=name),
                concurrency=run.args.concurrency,
                limit_s=run.args.step_limit_s,
            )
        )
        spent = Meter.spent(before, meter.read())
    row = enrollment_row(label, processes, report, spent)
    print(f"  {json.dumps(row)}", file=sys.stderr)
    return row, report.credentials


async def new_database(server: PostgresServer) -> str:
    return await server.create_database()


# -- 2: connect storms ---------------------------------------------------------------------------


@dataclass
class Storm:
    clients: list[MqttClient] = field(default_factory=list)
    first_failures: Counter[str] = field(default_factory=Counter)
    final_failures: Counter[str] = field(default_factory=Counter)
    retries: int = 0
    connack_times: list[float] = field(default_factory=list)  # since the start, each device
    connack_s: float = 0.0
    suback_s: float = 0.0


def failure_kind(exc: MqttError) -> str:
    text = str(exc)
    for kind in ("code 3", "code 4", "code 5", "no CONNACK", "no SUBACK", "cannot connect"):
        if kind in text:
            return {"code 3": "CONNACK 3", "code 4": "CONNACK 4", "code 5": "CONNACK 5"}.get(
                kind, kind
            )
    return "closed" if "closed" in text else text


async def connect_storm(port: int, logins: Sequence[Login], limit_s: float) -> Storm:
    """Every login at once, each subscribing to its `cmd` once connected; a failed attempt is
    retried as the agent retries (iotbiz.agent.link: from 1 s, doubled, capped at 60 s, a
    random half to all of it) until `limit_s`. Times to the last CONNACK and SUBACK."""
    storm = Storm()
    start = time.perf_counter()
    stop_at = time.monotonic() + limit_s

    async def one(login: Login) -> None:
        first, backoff = True, BACKOFF_START_S
        while True:
            try:
                client = await open_mqtt(port, login, keepalive_s=KEEPALIVE_S, wait_s=30.0)
                storm.connack_times.append(time.perf_counter() - start)
                storm.connack_s = max(storm.connack_s, storm.connack_times[-1])
                code = await client.subscribe(device_topic(login.client_id, "cmd"), 1, 30.0)
                if code == 0x80:
                    client.abort()
                    raise MqttError(f"{login.client_id}: SUBACK refused")
            except MqttError as exc:
                kind = failure_kind(exc)
                if first:
                    storm.first_failures[kind] += 1
                first = False
                if time.monotonic() > stop_at:
                    storm.final_failures[kind] += 1
                    return
                storm.retries += 1
                await asyncio.sleep(random.uniform(backoff / 2, backoff))
                backoff = min(backoff * 2, BACKOFF_CAP_S)
                continue
            storm.suback_s = max(storm.suback_s, time.perf_counter() - start)
            storm.clients.append(client)
            return

    await asyncio.gather(*(one(login) for login in logins))
    return storm


def management_connections(rabbit: RabbitNode) -> int:
    request = urllib.request.Request(f"{rabbit.management_url}/api/overview")  # noqa: S310
    secret = f"{rabbit.management_user}:{rabbit.management_password}"
    request.add_header("Authorization", "Basic " + base64.b64encode(secret.encode()).decode())
    with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - loopback
        return int(json.load(response)["object_totals"]["connections"])


async def wait_connections(rabbit: RabbitNode, at_most: int, limit_s: float = 60.0) -> str:
    """Until RabbitMQ lists at most `at_most` connections (the management API's totals lag
    a few seconds); how long that took, or how many were still listed at the bound."""
    started = time.monotonic()
    seen = -1
    while time.monotonic() - started < limit_s:
        with contextlib.suppress(OSError, ValueError, KeyError):
            seen = await asyncio.to_thread(management_connections, rabbit)
            if seen <= at_most:
                return f"{time.monotonic() - started:.1f} s until RabbitMQ listed them gone"
        await asyncio.sleep(0.5)
    return f"RabbitMQ still listed {seen - at_most} of them after {limit_s:g} s"


def socket_counts(ports: dict[str, int]) -> dict[str, int]:
    """From /proc/net/tcp (cheap): for each named port on 127.0.0.1, the connections
    established to it (`NAME open`) and those waiting in its listen queue (`NAME queued`)."""
    local = {f"0100007F:{port:04X}": name for name, port in ports.items()}
    counts = {f"{name} {kind}": 0 for name in ports for kind in ("open", "queued")}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        name = local.get(fields[1])
        if name is None:
            continue
        if fields[3] == "01":  # ESTABLISHED
            counts[f"{name} open"] += 1
        elif fields[3] == "0A":  # LISTEN: rx_queue is the accept queue's length
            counts[f"{name} queued"] = int(fields[4].split(":")[1], 16)
    return counts


async def peak_sockets(ports: dict[str, int], stop: asyncio.Event) -> dict[str, int]:
    """The peak of each of `socket_counts`, sampled every 0.1 s until `stop`."""
    peak: dict[str, int] = {}
    while not stop.is_set():
        for key, value in (await asyncio.to_thread(socket_counts, ports)).items():
            peak[key] = max(peak.get(key, 0), value)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.1)
    return peak


def login_counters(url: str, token: str) -> dict[str, float]:
    """The platform's refused and busy-refused MQTT logins, from its /metrics (three tries;
    nothing when all fail: the figure is then missing, not zero)."""
    request = urllib.request.Request(f"{url}/metrics")  # noqa: S310
    request.add_header("Authorization", f"Bearer {token}")
    for attempt in range(3):
        try:
            with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
                text = response.read().decode()
            break
        except OSError as exc:  # urllib.error.URLError is one
            print(f"  /metrics failed ({exc!r}), attempt {attempt + 1} of 3", file=sys.stderr)
            time.sleep(1.0)
    else:
        return {}
    counters = {"refused_logins": 0.0, "busy_refusals": 0.0}
    for line in text.splitlines():
        for key in counters:
            if line.startswith(f"iotbiz_mqtt_{key}"):
                counters[key] = float(line.split()[-1])
    return counters


def storm_row(
    label: str,
    devices: int,
    storm: Storm,
    spent: dict[str, float],
    refusals: dict[str, float],
    sockets: dict[str, int],
) -> dict[str, Any]:
    connected = len(storm.clients)
    return {
        "storm": label,
        "devices": devices,
        "connected": connected,
        "connack_p50_s": round(percentile(storm.connack_times, 50) or 0.0, 2),
        "connack_p90_s": round(percentile(storm.connack_times, 90) or 0.0, 2),
        "connack_s": round(storm.connack_s, 2),
        "suback_s": round(storm.suback_s, 2),
        "connects_per_s": round(connected / storm.connack_s, 1) if storm.connack_s else None,
        "first_try_failures": dict(storm.first_failures),
        "retries": storm.retries,
        "not_connected": dict(storm.final_failures),
        "refused": {key: int(value) for key, value in refusals.items()},
        "sockets_peak": sockets,
        "cpu_s": {name: round(value, 1) for name, value in spent.items()},
    }


# -- 3: telemetry --------------------------------------------------------------------------------


class Publisher:
    """A connected device as `bench.drive` publishes through it: a message for a device whose
    connection has closed meanwhile is not sent but counted (`unsent`), instead of ending the
    phase; drive counts it as sent, so it is among the lost too."""

    def __init__(self, client: MqttClient) -> None:
        self.client = client
        self.client_id = client.client_id
        self.unsent = 0

    def publish(self, topic: bytes, payload: bytes, qos: int = 0) -> int:
        if self.client.is_open:
            return self.client.publish(topic, payload, qos)
        self.unsent += 1
        return 0


def last_seqs(names: Sequence[str], sent: int) -> dict[str, int]:
    """The seq of each device's last message in a phase: `drive` sends message `s` from
    publisher `s % len(names)`."""
    count = len(names)
    return {
        name: index + (sent - 1 - index) // count * count
        for index, name in enumerate(names)
        if index < sent
    }


async def store_last_messages(url: str, expected: dict[str, int], since_ns: int) -> int:
    """How many devices' last_telemetry in the store is the last message they sent (this
    phase's: its send time is after `since_ns`)."""
    store = await PostgresStore.open(url)
    try:
        matched, after = 0, None
        while True:
            page, _ = await store.find_devices(
                customer_id=CUSTOMER, state=DeviceState.ACTIVE, limit=500, after=after
            )
            for device in page:
                telemetry = device.telemetry or {}
                if (
                    expected.get(device.name) == telemetry.get("seq")
                    and int(telemetry.get("ts", 0)) >= since_ns
                ):
                    matched += 1
            if len(page) < 500:
                return matched
            after = DeviceName(page[-1].customer_id, page[-1].device_id)
    finally:
        await store.close()


async def telemetry_phase(
    run: Run,
    port: int,
    observer: Login,
    publishers: Sequence[MqttClient],
    qos: int,
    rate: float,
    meter: Meter,
    store_url: str,
) -> dict[str, Any]:
    args = run.args
    flow = Flow(window=10**9)  # paced: the window never binds
    subscriber = await open_mqtt(port, observer, on_publish=flow.on_message, wait_s=30.0)
    try:
        if await subscriber.subscribe(TELEMETRY_FILTER, qos) == 0x80:
            raise RuntimeError(f"the observer may not subscribe to {TELEMETRY_FILTER}")
        flow.since_ns = time.perf_counter_ns()
        wrapped = [Publisher(client) for client in publishers]
        driver = asyncio.create_task(
            drive(flow, wrapped, qos, rate, args.warmup_s + args.phase_s)  # type: ignore[arg-type]
        )
        await asyncio.sleep(args.warmup_s)
        flow.measure_from_ns = time.perf_counter_ns()
        flow.measure_to_ns = flow.measure_from_ns + int(args.phase_s * 1e9)
        before, began = meter.read(), time.perf_counter()
        await asyncio.sleep(args.phase_s)
        spent, elapsed = Meter.spent(before, meter.read()), time.perf_counter() - began
        sent = await driver
        drained = time.monotonic() + DRAIN_S
        while flow.inflight and time.monotonic() < drained:  # noqa: ASYNC110 - polls a count
            await asyncio.sleep(0.1)
        lost = flow.lost + flow.inflight
    finally:
        await disconnect_all([subscriber])
    names = [client.client_id for client in publishers]
    expected = last_seqs(names, sent)
    in_store = 0
    deadline = time.monotonic() + DRAIN_S  # the leader flushes presence every 0.2 s
    while time.monotonic() < deadline:
        in_store = await store_last_messages(store_url, expected, flow.since_ns)
        if in_store == len(expected):
            break
        await asyncio.sleep(0.5)
    delivered = flow.received

    def per_message(name: str) -> float | None:
        return round(spent[name] / delivered * 1e6, 1) if delivered else None

    row = {
        "qos": qos,
        "offered_per_s": rate,
        "publishers": len(publishers),
        "connected_at_end": sum(client.is_open for client in publishers),
        "sent": sent,
        "observer_per_s": round(delivered / elapsed, 1),
        "p50_ms": ms(percentile(flow.latencies, 50)),
        "p99_ms": ms(percentile(flow.latencies, 99)),
        "lost": lost,
        "unsent": sum(p.unsent for p in wrapped),
        "store_last_message": f"{in_store}/{len(expected)}",
        "platform_us_per_msg": per_message("platform"),
        "rabbitmq_us_per_msg": per_message("rabbitmq"),
        "postgres_us_per_msg": per_message("postgres"),
        "cpu_cores": cores(spent, elapsed),
    }
    print(f"  {json.dumps(row)}", file=sys.stderr)
    return row


async def mqtt_steps(
    run: Run,
    rabbit: RabbitNode,
    fleet: Sequence[Credentials],
    observer: Login,
    meter: Meter,
    store_url: str,
    platform_url: str,
    platform_port: int,
    result: dict[str, Any],
) -> None:
    """The storms and the telemetry phases; their rows go into `result` as they finish."""
    args = run.args
    logins = [c.login() for c in fleet]
    # the platform's service client (the management API's totals lag: it may not show yet)
    baseline = max(1, await asyncio.to_thread(management_connections, rabbit))
    result.update(storms=[], telemetry=[])
    clients: list[MqttClient] = []
    try:
        for label in ("cold", "warm"):
            counted = await asyncio.to_thread(login_counters, platform_url, run.token)
            refusals: dict[str, float] = {}
            stop = asyncio.Event()
            ports = {"balancer": rabbit.auth_port, "platform": platform_port}
            sampler = asyncio.create_task(peak_sockets(ports, stop))
            before, overflows = meter.read(), listen_overflows()
            storm = await connect_storm(rabbit.mqtt_port, logins, args.storm_limit_s)
            spent = Meter.spent(before, meter.read())
            refusals["listen_overflows"] = listen_overflows() - overflows
            stop.set()
            now = await asyncio.to_thread(login_counters, platform_url, run.token)
            refusals |= {key: now[key] - counted[key] for key in now.keys() & counted.keys()}
            clients = storm.clients
            result["storms"].append(
                storm_row(label, len(logins), storm, spent, refusals, await sampler)
            )
            print(f"  {json.dumps(result['storms'][-1])}", file=sys.stderr)
            if label == "cold":
                await disconnect_all(clients)
                clients = []
                result["drained"] = await wait_connections(rabbit, baseline)
        if len(clients) < len(logins):
            print(f"  only {len(clients)} devices publish", file=sys.stderr)
        order = {c.name: n for n, c in enumerate(fleet)}
        clients.sort(key=lambda client: order[client.client_id])
        for qos in (0, 1):
            for rate in args.rates:
                publishers = [client for client in clients if client.is_open]
                result["telemetry"].append(
                    await telemetry_phase(
                        run, rabbit.mqtt_port, observer, publishers, qos, rate, meter, store_url
                    )
                )
    finally:
        await disconnect_all(clients)


def rabbit_steps(
    run: Run,
    postgres: PostgresServer,
    store_url: str,
    fleet: Sequence[Credentials],
    result: dict[str, Any],
) -> None:
    """RabbitMQ, a freshly started platform in external mode behind the balancer on the
    node's auth port, a superuser observer; the storms and the telemetry phases."""
    folder = run.folder / "rabbit"
    with ExitStack() as stack:
        started = time.monotonic()
        rabbit = stack.enter_context(rabbitmq_node(folder / "node"))
        boot_s = time.monotonic() - started
        broker = {
            "mode": "external",
            "url": f"mqtt://127.0.0.1:{rabbit.mqtt_port}",
            "service_password": secrets.token_urlsafe(16),
            "management_url": rabbit.management_url,
            "management_user": rabbit.management_user,
            "management_password": rabbit.management_password,
        }
        config = write_config(run, folder / "platform", url=store_url, broker=broker)
        answer = json.loads(cli(config, "account", "add", OBSERVER, "--superuser", "--json"))
        observer = Login(OBSERVER, OBSERVER, str(answer["password"]))
        platform = stack.enter_context(platform_process(config.parent, "--config", str(config)))
        stack.callback(stop_platform, platform)
        proc = stack.enter_context(
            balancer(
                rabbit.auth_port, [platform.http_port], folder / "balancer.log", run.args.backlog
            )
        )
        wait_healthy(platform)  # its service client's login went through RabbitMQ
        wait_logged(platform, "FOLLOWER -> LEADER")  # the leader records presence
        meter = Meter()
        meter.add("platform", [platform.proc.pid])
        meter.add("rabbitmq", beam_pids())
        meter.add("postgres", [postmaster_pid(postgres)], descendants=True)
        meter.add("balancer", [proc.pid])
        meter.add("load", [os.getpid()])
        result["rabbitmq_boot_s"] = round(boot_s, 1)
        asyncio.run(
            mqtt_steps(
                run,
                rabbit,
                fleet,
                observer,
                meter,
                store_url,
                platform.url,
                platform.http_port,
                result,
            )
        )


# -- the run -------------------------------------------------------------------------------------


def commit() -> str:
    done = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    return done.stdout.strip() or "unknown"


def measure(args: argparse.Namespace, folder: Path, result: dict[str, Any]) -> None:
    """Every step, in order; the figures go into `result` as each step ends."""
    run = Run(args, folder)
    result |= {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit(),
        "machine": machine(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "bcrypt_cost": args.cost,
        "bcrypt_pair_ms": round(bcrypt_pair_seconds(args.cost) * 1000, 2),
        "devices": args.devices,
        "concurrency": args.concurrency,
        "enrollment": [],
    }
    postgres = PostgresServer.start()
    try:
        print("enrollment", file=sys.stderr)
        row, _ = enroll(run, "SQLite, 1 process", "sqlite")
        result["enrollment"].append(row)
        pg = {"postgres": postgres}
        for label, name, processes, via in (
            ("PostgreSQL, 1 process", "pg1", 1, False),
            ("PostgreSQL, 1 process, balancer", "pg1b", 1, True),
            ("PostgreSQL, 2 processes, balancer", "pg2b", 2, True),
        ):
            url = asyncio.run(new_database(postgres))
            row, fleet = enroll(
                run, label, name, url=url, processes=processes, via_balancer=via, **pg
            )
            result["enrollment"].append(row)
        rates = {row["setup"]: row["devices_per_s"] for row in result["enrollment"]}
        one = rates["PostgreSQL, 1 process"]
        two = rates["PostgreSQL, 2 processes, balancer"]
        result["ratio_2_to_1"] = round(two / one, 2) if one else None
        via = rates["PostgreSQL, 1 process, balancer"]
        result["ratio_2_to_1_both_balanced"] = round(two / via, 2) if via else None
        if len(fleet) < args.devices:
            raise RuntimeError(f"only {len(fleet)} of {args.devices} devices enrolled")
        print("RabbitMQ", file=sys.stderr)
        rabbit_steps(run, postgres, url, fleet, result)
    finally:
        postgres.stop()


def _cell(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items()) or "none"
    if value is None:
        return "-"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _table(columns: Sequence[tuple[str, str]], rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table: one (header, key) per column, one row per dict."""
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row[k]) for _, k in columns) + " |" for row in rows]
    return "\n".join(lines)


ENROLLMENT_COLUMNS = [
    ("setup", "setup"),
    ("devices/s", "devices_per_s"),
    ("s", "seconds"),
    ("pair p50 ms", "pair_p50_ms"),
    ("pair p99 ms", "pair_p99_ms"),
    ("errors", "errors"),
    ("CPU, cores", "cpu_cores"),
]
STORM_COLUMNS = [
    ("storm", "storm"),
    ("devices", "devices"),
    ("connected", "connected"),
    ("CONNACK p50 s", "connack_p50_s"),
    ("p90 s", "connack_p90_s"),
    ("all CONNACKs s", "connack_s"),
    ("all SUBACKs s", "suback_s"),
    ("connects/s", "connects_per_s"),
    ("first-try failures", "first_try_failures"),
    ("retries", "retries"),
    ("not connected", "not_connected"),
    ("platform refusals, kernel listen overflows", "refused"),
    ("sockets, peak", "sockets_peak"),
    ("CPU s", "cpu_s"),
]
TELEMETRY_COLUMNS = [
    ("QoS", "qos"),
    ("devices", "publishers"),
    ("still connected", "connected_at_end"),
    ("offered/s", "offered_per_s"),
    ("sent", "sent"),
    ("delivered/s", "observer_per_s"),
    ("p50 ms", "p50_ms"),
    ("p99 ms", "p99_ms"),
    ("lost", "lost"),
    ("of them unsent (device disconnected)", "unsent"),
    ("in store", "store_last_message"),
    ("platform us/msg", "platform_us_per_msg"),
    ("RabbitMQ us/msg", "rabbitmq_us_per_msg"),
    ("PostgreSQL us/msg", "postgres_us_per_msg"),
    ("CPU, cores", "cpu_cores"),
]


def markdown(result: dict[str, Any]) -> str:
    info = result["machine"]
    return "\n".join(
        [
            f"Run {result['date']}, commit {result['commit']}; {info['cores']} cores"
            f" ({info['cpu']}), Python {info['python']}; load average at start"
            f" {result['load_average_at_start']}; bcrypt cost {result['bcrypt_cost']}:"
            f" {result['bcrypt_pair_ms']} ms per hash + check.",
            "",
            f"Enrollment: {result['devices']:,} devices per setup (register + activate),"
            f" {result['concurrency']} concurrent clients, a new store each; CPU in cores.",
            "",
            _table(ENROLLMENT_COLUMNS, result["enrollment"]),
            "",
            f"Ratio 2 processes / 1 process: {result['ratio_2_to_1']} (1 process direct),"
            f" {result['ratio_2_to_1_both_balanced']} (both through the balancer).",
            "",
            f"Connect storm through RabbitMQ (booted in {result['rabbitmq_boot_s']} s): every"
            " device CONNECTs and SUBSCRIBEs to its cmd at once; CPU seconds over the storm;"
            f" the cold storm's connections closed: {result['drained']}.",
            "",
            _table(STORM_COLUMNS, result["storms"]),
            "",
            "Telemetry through RabbitMQ, paced, round robin over the connected devices;"
            " delivered = seen by a superuser observer on devices/+/+/telemetry; in store ="
            " devices whose last_telemetry is the last message they sent; CPU per delivered"
            " message.",
            "",
            _table(TELEMETRY_COLUMNS, result["telemetry"]),
        ]
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2000, help="devices per enrollment")
    parser.add_argument("--concurrency", type=int, default=50, help="enrolling clients")
    parser.add_argument("--cost", type=int, default=6, help="bcrypt cost of the platforms")
    parser.add_argument(
        "--rates", default="500,1000", help="total telemetry msgs/s, comma-separated"
    )
    parser.add_argument("--phase-s", type=float, default=20.0, help="seconds measured per rate")
    parser.add_argument("--warmup-s", type=float, default=2.0, help="before each phase")
    parser.add_argument("--storm-limit-s", type=float, default=180.0, help="per storm")
    parser.add_argument("--step-limit-s", type=float, default=300.0, help="per enrollment")
    parser.add_argument(
        "--backlog", type=int, default=511, help="the balancer's listen queue (nginx's default)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 200 devices, 3 s")
    parser.add_argument("--out", type=Path, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.devices, args.phase_s, args.warmup_s = 200, 3.0, 1.0
    args.rates = [float(rate) for rate in args.rates.split(",")]
    if args.devices < 1 or args.concurrency < 1 or min(args.rates) <= 0:
        parser.error("--devices, --concurrency and --rates must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    raise_open_files_limit()  # before RabbitMQ starts: it inherits the limit
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-scale-out-") as folder:
        try:
            measure(args, Path(folder), result)
        except BaseException:
            print(f"failed; measured so far:\n{json.dumps(result, indent=2)}", file=sys.stderr)
            for log in sorted(Path(folder).glob("rabbit/**/*.log")):
                tail = log.read_text(errors="replace")[-3000:]
                print(f"--- {log.relative_to(folder)}\n{tail}", file=sys.stderr)
            raise
    print(markdown(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
