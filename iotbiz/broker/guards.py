"""Connection guards: amqtt's stream adapters with limits (part of `iotbiz.broker.hardened`).

`GuardedReader` follows the MQTT framing to refuse packets larger than `max_packet_size` before
buffering them, times the last complete packet (for the keep-alive watch) and, with an
`InflowGate`, stops reading while the broker holds too many of the connection's messages
unprocessed; `GuardedWriter` aborts a peer that stops reading for `write_timeout` seconds, and
hands what is written during one event-loop iteration to the transport in one piece (one send
system call, not one per packet: a subscriber following a whole fleet gets many packets per
iteration; profiled, the sends were a fifth of the broker's time).
Fits amqtt==0.12.1, which `iotbiz.broker.hardened` checks on import.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from amqtt.adapters import ReaderAdapter, StreamWriterAdapter, WebSocketsWriter, WriterAdapter
from amqtt.errors import AMQTTError

log = logging.getLogger(__name__)

# GuardedWriter: queued writes beyond this go to the transport at the next drain (the transport's
# default low-water mark is 16 KiB, its high-water mark 64 KiB).
FLUSH_AT_DRAIN = 16 * 1024


class ConnectionGuardError(AMQTTError):
    """The peer broke the framing rules (oversized or malformed packet); drop the connection.

    Deliberately not an `MQTTError`: amqtt's reader loop skips MQTTErrors and keeps reading,
    while any other exception ends the connection.
    """


# GuardedReader framing states.
_EXPECT_TYPE = 0
_EXPECT_LENGTH = 1
_EXPECT_BODY = 2


class InflowGate:
    """Holds a connection's reader while the broker holds `limit` of its messages unprocessed.

    amqtt's reader loop reads packets as fast as they come and starts a task for each; nothing
    stopped a client that publishes faster than the broker delivers (or sends PINGREQs and
    SUBSCRIBEs without reading the answers) from filling memory with those tasks and the
    queues behind them. With this gate the reader waits, before the first byte of the next
    packet, while `held()` (the protocol handler's count of received packets not yet done
    with) is at `limit`: the client's packets then wait in the kernel's buffers and TCP slows
    the client down. Nothing is dropped.

    The reader loop starts the task of a packet it read only later, so packets read since the
    loop last yielded are counted too (`packet_read`); once the count reaches the limit, one
    yield lets those tasks start and count themselves in `held()`. A paused reader resumes when
    `held()` is down to half the limit, not at the first free place: waking the reader for
    every packet cost a quarter of the throughput of a publisher that the broker cannot keep
    up with (measured: 3,000 -> 2,300 QoS 1 messages/s in a one-publisher test).
    """

    def __init__(self, limit: int, held: Callable[[], int]) -> None:
        self.limit = limit
        self._resume_at = limit // 2
        self._held = held
        self._unseen = 0  # packets read whose handler task may not have started yet
        self._space: asyncio.Future[None] | None = None
        self.paused = False
        self.pauses = 0  # how often the reader waited (for tests and metrics)

    def packet_read(self) -> None:
        self._unseen += 1

    def may_be_full(self) -> bool:
        """False when the reader may go on without awaiting `wait()` (the common case)."""
        return self._unseen + self._held() >= self.limit

    def wake(self) -> None:
        """The handler took or finished a message: let a waiting reader check again."""
        space = self._space
        if space is not None and not space.done() and self._held() <= self._resume_at:
            space.set_result(None)

    async def wait(self) -> bool:
        """Return once the broker holds fewer than `limit` messages; True if it had to wait."""
        if not self.may_be_full():
            return False
        await asyncio.sleep(0)  # the tasks of the packets just read start and count themselves
        self._unseen = 0
        if self._held() < self.limit:
            return False
        self.paused = True
        self.pauses += 1
        try:
            while self._held() > self._resume_at:
                self._space = asyncio.get_running_loop().create_future()
                await self._space
        finally:
            self._space = None
            self.paused = False
        return True


CONNECT_TYPE = 1


class GuardedReader(ReaderAdapter):
    """Wraps a reader adapter and follows the MQTT framing of the bytes it returns.

    It refuses a packet whose remaining length exceeds `max_packet_size` as soon as the length is
    known (before its body is buffered), and records when the last complete control packet
    arrived (`last_packet_at`, `time.monotonic()`), which the keep-alive watchdog reads. With an
    `inflow` gate (set by the protocol handler once the connection is accepted), it waits at the
    start of each packet while the gate is closed; the time it waited does not count as the
    client's silence.
    """

    def __init__(self, inner: ReaderAdapter, max_packet_size: int) -> None:
        self._inner = inner
        self._max_packet_size = max_packet_size
        self._state = _EXPECT_TYPE
        self._length = 0
        self._multiplier = 1
        self._length_bytes = 0
        self._body_left = 0
        self._error: ConnectionGuardError | None = None
        self.last_packet_at = time.monotonic()
        self.inflow: InflowGate | None = None
        self._first = True  # the first packet must be CONNECT [MQTT-3.1.0-1]

    @property
    def paused(self) -> bool:
        """True while the inflow gate holds this reader."""
        return self.inflow is not None and self.inflow.paused

    async def read(self, n: int = -1) -> bytes:
        if self._error is not None:
            raise self._error
        inflow = self.inflow
        if (
            inflow is not None
            and self._state == _EXPECT_TYPE
            and inflow.may_be_full()
            and await inflow.wait()
        ):
            self.last_packet_at = time.monotonic()  # we did not read; the client was not silent
        try:
            data: bytes = await self._inner.read(n)
        except (EOFError, OSError):
            await self._before_end()
            raise
        if not data and n != 0:
            await self._before_end()
        self._track(data)
        return data

    @staticmethod
    async def _before_end() -> None:
        # amqtt's reader loop handles each packet in a new task and cancels the unfinished ones
        # when it reads EOF; if the EOF was already buffered (PUBLISH + DISCONNECT + FIN in one
        # go) they were cancelled before they ran. One loop iteration lets them start.
        await asyncio.sleep(0)

    def feed_eof(self) -> None:
        self._inner.feed_eof()

    def _track(self, data: bytes) -> None:
        index = 0
        while index < len(data):
            if self._state == _EXPECT_BODY:
                taken = min(self._body_left, len(data) - index)
                self._body_left -= taken
                index += taken
                if self._body_left == 0:
                    self._packet_complete()
                continue
            byte = data[index]
            index += 1
            if self._state == _EXPECT_TYPE:
                if self._first:
                    self._first = False
                    if byte >> 4 != CONNECT_TYPE:
                        self._fail(f"the first packet is type {byte >> 4}, not CONNECT")
                self._state = _EXPECT_LENGTH
                self._length, self._multiplier, self._length_bytes = 0, 1, 0
                continue
            self._length += (byte & 0x7F) * self._multiplier
            self._multiplier *= 128
            self._length_bytes += 1
            if byte & 0x80:
                if self._length_bytes == 4:
                    self._fail("malformed remaining length")
                continue
            if self._length > self._max_packet_size:
                self._fail(
                    f"packet of {self._length} bytes exceeds the limit of "
                    f"{self._max_packet_size} bytes"
                )
            if self._length == 0:
                self._packet_complete()
            else:
                self._state = _EXPECT_BODY
                self._body_left = self._length

    def _packet_complete(self) -> None:
        self._state = _EXPECT_TYPE
        self.last_packet_at = time.monotonic()
        if self.inflow is not None:
            self.inflow.packet_read()

    def _fail(self, reason: str) -> None:
        self._error = ConnectionGuardError(reason)
        raise self._error


def _transport_of(writer: WriterAdapter) -> asyncio.WriteTransport | None:
    """The transport under one of amqtt's writer adapters (private attributes, amqtt 0.12.1)."""
    transport: asyncio.WriteTransport | None = None
    if isinstance(writer, StreamWriterAdapter):
        transport = writer._writer.transport
    elif isinstance(writer, WebSocketsWriter):
        transport = writer._protocol.transport
    return transport


