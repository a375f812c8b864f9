"""Subscriptions changing while messages flow (issue 13): subscribe, unsubscribe, disconnect,
resume a persistent session, revoke; nobody gets a message twice or one it may not receive.

The broker is a real `HardenedBroker` on port 0 with the test ACL (tests/broker/acl_plugins:
`alice` and `carol` under `a/`, `bob` under `b/`, `root` anything) or the whole platform (for
revocation through the store). `FlowClient` is a hand-built MQTT 3.1.1 client whose reader runs
in the background, so that acks and messages may interleave; it acknowledges QoS 1 at once and
records every PUBLISH with its DUP flag.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import struct
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest

from iotbiz.broker.hardened import HardenedBroker
from iotbiz.names import DeviceName
from iotbiz.platform import Platform
from tests.broker import acl_plugins
from tests.broker.acl_plugins import PASSWORDS
from tests.broker.test_hardened import TEST_LIMITS, until
from tests.mqtt_wire import connect_packet, encode_string, packet, publish_packet
from tests.processes import run_cli

CONNACK, PUBLISH, PUBACK, SUBACK, UNSUBACK = 2, 3, 4, 9, 11
WAIT = 10.0  # the machine may be busy (a bound, not a pause)


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    qos: int
    dup: bool


@dataclass
class FlowClient:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    messages: list[Received] = field(default_factory=list)
    _acks: dict[tuple[int, int], asyncio.Future[bytes]] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _connack: asyncio.Future[bytes] | None = None
    _task: asyncio.Task[None] | None = None

    @classmethod
    async def connect(
        cls,
        port: int,
        username: str,
        password: str | None = None,
        *,
        clean: bool = True,
    ) -> tuple[FlowClient, bool]:
        """Connect (must be accepted); the client and CONNACK's session-present flag."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer)
        client._connack = asyncio.get_running_loop().create_future()
        client._task = asyncio.create_task(client._read())
        password = PASSWORDS[username] if password is None else password
        writer.write(connect_packet(username, username, password, 60, clean=clean))
        async with asyncio.timeout(WAIT):
            connack = await client._connack
        assert connack[1] == 0, f"CONNACK {connack[1]}"
        return client, bool(connack[0] & 1)

    async def _read(self) -> None:
        try:
            while True:
                first = (await self.reader.readexactly(1))[0]
                length, multiplier = 0, 1
                while True:
                    byte = (await self.reader.readexactly(1))[0]
                    length += (byte & 0x7F) * multiplier
                    multiplier *= 128
                    if not byte & 0x80:
                        break
                body = await self.reader.readexactly(length)
                self._dispatch(first >> 4, first & 0x0F, body)
        except (asyncio.IncompleteReadError, ConnectionError):
            return

    def _dispatch(self, kind: int, flags: int, body: bytes) -> None:
        if kind == CONNACK and self._connack is not None and not self._connack.done():
            self._connack.set_result(body)
        elif kind == PUBLISH:
            qos = (flags >> 1) & 3
            (size,) = struct.unpack("!H", body[:2])
            topic = body[2 : 2 + size].decode()
            start = 2 + size + (2 if qos else 0)
            self.messages.append(Received(topic, body[start:], qos, bool(flags & 0x08)))
            if qos == 1:
                self.writer.write(packet(0x40, body[2 + size : 4 + size]))
        elif kind in (PUBACK, SUBACK, UNSUBACK):
            waiter = self._acks.pop((kind, struct.unpack("!H", body[:2])[0]), None)
            if waiter is not None and not waiter.done():
                waiter.set_result(body[2:])

    async def _request(self, kind: int, first_byte: int, body: bytes) -> bytes:
        packet_id = next(self._ids)
        waiter = asyncio.get_running_loop().create_future()
        self._acks[(kind, packet_id)] = waiter
        self.writer.write(packet(first_byte, struct.pack("!H", packet_id) + body))
        async with asyncio.timeout(WAIT):
            return await waiter

    async def subscribe(self, *filters: tuple[str, int]) -> list[int]:
        body = b"".join(encode_string(f) + bytes([q]) for f, q in filters)
        return list(await self._request(SUBACK, 0x82, body))

    async def unsubscribe(self, *filters: str) -> None:
        await self._request(UNSUBACK, 0xA2, b"".join(encode_string(f) for f in filters))

    async def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        """QoS 1: returns once the broker acknowledged it (so it has the message)."""
        if qos == 0:
            self.writer.write(publish_packet(topic, payload))
            return
        packet_id = next(self._ids)
        waiter = asyncio.get_running_loop().create_future()
        self._acks[(PUBACK, packet_id)] = waiter
        self.writer.write(publish_packet(topic, payload, qos=1, packet_id=packet_id))
        async with asyncio.timeout(WAIT):
            await waiter

    async def close(self, *, clean: bool = True) -> None:
        """DISCONNECT (clean) or just drop the socket."""
        if clean and not self.writer.is_closing():
            self.writer.write(b"\xe0\x00")
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def payloads(self, prefix: str = "") -> list[bytes]:
        return [m.payload for m in self.messages if m.topic.startswith(prefix)]


