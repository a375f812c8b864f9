"""HardenedBroker against the amqtt 0.12.1 defects it fixes, with real clients on 127.0.0.1.

Each defect test runs against `HardenedBroker` (must pass) and against plain amqtt `Broker`
(marked xfail(strict=True): the test must fail there, which proves it detects the defect).
Clients are paho-mqtt 2.x where paho can express the case, and `RawClient` (hand-built MQTT
3.1.1 packets over asyncio streams) where it cannot: a subscriber that withholds acks, a client
that vanishes without DISCONNECT, a silent client, junk bytes.

Tests marked "(hygiene)" and "(semantics)" cover amqtt defects found beyond the numbered seven:
junk and half-open sockets, and messages lost when a client leaves right after publishing.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from amqtt.broker import Broker
from amqtt.session import Session
from paho.mqtt.enums import CallbackAPIVersion

from iotbiz.broker.hardened import HardenedBroker
from iotbiz.broker.sessions import LeanSession
from tests.broker import acl_plugins
from tests.broker.acl_plugins import PASSWORDS

# HardenedBroker limits for the tests: short, so every defect shows within seconds.
TEST_LIMITS: dict[str, Any] = {
    "ack_timeout": 1.0,
    "connect_timeout": 1.0,
    "write_timeout": 2.0,
    "takeover_timeout": 2.0,
    "max_packet_size": 64 * 1024,
}
AMQTT_ACK_TIMEOUT = 5.0  # hard-coded in amqtt 0.12.1's QoS 1/2 flows
WAIT = 3.0  # default bound for anything that should happen "now"

CONNACK_ACCEPTED = 0
CONNACK_NOT_AUTHORIZED = 5
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 12, 13, 14


def brokers(defect: int | str, what: str) -> list[Any]:
    """Parametrize over HardenedBroker (passes) and plain amqtt Broker (strict xfail)."""
    return [
        pytest.param(HardenedBroker, id="hardened"),
        pytest.param(
            Broker,
            id="amqtt",
            marks=pytest.mark.xfail(strict=True, reason=f"amqtt 0.12.1 defect {defect}: {what}"),
        ),
    ]


async def until(predicate: Callable[[], bool], what: str, within: float = WAIT) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.02)


async def wait_event(event: threading.Event, seconds: float = WAIT) -> bool:
    return await asyncio.to_thread(event.wait, seconds)


# --- raw MQTT 3.1.1 client --------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value % 128, value // 128
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(data: str | bytes) -> bytes:
    raw = data.encode() if isinstance(data, str) else data
    return struct.pack("!H", len(raw)) + raw


def _packet(packet_type: int, flags: int, body: bytes) -> bytes:
    return bytes([packet_type << 4 | flags]) + _varint(len(body)) + body


def connect_packet(
    username: str,
    password: str | None = None,
    *,
    client_id: str | None = None,
    clean: bool = True,
    keepalive: int = 60,
    will: tuple[str, bytes] | None = None,
) -> bytes:
    password = PASSWORDS[username] if password is None else password
    flags = 0xC0 | (0x02 if clean else 0)
    payload = _field(client_id if client_id is not None else username)
    if will is not None:
        flags |= 0x04
        payload += _field(will[0]) + _field(will[1])
    payload += _field(username) + _field(password)
    body = _field("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive) + payload
    return _packet(CONNECT, 0, body)


@dataclass
class Packet:
    type: int
    flags: int
    body: bytes

    @property
    def packet_id(self) -> int:
        """Packet id of an ack packet, or of a QoS>0 PUBLISH."""
        if self.type == PUBLISH:
            (topic_len,) = struct.unpack("!H", self.body[:2])
            return int(struct.unpack("!H", self.body[2 + topic_len : 4 + topic_len])[0])
        return int(struct.unpack("!H", self.body[:2])[0])

    @property
    def topic(self) -> str:
        (topic_len,) = struct.unpack("!H", self.body[:2])
        return self.body[2 : 2 + topic_len].decode()

    @property
    def qos(self) -> int:
        return (self.flags >> 1) & 3

    @property
    def dup(self) -> bool:
        return bool(self.flags & 0x08)

    @property
    def payload(self) -> bytes:
        (topic_len,) = struct.unpack("!H", self.body[:2])
        return self.body[2 + topic_len + (2 if self.qos else 0) :]


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def connect(
        self,
        username: str,
        password: str | None = None,
        *,
        client_id: str | None = None,
        clean: bool = True,
        keepalive: int = 60,
        will: tuple[str, bytes] | None = None,
    ) -> tuple[bool, int]:
        """Send CONNECT, return (session present, CONNACK return code)."""
        await self.send(
            connect_packet(
                username, password, client_id=client_id, clean=clean, keepalive=keepalive, will=will
            )
        )
        connack = await self.read_packet()
        assert connack.type == CONNACK, connack
        return bool(connack.body[0] & 1), connack.body[1]

    async def subscribe(self, packet_id: int, filters: list[tuple[str, int]]) -> list[int]:
        body = struct.pack("!H", packet_id) + b"".join(_field(f) + bytes([q]) for f, q in filters)
        await self.send(_packet(SUBSCRIBE, 2, body))
        suback = await self.read_packet()
        assert suback.type == SUBACK, suback
        assert suback.packet_id == packet_id
        return list(suback.body[2:])

    async def ack(self, packet_type: int, packet_id: int) -> None:
        await self.send(
            _packet(packet_type, 2 if packet_type == PUBREL else 0, struct.pack("!H", packet_id))
        )

    async def read_packet(self, within: float = WAIT) -> Packet:
        async with asyncio.timeout(within):
            first = (await self.reader.readexactly(1))[0]
            length, multiplier = 0, 1
            while True:
                byte = (await self.reader.readexactly(1))[0]
                length += (byte & 0x7F) * multiplier
                multiplier *= 128
                if not byte & 0x80:
                    break
            body = await self.reader.readexactly(length)
        return Packet(first >> 4, first & 0x0F, body)

    async def closed_by_peer(self, within: float = WAIT) -> bool:
        """True once the broker closed the connection (EOF/reset), False on timeout."""
        try:
            async with asyncio.timeout(within):
                while await self.reader.read(4096):
                    pass
        except TimeoutError:
            return False
        except ConnectionError:
            return True
        return True

    def close(self) -> None:
        """Vanish without DISCONNECT (an abnormal disconnect for the broker)."""
        self.writer.close()


# --- paho client ------------------------------------------------------------------------------


class Paho:
    """paho-mqtt 2.x client in its own network thread; waits are bounded and loop-friendly."""

    def __init__(
        self,
        port: int,
        username: str,
        *,
        clean_session: bool = True,
        keepalive: int = 60,
        will: tuple[str, bytes] | None = None,
    ) -> None:
        self.port = port
        self.keepalive = keepalive
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=username,
            clean_session=clean_session,
            protocol=mqtt.MQTTv311,
        )
        self.client.username_pw_set(username, PASSWORDS[username])
        # No quick automatic reconnect: a kicked client must stay kicked during a test.
        self.client.reconnect_delay_set(30, 60)
        if will is not None:
            self.client.will_set(will[0], will[1])
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.session_present: bool | None = None
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.subacks: queue.Queue[tuple[int, list[Any]]] = queue.Queue()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = lambda _c, _u, message: self.messages.put(message)
        self.client.on_subscribe = lambda _c, _u, mid, codes, _p: self.subacks.put((mid, codes))

    def _on_connect(self, _c: Any, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        if not reason.is_failure:
            self.session_present = bool(flags.session_present)
            self.connected.set()

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, _r: Any, _p: Any) -> None:
        self.disconnected.set()

    async def start(self) -> Paho:
        self.client.connect_async("127.0.0.1", self.port, self.keepalive)
        self.client.loop_start()
        assert await wait_event(self.connected), "paho client did not connect"
        return self

    async def stop(self) -> None:
        self.client.disconnect()
        await asyncio.to_thread(self.client.loop_stop)

    async def subscribe(self, topic: str, qos: int = 0) -> None:
        result, mid = self.client.subscribe(topic, qos)
        assert result == mqtt.MQTT_ERR_SUCCESS
        got_mid, codes = await asyncio.to_thread(self.subacks.get, True, WAIT)
        assert got_mid == mid
        assert not codes[0].is_failure, f"subscription to {topic} refused"

    async def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        await asyncio.to_thread(info.wait_for_publish, WAIT)

    async def next_message(self, within: float = WAIT) -> mqtt.MQTTMessage:
        return await asyncio.to_thread(self.messages.get, True, within)

    async def topics_before(self, sentinel: str, within: float = WAIT) -> list[str]:
        """Topics received before the first message on `sentinel` (which must arrive)."""
        topics: list[str] = []
        while (message := await self.next_message(within)).topic != sentinel:
            topics.append(message.topic)
        return topics


# --- harness ----------------------------------------------------------------------------------


class Harness:
    def __init__(self, broker: Any) -> None:
        self.broker = broker
        self.port: int = broker._servers["default"].instance.sockets[0].getsockname()[1]
        self._paho: list[Paho] = []
        self._raw: list[RawClient] = []

    async def paho(self, username: str, **options: Any) -> Paho:
        client = Paho(self.port, username, **options)
        self._paho.append(client)
        return await client.start()

    async def raw(self) -> RawClient:
        client = await RawClient.open(self.port)
        self._raw.append(client)
        return client

    def session(self, client_id: str) -> Any:
        return self.broker.sessions[client_id][0]

    def session_connected(self, client_id: str) -> bool:
        entry = self.broker.sessions.get(client_id)
        return entry is not None and entry[0].transitions.state == "connected"

    async def close(self) -> None:
        for raw in self._raw:
            raw.writer.close()
        await asyncio.gather(*(client.stop() for client in self._paho))


@contextlib.asynccontextmanager
async def harness(broker_cls: type[Any], **limits: Any) -> AsyncIterator[Harness]:
    options = {**TEST_LIMITS, **limits} if broker_cls is HardenedBroker else {}
    broker = broker_cls(acl_plugins.broker_config(), **options)
    await broker.start()
    test = Harness(broker)
    try:
        yield test
    finally:
        await test.close()
        async with asyncio.timeout(10):
            await broker.shutdown()


# --- defect 1 ---------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("attacker_clean", [True, False], ids=["clean", "persistent"])
@pytest.mark.parametrize(
    "broker_cls", brokers(1, "a CONNECT with a wrong password destroys the victim's session")
)
async def test_wrong_password_leaves_victim_session_alone(
    broker_cls: type[Any], attacker_clean: bool
) -> None:
    async with harness(broker_cls) as test:
        victim = await test.paho("alice", clean_session=False)
        await victim.subscribe("a/#", qos=1)
        root = await test.paho("root")

        attacker = await test.raw()
        _, code = await attacker.connect("alice", "wrong", clean=attacker_clean)
        assert code == CONNACK_NOT_AUTHORIZED
        assert await attacker.closed_by_peer()

        await root.publish("a/after", b"still subscribed")
        assert (await victim.next_message()).topic == "a/after"
        assert not victim.disconnected.is_set()
        assert test.session("alice").password == PASSWORDS["alice"]


@pytest.mark.asyncio
async def test_authenticated_takeover_replaces_connection_and_resumes_session() -> None:
    """[MQTT-3.1.4-2] The owner may take over: old connection closed, session resumed."""
    async with harness(HardenedBroker) as test:
        first = await test.paho("alice", clean_session=False)
        await first.subscribe("a/#", qos=1)
        second = await test.paho("alice", clean_session=False)
        assert await wait_event(first.disconnected)
        assert second.session_present is True
        root = await test.paho("root")
        await root.publish("a/x", b"to the new connection")
        assert (await second.next_message()).topic == "a/x"
        assert sorted(test.broker.connected_client_ids()) == ["alice", "root"]


# --- defect 2 ---------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "broker_cls", brokers(2, "CONNECT sends retained messages of other clients' subscriptions")
)
async def test_connect_sends_only_own_permitted_retained_messages(broker_cls: type[Any]) -> None:
    async with harness(broker_cls) as test:
        bob = await test.paho("bob")
        await bob.subscribe("b/#")
        root = await test.paho("root")
        await root.publish("b/secret", b"for bob only", retain=True)
        assert (await bob.next_message()).topic == "b/secret"

        # A new connection without subscriptions gets no retained message at all.
        alice = await test.paho("alice")
        await alice.subscribe("a/sentinel")
        await root.publish("a/sentinel", b"1")
        assert await alice.topics_before("a/sentinel") == []
        await alice.stop()

        # A resumed session gets the retained messages of its own subscriptions, per the ACL.
        alice = await test.paho("alice", clean_session=False)
        await alice.subscribe("+/status")
        await alice.stop()
        await root.publish("a/status", b"up", retain=True)
        await root.publish("b/status", b"up", retain=True)
        await until(
            lambda: {"a/status", "b/status"} <= set(test.broker.retained_messages),
            "retained messages stored",
        )
        alice = await test.paho("alice", clean_session=False)
        assert alice.session_present is True
        await alice.subscribe("a/sentinel")
        await root.publish("a/sentinel", b"2")
        assert await alice.topics_before("a/sentinel") == ["a/status"]


# --- defect 3 ---------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "broker_cls", brokers(3, "retained messages on SUBSCRIBE skip the RECEIVE ACL")
)
async def test_subscribe_sends_only_permitted_retained_messages(broker_cls: type[Any]) -> None:
    async with harness(broker_cls) as test:
        root = await test.paho("root")
        await root.publish("a/secret", b"alice may read", retain=True)
        await root.publish("b/secret", b"alice may not read", retain=True)
        await until(
            lambda: {"a/secret", "b/secret"} <= set(test.broker.retained_messages),
            "retained messages stored",
        )

        alice = await test.paho("alice")
        await alice.subscribe("+/secret")  # allowed: the RECEIVE check filters per message
        await alice.subscribe("a/sentinel")
        await root.publish("a/sentinel", b"")
        assert await alice.topics_before("a/sentinel") == ["a/secret"]


# --- defect 4 ---------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("broker_cls", brokers(4, "will messages skip the PUBLISH ACL"))
async def test_will_needs_publish_permission(broker_cls: type[Any]) -> None:
    async with harness(broker_cls) as test:
        root = await test.paho("root")
        await root.subscribe("#")

        denied = await test.raw()
        assert (await denied.connect("alice", will=("b/will", b"not alice's topic")))[1] == 0
        denied.close()
        await until(lambda: not test.session_connected("alice"), "first disconnect handled")

        allowed = await test.raw()
        assert (await allowed.connect("alice", will=("a/will", b"alice's topic")))[1] == 0
        allowed.close()

        # Wills are broadcast in disconnect order: "b/will" would have come first.
        assert await root.topics_before("a/will") == []


# --- defect 5 ---------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("broker_cls", brokers(5, "keep-alive is not enforced"))
async def test_silent_client_is_disconnected_after_one_and_a_half_keepalives(
    broker_cls: type[Any],
) -> None:
    async with harness(broker_cls) as test:
        root = await test.paho("root")
        await root.subscribe("a/#")
        chatty = await test.paho("bob", keepalive=1)  # paho sends PINGREQ: must stay

        silent = await test.raw()
        assert (await silent.connect("alice", keepalive=1, will=("a/gone", b"timeout")))[1] == 0
        started = time.monotonic()
        message = await root.next_message(within=4.0)
        elapsed = time.monotonic() - started
        assert message.topic == "a/gone"
        assert 1.0 <= elapsed <= 3.5
        assert await silent.closed_by_peer()
        assert not chatty.disconnected.is_set()


@pytest.mark.asyncio
async def test_keepalive_zero_means_no_timeout() -> None:
    """Two silent clients: keep-alive 1 is dropped after 1.5 s; by then keep-alive 0 would
    have been too if 0 meant any timeout at all, and it still answers PINGREQ."""
    async with harness(HardenedBroker) as test:
        client = await test.raw()
        assert (await client.connect("alice", keepalive=0))[1] == 0
        timed = await test.raw()
        assert (await timed.connect("bob", keepalive=1))[1] == 0
        assert await timed.closed_by_peer(within=4.0)
        assert test.session_connected("alice")
        await client.send(_packet(PINGREQ, 0, b""))
        assert (await client.read_packet()).type == PINGRESP


@pytest.mark.asyncio
@pytest.mark.parametrize("keepalive", [0, 60])
@pytest.mark.parametrize("ending", ["disconnect", "vanish"])
@pytest.mark.parametrize(
    "broker_cls",
    brokers(
        "(semantics)", "a client leaving right after publishing loses messages or stays connected"
    ),
)
async def test_messages_published_right_before_leaving_are_delivered(
    broker_cls: type[Any], ending: str, keepalive: int
) -> None:
    """CONNECT, 5 PUBLISHes, DISCONNECT (or nothing) in one write, then FIN: none lost."""
    acl_plugins.EVENTS.clear()
    async with harness(broker_cls) as test:
        root = await test.paho("root")
        await root.subscribe("a/#")
        peer = await test.raw()
        data = connect_packet("alice", keepalive=keepalive, will=("a/will", b"gone"))
        topics = [f"a/{index}" for index in range(5)]
        data += b"".join(_packet(PUBLISH, 0, _field(topic) + b"reading") for topic in topics)
        if ending == "disconnect":
            data += _packet(DISCONNECT, 0, b"")
        await peer.send(data)
        peer.close()

        await until(lambda: ("disconnected", "alice") in acl_plugins.EVENTS, "disconnect event")
        assert not test.session_connected("alice")
        await root.publish("a/sentinel", b"")
        expected = topics if ending == "disconnect" else [*topics, "a/will"]
        assert await root.topics_before("a/sentinel") == expected


# --- defect 6 ---------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "broker_cls", brokers(6, "QoS 1/2 messages are dropped 5 s after sending without an ack")
)
async def test_unacknowledged_messages_stay_in_flight(broker_cls: type[Any]) -> None:
    async with harness(broker_cls) as test:
        alice = await test.raw()
        assert (await alice.connect("alice", clean=False))[1] == 0
        assert await alice.subscribe(1, [("a/one", 1), ("a/two", 2)]) == [1, 2]
        root = await test.paho("root")
        await root.publish("a/one", b"m1", qos=1)
        await root.publish("a/two", b"m2", qos=2)
        first, second = await alice.read_packet(), await alice.read_packet()
        assert (first.type, first.qos, second.type, second.qos) == (PUBLISH, 1, PUBLISH, 2)

        # Past amqtt's fixed 5 s and HardenedBroker's ack_timeout (1 s in these tests).
        await asyncio.sleep(AMQTT_ACK_TIMEOUT + 0.5)
        inflight = test.session("alice").inflight_out
        assert set(inflight) == {first.packet_id, second.packet_id}

        # Late acks still complete both flows.
        await alice.ack(PUBACK, first.packet_id)
        await alice.ack(PUBREC, second.packet_id)
        pubrel = await alice.read_packet()
        assert (pubrel.type, pubrel.packet_id) == (PUBREL, second.packet_id)
        await alice.ack(PUBCOMP, second.packet_id)
        await until(lambda: not inflight, "in-flight messages completed")


# --- defect 7 ---------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "broker_cls", brokers(7, "unacknowledged QoS 1/2 messages are not re-sent on reconnect")
)
async def test_persistent_session_gets_unacknowledged_messages_again(
    broker_cls: type[Any],
) -> None:
    async with harness(broker_cls) as test:
        alice = await test.raw()
        assert (await alice.connect("alice", clean=False))[1] == 0
        granted = await alice.subscribe(1, [("a/one", 1), ("a/two", 2), ("a/three", 2)])
        assert granted == [1, 2, 2]
        root = await test.paho("root")

        await root.publish("a/one", b"m1", qos=1)
        m1 = await alice.read_packet()  # not acknowledged
        await root.publish("a/two", b"m2", qos=2)
        m2 = await alice.read_packet()  # not acknowledged
        await root.publish("a/three", b"m3", qos=2)
        m3 = await alice.read_packet()
        await alice.ack(PUBREC, m3.packet_id)
        assert (await alice.read_packet()).type == PUBREL  # no PUBCOMP follows
        alice.close()
        await until(lambda: not test.session_connected("alice"), "broker saw the disconnect")

        await root.publish("a/one", b"m4", qos=1)  # queued while alice is offline
        await until(lambda: test.session("alice").retained_messages.qsize() == 1, "m4 queued")

        alice = await test.raw()
        assert await alice.connect("alice", clean=False) == (True, CONNACK_ACCEPTED)
        again = [await alice.read_packet() for _ in range(4)]
        assert [(p.type, p.dup, p.packet_id) for p in again[:3]] == [
            (PUBLISH, True, m1.packet_id),
            (PUBLISH, True, m2.packet_id),
            (PUBREL, False, m3.packet_id),
        ]
        assert [again[0].payload, again[1].payload] == [b"m1", b"m2"]
        assert (again[3].type, again[3].dup, again[3].payload) == (PUBLISH, False, b"m4")

        await alice.ack(PUBACK, m1.packet_id)
        await alice.ack(PUBREC, m2.packet_id)
        assert (await alice.read_packet()).type == PUBREL
        await alice.ack(PUBCOMP, m2.packet_id)
        await alice.ack(PUBCOMP, m3.packet_id)
        await alice.ack(PUBACK, again[3].packet_id)
        await until(lambda: not test.session("alice").inflight_out, "all messages acknowledged")


# --- junk, oversized packets, half-open sockets -----------------------------------------------

JUNK = {
    "zeros": bytes(64),
    "http": b"GET / HTTP/1.1\r\nHost: broker\r\n\r\n",
    "noise": bytes((i * 167 + 13) % 256 for i in range(512)),
    "reserved-type": b"\xf0\x00" * 8,
    "bad-protocol": _packet(CONNECT, 0, _field("MQIsdp") + bytes([3, 2, 0, 60]) + _field("x")),
    "bad-length": b"\x10\xff\xff\xff\xff\x01",
}


async def _assert_still_serving(test: Harness) -> None:
    bob = await test.paho("bob")
    await bob.subscribe("b/echo")
    await bob.publish("b/echo", b"ping")
    assert (await bob.next_message()).payload == b"ping"
    await bob.stop()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "broker_cls", brokers("(hygiene)", "a CONNECT that fails to parse leaves the socket open")
)
async def test_junk_is_dropped_and_others_keep_working(broker_cls: type[Any]) -> None:
    async with harness(broker_cls) as test:
        bystander = await test.paho("root")
        await bystander.subscribe("#")
        for name, junk in JUNK.items():
            peer = await test.raw()
            with contextlib.suppress(ConnectionError):
                await peer.send(junk)
            assert await peer.closed_by_peer(), f"{name}: connection not closed"
        await _assert_still_serving(test)
        await bystander.publish("a/still", b"here")
        assert await bystander.topics_before("a/still") == ["b/echo"]
        assert not bystander.disconnected.is_set()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "broker_cls", brokers("(hygiene)", "no CONNECT timeout and no packet size limit")
)
async def test_half_open_and_oversized_connections_are_dropped(broker_cls: type[Any]) -> None:
    async with harness(broker_cls, connect_timeout=1.0) as test:
        # Many connections that never complete a CONNECT: dropped after connect_timeout.
        half_open = [await test.raw() for _ in range(20)]
        partial = await test.raw()
        await partial.send(_packet(CONNECT, 0, _field("MQTT") + bytes([4]))[:6])
        await _assert_still_serving(test)  # while they are open
        for peer in [*half_open, partial]:
            assert await peer.closed_by_peer(), "half-open connection not dropped"

        # An oversized packet is refused as soon as its length is known, before or after CONNECT.
        huge_connect = await test.raw()
        await huge_connect.send(b"\x10" + _varint(10_000_000) + b"\x00\x04MQTT")
        assert await huge_connect.closed_by_peer(within=0.5)
        alice = await test.raw()
        assert (await alice.connect("alice"))[1] == 0
        await alice.send(b"\x30" + _varint(10_000_000) + _field("a/big") + b"x" * 100)
        assert await alice.closed_by_peer(within=0.5)
        await _assert_still_serving(test)


# --- API for the platform: kick a client, presence events --------------------------------------


@pytest.mark.asyncio
async def test_disconnect_client_by_id_and_presence_events() -> None:
    acl_plugins.EVENTS.clear()
    async with harness(HardenedBroker) as test:
        root = await test.paho("root")
        await root.subscribe("a/#")
        alice = await test.paho("alice", will=("a/will", b"bye"))
        assert test.broker.is_connected("alice")

        started = time.monotonic()
        assert await test.broker.disconnect_client("alice", publish_will=False) is True
        assert await wait_event(alice.disconnected, 1.0)
        assert time.monotonic() - started < 1.0
        assert not test.broker.is_connected("alice")
        assert await test.broker.disconnect_client("alice") is False

        await root.publish("a/sentinel", b"")
        assert await root.topics_before("a/sentinel") == []  # no will
        await until(lambda: ("disconnected", "alice") in acl_plugins.EVENTS, "presence event")
        alice_events = [event for event, client in acl_plugins.EVENTS if client == "alice"]
        assert alice_events == ["connected", "disconnected"]


# --- semantics: delivery QoS --------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "broker_cls",
    brokers("(semantics)", "messages and wills go out at the subscription's QoS, not the lower"),
)
async def test_delivery_qos_is_the_lower_of_message_and_subscription(
    broker_cls: type[Any],
) -> None:
    """[MQTT-3.8.4-6]: a QoS 2 will reaches a QoS 0 subscriber at QoS 0; a QoS 0 message
    reaches a QoS 2 subscriber at QoS 0 and is not queued for it while it is offline."""
    async with harness(broker_cls) as test:
        watcher = await test.raw()
        assert (await watcher.connect("alice"))[1] == 0
        assert await watcher.subscribe(1, [("a/will", 0)]) == [0]
        dying = await test.raw()
        will_connect = connect_packet("root", will=("a/will", b"gone"))
        flags_at = 9  # type, length (one byte here), "MQTT" (6), level: then the flags
        will_connect = (
            will_connect[:flags_at]
            + bytes([will_connect[flags_at] | 0x10])  # will QoS 2
            + will_connect[flags_at + 1 :]
        )
        await dying.send(will_connect)
        assert (await dying.read_packet()).type == CONNACK
        dying.close()
        will = await watcher.read_packet()
        assert (will.type, will.topic, will.qos) == (PUBLISH, "a/will", 0)
        watcher.close()
        await until(lambda: not test.session_connected("alice"), "watcher gone")
        await until(lambda: not test.session_connected("root"), "dying client gone")

        alice = await test.raw()
        assert (await alice.connect("alice", clean=False))[1] == 0
        assert await alice.subscribe(1, [("a/#", 2)]) == [2]
        root = await test.paho("root")
        for qos in (0, 1, 2):
            await root.publish(f"a/q{qos}", b"m", qos=qos)
        delivered = {}
        for _ in range(3):
            packet = await alice.read_packet()
            delivered[packet.topic] = packet.qos
            if packet.qos == 1:
                await alice.ack(PUBACK, packet.packet_id)
            elif packet.qos == 2:
                await alice.ack(PUBREC, packet.packet_id)
                assert (await alice.read_packet()).type == PUBREL
                await alice.ack(PUBCOMP, packet.packet_id)
        assert delivered == {"a/q0": 0, "a/q1": 1, "a/q2": 2}

        alice.close()  # offline: a QoS 0 message is not kept for it, a QoS 1 one is
        await until(lambda: not test.session_connected("alice"), "alice offline")
        await root.publish("a/later0", b"m", qos=0)
        await root.publish("a/later1", b"m", qos=1)
        queued = test.session("alice").retained_messages
        # Broadcast in order: by the time "a/later1" is queued, "a/later0" was handled.
        await until(lambda: queued.qsize() >= 1, "a message queued for alice")
        waiting = queued.items() if hasattr(queued, "items") else list(queued._queue)
        assert [(m.topic, m.qos) for m in waiting] == [("a/later1", 1)]


# --- plain amqtt stays plain --------------------------------------------------------------------


@pytest.mark.asyncio
async def test_plain_amqtt_after_a_hardened_broker_builds_its_own_sessions() -> None:
    """HardenedBroker's lean sessions are its own: a plain amqtt `Broker` started later in the
    same process (the baselines above) still gets amqtt's `Session` with its state machine."""
    async with harness(HardenedBroker) as test:
        await test.paho("alice")
        assert type(test.session("alice")) is LeanSession
    async with harness(Broker) as test:
        await test.paho("bob")
        assert type(test.session("bob")) is Session