class GuardedWriter(WriterAdapter):
    """Wraps a writer adapter: bounded drain/close, and `abort()` to drop a stuck peer."""

    def __init__(self, inner: WriterAdapter, write_timeout: float) -> None:
        self._inner = inner
        self._write_timeout = write_timeout
        self._closed = False
        self.ticket: Any = None  # the connection's admission (iotbiz.broker.admission.Ticket)
        self._transport = _transport_of(inner)
        self._pending: list[bytes] = []  # written during this loop iteration, not yet sent
        self._pending_size = 0
        self._flush_handle: asyncio.Handle | None = None

    def write(self, data: bytes) -> None:
        """Queue `data`; it goes to the transport, with whatever else is written in this
        event-loop iteration, at the end of the iteration (or at the next drain if a lot is
        queued, or at close). Order is kept: every write of the connection comes this way."""
        self._pending.append(data)
        self._pending_size += len(data)
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending.clear()
        self._pending_size = 0
        try:
            self._inner.write(data)
        except (OSError, RuntimeError) as exc:  # the connection is gone; its reader notices
            log.debug("write to %s failed: %r", self.get_peer_info(), exc)

    def backed_up(self) -> bool:
        """True when `drain` may have to wait: the peer is not reading what it is sent (the
        transport's buffer is above its low-water mark), or the connection is closing."""
        transport = self._transport
        return (
            transport is None
            or transport.is_closing()
            or transport.get_write_buffer_size() > transport.get_write_buffer_limits()[0]
        )

    async def drain(self) -> None:
        """The inner drain, bounded by `write_timeout` when it may have to wait.

        When the transport's buffer is at or below its low-water mark, the protocol is not
        paused and drain returns at once: it is called for every packet sent, so the timeout
        (a timer scheduled and cancelled) is only set up when the peer is behind.
        """
        if self._pending_size > FLUSH_AT_DRAIN:
            self._flush()  # much queued: let the transport (and its flow control) have it
        if not self.backed_up():
            await self._inner.drain()
            return
        try:
            async with asyncio.timeout(self._write_timeout):
                await self._inner.drain()
        except TimeoutError as exc:
            log.warning(
                "%s has not read for %.1fs; aborting the connection",
                self.get_peer_info(),
                self._write_timeout,
            )
            self.abort()
            raise ConnectionResetError("peer stopped reading") from exc

    def get_peer_info(self) -> tuple[str, int] | None:
        peer: tuple[str, int] | None = self._inner.get_peer_info()
        return peer

    def get_ssl_info(self) -> Any:
        return self._inner.get_ssl_info()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._flush()
        try:
            async with asyncio.timeout(self._write_timeout):
                await self._inner.close()
        except TimeoutError:
            log.warning("closing %s timed out; aborting the connection", self.get_peer_info())
            self.abort()
        except OSError as exc:
            log.debug("closing %s failed (%r); aborting the connection", self.get_peer_info(), exc)
            self.abort()

    def abort(self) -> None:
        """Drop the connection at once, discarding unsent data."""
        self._pending.clear()
        self._pending_size = 0
        transport = _transport_of(self._inner)
        if transport is not None:
            transport.abort()
