"""Hypothesis strategies for hostile raw MQTT 3.1.1 byte streams, and the rule every answer
must keep.

Shared by `tests/broker/test_mqtt_fuzz.py` (a bounded number of cases in every test run) and
`scripts/fuzz_mqtt.py` (a nightly-size run). A case is the bytes one TCP connection sends:

- `before`: packets and junk before any CONNECT [MQTT-3.1.0-1];
- `connect`: one CONNECT with good and bad protocol names and levels, flags, keep-alive, client
  ids, credentials and wills;
- `session`: the fuzzing device's good CONNECT, then SUBSCRIBE, PUBLISH (QoS 0-3, retain,
  dup), UNSUBSCRIBE, PINGREQ, PUBACK, DISCONNECT, a second CONNECT and junk, any of them with a
  broken remaining length (too long, too short, over 4 bytes, over `mqtt.max_packet_bytes`),
  topics with invalid UTF-8, NUL, wildcards, empty, and payloads up to a bit over the limit.

After the case the client sends a probe (a SUBSCRIBE with packet id `PROBE_ID`) and reads until
the probe's SUBACK or the end of the connection, within a bound: a hang is a failure. The rule
(`check_answer`): every packet the broker sends is one it documents, well formed; the first is
a CONNACK (nothing is answered before CONNECT); a refused CONNECT is followed by nothing; a
subscription is granted only for the device's own `cmd` topic, and nothing is ever delivered
to the fuzzing device (no one publishes to its `cmd`: anything it receives came through an ACL
hole).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.mqtt_wire import encode_string, packet, remaining_length

PROBE_ID = 0xFFFF  # the probe's packet id; a case's packets use 1..65534
PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"
CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 2, 3, 4, 5, 6, 7
SUBACK, UNSUBACK, PINGRESP = 9, 11, 13
# What the broker may send (the fixed-header flags each must carry) [MQTT-2.2.2-1].
SENT_BY_BROKER = {CONNACK: 0, PUBACK: 0, PUBREC: 0, PUBREL: 2, PUBCOMP: 0, SUBACK: 0}
SENT_BY_BROKER |= {UNSUBACK: 0, PINGRESP: 0}


@dataclass(frozen=True)
class Names:
    """Who the fuzzing device is, and whom it attacks."""

    username: str  # = client id, `{customer}/{device}`
    password: str
    other: str  # the honest device's name
    max_packet: int  # mqtt.max_packet_bytes of the broker under test
    connect_timeout_s: float = 10.0  # mqtt.connect_timeout_s of the broker under test

    def topic(self, suffix: str, *, other: bool = False) -> str:
        return f"devices/{self.other if other else self.username}/{suffix}"

    @property
    def command_topic(self) -> bytes:
        return self.topic("cmd").encode()


@dataclass(frozen=True)
class Case:
    kind: str  # "before", "connect" or "session"
    raw: bytes
    steps: tuple[str, ...]  # what each part is, for the report and hypothesis's shrinking
    subscriptions: dict[int, tuple[tuple[bytes, int], ...]] = field(default_factory=dict)
    good_connect: bool = False  # the case starts with the device's own, well-formed CONNECT

    def __repr__(self) -> str:
        return f"Case({self.kind}, {self.steps}, {self.raw[:400]!r})"


def u16(value: int) -> bytes:
    return struct.pack("!H", value)


def topics(names: Names) -> st.SearchStrategy[bytes]:
    """Topic names and filters: own and another device's, wildcards in right and wrong places,
    empty, NUL, invalid UTF-8, anything."""
    own = [names.topic(s) for s in ("status", "telemetry", "events", "reply", "cmd")]
    others = [names.topic(s, other=True) for s in ("status", "telemetry", "cmd", "reply")]
    wild = [
        "#",
        "+",
        "devices/#",
        "devices/+/+/cmd",
        "devices/+/+/+",
        f"devices/{names.other.split('/')[0]}/#",
        names.topic("+", other=True),
        names.topic("#"),
        "$SYS/#",
        "$SYS/broker/uptime",
        "+/+/+/+",
    ]
    wrong_wild = [
        "devices/a#",
        "devices/#/cmd",
        "##",
        "+#",
        "#+",
        "de+vices/#",
        names.topic("cmd#"),
        names.topic("cmd/+x"),
        names.topic("cmd") + "/#/",
    ]
    plain = st.sampled_from(own + others + wild + wrong_wild + ["", "/", "//", "a"]).map(str.encode)
    broken = st.sampled_from(own + others).flatmap(
        lambda topic: st.sampled_from(
            [b"\x00", b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xc0\x80"]
        ).flatmap(
            lambda bad: st.integers(0, len(topic)).map(
                lambda at: topic.encode()[:at] + bad + topic.encode()[at:]
            )
        )
    )
    return st.one_of(
        plain,
        broken,
        st.text(max_size=30).map(lambda t: t.encode("utf-8", "surrogatepass")),
        st.binary(max_size=30),
    )


def payloads(names: Names) -> st.SearchStrategy[bytes]:
    limit = names.max_packet
    return st.one_of(
        st.sampled_from(
            [b"", b"{}", b'{"cpu_percent": 1}', b'{"state": "online"}', b"null", b"[1,2", b"\xff"]
        ),
        st.binary(max_size=200),
        # around mqtt.max_packet_bytes: under it (accepted) and over it (the connection closes)
        st.integers(limit - 64, limit + 64).map(lambda n: b"x" * n),
    )


def packet_ids() -> st.SearchStrategy[int]:
    return st.integers(0, PROBE_ID - 1) | st.sampled_from([0, 1, 2, PROBE_ID - 1])


@dataclass
class Built:
    """One packet: its bytes, its name, and for SUBSCRIBE its filters and requested QoS."""

    raw: bytes
    step: str
    packet_id: int | None = None
    filters: tuple[tuple[bytes, int], ...] = ()


@st.composite
def connects(draw: Any, names: Names, *, good: bool = False) -> Built:
    """A CONNECT: the device's own well-formed one (`good`), or anything from almost right to
    garbage."""
    if good:
        raw = connect_bytes(
            # keep-alive 1: a packet announced longer than sent is dropped after 1.5 s
            b"MQTT",
            4,
            0x02 | 0xC0,
            1,
            names.username,
            names.password,
        )
        return Built(raw, "connect(good)")
    near = draw(st.booleans())  # a well-formed CONNECT with fuzzed fields, or anything
    protocol = (
        b"MQTT"
        if near
        else draw(
            st.sampled_from([b"MQTT", b"MQIsdp", b"mqtt", b"", b"MQTT\x00", b"\xff\xfe"])
            | st.binary(max_size=8)
        )
    )
    level = 4 if near else draw(st.sampled_from([4, 3, 5, 0, 255]) | st.integers(0, 255))
    client_id = draw(
        st.sampled_from([names.username, names.other, "", "a", "x" * 300]).map(str.encode)
        | topics(names)
    )
    username = draw(
        st.none()
        | st.sampled_from([names.username, names.other, "", "iotbiz-service"]).map(str.encode)
        | st.binary(max_size=20)
    )
    password = draw(
        st.none()
        | st.sampled_from([names.password, "wrong", ""]).map(str.encode)
        | st.binary(max_size=20)
    )
    will = draw(st.none() | st.tuples(topics(names), st.binary(max_size=30)))
    flags = 0x02 if draw(st.booleans()) else 0
    if will is not None:
        flags |= 0x04 | (draw(st.integers(0, 3)) << 3) | (0x20 if draw(st.booleans()) else 0)
    if username is not None:
        flags |= 0x80
    if password is not None:
        flags |= 0x40
    if not near:
        flags = draw(st.sampled_from([flags, flags | 0x01]) | st.integers(0, 255))  # reserved
    keepalive = draw(st.sampled_from([0, 1, 2, 60, 65535]) | st.integers(0, 65535))
    body = encode_string(protocol) + bytes([level, flags]) + u16(keepalive)
    body += encode_string(client_id)
    if will is not None:
        body += encode_string(will[0]) + encode_string(will[1])
    if username is not None:
        body += encode_string(username)
    if password is not None:
        body += encode_string(password)
    return Built(packet(0x10, body), f"connect(flags={flags:#04x}, level={level})")


def connect_bytes(
    protocol: bytes, level: int, flags: int, keepalive: int, username: str, password: str
) -> bytes:
    body = encode_string(protocol) + bytes([level, flags]) + u16(keepalive)
    body += encode_string(username) + encode_string(username) + encode_string(password)
    return packet(0x10, body)


@st.composite
def publishes(draw: Any, names: Names) -> Built:
    qos = draw(st.integers(0, 3))
    dup = (draw(st.booleans()) and qos > 0) or draw(st.integers(0, 9)) == 0
    retain = draw(st.booleans())
    topic = draw(topics(names))
    body = encode_string(topic)
    if qos:
        body += u16(draw(packet_ids()))
    body += draw(payloads(names))
    first = 0x30 | (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    return Built(packet(first, body), f"publish(qos={qos}, retain={retain}, topic={topic[:60]!r})")


@st.composite
def subscribes(draw: Any, names: Names) -> Built:
    packet_id = draw(packet_ids())
    filters = tuple(
        draw(
            st.lists(
                st.tuples(topics(names), st.sampled_from([0, 1, 2, 3]) | st.integers(0, 255)),
                max_size=3,
            )
        )
    )
    body = u16(packet_id) + b"".join(encode_string(f) + bytes([qos]) for f, qos in filters)
    first = draw(st.sampled_from([0x82, 0x82, 0x82, 0x80, 0x83, 0x8A]))
    return Built(packet(first, body), f"subscribe({first:#x}, {filters!r})", packet_id, filters)


@st.composite
def unsubscribes(draw: Any, names: Names) -> Built:
    packet_id = draw(packet_ids())
    filters = draw(st.lists(topics(names), max_size=3))
    first = draw(st.sampled_from([0xA2, 0xA2, 0xA0]))
    body = u16(packet_id) + b"".join(encode_string(f) for f in filters)
    return Built(packet(first, body), f"unsubscribe({first:#x}, {filters!r})")


def simple(raw: bytes, step: str) -> st.SearchStrategy[Built]:
    return st.just(Built(raw, step))


def acks() -> st.SearchStrategy[Built]:
    return st.sampled_from([0x40, 0x50, 0x62, 0x70]).flatmap(
        lambda first: packet_ids().map(
            lambda packet_id: Built(packet(first, u16(packet_id)), f"ack({first:#x})")
        )
    )


def junk() -> st.SearchStrategy[Built]:
    return st.binary(min_size=1, max_size=40).map(lambda data: Built(data, "junk"))


@st.composite
def misframed(draw: Any, inner: st.SearchStrategy[Built], names: Names) -> Built:
    """A packet from `inner` with its remaining length broken."""
    built = draw(inner)
    first, body = built.raw[:1], strip_header(built.raw)
    how = draw(st.sampled_from(["long", "short", "over4", "over_limit", "nonminimal"]))
    if how == "long":  # more announced than sent: the rest of the stream is taken as body
        raw = first + remaining_length(len(body) + draw(st.integers(1, 40))) + body
    elif how == "short":  # less announced: the tail is read as the next packet
        raw = first + remaining_length(max(0, len(body) - draw(st.integers(1, 10)))) + body
    elif how == "over4":  # a fifth length byte [MQTT-2.2.3]
        raw = first + b"\xff\xff\xff\xff" + bytes([draw(st.integers(0, 255))]) + body
    elif how == "over_limit":  # announced over mqtt.max_packet_bytes, body never sent
        raw = first + remaining_length(names.max_packet + draw(st.integers(1, 1 << 20)))
    else:  # a length padded with 0x80 bytes (allowed by framing, not minimal)
        raw = first + bytes([0x80 | (len(body) & 0x7F), 0x00]) + body if len(body) < 128 else b""
        raw = raw or built.raw
    return Built(raw, f"{how}:{built.step}")


def strip_header(raw: bytes) -> bytes:
    index = 1
    while raw[index] & 0x80:
        index += 1
    return raw[index + 1 :]


def session_packets(names: Names) -> st.SearchStrategy[Built]:
    plain = st.one_of(
        publishes(names),
        subscribes(names),
        unsubscribes(names),
        simple(PINGREQ, "pingreq"),
        acks(),
        simple(DISCONNECT, "disconnect"),
        connects(names, good=True).map(lambda b: Built(b.raw, "second connect")),
        connects(names).map(lambda b: Built(b.raw, "second " + b.step)),
        simple(b"\xe0\x01\x00", "disconnect(len 1)"),
        simple(b"\xc1\x00", "pingreq(flags 1)"),
        st.sampled_from([0x00, 0x0F, 0xF0, 0x20, 0x90, 0xB0, 0xD0]).map(
            lambda kind: Built(bytes([kind, 0]), f"type {kind >> 4}")
        ),
    )
    return st.one_of(plain, plain, plain, misframed(plain, names), junk())


@st.composite
def cases(draw: Any, names: Names) -> Case:
    """One connection's bytes (module docstring)."""
    kind = draw(st.sampled_from(["before", "connect", "session", "session"]))
    built: list[Built]
    if kind == "before":
        first = st.one_of(
            publishes(names),
            subscribes(names),
            simple(PINGREQ, "pingreq"),
            simple(DISCONNECT, "disconnect"),
            acks(),
            junk(),
            misframed(connects(names, good=True), names),
        )
        built = draw(st.lists(first, min_size=1, max_size=3))
    elif kind == "connect":
        built = [draw(connects(names))]
    else:
        built = [draw(connects(names, good=True))]
        built += draw(st.lists(session_packets(names), min_size=1, max_size=6))
    subscriptions: dict[int, tuple[tuple[bytes, int], ...]] = {}
    ambiguous: set[int] = set()
    # Re-framed packets and junk can be parsed as a SUBSCRIBE with any packet id: then no
    # SUBACK is matched to its filters (nothing delivered still shows an ACL hole).
    broken = any(item.step == "junk" or ":" in item.step.split("(")[0] for item in built)
    for item in [] if broken else built:
        if item.packet_id is not None:
            if item.packet_id in subscriptions:
                ambiguous.add(item.packet_id)
            subscriptions[item.packet_id] = item.filters
    for packet_id in ambiguous:
        del subscriptions[packet_id]
    return Case(
        kind,
        b"".join(item.raw for item in built),
        tuple(item.step for item in built),
        subscriptions,
        good_connect=kind == "session",
    )


