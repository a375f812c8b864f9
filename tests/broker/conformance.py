"""MQTT 3.1.1 conformance scenarios, run against any broker on a TCP port.

Our own implementation of the ten scenarios of the Eclipse Paho 3.1.1 interoperability client
test (eclipse/paho.mqtt.testing, interoperability/client_test.py): basic, retained messages,
offline message queueing, will message, overlapping subscriptions, keepalive, redelivery on
reconnect, zero-length client id, subscribe failure and `$` topics. No code is taken from that
suite; the checks follow its scenarios and the MQTT 3.1.1 specification.

Every client is a `RawClient`: hand-built MQTT 3.1.1 packets (tests/mqtt_wire.py) over asyncio
streams, so a scenario controls each byte: a client that goes silent, one that withholds its
acks, a second CONNECT on one socket, a bad protocol name.

    results = await run_all(Target("127.0.0.1", 1883, superuser("root", "secret")))

A `Target` says how to log in with a given client id (superuser-style: any client id, any
topic) and, for the subscribe-failure scenario, which restricted client to use. Each scenario
first resets the broker state it uses (the sessions of its client ids and the retained messages
on its topics), runs within a time limit and returns a `Result`; it never raises. This module
does not import pytest: tests/broker/test_conformance.py and scripts/conformance.py both use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from tests import mqtt_wire
from tests.mqtt_wire import encode_string, packet

# MQTT 3.1.1 control packet types (the high nibble of the first byte).
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 12, 13, 14
SUBACK_FAILURE = 0x80
CONNACK_ACCEPTED = 0
CONNACK_IDENTIFIER_REJECTED = 2

# The suite's topics and filters (wildcards are checked against these).
TOPICS = ("TopicA", "TopicA/B", "Topic/C", "TopicA/C", "/TopicA")
DOLLAR_TOPIC = "$TopicA/B"
NOSUBSCRIBE = "nosubscribe"
CLIENT_A = "conformance-a"
CLIENT_B = "conformance-b"

WAIT_S = 3.0  # bound for anything that should happen "now" (CONNACK, acks, a message)
# A client's own marker topics (three levels: no scenario filter matches them). To know that no
# extra message is still on its way, a client publishes a marker to itself and waits for it:
# whatever the broker had for it before comes first.
MARKER_ROOT = "conformance/marker"
_MARKER_IDS = itertools.count(1)
SCENARIO_LIMIT_S = 30.0  # bound for a whole scenario, reset included

Credentials = tuple[str | None, str | None]  # (username, password) of one CONNECT


@dataclass(frozen=True, slots=True)
class Restricted:
    """An ordinary client that may not subscribe to `topic_filter` (scenario 9)."""

    client_id: str
    username: str | None
    password: str | None
    topic_filter: str = NOSUBSCRIBE


@dataclass(frozen=True, slots=True)
class Target:
    """A broker to test. `login(client_id)` gives the credentials a client id connects with;
    they must allow any client id (the empty one included) and any topic. Without `restricted`,
    scenario 9 subscribes to "nosubscribe" with `login`, which the broker must refuse."""

    host: str
    port: int
    login: Callable[[str], Credentials]
    restricted: Restricted | None = None


@dataclass(frozen=True, slots=True)
class Result:
    name: str
    passed: bool
    detail: str
    seconds: float = 0.0


def superuser(username: str, password: str) -> Callable[[str], Credentials]:
    """`Target.login` for one account that may use any client id."""

    def login(_client_id: str) -> Credentials:
        return username, password

    return login


def anonymous(_client_id: str) -> Credentials:
    """`Target.login` for a broker that lets anyone in."""
    return None, None


class ScenarioFailed(Exception):
    """The broker did something the scenario does not allow; the message says what."""


# -- a raw MQTT 3.1.1 client ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False


@dataclass(frozen=True, slots=True)
class Message:
    """A PUBLISH the client received."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    at: float  # time.monotonic() when it arrived


def connect_packet(
    client_id: str,
    credentials: Credentials,
    *,
    clean: bool = True,
    keepalive: int = 60,
    will: Will | None = None,
    protocol: str = "MQTT",
    level: int = 4,
) -> bytes:
    username, password = credentials
    return mqtt_wire.connect_packet(
        client_id,
        username,
        password,
        keepalive,
        None if will is None else (will.topic, will.payload),
        clean=clean,
        will_qos=0 if will is None else will.qos,
        will_retain=False if will is None else will.retain,
        protocol=protocol,
        level=level,
    )