@contextlib.asynccontextmanager
async def started_broker() -> AsyncIterator[HardenedBroker]:
    broker = HardenedBroker(acl_plugins.broker_config(), **TEST_LIMITS)
    await broker.start()
    try:
        yield broker
    finally:
        async with asyncio.timeout(10):
            await broker.shutdown()


def seq(payload: bytes) -> int:
    return int(payload.split(b":")[1])


async def test_churn_while_messages_flow_delivers_once_and_only_where_allowed() -> None:
    async with started_broker() as broker:
        port = broker.listener_port()
        root, _ = await FlowClient.connect(port, "root")
        alice, _ = await FlowClient.connect(port, "alice")
        bob, _ = await FlowClient.connect(port, "bob")
        # overlapping filters: one copy each, at the highest QoS [MQTT-3.3.5-1]
        assert await alice.subscribe(("a/#", 0), ("a/+/x", 1), ("+/s/x", 1)) == [0, 1, 1]
        # bob may subscribe to `+/s/x`, but may receive nothing under a/
        assert await bob.subscribe(("+/s/x", 1), ("#", 1)) == [1, 0x80]
        carol_id = "carol"
        sent: list[int] = []
        after_unsubscribe: set[int] = set()
        counter = itertools.count()

        async def publish_some(count: int) -> None:
            for _ in range(count):
                n = next(counter)
                await root.publish("a/s/x", b"a:%d" % n)
                await root.publish("b/s/x", b"b:%d" % n)
                sent.append(n)

        carol_received: list[Received] = []
        for round_number in range(6):
            carol, _ = await FlowClient.connect(port, carol_id)
            assert await carol.subscribe(("a/s/+", 1)) == [1]
            subscribed_from = len(sent)
            await publish_some(5)
            await until(lambda: len(carol.payloads()) >= 5, "carol's messages")  # noqa: B023
            await carol.unsubscribe("a/s/+")
            unsubscribed_at = len(sent)
            await publish_some(3)  # after UNSUBACK: none of these may reach carol
            after_unsubscribe.update(sent[unsubscribed_at:])
            # alice has them: their broadcast is over before carol subscribes again
            await until(
                lambda: b"a:%d" % sent[-1] in alice.payloads(),
                "the broadcast of the messages sent while carol was unsubscribed",
            )
            # subscribed again, then gone: abruptly on odd rounds, with DISCONNECT on even ones
            assert await carol.subscribe(("a/#", 1)) == [1]
            await publish_some(2)
            await until(
                lambda: len(carol.payloads()) >= 7,  # noqa: B023
                f"carol's messages after subscribing again (round {round_number})",
            )
            await carol.close(clean=round_number % 2 == 0)
            await until(lambda: not broker.is_connected(carol_id), "carol gone")
            carol_received += carol.messages
            got = [seq(p) for p in carol.payloads()]
            assert len(got) == len(set(got)), f"carol got a message twice: {got}"
            assert not set(got) & after_unsubscribe, "carol got a message after UNSUBACK"
            assert set(sent[subscribed_from : subscribed_from + 5]) <= set(got)
            # a clean session leaves nothing behind in the index (amqtt's session monitor
            # removes it within a second)
            await until(lambda: carol_id not in broker.sessions, "carol's session removed")
            assert all(
                all(s.client_id != carol_id for s, _ in subs)
                for subs in broker.subscriptions.values()
            )

        marker = next(counter)
        await root.publish("a/s/x", b"a:%d" % marker)
        await root.publish("b/s/x", b"b:%d" % marker)
        await until(lambda: b"a:%d" % marker in alice.payloads(), "alice's last message")
        await until(lambda: b"b:%d" % marker in bob.payloads(), "bob's last message")
        expected = [*sent, marker]
        assert [seq(p) for p in alice.payloads("a/")] == expected  # once each, in order
        assert {m.qos for m in alice.messages} == {1}
        assert not alice.payloads("b/"), "alice received bob's topic"
        assert [seq(p) for p in bob.payloads("b/")] == expected
        assert not bob.payloads("a/"), "bob received a message under a/"
        for client in (root, alice, bob):
            await client.close()


