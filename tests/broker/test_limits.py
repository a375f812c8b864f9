"""What one device can make the embedded broker consume (issue 8, fault 7), through real parts.

The platform runs in-process (real broker on port 0, real registrar, SQLite in tmp_path); devices
are raw sockets (tests/mqtt_wire) where they must misbehave, paho where they are ordinary.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from iotbiz.broker.authority import Authority
from iotbiz.broker.hardened import HardenedBroker
from iotbiz.names import DeviceName
from iotbiz.platform import Platform
from iotbiz.settings import Settings
from tests.broker import acl_plugins
from tests.broker.acl_plugins import PASSWORDS
from tests.mqtt_device import PahoDevice
from tests.mqtt_wire import connect_packet, publish_packet, subscribe_packet
from tests.processes import run_cli

CONNACK_SERVER_UNAVAILABLE = 3
CONNACK_NOT_AUTHORIZED = 5
DEV = "abc123/dev-1"
PREFIX = "devices/abc123/dev-1/"
CMD = PREFIX + "cmd"


@pytest_asyncio.fixture
async def slow_bcrypt_platform(make_settings: Callable[..., Settings]) -> AsyncIterator[Platform]:
    """A platform whose bcrypt is slow (cost 8, one thread) and whose queue is short (16); a
    login beyond MQTT's share waits at most 1 s for its turn."""
    settings = make_settings(
        http={"host": "127.0.0.1"},
        registrar={"bcrypt_cost": 8, "hash_threads": 1, "max_queued_hashes": 16},
        mqtt={"login_wait_s": 1.0},
    )
    running = Platform(settings)
    await running.start()
    await running.store.add_customer("abc123", 60, actor="test")
    try:
        yield running
    finally:
        await running.stop()


async def enroll(http: aiohttp.ClientSession, device_id: str) -> str:
    body: dict[str, Any] = {"customer_id": "abc123", "mac_address": device_id}
    async with http.post("/api/v1/register", json=body) as response:
        assert response.status == 201, await response.text()
        body["password"] = (await response.json())["password"]
    async with http.post("/api/v1/activate", json=body) as response:
        assert response.status == 200, await response.text()
    return str(body["password"])