def publish_packet(
    topic: str, payload: bytes, qos: int, packet_id: int, *, retain: bool = False
) -> bytes:
    body = encode_string(topic) + (struct.pack("!H", packet_id) if qos else b"")
    return packet(PUBLISH << 4 | qos << 1 | int(retain), body + payload)


def ack_packet(packet_type: int, packet_id: int) -> bytes:
    return packet(
        packet_type << 4 | (2 if packet_type == PUBREL else 0), struct.pack("!H", packet_id)
    )


class RawClient:
    """One MQTT 3.1.1 connection; a reader task parses what the broker sends.

    Received PUBLISHes are appended to `messages`. With `auto_ack` (the default) they are
    acknowledged at once (PUBACK, or PUBREC and later PUBCOMP); without it, no ack is sent.
    Every wait is bounded: a missing answer raises ScenarioFailed.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self.auto_ack = True
        self.messages: list[Message] = []
        self.session_present: bool | None = None
        self.closed = asyncio.Event()  # the broker closed the connection (or we did)
        self._arrived = asyncio.Event()
        self._connack: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._waiters: dict[tuple[int, int], asyncio.Future[bytes]] = {}
        self._packet_ids = itertools.cycle(range(1, 65536))
        self._marker_topic = f"{MARKER_ROOT}/{next(_MARKER_IDS)}"
        self._marker_subscribed = False
        self._markers: dict[bytes, asyncio.Future[None]] = {}
        self._task = asyncio.create_task(self._read_loop())

    @classmethod
    async def open(cls, target: Target) -> RawClient:
        async with asyncio.timeout(WAIT_S):
            reader, writer = await asyncio.open_connection(target.host, target.port)
        return cls(reader, writer)

    # -- sending --

    def send(self, data: bytes) -> None:
        if self.closed.is_set() or self._writer.is_closing():
            raise ScenarioFailed("the broker closed the connection")
        self._writer.write(data)

    async def connect(
        self,
        client_id: str,
        credentials: Credentials,
        *,
        clean: bool = True,
        keepalive: int = 60,
        will: Will | None = None,
        protocol: str = "MQTT",
    ) -> int | None:
        """Send CONNECT; the CONNACK return code, or None if the broker closed without one."""
        self.send(
            connect_packet(
                client_id,
                credentials,
                clean=clean,
                keepalive=keepalive,
                will=will,
                protocol=protocol,
            )
        )
        return await self.connack()

    async def connack(self) -> int | None:
        """The CONNACK return code, or None if the broker closed the connection first."""
        try:
            async with asyncio.timeout(WAIT_S):
                return await asyncio.shield(self._connack)
        except TimeoutError:
            raise ScenarioFailed(f"no CONNACK within {WAIT_S}s") from None

    async def subscribe(self, filters: list[tuple[str, int]]) -> list[int]:
        """SUBSCRIBE in one packet; the SUBACK return codes."""
        packet_id = next(self._packet_ids)
        body = struct.pack("!H", packet_id)
        body += b"".join(
            encode_string(topic_filter) + bytes([qos]) for topic_filter, qos in filters
        )
        suback = await self._request(packet(SUBSCRIBE << 4 | 2, body), SUBACK, packet_id)
        return list(suback[2:])

    async def publish(self, topic: str, payload: bytes, qos: int, *, retain: bool = False) -> None:
        """PUBLISH and finish its flow (PUBACK, or PUBREC/PUBREL/PUBCOMP)."""
        if qos == 0:
            self.send(publish_packet(topic, payload, 0, 0, retain=retain))
            await self._writer.drain()
            return
        packet_id = next(self._packet_ids)
        data = publish_packet(topic, payload, qos, packet_id, retain=retain)
        if qos == 1:
            await self._request(data, PUBACK, packet_id)
            return
        await self._request(data, PUBREC, packet_id)
        await self._request(ack_packet(PUBREL, packet_id), PUBCOMP, packet_id)

    async def disconnect(self) -> None:
        """Send DISCONNECT and close the socket (a normal disconnect: no will)."""
        with contextlib.suppress(ScenarioFailed, ConnectionError):
            self.send(packet(DISCONNECT << 4, b""))
            await self._writer.drain()
        await self.close()

    async def close(self) -> None:
        """Close the socket without DISCONNECT (for the broker: an abnormal disconnect)."""
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError, TimeoutError):
            async with asyncio.timeout(WAIT_S):
                await self._writer.wait_closed()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.closed.set()

    async def _request(self, data: bytes, answer_type: int, packet_id: int) -> bytes:
        key = (answer_type, packet_id)
        waiter: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiters[key] = waiter
        try:
            self.send(data)
            async with asyncio.timeout(WAIT_S):
                return await waiter
        except TimeoutError:
            raise ScenarioFailed(
                f"no answer of type {answer_type} to packet id {packet_id} within {WAIT_S}s"
            ) from None
        finally:
            self._waiters.pop(key, None)

    # -- receiving --

    async def wait_messages(self, count: int, within: float = WAIT_S) -> list[Message]:
        """Wait until `count` messages arrived (or `within` passed), then `settle` (so that any
        extra message the broker already had for this client has arrived too)."""
        deadline = time.monotonic() + within
        while len(self.messages) < count and (left := deadline - time.monotonic()) > 0:
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._arrived.wait()
        await self.settle()
        return list(self.messages)

    async def settle(self) -> None:
        """Publish a marker (QoS 0) to this client's own marker topic and wait for it.

        Once it is back, the broker has processed what this client sent before it, and sent
        what it had for this client before it [MQTT-4.6.0-6]. Markers are not kept in
        `messages`. The subscription is QoS 0, so nothing of it is queued or redelivered.
        """
        if not self._marker_subscribed:
            if await self.subscribe([(self._marker_topic, 0)]) != [0]:
                raise ScenarioFailed(f"SUBSCRIBE {self._marker_topic} (marker) refused")
            self._marker_subscribed = True
        payload = b"marker %d" % next(_MARKER_IDS)
        arrived: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._markers[payload] = arrived
        try:
            await self.publish(self._marker_topic, payload, 0)
            async with asyncio.timeout(WAIT_S):
                await arrived
        except TimeoutError:
            raise ScenarioFailed(f"own marker message not back within {WAIT_S}s") from None
        finally:
            del self._markers[payload]

    async def wait_closed(self, within: float = WAIT_S) -> bool:
        """True once the broker has closed the connection."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await self.closed.wait()
        return self.closed.is_set()

    async def _read_packet(self) -> tuple[int, int, bytes]:
        first = (await self._reader.readexactly(1))[0]
        length, multiplier = 0, 1
        for _ in range(4):
            byte = (await self._reader.readexactly(1))[0]
            length += (byte & 0x7F) * multiplier
            multiplier *= 128
            if not byte & 0x80:
                break
        return first >> 4, first & 0x0F, await self._reader.readexactly(length)

    async def _read_loop(self) -> None:
        try:
            while True:
                packet_type, flags, body = await self._read_packet()
                self._handle(packet_type, flags, body)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass  # closed by the broker
        except (struct.error, IndexError):
            pass  # a malformed packet from the broker: treated as a closed connection
        finally:
            self.closed.set()
            if not self._connack.done():
                self._connack.set_result(None)
            for waiter in self._waiters.values():
                if not waiter.done():
                    waiter.set_exception(ScenarioFailed("the broker closed the connection"))
                    waiter.exception()  # retrieved: the requester may have gone

    def _handle(self, packet_type: int, flags: int, body: bytes) -> None:
        if packet_type == CONNACK:
            if not self._connack.done() and len(body) >= 2:
                self.session_present = bool(body[0] & 1)
                self._connack.set_result(body[1])
        elif packet_type == PUBLISH:
            self._received(flags, body)
        elif packet_type == PUBREL:
            if self.auto_ack:
                self._reply(ack_packet(PUBCOMP, _packet_id(body)))
        elif len(body) >= 2:
            waiter = self._waiters.get((packet_type, _packet_id(body)))
            if waiter is not None and not waiter.done():
                waiter.set_result(body)

    def _received(self, flags: int, body: bytes) -> None:
        qos = (flags >> 1) & 3
        (topic_length,) = struct.unpack("!H", body[:2])
        topic = body[2 : 2 + topic_length].decode(errors="replace")
        start = 2 + topic_length
        packet_id = 0
        if qos:
            packet_id = _packet_id(body[start:])
            start += 2
        retain, dup = bool(flags & 1), bool(flags & 8)
        if topic == self._marker_topic:
            marker = self._markers.get(body[start:])
            if marker is not None and not marker.done():
                marker.set_result(None)
            return
        self.messages.append(Message(topic, body[start:], qos, retain, dup, time.monotonic()))
        self._arrived.set()
        if self.auto_ack and qos == 1:
            self._reply(ack_packet(PUBACK, packet_id))
        elif self.auto_ack and qos == 2:
            self._reply(ack_packet(PUBREC, packet_id))

    def _reply(self, data: bytes) -> None:
        """An ack from the reader task: dropped if the connection is already closing."""
        if not self._writer.is_closing():
            self._writer.write(data)


