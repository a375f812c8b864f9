"""Hand-built MQTT 3.1.1 packets, for clients that must misbehave (go silent, never ack) and for
benchmarks that keep client overhead near zero."""

from __future__ import annotations

import struct


def encode_string(value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return struct.pack("!H", len(data)) + data


def remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def packet(first_byte: int, body: bytes) -> bytes:
    return bytes([first_byte]) + remaining_length(len(body)) + body


def connect_packet(
    client_id: str,
    username: str | None,
    password: str | None,
    keepalive: int,
    will: tuple[str, bytes] | None = None,
    *,
    clean: bool = True,
    will_qos: int = 1,
    will_retain: bool = True,
    protocol: str = "MQTT",
    level: int = 4,
) -> bytes:
    """CONNECT (by default a clean session, and a will sent QoS 1, retained)."""
    flags = 0x02 if clean else 0
    payload = encode_string(client_id)
    if will is not None:
        flags |= 0x04 | (will_qos << 3) | (0x20 if will_retain else 0)
        payload += encode_string(will[0]) + encode_string(will[1])
    if username is not None:
        flags |= 0x80
        payload += encode_string(username)
    if password is not None:
        flags |= 0x40
        payload += encode_string(password)
    variable = encode_string(protocol) + bytes([level, flags]) + struct.pack("!H", keepalive)
    return packet(0x10, variable + payload)


def publish_packet(topic: str, payload: bytes, *, qos: int = 0, packet_id: int = 1) -> bytes:
    body = encode_string(topic)
    if qos:
        body += struct.pack("!H", packet_id)
    return packet(0x30 | (qos << 1), body + payload)


def subscribe_packet(topic_filter: str, qos: int, packet_id: int = 1) -> bytes:
    return packet(0x82, struct.pack("!H", packet_id) + encode_string(topic_filter) + bytes([qos]))
