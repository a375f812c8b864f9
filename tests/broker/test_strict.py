"""MQTT 3.1.1 rules amqtt let pass, through a real broker on raw sockets: a first packet that is
not CONNECT closes the connection at once [MQTT-3.1.0-1]; a topic that is not valid UTF-8 or
holds U+0000 [MQTT-1.5.3-1, -2], a PUBLISH with QoS 3 [MQTT-3.3.1-4] or QoS 0 with DUP set
[MQTT-3.3.1-2] and a SUBSCRIBE asking QoS 3 [MQTT-3.8.3-4] close it instead of being
acknowledged, and so does a PUBLISH whose topic (and packet id) would run past the end of the
packet; good packets are still answered; a QoS 2 PUBLISH sent again before its PUBREL is
acknowledged again and delivered once [MQTT-4.3.3-2]."""

from __future__ import annotations

import asyncio
import socket
import struct
import time

import pytest

from iotbiz.broker.strict import _bad_string
from iotbiz.names import DeviceName
from iotbiz.platform import Platform
from tests.broker.conftest import Enroll
from tests.mqtt_wire import connect_packet, encode_string, packet

TOPIC = b"devices/abc123/strict-dev/telemetry"


async def open_socket(platform: Platform) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", platform.mqtt_port))
    return sock


async def read_until_closed(sock: socket.socket, timeout_s: float = 5.0) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                chunk = await loop.sock_recv(sock, 4096)
            except ConnectionResetError:
                return data
            if not chunk:
                return data
            data += chunk


async def logged_in(platform: Platform, enroll: Enroll) -> socket.socket:
    password = await enroll("strict-dev")
    name = "abc123/strict-dev"
    sock = await open_socket(platform)
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, connect_packet(name, name, password, keepalive=30))
    async with asyncio.timeout(5):
        assert await loop.sock_recv(sock, 4) == b"\x20\x02\x00\x00"
    return sock


def publish(topic: bytes, qos: int) -> bytes:
    body = encode_string(topic) + (struct.pack("!H", 7) if qos else b"") + b"{}"
    return packet(0x30 | (qos << 1), body)


async def test_a_first_packet_that_is_not_connect_closes_at_once(platform: Platform) -> None:
    sock = await open_socket(platform)
    try:
        started = time.monotonic()
        await asyncio.get_running_loop().sock_sendall(sock, b"\xc0\x00")  # PINGREQ
        assert await read_until_closed(sock) == b""
        assert time.monotonic() - started < 2  # not the 10 s CONNECT timeout
    finally:
        sock.close()


@pytest.mark.parametrize(
    "bad",
    [
        publish(TOPIC + b"/\xff\xfe", 1),
        publish(TOPIC + b"\x00", 1),
        publish(TOPIC, 3),
        packet(0x38, encode_string(TOPIC) + b"{}"),  # QoS 0 with DUP set [MQTT-3.3.1-2]
        packet(
            0x82, struct.pack("!H", 9) + encode_string(b"devices/abc123/strict-dev/cmd") + b"\x03"
        ),
        packet(0x82, struct.pack("!H", 9) + encode_string(b"devices/\xc3\x28") + b"\x01"),
        packet(0xA2, struct.pack("!H", 9) + encode_string(b"devices/\x00/cmd")),
        packet(0x82, struct.pack("!H", 9)),  # no filter [MQTT-3.8.3-3]
        packet(0x82, struct.pack("!H", 9) + encode_string(b"") + b"\x01"),  # [MQTT-4.7.3-1]
        packet(0xA2, struct.pack("!H", 9)),  # no filter [MQTT-3.10.3-2]
        packet(0x32, struct.pack("!H", 200) + TOPIC),  # topic length past the packet's end
        packet(0x32, encode_string(TOPIC)),  # QoS 1 without room for its packet id
    ],
    ids=[
        "topic-not-utf8",
        "topic-nul",
        "publish-qos-3",
        "qos-0-dup",
        "subscribe-qos-3",
        "filter-not-utf8",
        "unsubscribe-nul",
        "subscribe-without-filter",
        "subscribe-empty-filter",
        "unsubscribe-without-filter",
        "publish-topic-past-the-end",
        "publish-without-packet-id",
    ],
)
async def test_a_malformed_packet_closes_the_connection(
    platform: Platform, enroll: Enroll, bad: bytes
) -> None:
    sock = await logged_in(platform, enroll)
    try:
        await asyncio.get_running_loop().sock_sendall(sock, bad)
        answer = await read_until_closed(sock)
        assert answer == b"", answer  # no PUBACK, SUBACK or UNSUBACK: closed
    finally:
        sock.close()


async def test_good_packets_are_still_answered(platform: Platform, enroll: Enroll) -> None:
    sock = await logged_in(platform, enroll)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_sendall(sock, publish(TOPIC, 1))
        async with asyncio.timeout(5):
            assert await loop.sock_recv(sock, 4) == b"\x40\x02\x00\x07"  # PUBACK of id 7
    finally:
        sock.close()


async def test_a_qos_2_publish_sent_again_before_its_pubrel_is_delivered_once(
    platform: Platform, enroll: Enroll, caplog: pytest.LogCaptureFixture
) -> None:
    sock = await logged_in(platform, enroll)
    loop = asyncio.get_running_loop()
    events = b"devices/abc123/strict-dev/events"

    def event(qos: int, packet_id: int, kind: str, *, dup: bool = False) -> bytes:
        body = (
            encode_string(events) + struct.pack("!H", packet_id) + b'{"kind": "%s"}' % kind.encode()
        )
        return packet(0x30 | (qos << 1) | (0x08 if dup else 0), body)

    async def read(expected: bytes) -> None:
        async with asyncio.timeout(5):
            got = b""
            while len(got) < len(expected):
                got += await loop.sock_recv(sock, len(expected) - len(got))
        assert got == expected

    try:
        await loop.sock_sendall(sock, event(2, 5, "first"))
        await read(b"\x50\x02\x00\x05")  # PUBREC
        await loop.sock_sendall(sock, event(2, 5, "second", dup=True))  # the same packet id
        await read(b"\x50\x02\x00\x05")  # PUBREC again
        await loop.sock_sendall(sock, packet(0x62, struct.pack("!H", 5)))  # PUBREL
        await read(b"\x70\x02\x00\x05")  # PUBCOMP
        await loop.sock_sendall(sock, event(1, 6, "sentinel"))
        await read(b"\x40\x02\x00\x06")  # PUBACK
        name = DeviceName("abc123", "strict-dev")
        async with asyncio.timeout(10):
            while True:
                recorded = await platform.store.list_events(name=name)
                if any(e.body.get("kind") == "sentinel" for e in recorded):
                    break
                await asyncio.sleep(0.05)
        assert sorted(e.body["kind"] for e in recorded) == ["first", "sentinel"]
        assert "A waiter already exists" not in caplog.text
    finally:
        sock.close()


def test_a_real_topic_spelled_like_a_bytes_literal_is_not_malformed() -> None:
    assert _bad_string("b'abc'", "topic") is None
    assert _bad_string("b'\\xff'", "topic") == "topic is not valid UTF-8"
    assert _bad_string("b'\\xc3\\xa9'", "topic") is None  # valid UTF-8 bytes spelled out
    assert _bad_string("plain/topic", "topic") is None