def _packet_id(body: bytes) -> int:
    return int(struct.unpack("!H", body[:2])[0])


@dataclass
class Clients:
    """Opens clients for one scenario and closes every one of them at the end."""

    target: Target
    opened: list[RawClient] = field(default_factory=list)

    async def open(self) -> RawClient:
        client = await RawClient.open(self.target)
        self.opened.append(client)
        return client

    async def connect(
        self,
        client_id: str,
        *,
        clean: bool = True,
        keepalive: int = 60,
        will: Will | None = None,
    ) -> RawClient:
        """A connected client (CONNACK 0) with the target's credentials for `client_id`."""
        client = await self.open()
        code = await client.connect(
            client_id, self.target.login(client_id), clean=clean, keepalive=keepalive, will=will
        )
        if code != CONNACK_ACCEPTED:
            raise ScenarioFailed(f"CONNECT of {client_id!r} refused: {_connack_text(code)}")
        return client

    async def close_all(self) -> None:
        await asyncio.gather(*(client.close() for client in self.opened))


@contextlib.asynccontextmanager
async def clients(target: Target) -> AsyncIterator[Clients]:
    opened = Clients(target)
    try:
        yield opened
    finally:
        await opened.close_all()


def _connack_text(code: int | None) -> str:
    return "connection closed without CONNACK" if code is None else f"CONNACK {code}"


