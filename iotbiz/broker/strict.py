"""The MQTT 3.1.1 rules amqtt 0.12.1 lets pass, checked on each decoded packet; a packet that
breaks one closes its connection (the spec's answer to a malformed packet).

- [MQTT-1.5.3-1] a string that is not valid UTF-8: amqtt's `decode_string` then returns
  `str(the_bytes)` ("b'\\xff...'"), a topic no ACL would ever match, so the PUBLISH was
  acknowledged and dropped. Such a fallback is told from most real topics spelled like it by
  reading it back as bytes and decoding those (a real topic of the characters `b'\xff'` would
  be taken for one: no device may publish there anyway).
- [MQTT-1.5.3-2] a string holding U+0000.
- [MQTT-3.3.1-2] a QoS 0 PUBLISH with the DUP flag set: amqtt dropped it with a WARNING holding
  the whole packet (its payload too) for each one, a log a client could fill at line rate.
- [MQTT-3.3.1-4] a PUBLISH with both QoS bits set (QoS 3).
- [MQTT-3.8.3-4] a SUBSCRIBE asking QoS 3 (amqtt answered 0x03 in the SUBACK).
- [MQTT-3.8.3-3, MQTT-3.10.3-2] a SUBSCRIBE or UNSUBSCRIBE without a topic filter (amqtt
  answered a SUBACK without return codes), and [MQTT-4.7.3-1] an empty topic filter.

A first packet that is not CONNECT [MQTT-3.1.0-1] is caught earlier, in the framing
(`guards.GuardedReader`), so that the connection closes at once instead of at the CONNECT timeout.
"""

from __future__ import annotations

import ast
from typing import Any

from amqtt.mqtt.constants import QOS_0, QOS_2
from amqtt.mqtt.packet import PUBLISH, SUBSCRIBE, UNSUBSCRIBE


def malformed(packet: Any) -> str | None:
    """Why `packet` (a decoded amqtt packet) breaks MQTT 3.1.1, or None."""
    kind = packet.fixed_header.packet_type
    if kind == PUBLISH:
        flags = packet.fixed_header.flags
        if (flags >> 1) & 0x03 == 0x03:
            return "PUBLISH with QoS 3"
        if flags & 0x08 and not (flags >> 1) & 0x03:
            return "QoS 0 PUBLISH with DUP set"
        return _bad_string(packet.variable_header.topic_name, "topic")
    if kind == SUBSCRIBE:
        if not packet.payload.topics:
            return "SUBSCRIBE without a topic filter"
        for topic_filter, qos in packet.payload.topics:
            if not QOS_0 <= qos <= QOS_2:
                return f"SUBSCRIBE asking QoS {qos}"
            if reason := _bad_filter(topic_filter):
                return reason
    elif kind == UNSUBSCRIBE:
        if not packet.payload.topics:
            return "UNSUBSCRIBE without a topic filter"
        for topic_filter in packet.payload.topics:
            if reason := _bad_filter(topic_filter):
                return reason
    return None


def _bad_filter(topic_filter: str | None) -> str | None:
    if not topic_filter:
        return "empty topic filter"
    return _bad_string(topic_filter, "topic filter")


def _bad_string(text: str | None, what: str) -> str | None:
    if text is None:
        return None
    if "\x00" in text:
        return f"{what} holds U+0000"
    if text.startswith(("b'", 'b"')) and len(text) >= 3 and text[-1] == text[1]:
        try:
            raw = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return None  # a real string that only looks like a bytes literal
        if isinstance(raw, bytes):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return f"{what} is not valid UTF-8"
    return None