async def test_resumed_persistent_session_gets_each_message_once() -> None:
    """alice (persistent) drops off and comes back while root keeps publishing at QoS 1: every
    message arrives; a second copy only ever as a redelivery (DUP), the subscription is kept
    once and not duplicated by the resume."""
    async with started_broker() as broker:
        port = broker.listener_port()
        root, _ = await FlowClient.connect(port, "root")
        alice, present = await FlowClient.connect(port, "alice", clean=False)
        assert not present
        assert await alice.subscribe(("a/p/+", 1)) == [1]
        received: list[Received] = []
        sent = 0
        for _ in range(5):
            for _ in range(10):
                await root.publish(f"a/p/{sent % 3}", b"m:%d" % sent)
                sent += 1
            await alice.close(clean=False)  # vanish: the session stays
            await until(lambda: not broker.is_connected("alice"), "alice gone")
            for _ in range(10):  # queued for the offline session
                await root.publish(f"a/p/{sent % 3}", b"m:%d" % sent)
                sent += 1
            received += alice.messages
            alice, present = await FlowClient.connect(port, "alice", clean=False)
            assert present
            assert broker.subscriptions["a/p/+"] == [(broker.sessions["alice"][0], 1)]
        await until(lambda: len(alice.payloads()) >= 10, "the last queued messages")
        received += alice.messages
        counts = Counter(seq(m.payload) for m in received)
        assert sorted(counts) == list(range(sent)), "a message was lost"
        firsts: set[int] = set()
        for message in received:
            n = seq(message.payload)
            assert n not in firsts or message.dup, f"message {n} twice without DUP"
            firsts.add(n)
        await alice.close()
        await root.close()


async def test_retained_messages_for_a_wildcard_subscription_once_and_only_permitted() -> None:
    async with started_broker() as broker:
        port = broker.listener_port()
        root, _ = await FlowClient.connect(port, "root")
        for prefix in ("a", "b"):
            for n in range(20):
                root.writer.write(
                    packet(0x31, encode_string(f"{prefix}/r/{n}") + b"%s:%d" % (prefix.encode(), n))
                )
        await root.publish("a/r/last", b"a:99")  # QoS 1: everything before it was read
        await until(lambda: len(broker.retained_messages) == 40, "retained messages stored")
        alice, _ = await FlowClient.connect(port, "alice")
        assert await alice.subscribe(("+/r/+", 1), ("a/#", 1)) == [1, 1]
        await root.publish("a/r/marker", b"a:100", qos=1)
        await until(lambda: b"a:100" in alice.payloads(), "the marker")
        retained = sorted(seq(p) for p in alice.payloads() if p != b"a:100")
        # each new subscription gets the retained messages it matches [MQTT-3.3.1-6]: a/r/*
        # once for each filter, nothing under b/; the live marker once (both filters match it)
        assert retained == sorted([*range(20)] * 2)
        assert alice.payloads().count(b"a:100") == 1
        assert not alice.payloads("b/")
        await alice.close()
        await root.close()