def _summary(messages: list[Message]) -> str:
    return ", ".join(f"{m.topic} q{m.qos}{' r' if m.retain else ''}" for m in messages) or "none"


def _published_qos(message: Message) -> int | None:
    """The QoS a message was published at, from the scenarios' "qos N" payloads."""
    if message.payload.startswith(b"qos ") and message.payload[4:] in (b"0", b"1", b"2"):
        return int(message.payload[4:])
    return None


def _qos_seen(messages: list[Message]) -> str:
    """How each "qos N" message was delivered, and a note when the broker raised its QoS.

    MQTT 3.1.1 section 3.8.4: a message goes out at the minimum of its published QoS and the
    subscription's granted QoS. The Paho suite does not check this; the detail reports it.
    """
    pairs = sorted((q, m.qos) for m in messages if (q := _published_qos(m)) is not None)
    seen = ", ".join(f"{published}->{delivered}" for published, delivered in pairs)
    raised = [f"{p}->{d}" for p, d in pairs if d > p]
    note = f"; NOTE: QoS raised above the published QoS ({', '.join(raised)})" if raised else ""
    return f"published->delivered QoS {seen or 'none'}{note}"


# -- the scenarios ---------------------------------------------------------------------------------

Body = Callable[[Target], Awaitable[str]]
Scenario = Callable[[Target], Awaitable[Result]]
SCENARIOS: dict[str, Scenario] = {}


def scenario(name: str) -> Callable[[Body], Scenario]:
    """Register a scenario body: it returns what it saw, or raises ScenarioFailed.

    The registered scenario resets the broker state first, bounds the whole run, and turns
    any exception into a failed `Result`.
    """

    def register(body: Body) -> Scenario:
        async def run(target: Target) -> Result:
            started = time.monotonic()
            try:
                async with asyncio.timeout(SCENARIO_LIMIT_S):
                    await reset(target)
                    detail = await body(target)
                passed = True
            except ScenarioFailed as exc:
                passed, detail = False, str(exc)
            except TimeoutError:
                passed, detail = False, f"timed out (scenario limit {SCENARIO_LIMIT_S}s)"
            except (ConnectionError, OSError, asyncio.IncompleteReadError) as exc:
                passed, detail = False, f"connection error: {exc!r}"
            return Result(name, passed, detail, round(time.monotonic() - started, 2))

        run.__name__ = run.__qualname__ = body.__name__
        run.__doc__ = body.__doc__
        SCENARIOS[name] = run
        return run

    return register


