"""Delivery through the real Outbox and the real Link to a real platform (in this process).

Between the link and the broker sits a TCP proxy that can hold back what the broker sends (its
PUBACKs, CONNACKs, PINGRESPs) while the connection stays open: a publish that never gets its
acknowledgement, as on a stalled network.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from iotbiz import topics
from iotbiz.agent.identity import Credentials, Enrollment
from iotbiz.agent.link import Link
from iotbiz.agent.outbox import Message, Outbox, Queued
from iotbiz.names import DeviceName
from iotbiz.passwords import PasswordHasher
from iotbiz.platform import Platform
from iotbiz.settings import AgentSettings, Settings, load_agent_settings
from tests.mqtt_device import PahoDevice

pytestmark = pytest.mark.timeout(60)

NAME = DeviceName("abc123", "link-1")
TELEMETRY = topics.device_topic(NAME, topics.TELEMETRY)
REPLY = topics.device_topic(NAME, topics.REPLY)


async def until(check: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.02)


class Proxy:
    """127.0.0.1 port 0 -> the broker. `hold()` stops forwarding what the broker sends (the
    connection stays open, bytes wait in the proxy); `release()` lets them through."""

    def __init__(self, target_port: int) -> None:
        self._target_port = target_port
        self._downstream = asyncio.Event()
        self._downstream.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self.port = 0
        self.connections = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def hold(self) -> None:
        self._downstream.clear()

    def release(self) -> None:
        self._downstream.set()

    def drop(self) -> None:
        """Close every connection through the proxy (as a broker that goes away would); new
        ones are still accepted."""
        for writer in self._writers:
            writer.close()
        self._writers.clear()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.drop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target_port)
        self._writers |= {writer, up_writer}
        for coro in (self._pipe(reader, up_writer, None), self._pipe(up_reader, writer, True)):
            task = asyncio.create_task(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, gated: bool | None
    ) -> None:
        try:
            while data := await reader.read(65536):
                if gated:
                    await self._downstream.wait()
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def started_platform(settings: Settings) -> AsyncIterator[Platform]:
    """The whole platform in this process on ports 0; customer `abc123` may have 10 devices."""
    started = Platform(settings)
    await started.start()
    try:
        await started.store.add_customer("abc123", 10, actor="test")
        yield started
    finally:
        await started.stop()


@contextlib.asynccontextmanager
async def operator_device(platform: Platform) -> AsyncIterator[PahoDevice]:
    """An operator (superuser) connected straight to the broker, subscribed to all devices."""
    hasher = PasswordHasher(4, threads=1)
    try:
        password_hash = await hasher.hash("ops-password")
    finally:
        hasher.close()
    await platform.store.add_account("ops", password_hash, superuser=True, actor="test")
    device = PahoDevice(platform.mqtt_port, "ops", "ops-password", client_id="ops")
    assert await device.connect() == 0
    try:
        assert await device.subscribe("devices/#") == [1]
        yield device
    finally:
        device.close()


@pytest_asyncio.fixture
async def platform(make_settings: Callable[..., Settings]) -> AsyncIterator[Platform]:
    async with started_platform(make_settings(http={"host": "127.0.0.1"})) as started:
        yield started


@pytest_asyncio.fixture
async def proxy(platform: Platform) -> AsyncIterator[Proxy]:
    started = Proxy(platform.mqtt_port)
    await started.start()
    yield started
    await started.close()


@pytest.fixture
def settings(tmp_path: Path, platform: Platform, proxy: Proxy) -> AgentSettings:
    state = tmp_path / "agent"
    state.mkdir()
    return load_agent_settings(
        None,
        environ={},
        overrides={
            "customer_id": NAME.customer_id,
            "device_id": NAME.device_id,
            "state_dir": state,
            "registrar_url": f"http://127.0.0.1:{platform.http_port}",
            "broker_url": f"mqtt://127.0.0.1:{proxy.port}",
            "keepalive_s": 5,
        },
    )


@pytest_asyncio.fixture
async def credentials(settings: AgentSettings) -> Credentials:
    return await asyncio.wait_for(Enrollment(settings, NAME.device_id).credentials(), 10)


@pytest_asyncio.fixture
async def ops(platform: Platform) -> AsyncIterator[PahoDevice]:
    async with operator_device(platform) as device:
        yield device


class Received:
    """What the operator received, by topic."""

    def __init__(self, ops: PahoDevice) -> None:
        self._ops = ops
        self.payloads: dict[str, list[Any]] = {}

    async def wait(self, topic: str, check: Callable[[list[Any]], bool], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not check(self.payloads.get(topic, [])):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{topic}: only {self.payloads.get(topic)} in {timeout_s} s")
            message = await self._ops.next_message(timeout=min(left, 0.5))
            if message is not None:
                self.payloads.setdefault(message.topic, []).append(json.loads(message.payload))


@contextlib.asynccontextmanager
async def running(link: Link) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(link.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)  # cancelling a link ends it promptly


def seq(i: int) -> Message:
    return Message(TELEMETRY, json.dumps({"seq": i}).encode())


def seqs(payloads: list[Any]) -> list[int]:
    return [p["seq"] for p in payloads if "seq" in p]


async def no_commands(_payload: bytes) -> None:
    return None


async def test_a_message_put_while_a_publish_waits_for_its_ack_is_sent(
    settings: AgentSettings, credentials: Credentials, proxy: Proxy, ops: PahoDevice
) -> None:
    """Issue 8 fault 4: the outbox is full while the sender waits for a PUBACK; the oldest entry
    (being sent) is dropped, and the acknowledgement must not remove the next, unsent one."""
    outbox = Outbox(settings.state_dir, 3)
    await outbox.load()
    link = Link(settings, credentials, [outbox], no_commands)
    received = Received(ops)
    async with running(link):
        await asyncio.wait_for(link.connected.wait(), 10)
        proxy.hold()  # the PUBACK of what is sent now waits in the proxy
        await outbox.put(seq(0))
        await received.wait(TELEMETRY, lambda p: seqs(p) == [0], 10)  # the broker has it
        for i in (1, 2, 3):  # the queue holds 3: 0 is dropped, 1, 2, 3 are queued
            await outbox.put(seq(i))
        proxy.release()
        await received.wait(TELEMETRY, lambda p: seqs(p)[-1:] == [3], 10)
    assert seqs(received.payloads[TELEMETRY]) == [0, 1, 2, 3]
    assert len(outbox) == 0


async def test_a_publish_that_times_out_makes_the_link_reconnect(
    settings: AgentSettings, credentials: Credentials, proxy: Proxy, ops: PahoDevice
) -> None:
    """Issue 8 fault 6: a publish timeout ended the sender and left the connection up, so
    nothing was sent until a reconnect. The session must end and the link reconnect."""
    outbox = Outbox(settings.state_dir, 100)
    await outbox.load()
    link = Link(settings, credentials, [outbox], no_commands, publish_timeout_s=1.0)
    received = Received(ops)
    async with running(link):
        await asyncio.wait_for(link.connected.wait(), 10)
        assert link.connections == 1
        proxy.hold()
        await outbox.put(seq(1))
        await received.wait(TELEMETRY, lambda p: seqs(p) == [1], 10)
        await until(lambda: not link.connected.is_set(), "the session to end", 5)
        proxy.release()  # the network is back (the same connection works again)
        await outbox.put(seq(2))
        await received.wait(TELEMETRY, lambda p: 2 in seqs(p), 10)
        assert link.connections >= 2
    assert len(outbox) == 0


async def test_a_message_too_big_for_the_broker_does_not_block_the_queue(
    settings: AgentSettings, credentials: Credentials, proxy: Proxy, ops: PahoDevice
) -> None:
    """A message larger than the broker's packet limit closed the connection and was resent
    first after every reconnect, for ever. It is dropped and counted; the rest goes through."""
    outbox = Outbox(settings.state_dir, 100, max_message_bytes=settings.max_message_bytes)
    await outbox.load()
    big = {"id": "big", "ok": True, "result": {"lines": ["x" * 8191] * 200}}  # 1.6 MB
    await outbox.put(Message(REPLY, json.dumps(big).encode()))
    await outbox.put(Message(REPLY, json.dumps({"id": "small", "ok": True}).encode()))
    link = Link(settings, credentials, [outbox], no_commands)
    received = Received(ops)
    async with running(link):
        await received.wait(REPLY, lambda p: any(r["id"] == "small" for r in p), 10)
        assert link.connections == 1
    assert outbox.dropped == 1
    assert [r["id"] for r in received.payloads[REPLY]] == ["small"]


async def test_replies_go_before_telemetry(
    settings: AgentSettings, credentials: Credentials, ops: PahoDevice
) -> None:
    telemetry = Outbox(settings.state_dir, 1000)
    replies = Outbox(settings.state_dir, 10, name="outbox-replies")
    await telemetry.load()
    await replies.load()
    for i in range(120):
        await telemetry.put(seq(i))
    await replies.put(Message(REPLY, b'{"id": "r1", "ok": true}'))
    link = Link(settings, credentials, [replies, telemetry], no_commands)
    received = Received(ops)
    async with running(link):
        await received.wait(REPLY, lambda p: len(p) == 1, 10)
        assert len(seqs(received.payloads.get(TELEMETRY, []))) < 120  # the reply came first
        await received.wait(TELEMETRY, lambda p: seqs(p)[-1:] == [119], 10)


def cancel_at_puback(link: Link, task: asyncio.Task[None], count: int) -> None:
    """Cancel `task` from paho's on_publish callback, right after aiomqtt's own, at the
    `count`-th PUBACK: a timing hook on the library's callback, nothing replaced."""
    assert link._client is not None
    paho = link._client._client
    on_publish: Any = paho.on_publish
    assert on_publish is not None
    acks = 0

    def hook(*args: Any) -> None:
        nonlocal acks
        on_publish(*args)  # aiomqtt sets the publish's confirmation
        acks += 1
        if acks == count:
            task.cancel()  # and the cancellation arrives right with it

    paho.on_publish = hook