def probe(names: Names) -> bytes:
    """A SUBSCRIBE to the device's own cmd: its SUBACK (id PROBE_ID) says the connection lives."""
    return packet(0x82, u16(PROBE_ID) + encode_string(names.command_topic) + b"\x01")


@dataclass
class Answer:
    packets: list[tuple[int, bytes]]  # (first byte, body) of each packet received
    closed: bool  # the broker ended the connection (else the probe was answered)
    seconds: float
    rest: bytes = b""  # bytes after the last whole packet (only possible on a reset)


def split_packets(data: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    out: list[tuple[int, bytes]] = []
    index = 0
    while index < len(data):
        start = index
        first = data[index]
        index += 1
        length, multiplier = 0, 1
        for _ in range(4):
            if index >= len(data):
                return out, data[start:]
            byte = data[index]
            index += 1
            length += (byte & 0x7F) * multiplier
            multiplier *= 128
            if not byte & 0x80:
                break
        else:
            raise AssertionError(f"the broker sent a remaining length over 4 bytes: {data!r}")
        if index + length > len(data):
            return out, data[start:]
        out.append((first, data[index : index + length]))
        index += length
    return out, b""


def probe_answered(packets: list[tuple[int, bytes]]) -> bool:
    return any(first == 0x90 and body[:2] == u16(PROBE_ID) for first, body in packets)


def exchange(port: int, case: Case, names: Names, timeout_s: float = 5.0) -> Answer:
    """Send the case and the probe; read until the probe's SUBACK or the end of the connection.
    Neither within `timeout_s` is a hang: AssertionError."""
    started = time.monotonic()
    deadline = started + timeout_s
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        with contextlib.suppress(OSError):  # closed on us while sending: read what came
            sock.sendall(case.raw + probe(names))
        data = b""
        while True:
            packets, rest = split_packets(data)
            if probe_answered(packets):
                return Answer(packets, False, time.monotonic() - started, rest)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no probe answer and no close within {timeout_s} s")
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                chunk = b""
            except TimeoutError as exc:
                raise AssertionError(
                    f"no probe answer and no close within {timeout_s} s (got {data[:200]!r})"
                ) from exc
            if not chunk:
                return Answer(packets, True, time.monotonic() - started, rest)
            data += chunk


def check_answer(case: Case, answer: Answer, names: Names) -> str:
    """The rule (module docstring); returns the outcome's name, for the distribution."""
    assert not answer.rest or answer.closed, f"a partial packet on a live connection: {answer}"
    connack: int | None = None
    for position, (first, body) in enumerate(answer.packets):
        kind, flags = first >> 4, first & 0x0F
        if position == 0:
            assert kind == CONNACK, f"the first packet is not a CONNACK: {first:#x}"
        if kind == PUBLISH:
            check_delivery(first, body, names)
            continue
        assert kind in SENT_BY_BROKER, f"the broker sent packet type {kind}"
        assert flags == SENT_BY_BROKER[kind], f"packet type {kind} with flags {flags:#x}"
        if kind == CONNACK:
            assert position == 0, "a second CONNACK"
            assert len(body) == 2, body
            assert body[0] in (0, 1), body
            connack = body[1]
            assert connack in range(6), body
            if connack:
                assert body[0] == 0, body  # session present only when accepted [MQTT-3.2.2-4]
        elif kind == SUBACK:
            check_suback(case, body, names)
        elif kind in (PUBACK, PUBREC, PUBREL, PUBCOMP, UNSUBACK):
            assert len(body) == 2, (kind, body)
        elif kind == PINGRESP:
            assert body == b"", body
    if connack:  # a refused CONNECT: the connection ends [MQTT-3.2.2-5]
        assert len(answer.packets) == 1, answer
        assert answer.closed, answer
    if case.good_connect and connack is None and answer.seconds >= names.connect_timeout_s:
        # The documented connect timer, not a refusal: on a loaded machine the broker did not
        # read even a whole CONNECT within the (test's short) connect_timeout_s. Counted apart.
        return f"{case.kind}: closed by the connect timer (the CONNECT not read in time)"
    if case.good_connect:
        assert connack == 0, f"the device's own CONNECT was not accepted: {answer.packets[:2]}"
    if connack is None:
        assert not answer.packets
        return f"{case.kind}: closed without an answer"
    end = "closed" if answer.closed else "served"
    return f"{case.kind}: CONNACK {connack}, {end}"


def check_delivery(first: int, body: bytes, names: Names) -> None:
    """Nobody publishes to the fuzzing device's cmd: anything delivered came through a hole."""
    (length,) = struct.unpack("!H", body[:2])
    topic = body[2 : 2 + length]
    raise AssertionError(f"delivered to the fuzzing device: {topic!r} ({first:#x}, {body[:80]!r})")


def check_suback(case: Case, body: bytes, names: Names) -> None:
    assert len(body) >= 2, body
    (packet_id,) = struct.unpack("!H", body[:2])
    codes = body[2:]
    filters = case.subscriptions.get(packet_id)
    # A SUBSCRIBE without filters, or with an empty or non-UTF-8 one, or asking QoS 3, closes
    # the connection [MQTT-3.8.3-3, -4, MQTT-4.7.3-1, MQTT-1.5.3-1]: no SUBACK without codes.
    assert codes, f"a SUBACK without return codes: {body!r}"
    for code in codes:
        assert code in (0, 1, 2, 0x80), f"SUBACK return code {code:#x}"
    if packet_id == PROBE_ID:
        assert codes == b"\x01", f"the probe (own cmd, QoS 1) got {codes!r}"
        return
    if filters is None:
        return  # a packet id used twice in the case, or a SUBSCRIBE re-framed: not checkable
    assert len(codes) == len(filters), (filters, codes)
    for (topic_filter, qos), code in zip(filters, codes, strict=True):
        if code != 0x80:
            assert topic_filter == names.command_topic, f"granted {topic_filter!r}: {code}"
            assert code <= qos, f"granted QoS {code} for {qos}"


def fuzz_cases(port: int, names: Names, examples: int) -> Counter[str]:
    """Run `examples` cases against the broker on `port`; the outcomes seen. Raises on the
    first case that breaks the rule, after hypothesis shrank it. (A module function: the nightly
    script runs it in several processes at once.)"""
    outcomes: Counter[str] = Counter()
    recent: deque[Case] = deque(maxlen=3)  # the cases before a failure (a broker left stuck)

    @given(case=cases(names))
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def one(case: Case) -> None:
        try:
            outcomes[check_answer(case, exchange(port, case, names), names)] += 1
        except AssertionError as exc:
            before = "".join(f"\n  after {earlier!r}" for earlier in recent)
            raise AssertionError(f"{exc}\n  in {case!r}{before}") from exc
        finally:
            recent.append(case)

    one()
    return outcomes