async def reset(target: Target) -> None:
    """Forget the sessions of the suite's client ids and the retained messages on its topics."""
    async with clients(target) as opened:
        for client_id in (CLIENT_A, CLIENT_B):
            client = await opened.connect(client_id, clean=True)
            await client.disconnect()
        client = await opened.connect(CLIENT_A, clean=True)
        for topic in TOPICS:
            await client.publish(topic, b"", 1, retain=True)
        await client.disconnect()
        client = await opened.connect(CLIENT_A, clean=True)  # no session left behind
        await client.disconnect()


@scenario("basic")
async def basic(target: Target) -> str:
    """Connect, disconnect, reconnect; 3 messages at QoS 0/1/2; a second CONNECT and a bad
    protocol name each end the connection."""
    async with clients(target) as opened:
        client = await opened.connect(CLIENT_A)
        await client.disconnect()
        client = await opened.connect(CLIENT_A)
        granted = await client.subscribe([("TopicA", 2)])
        if granted != [2]:
            raise ScenarioFailed(f"SUBSCRIBE TopicA at QoS 2 granted {granted}")
        for qos in (0, 1, 2):
            await client.publish("TopicA", f"qos {qos}".encode(), qos)
        received = await client.wait_messages(3)
        if len(received) != 3:
            raise ScenarioFailed(f"{len(received)} messages instead of 3: {_summary(received)}")
        await client.disconnect()

        client = await opened.connect(CLIENT_A)
        client.send(connect_packet(CLIENT_A, target.login(CLIENT_A)))
        if not await client.wait_closed():
            raise ScenarioFailed(
                f"a second CONNECT on one connection left it open for {WAIT_S}s [MQTT-3.1.0-2]"
            )

        client = await opened.open()
        code = await client.connect(CLIENT_A, target.login(CLIENT_A), protocol="hj")
        if code == CONNACK_ACCEPTED:
            raise ScenarioFailed('CONNECT with protocol name "hj" accepted (CONNACK 0)')
        closed = await client.wait_closed()
        if not closed:
            raise ScenarioFailed(f'protocol name "hj": {_connack_text(code)}, connection left open')
    return (
        f"3 messages received ({_qos_seen(received)}); second CONNECT closed the connection; "
        f'protocol name "hj": {_connack_text(code)}, closed'
    )


@scenario("retained_messages")
async def retained_messages(target: Target) -> str:
    """3 retained messages (QoS 0/1/2) reach a later "+/+" subscription; empty ones clear them."""
    retained = (("TopicA/B", 0), ("Topic/C", 1), ("TopicA/C", 2))
    async with clients(target) as opened:
        client = await opened.connect(CLIENT_A)
        for topic, qos in retained:
            await client.publish(topic, f"qos {qos}".encode(), qos, retain=True)
        await client.settle()  # the QoS 0 one has no ack to wait for: processed before this
        await client.subscribe([("+/+", 2)])
        received = await client.wait_messages(3)
        if len(received) != 3:
            raise ScenarioFailed(
                f"{len(received)} retained messages instead of 3: {_summary(received)}"
            )
        flags = "all with RETAIN=1" if all(m.retain for m in received) else _summary(received)
        await client.disconnect()

        client = await opened.connect(CLIENT_A)
        for topic, qos in retained:
            await client.publish(topic, b"", qos, retain=True)
        await client.settle()
        await client.subscribe([("+/+", 2)])
        left = await client.wait_messages(0)
        if left:
            raise ScenarioFailed(f"empty retained messages did not clear: {_summary(left)}")
        await client.disconnect()
    return f"3 retained messages ({flags}); 0 after clearing"


