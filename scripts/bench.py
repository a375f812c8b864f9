"""IoTBiz benchmark: the platform against plain amqtt 0.12.1 and mosquitto 2, in one run.

    python scripts/bench.py [--quick] [--out bench.json] [--py-spy profile.txt]
    python scripts/bench.py --fleet-scale 1000,2000,5000,10000 [--scale-rate 1000] ...

Every broker is its own process on a free loopback port; the load (simulated devices from
scripts/fleet_sim.py: raw asyncio sockets, hand-built packets) comes from this process.
Measured, at default sizes (about 5 minutes on 2 cores; --quick is a CI-size run of about 1.5):

  a. enrollment: register + activate pairs/s with 2 clients per core for --enroll-seconds,
     against the bcrypt bound (cores / time of one hash + one check at the platform's cost), and
     /healthz latency meanwhile. The devices enrolled here are the fleet of the next steps.
  b. connect storm: N devices connect at once (time until every CONNACK; each then subscribes
     to its `cmd` topic, timed to the last SUBACK): cold (broker just started: IoTBiz pays
     bcrypt once per device) and warm (again, after all disconnected). mosquitto gets the same
     accounts in a password file (`mosquitto_passwd -U`) and an ACL file with IoTBiz's rules.
  c. telemetry: devices publish to `devices/{c}/{d}/telemetry`, one subscriber follows
     `devices/+/+/telemetry`; messages/s and delivery latency (the send time is in the payload)
     at QoS 0 and 1, saturated (at most --window messages between publishers and subscriber)
     and paced (--rate msgs/s), with --publishers devices, and again with the whole fleet
     connected (amqtt matches every message against every subscription).
     IoTBiz's own service client also receives every telemetry message (QoS 1, to record
     presence): that is part of the platform's cost and is not switched off.
  d. memory: broker RSS per connected device at each fleet size (RSS with N connected and
     subscribed minus RSS idle, / N), and how connect time grows with N.
  e. the agent: RSS and CPU of `python -m iotbiz.agent` with three apps and telemetry every
     10 s (scripts/bench_agent.py), sampled for 60 s (20 s with --quick).

--fleet-scale runs only the fleet-scale step instead (scripts/bench_fleet.py): IoTBiz and
mosquitto (the same accounts, a per-device ACL of `pattern` lines) one after the other at each
fleet size, the same total telemetry rate (and, for IoTBiz, the command rate) at every size;
broker CPU per message, delivery and command latency, losses, cold and warm connect and memory
per device; --plot draws cost per message and delivery p99 against fleet size to a PNG.

Plain amqtt runs with the only plugin it needs to accept connections (anonymous auth).
If the `mosquitto` binary is missing, its columns are skipped with a message.
Output: a markdown table (with ratios and the goals) on stdout, JSON in --out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import itertools
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_fleet
from bench_agent import measure as measure_agent
from fleet_sim import (
    Credentials,
    Login,
    MqttClient,
    add_account,
    add_customer,
    connect_storm,
    device_ids,
    device_topic,
    disconnect_all,
    encode_topic,
    enroll_devices,
    free_port,
    ms,
    open_mqtt,
    payload_sent_ns,
    percentile,
    port_open,
    probe_health,
    raise_open_files_limit,
    spawn,
    start_platform,
    telemetry_payload,
)

CUSTOMER = "bench"
SUBSCRIBER = "bench-sub"
TELEMETRY_FILTER = "devices/+/+/telemetry"
SETTLE_S = 1.5  # after a storm, before reading RSS
SESSION_CLEANUP_S = 2.0  # amqtt's session monitor drops disconnected clean sessions every 1 s

PLAIN_AMQTT = """
import asyncio
from amqtt.broker import Broker