async def connack_code(port: int, packet: bytes) -> int | None:
    """Send one CONNECT on a new socket; the CONNACK return code (None: closed without one)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(packet)
        await writer.drain()
        async with asyncio.timeout(30):
            connack = await reader.read(4)
        return connack[3] if len(connack) == 4 else None
    finally:
        writer.close()


def authority_of(platform: Platform) -> Authority:
    assert platform.authority is not None
    return platform.authority


async def test_login_flood_leaves_room_for_enrollment(slow_bcrypt_platform: Platform) -> None:
    """Hundreds of wrong-password CONNECTs for enrolled but uncached devices run bcrypt; they
    may fill only MQTT's share of the bcrypt queue, those that would wait more than 1 s for
    their turn are refused with CONNACK 3 (server unavailable: the credentials may be right),
    and an enrollment meanwhile still succeeds."""
    platform = slow_bcrypt_platform
    authority = authority_of(platform)
    hasher = authority.hasher
    async with aiohttp.ClientSession(f"http://127.0.0.1:{platform.http_port}") as http:
        victims = [f"victim-{index}" for index in range(5)]
        for victim in victims:
            await enroll(http, victim)
        flood = [
            asyncio.create_task(
                connack_code(
                    platform.mqtt_port,
                    connect_packet(name, name, "wrong-password", keepalive=60),
                )
            )
            for index in range(400)
            for name in [f"abc123/{victims[index % len(victims)]}"]
        ]
        deadline = time.monotonic() + 10
        while hasher.jobs < hasher.max_jobs // 2:  # the flood has reached bcrypt
            assert time.monotonic() < deadline, "the flood never reached bcrypt"
            await asyncio.sleep(0.005)

        started = time.monotonic()
        await enroll(http, "newcomer")
        enrolled_in = time.monotonic() - started

        codes = await asyncio.gather(*flood)
    assert enrolled_in < 5.0
    assert set(codes) <= {CONNACK_SERVER_UNAVAILABLE, CONNACK_NOT_AUTHORIZED}, set(codes)
    busy = codes.count(CONNACK_SERVER_UNAVAILABLE)
    assert busy > 0
    assert authority.busy_refusals == busy


async def test_a_login_storm_beyond_the_share_waits_its_turn(
    slow_bcrypt_platform: Platform,
) -> None:
    """40 devices log in at once with their right passwords, uncached: bcrypt (one thread) may
    run only MQTT's share of its queue (8 jobs) for them, so most wait their turn, and every
    one is accepted, none refused with CONNACK 3 (their expected wait is within 1 s)."""
    platform = slow_bcrypt_platform
    authority = authority_of(platform)
    hasher = authority.hasher
    share = max(1, int(hasher.max_jobs * authority.login_hash_share))
    async with aiohttp.ClientSession(f"http://127.0.0.1:{platform.http_port}") as http:
        passwords = {f"dev-{i}": await enroll(http, f"dev-{i}") for i in range(40)}
    # the estimate of a check's time decides at arrival who may wait: pinned near cost 8's
    # (~10 ms on an idle core), so that a loaded test machine does not turn the test into a
    # flood test
    hasher.seconds_per_job = 0.01
    most_jobs = most_waiting = 0

    async def watch() -> None:
        nonlocal most_jobs, most_waiting
        while True:
            most_jobs, most_waiting = max(most_jobs, hasher.jobs), max(most_waiting, hasher.waiting)
            await asyncio.sleep(0.001)

    watcher = asyncio.create_task(watch())
    try:
        codes = await asyncio.gather(
            *(
                connack_code(
                    platform.mqtt_port,
                    connect_packet(f"abc123/{d}", f"abc123/{d}", password, keepalive=60),
                )
                for d, password in passwords.items()
            )
        )
    finally:
        watcher.cancel()
    assert codes == [0] * 40
    assert authority.busy_refusals == 0
    assert most_waiting > 0  # some did wait
    assert most_jobs <= share


@pytest_asyncio.fixture
async def small_queue_platform(make_settings: Callable[..., Settings]) -> AsyncIterator[Platform]:
    """A platform that keeps at most 5 queued messages per client."""
    settings = make_settings(http={"host": "127.0.0.1"}, mqtt={"max_queued_messages": 5})
    running = Platform(settings)
    await running.start()
    await running.store.add_customer("abc123", 20, actor="test")
    try:
        yield running
    finally:
        await running.stop()


async def add_operator(platform: Platform, name: str = "ops") -> str:
    """An operator account (service role), made with the CLI as an operator would; its password."""
    args = ["account", "add", name, "--db", str(platform.store.path), "--json"]
    result = await asyncio.to_thread(run_cli, *args)
    assert result.returncode == 0, result.stderr
    return str(json.loads(result.stdout)["password"])


async def until(predicate: Callable[[], bool], what: str, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {within}s waiting for {what}"
        await asyncio.sleep(0.01)


async def test_offline_session_keeps_only_the_newest_messages(
    small_queue_platform: Platform,
) -> None:
    """An offline persistent session keeps at most `max_queued_messages` (5 here): publishing 8
    commands drops the 3 oldest, counted; on reconnect the device gets exactly the newest 5."""
    platform = small_queue_platform
    assert platform.broker is not None
    broker = platform.broker.broker
    async with aiohttp.ClientSession(f"http://127.0.0.1:{platform.http_port}") as http:
        password = await enroll(http, "dev-1")
    device = PahoDevice(platform.mqtt_port, DEV, password, clean_session=False)
    assert await device.connect() == 0
    assert await device.subscribe(CMD, qos=1) == [1]
    device.close()
    await until(lambda: not broker.is_connected(DEV), "the device offline")

    service = PahoDevice(platform.mqtt_port, "ops", await add_operator(platform))
    assert await service.connect() == 0
    for index in range(8):
        await service.publish(CMD, f"command {index}", qos=1)
    queue = broker.sessions[DEV][0].retained_messages
    await until(
        lambda: queue.qsize() + getattr(broker, "dropped_queued_messages", 0) == 8,
        "8 commands handled",
    )

    device = PahoDevice(platform.mqtt_port, DEV, password, clean_session=False)
    assert await device.connect() == 0
    received = [await device.next_message() for _ in range(5)]
    await service.publish(CMD, "marker", qos=1)  # queued ones come first, then new ones
    marker = await device.next_message()
    assert [m.payload.decode() for m in received if m is not None] == [
        f"command {index}" for index in range(3, 8)
    ]
    assert marker is not None
    assert marker.payload == b"marker"
    assert broker.dropped_queued_messages == 3
    device.close()
    service.close()


@pytest.mark.parametrize("action", ["revoke", "reset"])
async def test_revoked_or_reset_device_leaves_no_retained_messages(
    small_queue_platform: Platform, action: str
) -> None:
    """A device's retained status goes when the device is revoked or reset (through the store,
    as the CLI does it); another device's stays."""
    platform = small_queue_platform
    assert platform.broker is not None
    broker = platform.broker.broker
    passwords = {}
    async with aiohttp.ClientSession(f"http://127.0.0.1:{platform.http_port}") as http:
        for device_id in ("dev-1", "dev-2"):
            passwords[device_id] = await enroll(http, device_id)
    devices = {}
    for device_id, password in passwords.items():
        devices[device_id] = PahoDevice(platform.mqtt_port, f"abc123/{device_id}", password)
        assert await devices[device_id].connect() == 0
        topic = f"devices/abc123/{device_id}/status"
        await devices[device_id].publish(topic, b'{"state": "online"}', qos=1, retain=True)
    await until(lambda: len(broker.retained_messages) == 2, "both statuses retained")

    name = DeviceName("abc123", "dev-1")
    if action == "revoke":
        await platform.store.revoke_device(name, actor="operator")
    else:
        await platform.store.reset_device(name, actor="operator")
    assert await devices["dev-1"].wait_disconnected(timeout=5)
    await until(
        lambda: not any(t.startswith(PREFIX) for t in broker.retained_messages),
        "dev-1's retained status removed",
    )

    service = PahoDevice(platform.mqtt_port, "ops", await add_operator(platform))
    assert await service.connect() == 0
    assert await service.subscribe("devices/#") == [1]
    await service.publish("devices/abc123/dev-2/cmd", b"marker", qos=1)
    topics = []
    while (message := await service.next_message()) is not None and message.payload != b"marker":
        topics.append(message.topic)
    assert message is not None, "marker not received"
    assert topics == ["devices/abc123/dev-2/status"]
    for client in (*devices.values(), service):
        client.close()