@scenario("offline_message_queueing")
async def offline_message_queueing(target: Target) -> str:
    """A persistent session gets what was published while it was offline (QoS 0 optional)."""
    async with clients(target) as opened:
        client = await opened.connect(CLIENT_A, clean=False)
        await client.subscribe([("+/+", 2)])
        await client.disconnect()

        publisher = await opened.connect(CLIENT_B)
        for qos, topic in enumerate(("TopicA/B", "Topic/C", "TopicA/C")):
            await publisher.publish(topic, f"qos {qos}".encode(), qos)
        await publisher.settle()  # its messages are broadcast (queued for A) before the marker
        await publisher.disconnect()

        client = await opened.connect(CLIENT_A, clean=False)
        received = await client.wait_messages(3)
        await client.disconnect()
    if len(received) not in (2, 3):
        raise ScenarioFailed(f"{len(received)} queued messages, not 2 or 3: {_summary(received)}")
    queued_qos0 = "queued" if any(_published_qos(m) == 0 for m in received) else "not queued"
    return (
        f"{len(received)} messages after reconnecting (the QoS 0 one {queued_qos0}; "
        f"{_qos_seen(received)}; session present={client.session_present})"
    )


@scenario("will_message")
async def will_message(target: Target) -> str:
    """A client's socket closes without DISCONNECT: its will is published once."""
    will = Will("Topic/C", b"client not disconnected")
    async with clients(target) as opened:
        client = await opened.connect(CLIENT_A, keepalive=2, will=will)
        subscriber = await opened.connect(CLIENT_B)
        await subscriber.subscribe([("Topic/C", 2)])
        await client.close()
        received = await subscriber.wait_messages(1, within=5.0)
        await subscriber.disconnect()
    wills = [m for m in received if m.topic == will.topic and m.payload == will.payload]
    if len(wills) != 1 or len(received) != 1:
        raise ScenarioFailed(f"{len(wills)} will messages (received: {_summary(received)})")
    return f"will received once (will QoS 0, subscription QoS 2, delivered QoS {wills[0].qos})"


@scenario("overlapping_subscriptions")
async def overlapping_subscriptions(target: Target) -> str:
    """ "TopicA/#" at QoS 2 and "TopicA/+" at QoS 1: one message at QoS 2, or one per filter."""
    async with clients(target) as opened:
        client = await opened.connect(CLIENT_A)
        granted = await client.subscribe([("TopicA/#", 2), ("TopicA/+", 1)])
        if granted != [2, 1]:
            raise ScenarioFailed(f"SUBSCRIBE granted {granted}, not [2, 1]")
        await client.publish("TopicA/C", b"overlapping topic filters", 2)
        received = await client.wait_messages(1)  # and a second one, if it comes, by the marker
        await client.disconnect()
    qos = sorted(m.qos for m in received)
    if qos not in ([2], [1, 2]):
        raise ScenarioFailed(f"received {_summary(received)}; expected 1 at QoS 2 or QoS 1 + 2")
    return f"{len(received)} message(s) at QoS {qos}"


@scenario("keepalive")
async def keepalive(target: Target) -> str:
    """A client silent past its keep-alive is disconnected and its will fires once."""
    will = Will("/TopicA", b"keepalive expiry")
    async with clients(target) as opened:
        silent = await opened.connect(CLIENT_A, keepalive=5, will=will)
        started = time.monotonic()
        subscriber = await opened.connect(CLIENT_B, keepalive=0)
        await subscriber.subscribe([("/TopicA", 2)])
        received = await subscriber.wait_messages(1, within=15.0)
        closed = silent.closed.is_set()
        await subscriber.disconnect()
    wills = [m for m in received if m.topic == will.topic and m.payload == will.payload]
    if len(wills) != 1 or len(received) != 1:
        raise ScenarioFailed(
            f"{len(wills)} will messages within 15s (received: {_summary(received)})"
        )
    elapsed = wills[0].at - started
    return f"will {elapsed:.1f}s after the silent CONNECT (keep-alive 5s); closed={closed}"


