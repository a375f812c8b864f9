"""The lean per-packet path of `HardenedProtocolHandler` and `GuardedWriter` keeps its bounds:
no keep-alive timer re-created per packet (the watchdog alone enforces keep-alive), packets
written in one event-loop iteration reach the transport as one write, and a peer that stops
reading is still aborted after `write_timeout` although drains below the low-water mark skip
the timeout."""

from __future__ import annotations

import asyncio
import socket
import time

from amqtt.adapters import StreamWriterAdapter

from iotbiz.broker.guards import FLUSH_AT_DRAIN, GuardedWriter
from tests.broker.acl_plugins import PASSWORDS
from tests.broker.test_hardened import until
from tests.broker.test_subscription_flow import FlowClient, started_broker
from tests.mqtt_wire import connect_packet, subscribe_packet


async def test_one_keepalive_timer_per_connection_not_one_per_packet() -> None:
    async with started_broker() as broker:
        port = broker.listener_port()
        alice, _ = await FlowClient.connect(port, "alice")
        assert await alice.subscribe(("a/#", 1)) == [1]
        for n in range(20):
            await alice.publish("a/x", b"m:%d" % n)
        await until(lambda: len(alice.messages) == 20, "alice's own messages")
        handler = broker.sessions["alice"][1]
        assert handler._watchdog is not None  # keep-alive 60 s: the watchdog runs
        assert handler._keepalive_task is None  # amqtt's no-op timer, re-made for every send
        await alice.close()


async def test_a_peer_that_stops_reading_is_aborted_after_the_write_timeout() -> None:
    async with started_broker() as broker:  # write_timeout 2 s (tests/broker/test_hardened)
        port = broker.listener_port()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, connect_packet("alice", "alice", PASSWORDS["alice"], 0))
        await loop.sock_sendall(sock, subscribe_packet("a/#", 0))
        await until(lambda: broker.is_connected("alice"), "alice connected")
        root, _ = await FlowClient.connect(port, "root")
        payload = bytes(32 * 1024)
        started = time.monotonic()
        try:
            while broker.is_connected("alice"):  # alice never reads from now on
                assert time.monotonic() - started < 20, "the stuck peer was never aborted"
                await root.publish("a/big", payload, qos=1)
                await asyncio.sleep(0.01)
        finally:
            sock.close()
        await root.close()


class CountingAdapter(StreamWriterAdapter):
    """amqtt's stream adapter, counting the writes that reach it (the transport's sends)."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        super().__init__(writer)
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


async def test_packets_written_in_one_loop_iteration_go_out_as_one_write() -> None:
    ours, theirs = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=ours)
    peer_reader, peer_writer = await asyncio.open_connection(sock=theirs)
    inner = CountingAdapter(writer)
    guarded = GuardedWriter(inner, write_timeout=5.0)
    for n in range(3):  # as amqtt sends a packet: write, then drain
        guarded.write(b"packet %d;" % n)
        await guarded.drain()
    assert inner.writes == []  # not yet: the iteration has not ended
    await asyncio.sleep(0)
    assert inner.writes == [b"packet 0;packet 1;packet 2;"]
    big = bytes(FLUSH_AT_DRAIN + 1)
    guarded.write(big)
    await guarded.drain()  # much queued: handed over at once
    assert inner.writes[-1] == big
    guarded.write(b"last")
    await guarded.close()  # close sends what is queued first
    expected = b"packet 0;packet 1;packet 2;" + big + b"last"
    async with asyncio.timeout(5):
        assert await peer_reader.readexactly(len(expected)) == expected
    peer_writer.close()
    reader.feed_eof()