# --- inflow: a fast publisher and a subscriber that does not read -----------------------------

FLOOD = 3000
INFLIGHT_IN, BROADCAST_QUEUE, QUEUED = 10, 20, 200


async def raw_login(
    port: int, username: str, topic_filter: str, qos: int, *, receive_buffer: int = 0
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw client logged in as an acl_plugins user and subscribed to `topic_filter`."""
    sock = socket.socket()
    if receive_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(connect_packet(username, username, PASSWORDS[username], keepalive=0))
    writer.write(subscribe_packet(topic_filter, qos))
    await writer.drain()
    async with asyncio.timeout(5):
        assert (await reader.readexactly(4))[3] == 0  # CONNACK accepted
        assert (await reader.readexactly(5))[4] == qos  # SUBACK granted
    return reader, writer


async def read_packets(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, acked: set[int], got: set[bytes]
) -> None:
    """Collect PUBACKs (packet ids) and QoS 1 PUBLISHes (payloads, acknowledged) until EOF."""
    while True:
        first = (await reader.readexactly(1))[0]
        length, multiplier = 0, 1
        while True:
            byte = (await reader.readexactly(1))[0]
            length += (byte & 0x7F) * multiplier
            multiplier *= 128
            if not byte & 0x80:
                break
        body = await reader.readexactly(length)
        if first >> 4 == 4:  # PUBACK
            acked.add(struct.unpack("!H", body[:2])[0])
        elif first >> 4 == 3:  # PUBLISH, QoS 1 here
            (topic_length,) = struct.unpack("!H", body[:2])
            packet_id = body[2 + topic_length : 4 + topic_length]
            got.add(body[4 + topic_length :])
            writer.write(b"\x40\x02" + packet_id)


async def test_a_fast_publisher_cannot_grow_the_broker_s_queues() -> None:
    """A client publishes 3,000 QoS 1 messages of 4 KB as fast as it can while one subscriber
    of them stops reading. The broker stops reading the publisher while it holds
    `max_inflight_in` of its messages unprocessed, its broadcast queue stays within
    `max_broadcast_queue`, the deliveries waiting for the stuck subscriber within
    `max_queued_messages` (the rest are dropped and counted); and every message the publisher
    got a PUBACK for reaches the subscriber that reads."""
    broker = HardenedBroker(
        acl_plugins.broker_config(),
        write_timeout=60.0,
        max_inflight_in=INFLIGHT_IN,
        max_broadcast_queue=BROADCAST_QUEUE,
        max_queued_messages=QUEUED,
    )
    await broker.start()
    port = broker.listener_port()
    try:
        _, stuck = await raw_login(port, "carol", "a/#", 0, receive_buffer=4096)
        root_reader, root_writer = await raw_login(port, "root", "a/#", 1)
        reader, writer = await raw_login(port, "alice", "a/nothing", 0)
        acked: set[int] = set()
        got: set[bytes] = set()
        collectors = [
            asyncio.create_task(read_packets(reader, writer, acked, set())),
            asyncio.create_task(read_packets(root_reader, root_writer, set(), got)),
        ]
        peaks = {"held": 0, "broadcast": 0, "deliveries": 0, "tasks": 0}

        async def sample() -> None:
            alice, _ = broker.sessions["alice"]
            _, carol = broker.sessions["carol"]
            while True:
                peaks["held"] = max(peaks["held"], alice.delivered_message_queue.qsize())
                peaks["broadcast"] = max(peaks["broadcast"], broker._broadcast_queue.qsize())
                peaks["deliveries"] = max(
                    peaks["deliveries"], len(getattr(carol, "_deliveries", ()))
                )
                peaks["tasks"] = max(peaks["tasks"], len(asyncio.all_tasks()))
                await asyncio.sleep(0.001)

        sampler = asyncio.create_task(sample())
        padding = b"." * 4096
        for index in range(FLOOD):
            payload = b"%d:" % index + padding
            writer.write(publish_packet("a/flood", payload, qos=1, packet_id=index + 1))
            if index % 100 == 99:
                await writer.drain()
        await writer.drain()
        await until(lambda: len(acked) == FLOOD, "every message acknowledged", within=60)
        await until(lambda: len(got) == FLOOD, "every message delivered to root", within=30)
        sampler.cancel()
        for task in collectors:
            task.cancel()
        stuck.close()
        writer.close()
        root_writer.close()
    finally:
        async with asyncio.timeout(10):
            await broker.shutdown()
    assert got == {b"%d:" % index + padding for index in range(FLOOD)}
    assert peaks["held"] <= INFLIGHT_IN, peaks
    assert peaks["broadcast"] <= BROADCAST_QUEUE, peaks
    assert peaks["deliveries"] <= QUEUED, peaks
    # no task per message in flight: the publisher's packets, the deliveries to both subscribers
    assert peaks["tasks"] <= 2 * (INFLIGHT_IN + QUEUED + BROADCAST_QUEUE), peaks
    assert broker.dropped_deliveries > 0, peaks


async def test_a_publisher_that_never_reads_is_paused_not_taken_for_silent() -> None:
    """A client floods QoS 1 messages of 4 KB to a topic it subscribes to itself, and never
    reads. The deliveries to it back up and, behind them, its PUBACKs, so the handlers of its
    packets cannot finish: the broker stops reading it at `max_inflight_in` of them (no task
    per packet read) and holds at most `max_queued_messages` deliveries for it. The pause is not
    taken for keep-alive silence: a silent client with the same keep-alive is dropped meanwhile,
    the paused one is not."""
    broker = HardenedBroker(
        acl_plugins.broker_config(),
        write_timeout=60.0,
        max_inflight_in=INFLIGHT_IN,
        max_queued_messages=QUEUED,
    )
    await broker.start()
    port = broker.listener_port()
    try:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(connect_packet("alice", "alice", PASSWORDS["alice"], keepalive=1))
        writer.write(subscribe_packet("a/#", 0))
        async with asyncio.timeout(5):
            assert (await reader.readexactly(4))[3] == 0  # CONNACK accepted
            assert (await reader.readexactly(5))[4] == 0  # SUBACK
        _, handler = broker.sessions["alice"]

        def paused() -> bool:
            gate = getattr(handler.reader, "inflow", None)
            return gate is not None and bool(gate.paused)

        async def flood() -> None:
            payload = b"." * 4096
            for index in range(1_000_000):
                writer.write(publish_packet("a/flood", payload, qos=1, packet_id=index % 65535 + 1))
                if index % 10 == 9:
                    await writer.drain()

        flooding = asyncio.create_task(flood())
        try:
            await until(paused, "the broker to stop reading the flood", within=20)
            silent_reader, silent_writer = await asyncio.open_connection("127.0.0.1", port)
            silent_writer.write(connect_packet("bob", "bob", PASSWORDS["bob"], keepalive=1))
            async with asyncio.timeout(5):
                assert (await silent_reader.readexactly(4))[3] == 0
                assert await silent_reader.read() == b""  # dropped after 1.5 s of silence
            silent_writer.close()
            assert broker.is_connected("alice")
            assert paused()
            assert handler._handlers_running <= INFLIGHT_IN
            assert len(handler._deliveries) <= QUEUED
            assert len(asyncio.all_tasks()) <= 2 * (INFLIGHT_IN + QUEUED)
        finally:
            flooding.cancel()
            writer.transport.abort()
    finally:
        async with asyncio.timeout(10):
            await broker.shutdown()


async def test_a_subscribe_flood_that_never_reads_is_paused_too() -> None:
    """Not only PUBLISHes: a client that never reads sends SUBSCRIBE after SUBSCRIBE to a filter
    with a 64 KB retained message. Each would answer with a SUBACK and that retained message;
    the broker holds at most `max_inflight_in` of its packets unprocessed and at most
    `max_queued_messages` deliveries for it, then stops reading it (and counts the drops)."""
    broker = HardenedBroker(
        acl_plugins.broker_config(),
        write_timeout=60.0,
        max_inflight_in=INFLIGHT_IN,
        max_queued_messages=QUEUED,
    )
    await broker.start()
    port = broker.listener_port()
    try:
        _, root = await raw_login(port, "root", "x/none", 0)
        root.write(publish_packet("a/big", b"." * 65536, qos=0).replace(b"\x30", b"\x31", 1))
        await root.drain()
        await until(lambda: "a/big" in broker.retained_messages, "the retained message stored")

        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(connect_packet("alice", "alice", PASSWORDS["alice"], keepalive=0))
        async with asyncio.timeout(5):
            assert (await reader.readexactly(4))[3] == 0  # CONNACK accepted
        _, handler = broker.sessions["alice"]

        def paused() -> bool:
            gate = getattr(handler.reader, "inflow", None)
            return gate is not None and bool(gate.paused)

        async def flood() -> None:
            for index in range(1_000_000):
                writer.write(subscribe_packet("a/#", 0, packet_id=index % 65535 + 1))
                if index % 100 == 99:
                    await writer.drain()

        flooding = asyncio.create_task(flood())
        try:
            await until(paused, "the broker to stop reading the flood", within=20)
            assert handler._pending_subscriptions.qsize() <= INFLIGHT_IN
            assert len(handler._deliveries) <= QUEUED
            assert len(asyncio.all_tasks()) <= 2 * (INFLIGHT_IN + QUEUED)
        finally:
            flooding.cancel()
            writer.transport.abort()
            root.close()
    finally:
        async with asyncio.timeout(10):
            await broker.shutdown()