@scenario("redelivery_on_reconnect")
async def redelivery_on_reconnect(target: Target) -> str:
    """QoS 1/2 messages left unacknowledged are sent again when the session reconnects."""
    async with clients(target) as opened:
        subscriber = await opened.connect(CLIENT_B, clean=False)
        await subscriber.subscribe([("TopicA/#", 2)])
        subscriber.auto_ack = False
        publisher = await opened.connect(CLIENT_A)
        await publisher.publish("TopicA/B", b"qos 1", 1)
        await publisher.publish("TopicA/C", b"qos 2", 2)
        first = await subscriber.wait_messages(2)
        await subscriber.disconnect()
        await publisher.disconnect()

        subscriber = await opened.connect(CLIENT_B, clean=False)
        received = await subscriber.wait_messages(2)
        await subscriber.disconnect()
    topics = sorted(m.topic for m in received)
    if topics != ["TopicA/B", "TopicA/C"]:
        raise ScenarioFailed(
            f"after reconnecting received {_summary(received)}; expected TopicA/B and TopicA/C "
            f"(before: {_summary(first)}, not acknowledged)"
        )
    dup = "with DUP=1" if all(m.dup for m in received) else "DUP " + str([m.dup for m in received])
    return (
        f"both messages sent again ({dup}); {len(first)} unacknowledged before ({_qos_seen(first)})"
    )


@scenario("zero_length_clientid")
async def zero_length_clientid(target: Target) -> str:
    """An empty client id is refused with a persistent session, accepted with a clean one."""
    async with clients(target) as opened:
        client = await opened.open()
        code = await client.connect("", target.login(""), clean=False)
        if code not in (CONNACK_IDENTIFIER_REJECTED, None):
            raise ScenarioFailed(
                f"empty client id, clean session 0: {_connack_text(code)}, expected CONNACK 2 "
                "[MQTT-3.1.3-8]"
            )
        refused = _connack_text(code)
        client = await opened.open()
        code = await client.connect("", target.login(""), clean=True)
        if code != CONNACK_ACCEPTED:
            raise ScenarioFailed(f"empty client id, clean session 1: {_connack_text(code)}")
        await client.disconnect()
    return f"clean session 0: {refused}; clean session 1: accepted"


@scenario("subscribe_failure")
async def subscribe_failure(target: Target) -> str:
    """A subscription the broker does not allow gets SUBACK return code 0x80."""
    restricted = target.restricted
    async with clients(target) as opened:
        if restricted is None:
            client = await opened.connect(CLIENT_A)
            topic_filter, who = NOSUBSCRIBE, "superuser"
        else:
            client = await opened.open()
            credentials = (restricted.username, restricted.password)
            code = await client.connect(restricted.client_id, credentials)
            if code != CONNACK_ACCEPTED:
                raise ScenarioFailed(f"restricted client refused: {_connack_text(code)}")
            topic_filter, who = restricted.topic_filter, f"restricted client {restricted.client_id}"
        granted = await client.subscribe([(topic_filter, 2)])
        await client.disconnect()
    if granted != [SUBACK_FAILURE]:
        raise ScenarioFailed(f"{who}: SUBSCRIBE {topic_filter!r} granted {granted}, not [0x80]")
    return f"{who}: SUBSCRIBE {topic_filter!r} refused with 0x80"


@scenario("dollar_topics")
async def dollar_topics(target: Target) -> str:
    """A "+/+" subscription does not match a topic that starts with "$" [MQTT-4.7.2-1]."""
    async with clients(target) as opened:
        subscriber = await opened.connect(CLIENT_B)
        await subscriber.subscribe([("+/+", 2)])
        publisher = await opened.connect(CLIENT_A)
        try:
            await publisher.publish(DOLLAR_TOPIC, b"", 1)
            published = "acknowledged"
        except ScenarioFailed as exc:  # refusing the publish is allowed too
            published = f"not acknowledged ({exc})"
        try:  # once the publisher's marker is back, the $ message has been handled
            await publisher.settle()
        except ScenarioFailed:  # ... or the broker closed the publisher because of it
            published += ", then the broker closed the publisher's connection"
        await subscriber.publish("TopicA/B", b"sentinel", 1)
        received = await subscriber.wait_messages(1)
        await subscriber.disconnect()
    if any(m.topic.startswith("$") for m in received):
        raise ScenarioFailed(f"+/+ matched a $ topic: {_summary(received)}")
    if [m.topic for m in received] != ["TopicA/B"]:
        raise ScenarioFailed(f"expected only the sentinel on TopicA/B: {_summary(received)}")
    return f"PUBLISH {DOLLAR_TOPIC} {published}; not delivered to +/+"


async def run_all(target: Target, names: list[str] | None = None) -> list[Result]:
    """Run the scenarios (all of them, in the suite's order, by default) one after another."""
    return [await SCENARIOS[name](target) for name in names or list(SCENARIOS)]