async def test_revoked_device_gets_nothing_after_revocation_and_others_each_once(
    platform: Platform,
) -> None:
    """Commands flow to two devices; dev-1 is revoked through the store meanwhile."""
    assert platform.broker is not None
    broker = platform.broker.broker
    passwords: dict[str, str] = {}
    async with aiohttp.ClientSession(f"http://127.0.0.1:{platform.http_port}") as http:
        for device_id in ("dev-1", "dev-2"):
            body = {"customer_id": "abc123", "mac_address": device_id}
            async with http.post("/api/v1/register", json=body) as response:
                assert response.status == 201
                body["password"] = (await response.json())["password"]
            async with http.post("/api/v1/activate", json=body) as response:
                assert response.status == 200
            passwords[device_id] = body["password"]
    result = await asyncio.to_thread(
        run_cli, "account", "add", "ops", "--db", str(platform.store.path), "--json"
    )
    assert result.returncode == 0, result.stderr
    ops, _ = await FlowClient.connect(
        platform.mqtt_port, "ops", json.loads(result.stdout)["password"]
    )
    devices = {}
    for device_id, password in passwords.items():
        name = f"abc123/{device_id}"
        devices[device_id], _ = await FlowClient.connect(platform.mqtt_port, name, password)
        assert await devices[device_id].subscribe((f"devices/{name}/cmd", 1)) == [1]
        # nor may a device listen to the other's commands
        assert await devices[device_id].subscribe(("devices/abc123/+/cmd", 1)) == [0x80]

    n = 0

    async def command_both(count: int) -> None:
        nonlocal n
        for _ in range(count):
            for device_id in devices:
                await ops.publish(f"devices/abc123/{device_id}/cmd", b"c:%d" % n)
            n += 1

    await command_both(10)
    await platform.store.revoke_device(DeviceName("abc123", "dev-1"), actor="test")
    await command_both(10)
    await until(lambda: not broker.is_connected("abc123/dev-1"), "dev-1 disconnected", 5)
    revoked_at = n
    await command_both(10)
    assert "abc123/dev-1" not in broker.sessions  # its session was discarded
    assert all(
        all(s.client_id != "abc123/dev-1" for s, _ in subs)
        for subs in broker.subscriptions.values()
    )
    await until(lambda: len(devices["dev-2"].payloads()) == n, "dev-2's commands")
    assert [seq(p) for p in devices["dev-2"].payloads()] == list(range(n))
    got = [seq(p) for p in devices["dev-1"].payloads()]
    assert len(got) == len(set(got))
    assert all(c < revoked_at for c in got), "dev-1 got a command after it was revoked"
    assert set(range(10)) <= set(got)
    for client in (ops, *devices.values()):
        await client.close()


@pytest.mark.parametrize("count", [1, 50])
async def test_connect_and_disconnect_touch_only_the_clients_own_entries(count: int) -> None:
    """Many clients' subscriptions stay exactly as they were while one client comes and goes."""
    async with started_broker() as broker:
        port = broker.listener_port()
        root, _ = await FlowClient.connect(port, "root")
        assert await root.subscribe(*((f"x/{i}/+", 1) for i in range(count))) == [1] * count
        before = {
            f: [(s.client_id, q) for s, q in subs] for f, subs in broker.subscriptions.items()
        }
        for _ in range(3):
            alice, _ = await FlowClient.connect(port, "alice")
            assert await alice.subscribe(("a/1", 1), ("a/+", 0)) == [1, 0]
            assert broker._subscriptions_of(broker.sessions["alice"][0]) == [("a/1", 1), ("a/+", 0)]
            await alice.close()
            await until(lambda: "alice" not in broker.sessions, "alice's clean session removed")
            after = {
                f: [(s.client_id, q) for s, q in subs] for f, subs in broker.subscriptions.items()
            }
            assert after == before
        await root.close()


async def test_session_monitor_expires_only_disconnected_sessions_and_forgets_the_rest() -> None:
    """Clean sessions go within a second or two of their disconnect, persistent ones after
    `session_expiry_interval`, connected ones never; the monitor keeps no record of them."""
    config = {**acl_plugins.broker_config(), "session_expiry_interval": 1}
    broker = HardenedBroker(config, **TEST_LIMITS)
    await broker.start()
    try:
        port = broker.listener_port()
        bob, _ = await FlowClient.connect(port, "bob", clean=False)  # stays connected
        assert await bob.subscribe(("b/x", 1)) == [1]
        alice, _ = await FlowClient.connect(port, "alice", clean=False)
        assert await alice.subscribe(("a/x", 1)) == [1]
        carol, _ = await FlowClient.connect(port, "carol")
        await alice.close(clean=False)
        await carol.close()
        await until(lambda: "carol" not in broker.sessions, "the clean session removed", 5)
        await until(lambda: "alice" not in broker.sessions, "the persistent session expired", 6)
        assert "a/x" not in broker.subscriptions
        assert broker.is_connected("bob")  # connected for longer than the expiry
        assert broker.subscriptions["b/x"] == [(broker.sessions["bob"][0], 1)]
        assert broker._disconnected == {}
        # a client back before the monitor runs is not removed
        alice, _ = await FlowClient.connect(port, "alice", clean=False)
        assert await alice.subscribe(("a/x", 1)) == [1]
        await alice.close(clean=False)
        alice, present = await FlowClient.connect(port, "alice", clean=False)
        assert present
        assert "alice" not in broker._disconnected
        for client in (alice, bob):
            await client.close()
    finally:
        async with asyncio.timeout(10):
            await broker.shutdown()