async def main():
    broker = Broker({
        "listeners": {"default": {"type": "tcp", "bind": "127.0.0.1:%d"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    })
    await broker.start()
    await asyncio.Event().wait()

asyncio.run(main())
"""

MOSQUITTO_CONF = """\
per_listener_settings false
listener {port} 127.0.0.1
allow_anonymous false
password_file {folder}/mosquitto.passwd
acl_file {folder}/mosquitto.acl
persistence false
user root
# 2.0.11 drops QoS 1 messages for a fast subscriber with the default of 1000 even when far fewer
# are queued ("Outgoing messages are being dropped"); the benchmark never queues more than
# --window messages, so a high limit changes nothing else.
max_queued_messages 100000
log_dest stderr
log_type error
log_type warning
log_type notice
connection_messages false
"""


@dataclass(frozen=True, slots=True)
class Sizes:
    fleet: tuple[int, ...]  # connect storm / memory sizes; the largest is the fleet
    enroll_s: float
    publishers: int
    window: int
    rate: float  # paced telemetry, msgs/s; 0: no paced phase
    phase_s: float
    warmup_s: float
    fleet_traffic: bool  # repeat the telemetry phases with the whole fleet connected

    @property
    def devices(self) -> int:
        return max(self.fleet)


FULL = Sizes((500, 1000, 2000), 10.0, 100, 500, 500.0, 4.0, 1.0, True)
QUICK = Sizes((100, 300), 3.0, 50, 300, 0.0, 1.5, 0.5, False)


@dataclass(frozen=True, slots=True)
class Running:
    pid: int
    port: int  # MQTT
    http_port: int | None = None  # IoTBiz's registrar


@dataclass
class BrokerSpec:
    """How to start one broker under test and how the fleet logs in to it."""

    name: str
    start: Callable[[], contextlib.AbstractContextManager[Running]]
    device_login: Callable[[Credentials], Login]
    subscriber: Login
    profile_to: Path | None = None


# -- machine and bcrypt ----------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
    }


def bcrypt_pair_seconds(cost: int, rounds: int = 40) -> float:
    """Seconds of one bcrypt hash + one check at `cost`, on one core."""
    password = b"x" * 32
    start = time.perf_counter()
    for _ in range(rounds):
        hashed = bcrypt.hashpw(password, bcrypt.gensalt(cost))
        bcrypt.checkpw(password, hashed)
    return (time.perf_counter() - start) / rounds


def listen_overflows() -> int:
    """The kernel's count of connections dropped because a listen queue was full."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        lines = Path("/proc/net/netstat").read_text().splitlines()
        header, values = (line.split() for line in lines if line.startswith("TcpExt:"))
        return int(dict(zip(header, values, strict=True))["ListenOverflows"])
    return 0


# -- the brokers -----------------------------------------------------------------------------------


def _one_address_fleet(devices: int = 10**5) -> dict[str, str]:
    """The simulated fleet connects from one address: the per-address MQTT caps (since 620db5d)
    raised above it, as the registrar's rate limit is switched off, if the platform under test
    (the current directory's iotbiz) has them; an older one refuses unknown settings."""
    probe = (
        "import dataclasses, iotbiz.settings as s; "
        "print(*(f.name for c in (s.MQTTSettings, s.RegistrarSettings) "
        "for f in dataclasses.fields(c)))"
    )
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        fields = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
        ).stdout.split()
        caps = ("max_connections_per_address", "max_pending_per_address")
        env = {f"IOTBIZ_MQTT_{c.upper()}": str(devices) for c in caps if c in fields}
        if "rate_per_customer" in fields:  # the whole fleet is one customer enrolling at once
            env["IOTBIZ_REGISTRAR_RATE_PER_CUSTOMER"] = "0"
        return env
    return {}


ONE_ADDRESS_FLEET = _one_address_fleet()


def iotbiz_spec(folder: Path, db: Path, cost: int, log_level: str, password: str) -> BrokerSpec:
    runs = itertools.count(1)

    @contextlib.contextmanager
    def start() -> Iterator[Running]:
        log = folder / f"iotbiz-{next(runs)}.log"
        env = {"IOTBIZ_REGISTRAR_BCRYPT_COST": str(cost), **ONE_ADDRESS_FLEET}
        with start_platform(db, log, log_level=log_level, env=env) as platform_process:
            yield Running(
                platform_process.proc.pid, platform_process.mqtt_port, platform_process.http_port
            )

    return BrokerSpec("iotbiz", start, Credentials.login, Login(SUBSCRIBER, SUBSCRIBER, password))


def amqtt_spec(folder: Path) -> BrokerSpec:
    @contextlib.contextmanager
    def start() -> Iterator[Running]:
        port = free_port()
        args = [sys.executable, "-c", PLAIN_AMQTT % port]
        with spawn(args, folder / "amqtt.log", lambda: port_open(port)) as proc:
            yield Running(proc.pid, port)

    return BrokerSpec("amqtt", start, lambda c: Login(c.name), Login(SUBSCRIBER))


def mosquitto_spec(
    folder: Path, fleet: Sequence[Credentials], password: str, *, patterns: bool = False
) -> BrokerSpec:
    """mosquitto with a password file and an ACL file granting each device IoTBiz's rules.

    The rules are a `user` block per device, or with `patterns` the same rules once as `pattern`
    lines on the username (`%u` is `customer/device`), as a large fleet would be configured."""
    passwd = folder / "mosquitto.passwd"
    lines = [f"{c.name}:{c.password}" for c in fleet] + [f"{SUBSCRIBER}:{password}"]
    passwd.write_text("\n".join(lines) + "\n")
    passwd.chmod(0o600)
    subprocess.run(["mosquitto_passwd", "-U", str(passwd)], check=True, timeout=600)
    acl = [f"user {SUBSCRIBER}", "topic readwrite devices/#", ""]
    writes, reads = ("status", "telemetry", "events", "reply"), ("cmd",)
    if patterns:
        acl += [f"pattern write {device_topic('%u', s)}" for s in writes]
        acl += [f"pattern read {device_topic('%u', s)}" for s in reads] + [""]
    for c in () if patterns else fleet:
        acl.append(f"user {c.name}")
        acl += [f"topic write {device_topic(c.name, s)}" for s in writes]
        acl += [f"topic read {device_topic(c.name, s)}" for s in reads] + [""]
    (folder / "mosquitto.acl").write_text("\n".join(acl))

    @contextlib.contextmanager
    def start() -> Iterator[Running]:
        port = free_port()
        conf = folder / "mosquitto.conf"
        conf.write_text(MOSQUITTO_CONF.format(port=port, folder=folder))
        args = ["mosquitto", "-c", str(conf)]
        with spawn(args, folder / "mosquitto.log", lambda: port_open(port)) as proc:
            yield Running(proc.pid, port)

    return BrokerSpec(
        "mosquitto", start, Credentials.login, Login(SUBSCRIBER, SUBSCRIBER, password)
    )


# -- a: enrollment ---------------------------------------------------------------------------------


async def measure_enrollment(
    running: Running, sizes: Sizes, clients: int, bound: float
) -> tuple[dict[str, Any], list[Credentials]]:
    """The timed enrollment storm, then enough untimed enrollments for the fleet."""
    url = f"http://127.0.0.1:{running.http_port}"
    ids = iter(device_ids(10**6))
    stop = asyncio.Event()
    health = asyncio.create_task(probe_health(url, stop))
    platform_cpu, client_cpu = cpu_seconds(running.pid), _own_cpu_seconds()
    storm = await enroll_devices(url, CUSTOMER, ids, concurrency=clients, run_s=sizes.enroll_s)
    platform_cpu = cpu_seconds(running.pid) - platform_cpu
    client_cpu = _own_cpu_seconds() - client_cpu
    stop.set()
    probes = await health
    credentials = list(storm.credentials)
    for _ in range(5):  # top up (a failed enrollment is counted, then replaced)
        missing = sizes.devices - len(credentials)
        if missing <= 0:
            break
        more = await enroll_devices(
            url, CUSTOMER, itertools.islice(ids, missing), concurrency=clients
        )
        credentials += more.credentials
    if len(credentials) < sizes.devices:
        raise RuntimeError(f"only {len(credentials)} of {sizes.devices} devices enrolled")
    result = {
        "clients": clients,
        "seconds": round(storm.seconds, 2),
        "enrolled": len(storm.credentials),
        "per_s": round(storm.rate, 1),
        "bcrypt_bound_per_s": round(bound, 1),
        "share_of_bound": round(storm.rate / bound, 2),
        "pair_p50_ms": ms(percentile(storm.pair_seconds, 50)),
        "pair_p99_ms": ms(percentile(storm.pair_seconds, 99)),
        "errors": dict(storm.errors),
        "platform_cpu": round(platform_cpu / storm.seconds, 2),  # cores, bcrypt threads included
        "client_cpu": round(client_cpu / storm.seconds, 2),
        "healthz_samples": len(probes.latencies),
        "healthz_failures": probes.failures,
        "healthz_p50_ms": ms(percentile(probes.latencies, 50)),
        "healthz_p99_ms": ms(percentile(probes.latencies, 99)),
        "healthz_max_ms": ms(max(probes.latencies, default=None)),
    }
    return result, sorted(credentials, key=lambda c: c.device_id)[: sizes.devices]


# -- b and d: connect storms and memory ------------------------------------------------------------


def rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


async def storm(running: Running, logins: Sequence[Login]) -> tuple[dict[str, Any], list[Any]]:
    overflows, cpu = listen_overflows(), cpu_seconds(running.pid)
    report = await connect_storm(
        running.port, logins, subscribe=lambda login: device_topic(login.client_id, "cmd")
    )
    result = {
        "devices": len(logins),
        "connected": report.connected,
        "connack_s": round(report.connack_s, 3),
        "suback_s": round(report.suback_s, 3),
        "connect_p50_s": round(percentile(report.connect_seconds, 50) or 0.0, 3),
        "connect_p90_s": round(percentile(report.connect_seconds, 90) or 0.0, 3),
        "broker_cpu_s": round(cpu_seconds(running.pid) - cpu, 2),
        "listen_overflows": listen_overflows() - overflows,
        "errors": dict(report.errors),
    }
    return result, report.clients


async def measure_fleet_size(
    spec: BrokerSpec, running: Running, fleet: Sequence[Credentials], sizes: Sizes
) -> dict[str, Any]:
    """Idle RSS, cold storm, RSS with the fleet connected, warm storm (and traffic at the
    largest size)."""
    logins = [spec.device_login(c) for c in fleet]
    await asyncio.sleep(1.0)
    idle = rss(running.pid)
    cold, clients = await storm(running, logins)
    await asyncio.sleep(SETTLE_S)
    loaded = rss(running.pid)
    await disconnect_all(clients)
    await asyncio.sleep(SESSION_CLEANUP_S)
    warm, clients = await storm(running, logins)
    result: dict[str, Any] = {
        "devices": len(fleet),
        "cold": cold,
        "warm": warm,
        "rss_idle_mb": round(idle / 2**20, 1),
        "rss_connected_mb": round(loaded / 2**20, 1),
        "kb_per_device": round((loaded - idle) / 1024 / len(fleet), 1),
    }
    if len(fleet) == sizes.devices:
        if sizes.fleet_traffic:
            publishers = clients[: sizes.publishers]
            result["traffic_with_fleet"] = await measure_traffic(spec, running, publishers, sizes)
        await disconnect_all(clients)
        await asyncio.sleep(SESSION_CLEANUP_S)
        publisher_logins = logins[: sizes.publishers]
        small, clients = await storm(running, publisher_logins)
        if small["connected"] < len(publisher_logins):
            raise RuntimeError(f"{spec.name}: publishers could not connect: {small['errors']}")
        with profiling(spec.profile_to, running.pid):
            result["traffic"] = await measure_traffic(spec, running, clients, sizes)
    await disconnect_all(clients)
    return result


# -- c: telemetry ----------------------------------------------------------------------------------


@dataclass
class Flow:
    """The messages between the publishers and the subscriber (at most `window` at a time)."""

    window: int
    since_ns: int = 0  # messages sent before belong to an earlier phase
    inflight: int = 0
    lost: int = 0
    measure_from_ns: int = 0
    measure_to_ns: int = 0
    received: int = 0
    latencies: list[float] = field(default_factory=list)
    space: asyncio.Event = field(default_factory=asyncio.Event)
    last_receive: float = 0.0

    def on_message(self, client: MqttClient, topic: str, payload: bytes, qos: int) -> None:
        sent_ns = payload_sent_ns(payload)
        if sent_ns is None or sent_ns < self.since_ns:
            return
        now_ns = time.perf_counter_ns()
        self.last_receive = time.monotonic()
        self.inflight = max(0, self.inflight - 1)
        if self.inflight <= self.window // 2:
            self.space.set()
        if self.measure_from_ns <= now_ns < self.measure_to_ns:
            self.received += 1
            self.latencies.append((now_ns - sent_ns) / 1e9)

    def give_up_if_stalled(self, stall_s: float = 2.0) -> None:
        """Messages not delivered for `stall_s` are lost (QoS 0 may drop): free the window."""
        if self.inflight and time.monotonic() - self.last_receive > stall_s:
            self.lost += self.inflight
            self.inflight = 0
            self.last_receive = time.monotonic()


async def drive(
    flow: Flow, publishers: Sequence[MqttClient], qos: int, rate: float, run_s: float
) -> int:
    """Publish round-robin for `run_s`: as fast as the window allows (rate 0) or at `rate`."""
    topics = [encode_topic(device_topic(p.client_id, "telemetry")) for p in publishers]
    start = time.perf_counter()
    flow.last_receive = time.monotonic()
    sent = 0
    order = itertools.cycle(range(len(publishers)))
    while (now := time.perf_counter()) < start + run_s:
        allowed = flow.window - flow.inflight
        if rate > 0:
            allowed = min(allowed, int((now - start) * rate) - sent)
        for _ in range(max(0, allowed)):
            index = next(order)
            publishers[index].publish(topics[index], telemetry_payload(sent), qos)
            sent += 1
            flow.inflight += 1
        if rate > 0:
            await asyncio.sleep(0.005)
        else:
            flow.space.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(flow.space.wait(), 0.5)
        flow.give_up_if_stalled()
    return sent


async def telemetry_phase(
    spec: BrokerSpec,
    running: Running,
    publishers: Sequence[MqttClient],
    qos: int,
    rate: float,
    sizes: Sizes,
) -> dict[str, Any]:
    flow = Flow(window=sizes.window)
    subscriber = await open_mqtt(running.port, spec.subscriber, on_publish=flow.on_message)
    try:
        code = await subscriber.subscribe(TELEMETRY_FILTER, qos)
        if code == 0x80:
            raise RuntimeError(f"{spec.name}: subscription to {TELEMETRY_FILTER} refused")
        flow.since_ns = time.perf_counter_ns()
        driver = asyncio.create_task(
            drive(flow, publishers, qos, rate, sizes.warmup_s + sizes.phase_s)
        )
        await asyncio.sleep(sizes.warmup_s)
        flow.measure_from_ns = time.perf_counter_ns()
        flow.measure_to_ns = flow.measure_from_ns + int(sizes.phase_s * 1e9)
        broker_cpu, client_cpu = cpu_seconds(running.pid), _own_cpu_seconds()
        began = time.perf_counter()
        await asyncio.sleep(sizes.phase_s)
        elapsed = time.perf_counter() - began
        broker_cpu = cpu_seconds(running.pid) - broker_cpu
        client_cpu = _own_cpu_seconds() - client_cpu
        sent = await driver
        for _ in range(50):  # drain (bounded): the rest is counted as lost
            if not flow.inflight:
                break
            await asyncio.sleep(0.1)
        lost = flow.lost + flow.inflight
    finally:
        await disconnect_all([subscriber])
    rate_out = flow.received / elapsed
    return {
        "qos": qos,
        "offered_per_s": rate or None,
        "msgs_per_s": round(rate_out),
        "p50_ms": ms(percentile(flow.latencies, 50)),
        "p99_ms": ms(percentile(flow.latencies, 99)),
        "sent": sent,
        "lost": lost,
        "broker_cpu": round(broker_cpu / elapsed, 2),  # cores
        "broker_us_per_msg": round(broker_cpu / flow.received * 1e6, 1) if flow.received else None,
        "client_cpu": round(client_cpu / elapsed, 2),
    }


async def measure_traffic(
    spec: BrokerSpec, running: Running, publishers: Sequence[MqttClient], sizes: Sizes
) -> dict[str, Any]:
    result: dict[str, Any] = {"publishers": len(publishers), "window": sizes.window}
    for qos in (0, 1):
        result[f"qos{qos}"] = await telemetry_phase(spec, running, publishers, qos, 0.0, sizes)
        if sizes.rate:
            result[f"qos{qos}_paced"] = await telemetry_phase(
                spec, running, publishers, qos, sizes.rate, sizes
            )
    return result


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- profiling -------------------------------------------------------------------------------------


@contextlib.contextmanager
def profiling(out: Path | None, pid: int) -> Iterator[None]:
    """py-spy (raw, collapsed stacks) on `pid` while the block runs, if asked for."""
    if out is None:
        yield
        return
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    args = [py_spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "200"]
    with (out.parent / f"{out.name}.log").open("wb") as log:
        proc = subprocess.Popen([*args, "--nonblocking", "-o", str(out)], stdout=log, stderr=log)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def summarize_profile(path: Path, top: int = 15) -> dict[str, list[tuple[str, float]]]:
    """Own and total shares of samples per function, from py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    if not samples:
        return {"own": [], "total": []}
    return {
        "own": [(f, round(n / samples, 3)) for f, n in own.most_common(top)],
        "total": [(f, round(n / samples, 3)) for f, n in total.most_common(top + 10)],
    }


# -- the run ---------------------------------------------------------------------------------------


def run_broker(spec: BrokerSpec, fleet: Sequence[Credentials], sizes: Sizes) -> dict[str, Any]:
    """One fresh broker process per fleet size."""
    result: dict[str, Any] = {"sizes": {}}
    for size in sizes.fleet:
        print(f"  {spec.name}: {size} devices", file=sys.stderr, flush=True)
        profile_to = spec.profile_to if size == sizes.devices else None
        with spec.start() as running:
            measured = asyncio.run(
                measure_fleet_size(
                    dataclasses.replace(spec, profile_to=profile_to), running, fleet[:size], sizes
                )
            )
        for key in ("traffic", "traffic_with_fleet"):
            if key in measured:
                result[key] = measured.pop(key)
        result["sizes"][str(size)] = measured
    return result


def run(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    sizes = QUICK if args.quick else FULL
    if args.devices:
        sizes = dataclasses.replace(
            sizes,
            fleet=tuple(sorted({*(n for n in sizes.fleet if n < args.devices), args.devices})),
        )
    cores = os.cpu_count() or 1
    clients = 2 * cores
    cost = int(os.environ.get("IOTBIZ_REGISTRAR_BCRYPT_COST", "6"))
    pair_s = bcrypt_pair_seconds(cost)
    result: dict[str, Any] = {
        "machine": machine(),
        "quick": args.quick,
        "sizes": dataclasses.asdict(sizes),
        "open_files_limit": raise_open_files_limit(),
        "bcrypt": {"cost": cost, "pair_ms": round(pair_s * 1000, 2)},
    }
    db = folder / "bench.db"
    add_customer(db, CUSTOMER, sizes.devices + 10**5)
    password = add_account(db, SUBSCRIBER)
    iotbiz = iotbiz_spec(folder, db, cost, args.log_level, password)
    iotbiz.profile_to = args.py_spy

    print("enrollment ...", file=sys.stderr, flush=True)
    with iotbiz.start() as running:
        result["enrollment"], fleet = asyncio.run(
            measure_enrollment(running, sizes, clients, cores / pair_s)
        )

    specs = [iotbiz, amqtt_spec(folder)]
    if shutil.which("mosquitto") and shutil.which("mosquitto_passwd"):
        started = time.perf_counter()
        specs.append(mosquitto_spec(folder, fleet, password))
        result["mosquitto_passwd_s"] = round(time.perf_counter() - started, 2)
    else:
        print("mosquitto not found: the mosquitto columns are skipped", file=sys.stderr)
        result["mosquitto_skipped"] = "mosquitto binary not found"
    result["brokers"] = {}
    for spec in specs:
        print(f"{spec.name} ...", file=sys.stderr, flush=True)
        result["brokers"][spec.name] = run_broker(spec, fleet, sizes)
    if args.py_spy is not None and args.py_spy.exists():
        result["profile"] = summarize_profile(args.py_spy)
    print("agent ...", file=sys.stderr, flush=True)
    agent_s = 20.0 if args.quick else 60.0
    result["agent"] = measure_agent(duration=agent_s, interval=10.0, settle=agent_s / 4)
    result["goals"] = goals(result)
    return result


# -- goals and the table ---------------------------------------------------------------------------


def _get(data: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    enrollment = result["enrollment"]
    brokers = result["brokers"]
    biggest = str(max(result["sizes"]["fleet"]))
    iot = brokers["iotbiz"]
    rows: list[dict[str, Any]] = []

    def add(goal: str, measured: Any, met: bool | None, note: str = "") -> None:
        rows.append({"goal": goal, "measured": measured, "met": met, "note": note})

    add("enrollment >= 100/s", enrollment["per_s"], enrollment["per_s"] >= 100)
    share = enrollment["share_of_bound"]
    add("enrollment >= 80% of the bcrypt bound", share, share >= 0.8)
    p99 = enrollment["healthz_p99_ms"]
    add("/healthz p99 < 100 ms during the storm", p99, p99 is not None and p99 < 100)
    mosq_sizes = _get(brokers, "mosquitto", "sizes", biggest)
    for kind, limit in (("cold", 10.0), ("warm", 3.0)):
        seconds = iot["sizes"][biggest][kind]["connack_s"]
        mosq = _get(mosq_sizes or {}, kind, "connack_s")
        ratio = _ratio(seconds, mosq)
        note = f"{ratio}x mosquitto ({mosq} s)" if ratio is not None else ""
        add(f"{biggest}-device storm {kind} <= {limit:g} s", seconds, seconds <= limit, note)
    for qos in (0, 1):
        mine = _get(iot, "traffic", f"qos{qos}", "msgs_per_s")
        plain = _get(brokers, "amqtt", "traffic", f"qos{qos}", "msgs_per_s")
        ratio = _ratio(mine, plain)
        add(
            f"plugin overhead <= 15% (QoS {qos}, IoTBiz/amqtt >= 0.85)",
            ratio,
            None if ratio is None else ratio >= 0.85,
            f"{mine} vs {plain} msgs/s",
        )
    mine = _get(iot, "traffic", "qos0", "msgs_per_s")
    mosq = _get(brokers, "mosquitto", "traffic", "qos0", "msgs_per_s")
    ratio = _ratio(mine, mosq)
    add(
        "QoS 0 throughput >= 0.25 of mosquitto",
        ratio,
        None if ratio is None else ratio >= 0.25,
        f"{mine} vs {mosq} msgs/s" + _client_bound_note(brokers),
    )
    kb = iot["sizes"][biggest]["kb_per_device"]
    add(f"broker memory <= 40 KB per device (at {biggest})", kb, kb <= 40)
    plain_kb = _get(brokers, "amqtt", "sizes", biggest, "kb_per_device")
    rows[-1]["note"] = f"plain amqtt {plain_kb} KB" if plain_kb is not None else ""
    agent = result["agent"]
    rss_mb = agent["rss_mb_max"]
    add("agent RSS <= 30 MB (3 apps, 10 s interval)", rss_mb, rss_mb <= 30)
    cpu = agent["cpu_percent_of_one_core"]
    add("agent CPU < 1% of one core", cpu, cpu < 1, f"over {agent['seconds']} s")
    return rows


def _client_bound_note(brokers: dict[str, Any]) -> str:
    client = _get(brokers, "mosquitto", "traffic", "qos0", "client_cpu")
    if client is not None and client >= 0.85:
        return f"; load generator at {client} cores: mosquitto's figure is a lower bound"
    return ""


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown(result: dict[str, Any]) -> str:
    brokers = result["brokers"]
    names = [n for n in ("iotbiz", "amqtt", "mosquitto") if n in brokers]
    biggest = str(max(result["sizes"]["fleet"]))
    out: list[str] = []
    m = result["machine"]
    out.append(
        f"Machine: {m['cores']} cores, {m['cpu']}, Python {m['python']}; bcrypt cost "
        f"{result['bcrypt']['cost']}: {result['bcrypt']['pair_ms']} ms per hash + check."
    )
    e = result["enrollment"]
    out += [
        "",
        "| enrollment | value |",
        "|---|---|",
        f"| register+activate pairs/s ({e['clients']} clients, {e['seconds']} s) | {e['per_s']} |",
        f"| bcrypt bound (cores / pair time) | {e['bcrypt_bound_per_s']} |",
        f"| share of the bound | {e['share_of_bound']} |",
        f"| pair latency p50 / p99 ms | {e['pair_p50_ms']} / {e['pair_p99_ms']} |",
        f"| /healthz p50 / p99 / max ms ({e['healthz_samples']} probes) | "
        f"{e['healthz_p50_ms']} / {e['healthz_p99_ms']} / {e['healthz_max_ms']} |",
        f"| errors | {e['errors'] or 'none'} |",
    ]

    rows: list[tuple[str, Callable[[dict[str, Any]], Any]]] = [
        (
            f"connect {biggest} cold: all CONNACKs, s",
            lambda b: b["sizes"][biggest]["cold"]["connack_s"],
        ),
        (
            f"connect {biggest} warm: all CONNACKs, s",
            lambda b: b["sizes"][biggest]["warm"]["connack_s"],
        ),
        (
            f"connect {biggest} warm: all SUBACKs, s",
            lambda b: b["sizes"][biggest]["warm"]["suback_s"],
        ),
        ("RSS idle, MB", lambda b: b["sizes"][biggest]["rss_idle_mb"]),
        (
            f"RSS per connected device at {biggest}, KB",
            lambda b: b["sizes"][biggest]["kb_per_device"],
        ),
    ]
    for key, label in (("traffic", "publishers only"), ("traffic_with_fleet", "fleet connected")):
        for phase in ("qos0", "qos1", "qos0_paced", "qos1_paced"):
            if not any(_get(brokers[n], key, phase) for n in names):
                continue
            tag = f"{phase.replace('_paced', ' paced')} ({label})"
            rows += [
                (f"{tag}: msgs/s", _getter(key, phase, "msgs_per_s")),
                (f"{tag}: latency p50 ms", _getter(key, phase, "p50_ms")),
                (f"{tag}: latency p99 ms", _getter(key, phase, "p99_ms")),
                (f"{tag}: broker CPU us/msg", _getter(key, phase, "broker_us_per_msg")),
            ]
    header = "| metric | " + " | ".join(names)
    header += (
        " | IoTBiz/amqtt | IoTBiz/mosquitto |" if "mosquitto" in names else " | IoTBiz/amqtt |"
    )
    out += ["", header, "|---" * (header.count("|") - 1) + "|"]
    for label, get in rows:
        values = [_safe(get, brokers[n]) for n in names]
        ratios = [_ratio(values[0], values[i]) for i in range(1, len(names))]
        out.append(f"| {label} | " + " | ".join(_fmt(v) for v in values + ratios) + " |")

    out += [
        "",
        "| devices | "
        + " | ".join(f"{n} cold s | {n} warm s | {n} KB/device" for n in names)
        + " |",
        "|---" * (1 + 3 * len(names)) + "|",
    ]
    for size in result["sizes"]["fleet"]:
        cells = []
        for n in names:
            s = brokers[n]["sizes"][str(size)]
            cells += [s["cold"]["connack_s"], s["warm"]["connack_s"], s["kb_per_device"]]
        out.append(f"| {size} | " + " | ".join(_fmt(c) for c in cells) + " |")

    out += ["", "| goal | measured | met | note |", "|---|---|---|---|"]
    for g in result["goals"]:
        met = "n/a" if g["met"] is None else ("yes" if g["met"] else "**no**")
        out.append(f"| {g['goal']} | {_fmt(g['measured'])} | {met} | {g['note']} |")
    if "profile" in result:
        out += ["", "py-spy, IoTBiz under the telemetry load (share of samples):", ""]
        out += [f"- own {share:.1%}: {frame}" for frame, share in result["profile"]["own"]]
    return "\n".join(out)


def _getter(key: str, phase: str, name: str) -> Callable[[dict[str, Any]], Any]:
    return lambda b: b[key][phase][name]


def _safe(get: Callable[[dict[str, Any]], Any], data: dict[str, Any]) -> Any:
    try:
        return get(data)
    except (KeyError, TypeError):
        return None


def broker_drops(http_port: int, token_file: Path) -> dict[str, float]:
    """The platform's counters of dropped MQTT messages, from /metrics (admin token)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{http_port}/metrics",
        headers={"Authorization": f"Bearer {token_file.read_text().strip()}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 (loopback)
        text = response.read().decode()
    drops = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        name = name.removesuffix("_total")  # prometheus_client's counters
        if name in ("iotbiz_mqtt_dropped_deliveries", "iotbiz_mqtt_dropped_queued_messages"):
            drops[name.removeprefix("iotbiz_mqtt_")] = float(value)
    return drops


def run_fleet_scale(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """The fleet-scale step alone (see scripts/bench_fleet.py)."""
    sizes = sorted({int(n) for n in args.fleet_scale.split(",")})
    names = [n for n in args.scale_brokers.split(",") if n]
    if unknown := set(names) - {"iotbiz", "mosquitto"}:
        raise SystemExit(f"--scale-brokers: unknown {sorted(unknown)}")
    load = bench_fleet.ScaleLoad(
        args.scale_rate, args.scale_qos, args.scale_seconds, args.commands_per_s
    )
    cost = int(os.environ.get("IOTBIZ_REGISTRAR_BCRYPT_COST", "6"))
    result: dict[str, Any] = {
        "machine": machine(),
        "open_files_limit": raise_open_files_limit(),
        "bcrypt": {"cost": cost, "pair_ms": round(bcrypt_pair_seconds(cost) * 1000, 2)},
        "fleet_scale": {"load": dataclasses.asdict(load), "brokers": {}, "profiles": {}},
    }
    db = folder / "bench.db"
    add_customer(db, CUSTOMER, max(sizes) + 10**5)  # failed enrollments count to the limit
    password = add_account(db, SUBSCRIBER)
    iotbiz = iotbiz_spec(folder, db, cost, args.log_level, password)
    print(f"enrolling {max(sizes)} devices ...", file=sys.stderr, flush=True)
    ids, fleet, errors = iter(device_ids(10**6)), [], Counter[str]()
    with iotbiz.start() as running:
        url = f"http://127.0.0.1:{running.http_port}"
        for _ in range(5):  # top up (a failed enrollment is counted, then replaced)
            missing = max(sizes) - len(fleet)
            if missing <= 0:
                break
            enrolled = asyncio.run(
                enroll_devices(
                    url,
                    CUSTOMER,
                    itertools.islice(ids, missing),
                    concurrency=2 * (os.cpu_count() or 1),
                )
            )
            fleet += enrolled.credentials
            errors.update(enrolled.errors)
            if enrolled.errors:
                print(f"  enrollment errors: {dict(enrolled.errors)}", file=sys.stderr, flush=True)
    result["enrollment_errors"] = dict(errors)
    fleet = sorted(fleet, key=lambda c: c.device_id)
    if len(fleet) < max(sizes):
        raise RuntimeError(f"only {len(fleet)} of {max(sizes)} devices enrolled")
    specs = [iotbiz] if "iotbiz" in names else []
    if "mosquitto" in names and shutil.which("mosquitto") and shutil.which("mosquitto_passwd"):
        started = time.perf_counter()
        specs.append(mosquitto_spec(folder, fleet, password, patterns=True))
        result["mosquitto_passwd_s"] = round(time.perf_counter() - started, 2)
    elif "mosquitto" in names:
        print("mosquitto not found (scripts/bench-setup): skipped", file=sys.stderr)
        result["mosquitto_skipped"] = "mosquitto binary not found"
    brokers = result["fleet_scale"]["brokers"]
    for size in sizes:
        for spec in specs:  # side by side: every broker at this size before the next size
            print(f"  {spec.name}: {size} devices", file=sys.stderr, flush=True)
            measured = _fleet_size(spec, fleet[:size], load, args.py_spy, folder)
            brokers.setdefault(spec.name, {"sizes": {}})["sizes"][str(size)] = measured
            out = bench_fleet.profile_path(args.py_spy, size)
            if spec.name == "iotbiz" and out is not None and out.exists():
                result["fleet_scale"]["profiles"][str(size)] = summarize_profile(out)
    return result


def _fleet_size(
    spec: BrokerSpec,
    fleet: Sequence[Credentials],
    load: bench_fleet.ScaleLoad,
    py_spy: Path | None,
    folder: Path,
) -> dict[str, Any]:
    """One broker at one fleet size, freshly started. Commands are a platform feature: mosquitto
    carries the telemetry only (its devices have no agent to answer them)."""
    is_iotbiz = spec.name == "iotbiz"
    out = bench_fleet.profile_path(py_spy, len(fleet)) if is_iotbiz else None
    if not is_iotbiz:
        load = dataclasses.replace(load, commands_per_s=0.0)
    with spec.start() as running:
        pid = running.pid

        def drops() -> dict[str, float]:
            if not is_iotbiz:
                return {}
            return broker_drops(running.http_port or 0, folder / "admin.token")

        return asyncio.run(
            bench_fleet.measure_size(
                running.port,
                fleet,
                spec.subscriber,
                load,
                cpu=functools.partial(cpu_seconds, pid),
                rss=functools.partial(rss, pid),
                profile=functools.partial(profiling, out, pid),
                drops=drops,
            )
        )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI-size run (about 1.5 minutes)")
    parser.add_argument("--devices", type=int, help="largest fleet size (default 2000, quick 300)")
    parser.add_argument("--out", type=Path, default=Path("bench.json"), help="JSON results")
    parser.add_argument("--log-level", default="INFO", help="the platform's (its default: INFO)")
    parser.add_argument(
        "--py-spy", type=Path, help="profile IoTBiz under the telemetry load into this raw file"
    )
    parser.add_argument(
        "--fleet-scale", metavar="N,N,...", help="run only the fleet-scale step at these sizes"
    )
    parser.add_argument("--scale-rate", type=float, default=1000.0, help="fleet-scale msgs/s")
    parser.add_argument("--scale-qos", type=int, choices=(0, 1), default=1, help="its QoS")
    parser.add_argument("--scale-seconds", type=float, default=20.0, help="measured per size")
    parser.add_argument("--commands-per-s", type=float, default=10.0, help="operator commands")
    parser.add_argument(
        "--scale-brokers",
        default="iotbiz,mosquitto",
        help="fleet-scale brokers (default: both; mosquitto only if installed)",
    )
    parser.add_argument(
        "--plot", type=Path, help="fleet-scale: draw cost per message and p99 to this PNG"
    )
    args = parser.parse_args(argv)
    for name, path in (("--out", args.out), ("--plot", args.plot)):
        if path is not None and not path.parent.is_dir():  # checked before a run of minutes
            parser.error(f"{name}: no folder {path.parent}")
    started = time.perf_counter()
    step = run_fleet_scale if args.fleet_scale else run
    with tempfile.TemporaryDirectory(prefix="iotbiz-bench-") as tmp:
        try:
            result = step(args, Path(tmp))
        except Exception:
            for log in sorted(Path(tmp).glob("*.log")):
                print(f"--- {log.name} (tail)\n{log.read_text(errors='replace')[-3000:]}")
            raise
    result["seconds"] = round(time.perf_counter() - started, 1)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(bench_fleet.markdown(result) if args.fleet_scale else markdown(result))
    if args.fleet_scale and args.plot:
        bench_fleet.plot(result, args.plot)
        print(f"plot in {args.plot}")
    print(f"\n{result['seconds']} s; JSON in {args.out}")


if __name__ == "__main__":
    main()
