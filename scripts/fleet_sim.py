"""Fleet simulator: N IoTBiz devices on loopback, all in one asyncio process.

Each simulated device enrolls over HTTP (register + activate, a bounded number at a time),
connects over MQTT with its own credentials (username = client id = CUSTOMER/DEVICE, as the
contract says), subscribes to its `cmd` topic, sends telemetry at a fixed rate and answers every
command with a reply. An operator account can send commands to random devices and time the
replies, and follows the telemetry to time its delivery.

    python scripts/fleet_sim.py --devices 200 --duration 30          # starts its own platform
    python scripts/fleet_sim.py --url http://127.0.0.1:8080 --mqtt-port 1883 \\
        --customer abc123 --operator NAME:PASSWORD --devices 50 --duration 60 --json

Without --url it starts a platform (`python -m iotbiz.broker`) on free loopback ports with a new
store in a temporary folder, and makes the customer and the operator account itself.

Bounded in count and in time: the devices are the only connections it opens, every network
wait has a timeout, set-up (enrollment, connect) is limited by --setup-timeout and the traffic
phase by --duration.

The MQTT side is a minimal MQTT 3.1.1 client on asyncio's Protocol API (`MqttClient`), with the
hand-built packets of tests/mqtt_wire.py: 2,000 devices cost little CPU next to a broker that
shares the same cores. scripts/bench.py uses this module as a library: `enroll_devices`,
`probe_health`, `connect_storm`, `disconnect_all`, `start_platform`, `telemetry_payload` ...
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import resource
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from tests.mqtt_wire import connect_packet, encode_string, packet, subscribe_packet  # noqa: E402

HOST = "127.0.0.1"
DEVICE_PUBLISHES = ("status", "telemetry", "events", "reply")
PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"

# MQTT 3.1.1 control packet types (the high nibble of the first byte).
CONNACK, PUBLISH, PUBACK, SUBACK, PINGRESP = 2, 3, 4, 9, 13


# -- names and credentials -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Login:
    """What one MQTT CONNECT carries."""

    client_id: str
    username: str | None = None
    password: str | None = None


@dataclass(frozen=True, slots=True)
class Credentials:
    """An enrolled (activated) device."""

    customer_id: str
    device_id: str
    password: str

    @property
    def name(self) -> str:
        return f"{self.customer_id}/{self.device_id}"

    def login(self) -> Login:
        return Login(self.name, self.name, self.password)


def device_ids(count: int, start: int = 0, prefix: str = "sim") -> list[str]:
    """Device ids `sim-000000`, ...: valid IoTBiz ids without ':' (mosquitto's password file
    uses ':' as its separator, and bench.py gives mosquitto the same accounts)."""
    return [f"{prefix}-{i:06d}" for i in range(start, start + count)]


def device_topic(name: str, suffix: str) -> str:
    return f"devices/{name}/{suffix}"


def encode_topic(topic: str) -> bytes:
    """A topic as it goes into a PUBLISH (length-prefixed UTF-8), to build once and reuse."""
    return encode_string(topic)


# -- telemetry payloads --------------------------------------------------------------------------

_TELEMETRY = (
    b'{"ts":%d,"seq":%d,"cpu_percent":12.5,"load":[0.31,0.25,0.2],'
    b'"memory":{"percent":41.2,"used":412000000},"disk":{"percent":63.0},'
    b'"net":{"rx":123456789,"tx":98765432},"uptime_s":86400,'
    b'"apps":[{"name":"web","state":"running","pid":1234,"restarts":0,"version":"1.0.0"}]}'
)


def telemetry_payload(seq: int, sent_ns: int | None = None) -> bytes:
    """A realistic telemetry message (about 300 bytes of JSON) whose first field is the send
    time in `time.perf_counter_ns()` units, so a receiver in this process can time delivery."""
    return _TELEMETRY % (time.perf_counter_ns() if sent_ns is None else sent_ns, seq)


def payload_sent_ns(payload: bytes) -> int | None:
    """The send time in a `telemetry_payload`, or None for any other payload (cheap: no JSON)."""
    if not payload.startswith(b'{"ts":'):
        return None
    end = payload.find(b",", 6)
    try:
        return int(payload[6:end])
    except ValueError:
        return None


# -- a minimal MQTT client -----------------------------------------------------------------------


class MqttError(Exception):
    """Refused, timed out or disconnected."""


PublishHandler = Callable[["MqttClient", str, bytes, int], None]


def publish_packet(topic: bytes, payload: bytes, qos: int = 0, packet_id: int = 0) -> bytes:
    """PUBLISH with a topic from `encode_topic`: cheaper than re-encoding."""
    if qos:
        return packet(0x30 | (qos << 1), topic + struct.pack("!H", packet_id) + payload)
    return packet(0x30, topic + payload)


class MqttClient(asyncio.Protocol):
    """One MQTT 3.1.1 connection: a parser in `data_received` and futures for the acks waited on.

    Incoming QoS 1 messages are acknowledged at once (one write per read); `on_publish` is called
    with (client, topic, payload, qos) for every PUBLISH. PUBACKs nobody waits for are counted.
    """

    def __init__(self, client_id: str, on_publish: PublishHandler | None = None) -> None:
        loop = asyncio.get_running_loop()
        self.client_id = client_id
        self.on_publish = on_publish
        self.pubacks = 0
        self.received = 0
        self.last_sent = time.monotonic()
        self.closed: asyncio.Future[None] = loop.create_future()
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._connack: asyncio.Future[int] = loop.create_future()
        self._waiters: dict[tuple[int, int], asyncio.Future[bytes]] = {}
        self._packet_ids = itertools.cycle(range(1, 65536))

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        error = MqttError(f"{self.client_id}: connection closed ({exc or 'EOF'})")
        futures: list[asyncio.Future[Any]] = [self._connack, *self._waiters.values()]
        for future in futures:
            if not future.done():
                future.set_exception(error)
                future.exception()  # retrieved: nobody may be waiting any more
        self._waiters.clear()
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        size, start = len(buffer), 0
        acks = bytearray()
        while size - start >= 2:
            # Fixed header: type byte, then the remaining length in 1-4 bytes of 7 bits each.
            length, multiplier, index, complete = 0, 1, start + 1, False
            while index < size and index - start <= 4:
                byte = buffer[index]
                index += 1
                length += (byte & 0x7F) * multiplier
                if byte < 0x80:
                    complete = True
                    break
                multiplier *= 128
            if not complete:
                if index - start > 4:  # malformed: no broker sends this
                    self.abort()
                break
            end = index + length
            if end > size:
                break
            self._dispatch(buffer[start], buffer, index, end, acks)
            start = end
        del buffer[:start]
        if acks and self._transport is not None:
            self._transport.write(bytes(acks))

    def _dispatch(
        self, first: int, buffer: bytearray, begin: int, end: int, acks: bytearray
    ) -> None:
        kind = first >> 4
        if kind == PUBLISH:
            qos = (first >> 1) & 3
            topic_end = begin + 2 + (buffer[begin] << 8 | buffer[begin + 1])
            topic = buffer[begin + 2 : topic_end].decode()
            if qos:
                acks += b"\x40\x02" + buffer[topic_end : topic_end + 2]
                topic_end += 2
            self.received += 1
            if self.on_publish is not None:
                self.on_publish(self, topic, bytes(buffer[topic_end:end]), qos)
        elif kind == CONNACK:
            if not self._connack.done():
                self._connack.set_result(buffer[begin + 1])
        elif kind in (PUBACK, SUBACK):
            packet_id = buffer[begin] << 8 | buffer[begin + 1]
            waiter = self._waiters.pop((kind, packet_id), None)
            if waiter is not None and not waiter.done():
                waiter.set_result(bytes(buffer[begin + 2 : end]))
            elif kind == PUBACK:
                self.pubacks += 1

    # -- sending --

    @property
    def is_open(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    def send(self, data: bytes) -> None:
        if self._transport is None or self._transport.is_closing():
            raise MqttError(f"{self.client_id}: not connected")
        self._transport.write(data)
        self.last_sent = time.monotonic()

    def next_packet_id(self) -> int:
        return next(self._packet_ids)

    def publish(self, topic: bytes, payload: bytes, qos: int = 0) -> int:
        """Send a PUBLISH (topic pre-encoded with `encode_topic`) without waiting; the packet id
        (0 for QoS 0)."""
        packet_id = self.next_packet_id() if qos else 0
        self.send(publish_packet(topic, payload, qos, packet_id))
        return packet_id

    async def publish_acked(self, topic: str, payload: bytes, wait_s: float = 10.0) -> None:
        """QoS 1 PUBLISH, returning once it is acknowledged."""
        packet_id = self.next_packet_id()
        waiter = self._expect(PUBACK, packet_id)
        self.send(publish_packet(encode_topic(topic), payload, 1, packet_id))
        await self._wait(waiter, wait_s, f"PUBACK {packet_id}")

    async def subscribe(self, topic_filter: str, qos: int = 0, wait_s: float = 10.0) -> int:
        """Subscribe; the SUBACK return code (0-2 granted QoS, 0x80 refused)."""
        packet_id = self.next_packet_id()
        waiter = self._expect(SUBACK, packet_id)
        self.send(subscribe_packet(topic_filter, qos, packet_id))
        codes = await self._wait(waiter, wait_s, f"SUBACK {packet_id}")
        return codes[0] if codes else 0x80

    def ping_if_idle(self, keepalive_s: float) -> None:
        if self.is_open and time.monotonic() - self.last_sent > keepalive_s / 2:
            self.send(PINGREQ)

    def disconnect(self) -> None:
        """DISCONNECT and close (no wait); `closed` resolves when the socket is gone."""
        if self.is_open:
            self.send(DISCONNECT)
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _expect(self, kind: int, packet_id: int) -> asyncio.Future[bytes]:
        waiter: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiters[(kind, packet_id)] = waiter
        return waiter

    async def _wait(self, waiter: asyncio.Future[bytes], wait_s: float, what: str) -> bytes:
        try:
            async with asyncio.timeout(wait_s):
                return await waiter
        except TimeoutError as exc:
            raise MqttError(f"{self.client_id}: no {what} within {wait_s}s") from exc

    async def wait_connack(self, wait_s: float) -> int:
        try:
            async with asyncio.timeout(wait_s):
                return await self._connack
        except TimeoutError as exc:
            raise MqttError(f"{self.client_id}: no CONNACK within {wait_s}s") from exc


def device_address(index: int) -> str:
    """A loopback source address of its own for the `index`-th simulated device (Linux routes
    all of 127.0.0.0/8 to the loopback interface): a real fleet connects from many addresses,
    and a broker's per-address caps (IoTBiz's `mqtt.max_*_per_address`, fitted to its open-file
    limit) must not turn a storm from one benchmark process into a flood from one address."""
    if not 0 <= index < 250 * 250 * 250:
        raise ValueError(f"no loopback address for device {index}")
    return f"127.{1 + index // 62_500}.{index // 250 % 250}.{1 + index % 250}"


async def open_mqtt(
    port: int,
    login: Login,
    *,
    keepalive_s: int = 120,
    wait_s: float = 30.0,
    on_publish: PublishHandler | None = None,
    source: str | None = None,
) -> MqttClient:
    """Connect (from the address `source`, if given), send CONNECT and return once CONNACK
    accepted; MqttError otherwise."""
    loop = asyncio.get_running_loop()
    local = None if source is None else (source, 0)
    try:
        async with asyncio.timeout(wait_s):
            _, client = await loop.create_connection(
                lambda: MqttClient(login.client_id, on_publish), HOST, port, local_addr=local
            )
    except (TimeoutError, OSError) as exc:
        raise MqttError(f"{login.client_id}: cannot connect ({exc!r})") from exc
    try:
        client.send(connect_packet(login.client_id, login.username, login.password, keepalive_s))
        code = await client.wait_connack(wait_s)
    except MqttError:
        client.abort()
        raise
    if code != 0:
        client.abort()
        raise MqttError(f"{login.client_id}: CONNACK refused with code {code}")
    return client


# -- enrollment ----------------------------------------------------------------------------------


class EnrollError(Exception):
    """The registrar answered register or activate with an unexpected status."""


async def enroll_device(
    http: aiohttp.ClientSession, customer_id: str, device_id: str
) -> Credentials:
    """register (201, password) + activate (200) one device; EnrollError otherwise."""
    body: dict[str, str] = {"customer_id": customer_id, "mac_address": device_id}
    async with http.post("/api/v1/register", json=body) as response:
        if response.status != 201:
            raise EnrollError(f"register {response.status}")
        body["password"] = (await response.json())["password"]
    async with http.post("/api/v1/activate", json=body) as response:
        if response.status != 200:
            raise EnrollError(f"activate {response.status}")
    return Credentials(customer_id, device_id, body["password"])


@dataclass
class EnrollReport:
    credentials: list[Credentials] = field(default_factory=list)
    pair_seconds: list[float] = field(default_factory=list)  # register + activate, each
    errors: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return len(self.credentials) / self.seconds if self.seconds else 0.0


async def enroll_devices(
    url: str,
    customer_id: str,
    ids: Iterable[str],
    *,
    concurrency: int,
    run_s: float | None = None,
    request_s: float = 30.0,
    limit_s: float = 300.0,
) -> EnrollReport:
    """Enroll the devices `ids` with `concurrency` clients, each doing register + activate in a
    loop. With `run_s`, no new enrollment starts after that many seconds (`ids` may then be
    endless); in any case the whole call ends within `limit_s`."""
    report = EnrollReport()
    pending = iter(ids)
    start = time.perf_counter()
    stop_at = start + (run_s if run_s is not None else limit_s)
    timeout = aiohttp.ClientTimeout(total=request_s)
    connector = aiohttp.TCPConnector(limit=concurrency)

    async def client(http: aiohttp.ClientSession) -> None:
        for device_id in pending:
            if time.perf_counter() >= stop_at:
                return
            began = time.perf_counter()
            try:
                credentials = await enroll_device(http, customer_id, device_id)
            except (EnrollError, aiohttp.ClientError, TimeoutError) as exc:
                report.errors[str(exc) or type(exc).__name__] += 1
                continue
            report.pair_seconds.append(time.perf_counter() - began)
            report.credentials.append(credentials)

    async with aiohttp.ClientSession(url, timeout=timeout, connector=connector) as http:
        try:
            async with asyncio.timeout(limit_s):
                await asyncio.gather(*(client(http) for _ in range(concurrency)))
        except TimeoutError:
            report.errors["enrollment time limit"] += 1
    report.seconds = time.perf_counter() - start
    return report


@dataclass
class HealthReport:
    latencies: list[float] = field(default_factory=list)
    failures: int = 0


async def probe_health(
    url: str, stop: asyncio.Event, *, interval_s: float = 0.02, request_s: float = 5.0
) -> HealthReport:
    """GET /healthz every `interval_s` until `stop` is set; a failure counts as `request_s`."""
    report = HealthReport()
    timeout = aiohttp.ClientTimeout(total=request_s)
    async with aiohttp.ClientSession(url, timeout=timeout) as http:
        while not stop.is_set():
            began = time.perf_counter()
            try:
                async with http.get("/healthz") as response:
                    await response.read()
                    ok = response.status == 200
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            report.latencies.append(time.perf_counter() - began if ok else request_s)
            report.failures += not ok
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)
    return report


# -- connect storms ------------------------------------------------------------------------------


@dataclass
class StormReport:
    """N clients connecting at once."""

    clients: list[MqttClient] = field(default_factory=list)
    connack_s: float = 0.0  # until the last CONNACK
    suback_s: float = 0.0  # until the last SUBACK (when subscribing)
    connect_seconds: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def connected(self) -> int:
        return len(self.clients)


async def connect_storm(
    port: int,
    logins: Sequence[Login],
    *,
    subscribe: Callable[[Login], str | None] | None = None,
    subscribe_qos: int = 1,
    keepalive_s: int = 120,
    wait_s: float = 60.0,
    on_publish: PublishHandler | None = None,
) -> StormReport:
    """Open every login at once, each from an address of its own (`device_address`); time
    until all CONNACKs (and SUBACKs of `subscribe(login)`).

    Failed logins are counted in `errors`; the connected clients stay open in `clients`.
    """
    report = StormReport()
    start = time.perf_counter()
    last_connack = last_suback = start

    async def one(index: int, login: Login) -> None:
        nonlocal last_connack, last_suback
        try:
            client = await open_mqtt(
                port,
                login,
                keepalive_s=keepalive_s,
                wait_s=wait_s,
                on_publish=on_publish,
                source=device_address(index),
            )
        except MqttError as exc:
            report.errors[_error_kind(exc)] += 1
            return
        last_connack = time.perf_counter()
        report.connect_seconds.append(last_connack - start)
        report.clients.append(client)
        topic_filter = subscribe(login) if subscribe is not None else None
        if topic_filter is None:
            return
        try:
            code = await client.subscribe(topic_filter, subscribe_qos, wait_s)
        except MqttError as exc:
            report.errors[_error_kind(exc)] += 1
            return
        if code == 0x80:
            report.errors["SUBACK refused"] += 1
        last_suback = time.perf_counter()

    await asyncio.gather(*(one(index, login) for index, login in enumerate(logins)))
    report.connack_s = last_connack - start
    report.suback_s = last_suback - start if subscribe is not None else 0.0
    return report


def _error_kind(exc: Exception) -> str:
    text = str(exc)
    for kind in ("no CONNACK", "no SUBACK", "refused", "cannot connect", "closed"):
        if kind in text:
            return kind
    return text


async def disconnect_all(clients: Iterable[MqttClient], wait_s: float = 15.0) -> int:
    """DISCONNECT every client and wait for the sockets to close; how many did not in time."""
    clients = list(clients)
    for client in clients:
        client.disconnect()
    waits = [client.closed for client in clients if not client.closed.done()]
    if not waits:
        return 0
    _, pending = await asyncio.wait(waits, timeout=wait_s)
    for client in clients:
        if not client.closed.done():
            client.abort()
    return len(pending)


# -- simulated devices ---------------------------------------------------------------------------


class SimDevice:
    """An enrolled, connected device: telemetry at a rate, a reply to every command."""

    def __init__(self, credentials: Credentials, client: MqttClient, *, qos: int) -> None:
        self.credentials = credentials
        self.client = client
        self.qos = qos
        self.sent = 0
        self.replies = 0
        self.bad_commands = 0
        self._telemetry = encode_topic(device_topic(credentials.name, "telemetry"))
        self._reply = encode_topic(device_topic(credentials.name, "reply"))
        client.on_publish = self.on_command

    def on_command(self, client: MqttClient, topic: str, payload: bytes, qos: int) -> None:
        try:
            command = json.loads(payload)
            reply = {"id": command["id"], "ok": True, "result": {"pong": True}}
        except (ValueError, KeyError, TypeError):
            self.bad_commands += 1
            return
        if command.get("action") != "ping":
            reply = {"id": command["id"], "ok": False, "error": "unknown action"}
        if client.is_open:
            client.publish(self._reply, json.dumps(reply).encode(), qos=1)
            self.replies += 1

    async def run(self, rate: float, stop_at: float, keepalive_s: float) -> None:
        """Send telemetry every 1/rate seconds (the first at a random phase) until `stop_at`;
        keep the connection alive with PINGREQ when the rate is below the keep-alive."""
        interval = 1.0 / rate if rate > 0 else float("inf")
        next_send = time.monotonic() + random.uniform(0, min(interval, keepalive_s / 2))
        while self.client.is_open:
            now = time.monotonic()
            if now >= stop_at:
                return
            if now >= next_send:
                self.client.publish(self._telemetry, telemetry_payload(self.sent), self.qos)
                self.sent += 1
                next_send += interval
            else:
                self.client.ping_if_idle(keepalive_s)
            wake_at = min(next_send, stop_at, now + keepalive_s / 4)
            await asyncio.sleep(max(0.0, wake_at - time.monotonic()))


class Operator:
    """An operator account: sends `ping` commands and times replies; times telemetry delivery."""

    def __init__(self) -> None:
        self.commands_sent = 0
        self.command_rtts: list[float] = []
        self.telemetry_latencies: list[float] = []
        self.telemetry_received = 0
        self._sent_at: dict[str, float] = {}
        self._ids = itertools.count()

    def on_message(self, client: MqttClient, topic: str, payload: bytes, qos: int) -> None:
        if topic.endswith("/telemetry"):
            self.telemetry_received += 1
            sent_ns = payload_sent_ns(payload)
            if sent_ns is not None:
                self.telemetry_latencies.append((time.perf_counter_ns() - sent_ns) / 1e9)
            return
        try:
            command_id = json.loads(payload)["id"]
        except (ValueError, KeyError, TypeError):
            return
        sent_at = self._sent_at.pop(command_id, None)
        if sent_at is not None:
            self.command_rtts.append(time.perf_counter() - sent_at)

    async def run(
        self, client: MqttClient, names: Sequence[str], rate: float, stop_at: float
    ) -> None:
        if rate <= 0 or not names:
            return
        while time.monotonic() < stop_at and client.is_open:
            name = random.choice(names)
            command_id = f"sim-{next(self._ids)}"
            body = {"id": command_id, "action": "ping", "args": {}, "expires_at": time.time() + 60}
            self._sent_at[command_id] = time.perf_counter()
            client.publish(encode_topic(device_topic(name, "cmd")), json.dumps(body).encode(), 1)
            self.commands_sent += 1
            await asyncio.sleep(random.expovariate(rate))

    @property
    def unanswered(self) -> int:
        return len(self._sent_at)


# -- child processes -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - our own loopback URL
            return int(response.status) == 200
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def spawn(
    args: Sequence[str],
    log: Path,
    ready: Callable[[], bool],
    *,
    env: dict[str, str] | None = None,
    ready_s: float = 30.0,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a child process (output to `log`) until the block ends: SIGTERM, then SIGKILL."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            list(args), stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    try:
        deadline = time.monotonic() + ready_s
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{args[0]} did not start (exit {proc.poll()}):\n{tail}")
            time.sleep(0.1)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def iotbiz_cli(db: Path, *args: str) -> str:
    """Run the operator CLI on the store `db`; its standard output."""
    result = subprocess.run(
        [sys.executable, "-m", "iotbiz", *args, "--db", str(db)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.stdout


def add_customer(db: Path, customer_id: str, limit: int) -> None:
    iotbiz_cli(db, "customer", "add", customer_id, "--limit", str(limit))


def add_account(db: Path, name: str, *, superuser: bool = False) -> str:
    """A new operator account; its password."""
    flags = ["--superuser"] if superuser else []
    password: str = json.loads(iotbiz_cli(db, "account", "add", name, *flags, "--json"))["password"]
    return password


@dataclass(frozen=True, slots=True)
class PlatformProcess:
    proc: subprocess.Popen[bytes]
    http_port: int
    mqtt_port: int

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.http_port}"


@contextlib.contextmanager
def start_platform(
    db: Path,
    log: Path,
    *,
    log_level: str = "INFO",
    env: dict[str, str] | None = None,
    wrapper: Sequence[str] = (),
) -> Iterator[PlatformProcess]:
    """`python -m iotbiz.broker` on free loopback ports, ready once /healthz answers 200.

    The per-address rate limit is off (all simulated devices come from 127.0.0.1); `wrapper`
    prefixes the command (e.g. a profiler)."""
    http_port, mqtt_port = free_port(), free_port()
    args = [
        *wrapper,
        *(sys.executable, "-m", "iotbiz.broker", "--db", str(db), "--log-level", log_level),
        *("--http-port", str(http_port), "--mqtt-port", str(mqtt_port)),
    ]
    url = f"http://{HOST}:{http_port}/healthz"
    child_env = {"IOTBIZ_REGISTRAR_RATE_PER_IP": "0", **(env or {})}
    with spawn(args, log, lambda: http_ok(url), env=child_env, ready_s=60) as proc:
        yield PlatformProcess(proc, http_port, mqtt_port)


# -- the simulation ------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) by nearest rank, or None without values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


@dataclass(frozen=True, slots=True)
class Target:
    url: str
    mqtt_port: int
    customer_id: str
    operator: Login | None


async def simulate(args: argparse.Namespace, target: Target) -> dict[str, Any]:
    """Enroll, connect, run traffic for --duration, disconnect; the report."""
    report: dict[str, Any] = {"devices": args.devices}
    ids = device_ids(args.devices, prefix=args.prefix)
    enrolled = await enroll_devices(
        target.url,
        target.customer_id,
        ids,
        concurrency=args.enroll_concurrency,
        limit_s=args.setup_timeout,
    )
    report["enroll"] = {
        "enrolled": len(enrolled.credentials),
        "seconds": round(enrolled.seconds, 2),
        "per_s": round(enrolled.rate, 1),
        "pair_p50_ms": ms(percentile(enrolled.pair_seconds, 50)),
        "errors": dict(enrolled.errors),
    }
    by_name = {c.name: c for c in enrolled.credentials}
    storm = await connect_storm(
        target.mqtt_port,
        [c.login() for c in enrolled.credentials],
        subscribe=lambda login: device_topic(login.client_id, "cmd"),
        keepalive_s=args.keepalive,
        wait_s=args.setup_timeout,
    )
    report["connect"] = {
        "connected": storm.connected,
        "connack_s": round(storm.connack_s, 3),
        "suback_s": round(storm.suback_s, 3),
        "errors": dict(storm.errors),
    }
    devices = [SimDevice(by_name[c.client_id], c, qos=args.qos) for c in storm.clients]
    operator = Operator()
    op_client: MqttClient | None = None
    if target.operator is not None:
        op_client = await open_mqtt(
            target.mqtt_port, target.operator, on_publish=operator.on_message, wait_s=30
        )
        await op_client.subscribe("devices/+/+/reply", 1)
        await op_client.subscribe("devices/+/+/telemetry", 0)
    stop_at = time.monotonic() + args.duration
    tasks = [device.run(args.rate, stop_at, args.keepalive) for device in devices]
    if op_client is not None:
        names = [d.credentials.name for d in devices]
        tasks.append(operator.run(op_client, names, args.commands_per_s, stop_at))
    started = time.monotonic()
    async with asyncio.timeout(args.duration + 10):
        await asyncio.gather(*tasks)
    elapsed = time.monotonic() - started
    await asyncio.sleep(min(2.0, args.duration))  # the last replies and telemetry arrive
    sent = sum(d.sent for d in devices)
    report["traffic"] = {
        "seconds": round(elapsed, 1),
        "qos": args.qos,
        "telemetry_sent": sent,
        "telemetry_per_s": round(sent / elapsed, 1),
        "devices_still_connected": sum(d.client.is_open for d in devices),
        "commands_sent": operator.commands_sent,
        "commands_answered": len(operator.command_rtts),
        "commands_unanswered": operator.unanswered,
        "command_rtt_p50_ms": ms(percentile(operator.command_rtts, 50)),
        "command_rtt_p99_ms": ms(percentile(operator.command_rtts, 99)),
        "telemetry_seen_by_operator": operator.telemetry_received,
        "telemetry_latency_p50_ms": ms(percentile(operator.telemetry_latencies, 50)),
        "telemetry_latency_p99_ms": ms(percentile(operator.telemetry_latencies, 99)),
        "replies_by_devices": sum(d.replies for d in devices),
    }
    await disconnect_all([d.client for d in devices] + ([op_client] if op_client else []))
    return report


def print_table(report: dict[str, Any]) -> None:
    rows: list[tuple[str, Any]] = [("devices", report["devices"])]
    for section in ("enroll", "connect", "traffic"):
        rows += [(f"{section}.{key}", value) for key, value in report[section].items()]
    width = max(len(key) for key, _ in rows)
    print(f"| {'metric':{width}} | value |\n|{'-' * (width + 2)}|-------|")
    for key, value in rows:
        print(f"| {key:{width}} | {value} |")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=100, help="devices to simulate")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of traffic")
    parser.add_argument("--rate", type=float, default=0.1, help="telemetry msgs/s per device")
    parser.add_argument("--qos", type=int, choices=(0, 1), default=0, help="telemetry QoS")
    parser.add_argument("--commands-per-s", type=float, default=2.0, help="operator commands")
    parser.add_argument("--enroll-concurrency", type=int, default=2 * (os.cpu_count() or 1))
    parser.add_argument("--keepalive", type=int, default=60, help="MQTT keep-alive, seconds")
    parser.add_argument("--setup-timeout", type=float, default=120.0, help="enroll/connect limit")
    parser.add_argument("--prefix", default="sim", help="device ids are PREFIX-000000, ...")
    parser.add_argument("--url", help="registrar of a running platform (default: start one)")
    parser.add_argument("--mqtt-port", type=int, default=1883, help="with --url")
    parser.add_argument("--customer", default="sim", help="with --url: an existing customer")
    parser.add_argument("--operator", help="with --url: NAME:PASSWORD of an operator account")
    parser.add_argument("--log-level", default="WARNING", help="of a platform started here")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if args.devices < 1 or args.duration <= 0:
        parser.error("--devices and --duration must be positive")
    return args


def raise_open_files_limit() -> int:
    """Raise RLIMIT_NOFILE to the hard limit (children inherit it); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    raise_open_files_limit()
    if args.url:
        operator = None
        if args.operator:
            name, _, password = args.operator.partition(":")
            operator = Login(name, name, password)
        target = Target(args.url.rstrip("/"), args.mqtt_port, args.customer, operator)
        report = asyncio.run(simulate(args, target))
    else:
        with tempfile.TemporaryDirectory(prefix="fleet-sim-") as tmp:
            db = Path(tmp) / "fleet.db"
            add_customer(db, args.customer, args.devices)
            operator_password = add_account(db, "fleet-operator")
            log = Path(tmp) / "platform.log"
            with start_platform(db, log, log_level=args.log_level) as platform:
                target = Target(
                    platform.url,
                    platform.mqtt_port,
                    args.customer,
                    Login("fleet-operator", "fleet-operator", operator_password),
                )
                report = asyncio.run(simulate(args, target))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)


if __name__ == "__main__":
    main()