async def test_a_link_cancelled_as_a_puback_arrives_ends(
    settings: AgentSettings, credentials: Credentials
) -> None:
    """Issue 8 fault 9: the agent sometimes hung on SIGTERM, the outbox sender "cancelling" at
    `available.wait()`. aiomqtt's publish waits with asyncio.wait_for, which in Python 3.11
    swallows a cancellation that arrives as the PUBACK does (it returns the result instead); the
    sender went on, and the link, awaiting it, never ended. Here the link is cancelled from
    paho's on_publish callback, i.e. exactly as a PUBACK arrives, many times over."""
    outbox = Outbox(settings.state_dir, 100_000)
    lines = (Queued(i, seq(i)).to_line() for i in range(1, 5_001))
    (settings.state_dir / "outbox.jsonl").write_bytes(b"".join(lines))
    await outbox.load()
    for trial in range(10):
        link = Link(settings, credentials, [outbox], no_commands)
        task = asyncio.create_task(link.run())
        await asyncio.wait_for(link.connected.wait(), 10)
        cancel_at_puback(link, task, 3 + trial)
        done, _ = await asyncio.wait([task], timeout=5)
        assert done, f"trial {trial}: the link cancelled as a PUBACK arrived did not end"
        assert task.cancelled()


async def test_a_connection_lost_during_the_handshake_is_retried_at_once(
    settings: AgentSettings, credentials: Credentials
) -> None:
    """Found by scripts/soak.py: a connection that dropped before the CONNACK (a network cut
    during the handshake) left the agent waiting out aiomqtt's whole 30 s timeout."""

    async def take_connect_then_drop(reader: asyncio.StreamReader, writer: Any) -> None:
        await reader.read(1)
        writer.transport.abort()

    server = await asyncio.start_server(take_connect_then_drop, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    dropping = load_agent_settings(
        None,
        environ={},
        overrides={
            "customer_id": NAME.customer_id,
            "device_id": NAME.device_id,
            "state_dir": settings.state_dir,
            "broker_url": f"mqtt://127.0.0.1:{port}",
        },
    )
    link = Link(dropping, credentials, [], no_commands)
    try:
        began = time.monotonic()
        reason = await asyncio.wait_for(link._session_until_lost(), 10)
        assert time.monotonic() - began < 2.0, reason
        assert "before CONNACK" in reason
    finally:
        server.close()
        await server.wait_closed()
