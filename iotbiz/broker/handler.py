"""`HardenedProtocolHandler`: amqtt's per-connection protocol handler with keep-alive enforced
and durable outgoing QoS 1/2 flows (defects 5, 6 and 7; see `iotbiz.broker.hardened`), and with
bounds on what one connection makes the broker hold: received packets not yet processed
(`max_inflight_in`, enforced by stopping the reader: `iotbiz.broker.guards.InflowGate`) and
deliveries waiting for this client (`max_queued_out`, beyond which a new one is refused).

Per-packet costs amqtt paid for nothing on the broker side (found by profiling 1,000-10,000
devices): its reader wrapped every packet read in `asyncio.wait_for(..., keep-alive)` (in Python
3.11 a task and a timer per packet) whose timeout only called `handle_read_timeout`, a no-op in
`BrokerProtocolHandler`; and every packet sent cancelled and re-created a keep-alive timer whose
callback, `handle_write_timeout`, is a no-op there too. Keep-alive is enforced by this module's
watchdog instead, so `_reader_loop` is a lean copy of amqtt's without the `wait_for`, and
`_init_session` leaves amqtt's write timer off.

Fits amqtt==0.12.1, which `iotbiz.broker.hardened` checks on import.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Coroutine, Iterator
from typing import Any

from amqtt.adapters import BufferReader
from amqtt.codecs_amqtt import read_or_raise
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.events import MQTTEvents
from amqtt.mqtt import packet_class
from amqtt.mqtt.connack import ConnackPacket
from amqtt.mqtt.constants import QOS_0, QOS_1, QOS_2
from amqtt.mqtt.packet import (
    CONNACK,
    CONNECT,
    DISCONNECT,
    PINGREQ,
    PINGRESP,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    RESERVED_0,
    RESERVED_15,
    SUBACK,
    SUBSCRIBE,
    UNSUBACK,
    UNSUBSCRIBE,
    MQTTFixedHeader,
)
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.puback import PubackPacket
from amqtt.mqtt.pubcomp import PubcompPacket
from amqtt.mqtt.pubrec import PubrecPacket
from amqtt.mqtt.pubrel import PubrelPacket
from amqtt.session import OUTGOING, Session

from iotbiz.broker.guards import GuardedReader, GuardedWriter, InflowGate
from iotbiz.broker.sessions import LeanQueue, lean_init_from_connect
from iotbiz.broker.strict import malformed

log = logging.getLogger(__name__)

DEFAULT_ACK_TIMEOUT = 60.0
DEFAULT_KEEPALIVE_GRACE = 1.5
DEFAULT_MAX_INFLIGHT_IN = 100
DEFAULT_MAX_QUEUED_OUT = 1000


# amqtt's reader loop: the handler method for each packet type (each runs as a task of its own).
_PACKET_HANDLERS = {
    CONNACK: "handle_connack",
    SUBSCRIBE: "handle_subscribe",
    UNSUBSCRIBE: "handle_unsubscribe",
    SUBACK: "handle_suback",
    UNSUBACK: "handle_unsuback",
    PUBACK: "handle_puback",
    PUBREC: "handle_pubrec",
    PUBREL: "handle_pubrel",
    PUBCOMP: "handle_pubcomp",
    PINGREQ: "handle_pingreq",
    PINGRESP: "handle_pingresp",
    PUBLISH: "handle_publish",
    DISCONNECT: "handle_disconnect",
}
_STRICT_KINDS = frozenset({PUBLISH, SUBSCRIBE, UNSUBSCRIBE})  # checked by `strict.malformed`
_PACKET_RECEIVED = MQTTEvents.PACKET_RECEIVED


async def read_packet(reader: Any) -> tuple[MQTTFixedHeader, bytes] | None:
    """The next packet's fixed header and body (remaining length bytes, read at once), or None
    at EOF before a complete fixed header (as amqtt's `MQTTFixedHeader.from_stream`). EOF in
    the body raises NoDataError, as amqtt's field reads did."""
    try:
        first = (await read_or_raise(reader, 1))[0]
        length, multiplier = 0, 1
        while True:
            byte = (await read_or_raise(reader, 1))[0]
            length += (byte & 0x7F) * multiplier
            if not byte & 0x80:
                break
            multiplier *= 128
            if multiplier > 128**3:
                raise MQTTError(f"invalid remaining length, packet type {first >> 4}")
    except NoDataError:
        return None
    body = await read_or_raise(reader, length) if length else b""
    return MQTTFixedHeader(first >> 4, first & 0x0F, length), body


def _topic_overruns(flags: int, body: bytes) -> bool:
    """True if a PUBLISH body is too short for its topic (and packet id) as its topic length
    says. Read from the connection, amqtt took the missing bytes from the next packet; decoded
    from memory, the topic would come out short."""
    needed = 2 + int.from_bytes(body[:2], "big") + (2 if flags & 0x06 else 0)
    return len(body) < needed


def log_task_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.warning("background broker task %s failed: %r", task.get_name(), exc)


class HardenedProtocolHandler(BrokerProtocolHandler):
    """Per-connection protocol handler: keep-alive watchdog and durable outgoing QoS 1/2 flows.

    The broker sets `ack_timeout`, `keepalive_grace`, `max_inflight_in` and `max_queued_out`
    right after creating it.
    """

    def __init__(
        self,
        plugins_manager: Any,
        session: Session | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(plugins_manager, session, loop)
        # 3.3 KB less each than amqtt's asyncio.Queues (iotbiz.broker.sessions)
        self._pending_subscriptions: LeanQueue[Any] = LeanQueue()
        self._pending_unsubscriptions: LeanQueue[Any] = LeanQueue()
        self._pending_subscriptions.listener = self.notify_activity
        self._pending_unsubscriptions.listener = self.notify_activity
        self._activity: asyncio.Future[None] | None = None  # see `wait_activity`
        self.ack_timeout = DEFAULT_ACK_TIMEOUT
        self.keepalive_grace = DEFAULT_KEEPALIVE_GRACE
        self.max_inflight_in = DEFAULT_MAX_INFLIGHT_IN
        self.max_queued_out = DEFAULT_MAX_QUEUED_OUT
        self._handlers_running = 0  # packet handlers not finished (but QoS 2 PUBLISHes: see there)
        self._inflow: InflowGate | None = None
        # Deliveries to this client not finished (written, and acknowledged for QoS 1/2). Not
        # cancelled by stop(): a QoS 1/2 one must get as far as session.inflight_out (it then
        # stays there for the next connection); on a closed connection they end at once.
        self._deliveries: set[asyncio.Task[Any]] = set()
        self._ended = False  # handle_disconnect() was called (DISCONNECT, EOF, or a close)
        self._ended_with: Any = None
        self._watchdog: asyncio.TimerHandle | None = None  # keep-alive check (defect 5)
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    async def init_from_connect(
        cls,
        reader: Any,
        writer: Any,
        plugins_manager: Any,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> tuple[HardenedProtocolHandler, Session]:
        """amqtt's `BrokerProtocolHandler.init_from_connect`, unchanged except that the session
        it builds is a `LeanSession` (16 KB less per client; see `iotbiz.broker.sessions`).

        The upstream code runs with its own copy of amqtt's module globals, so amqtt itself is
        not patched: a plain amqtt `Broker` in the same process keeps amqtt's sessions.
        """
        handler, session = await lean_init_from_connect(cls, reader, writer, plugins_manager, loop)
        return handler, session

    def _init_session(self, session: Session) -> None:
        """amqtt's, with its keep-alive write timer off: on the broker its callback
        (`handle_write_timeout`) does nothing, and `_send_packet` re-created the timer for every
        packet sent. Keep-alive is this class's watchdog (`start`)."""
        super()._init_session(session)
        self.keepalive_timeout = None

    async def _reader_loop(self) -> None:
        """Replaces amqtt's `ProtocolHandler._reader_loop`: the same steps (read a packet, fire
        PACKET_RECEIVED, run its handler as a task, CONNECT inline; at the end cancel the
        handlers, close, stop), without `asyncio.wait_for` around each read (a task and a timer
        per packet, for a timeout whose handler is a no-op on the broker), with one dict
        lookup instead of a chain of isinstance checks per packet, with each packet's body
        read from the connection in one go (`read_packet`) and decoded by amqtt from memory
        (amqtt read every field with a read of its own on the connection: six for a PUBLISH),
        and with QoS 0 and 1 PUBLISHes handled inline (`_may_receive_inline`).
        """
        session = self._current_session()
        if not self._reader_ready:
            raise AMQTTError("Reader ready is not initialized.")
        running: deque[asyncio.Task[None]] = deque()
        # the events plugins listen to (amqtt 0.12.1's PluginManager): PACKET_RECEIVED is fired
        # only if one does (none of the platform's), as fire_event itself would decide
        listened = getattr(self.plugins_manager, "_event_plugin_callbacks", None)
        while True:
            try:
                self._reader_ready.set()
                while running and running[0].done():
                    running.popleft()
                if self.reader is None:
                    log.warning("reader of %s is not initialized", session.client_id)
                    break
                framed = await read_packet(self.reader)
                if framed is None:
                    break  # EOF
                fixed_header, body = framed
                kind = fixed_header.packet_type
                if kind in (RESERVED_0, RESERVED_15):
                    log.warning("%s sent a reserved packet type: closing", session.client_id)
                    await self.handle_connection_closed()
                    continue
                if kind == PUBLISH and _topic_overruns(fixed_header.flags, body):
                    log.debug("%s sent a PUBLISH cut short: closing", session.client_id)
                    break
                try:
                    packet = await packet_class(fixed_header).from_stream(
                        BufferReader(body), fixed_header=fixed_header
                    )
                except NoDataError:  # from memory: the packet is shorter than its fields say
                    log.debug("%s sent a packet cut short: closing", session.client_id)
                    break
                if listened is None or _PACKET_RECEIVED in listened:
                    await self.plugins_manager.fire_event(
                        _PACKET_RECEIVED, packet=packet, session=session
                    )
                if kind == CONNECT:  # a second one [MQTT-3.1.0-2]: a protocol violation
                    log.debug("%s sent a second CONNECT: closing", session.client_id)
                    break
                if kind in _STRICT_KINDS and (reason := malformed(packet)) is not None:
                    log.debug("%s sent a malformed packet (%s): closing", session.client_id, reason)
                    break
                if kind == PUBLISH and self._may_receive_inline(packet.qos):
                    await super().handle_publish(packet)  # amqtt's, in the reader: no task
                    continue
                name = _PACKET_HANDLERS.get(kind)
                if name is None:
                    log.warning("%s sent unhandled packet type %s", session.client_id, kind)
                    continue
                running.append(asyncio.create_task(getattr(self, name)(packet)))
            except MQTTError:
                log.debug("message from %s discarded", session.client_id)
            except asyncio.CancelledError:
                break
            except NoDataError:
                log.debug("%s: no data available", session.client_id)
            except Exception as exc:  # amqtt's rule: anything else ends the connection
                log.warning("reader of %s failed: %r", session.client_id, exc)
                break
        while running:
            running.popleft().cancel()
        await self.handle_connection_closed()
        self._reader_stopped.set()
        await self.stop()

    def _may_receive_inline(self, qos: int) -> bool:
        """QoS 0 always; QoS 1 unless its PUBACK could not be written at once (the client does
        not read what it is sent: then the PUBLISH runs as a task, as amqtt ran them all, and
        the inflow gate stops the reader, which keep-alive then does not take for silence);
        QoS 2 never (it waits for the client's PUBREL). Inline, a PUBLISH is not counted for
        the inflow gate: the reader reads nothing else until it is done."""
        if qos == QOS_0:
            return True
        writer = self.writer
        return qos == QOS_1 and isinstance(writer, GuardedWriter) and not writer.backed_up()

    async def mqtt_connack_refuse(self, return_code: int) -> None:
        """CONNACK with a refusal code of the caller's choice (amqtt's
        `mqtt_connack_authorize(False)` always sends 5, not authorised)."""
        await self._send_packet(ConnackPacket.build(0, return_code))

    # -- lifecycle ---------------------------------------------------------------------------

    def _current_session(self) -> Session:
        if self.session is None:
            raise AMQTTError("Session is not initialized.")
        return self.session

    @property
    def client_id(self) -> str | None:
        client_id: str | None = self.session.client_id if self.session is not None else None
        return client_id

    async def start(self) -> None:
        session = self._current_session()
        keep_alive: int = session.keep_alive
        if isinstance(self.reader, GuardedReader):
            self._inflow = self.reader.inflow = InflowGate(self.max_inflight_in, self._held)
            if keep_alive > 0:  # defect 5
                self._watch_keepalive(self.reader, keep_alive * self.keepalive_grace)
        await super().start()
        if self._ended:
            # amqtt drops a disconnect that happens before start() created the disconnect waiter
            # (a client that sends DISCONNECT or vanishes right after CONNECT); replay it, or
            # the broker would keep the session "connected" forever.
            await super().handle_disconnect(self._ended_with)

    async def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current and not task.done():
                task.cancel()
        await super().stop()

    async def request_close(self) -> None:
        """End this connection as an abnormal disconnect (the broker then fires the will)."""
        await self.handle_connection_closed()

    async def handle_disconnect(self, disconnect: Any) -> None:
        if not self._ended:
            self._ended = True
            self._ended_with = disconnect
            self.notify_activity()
        await super().handle_disconnect(disconnect)

    @property
    def ended(self) -> bool:
        """The connection ended: DISCONNECT, EOF, or closed (`ended_with` says which)."""
        return self._ended

    @property
    def ended_with(self) -> Any:
        """The DISCONNECT packet that ended the connection, or None for an abnormal end."""
        return self._ended_with

    # -- the broker's message loop: one wait for all its work --------------------------------

    async def wait_activity(self, messages: LeanQueue[Any]) -> None:
        """Return once a subscription, an unsubscription or one of `messages` (the session's
        delivered messages) is pending, or the connection ended.

        The broker's message loop used to keep a task waiting on each of these four (amqtt's
        design) and `asyncio.wait` for the first: four tasks per connected client (about 1.5 KB
        each) and an `asyncio.wait` per message. The queues call `notify_activity` instead."""
        if (
            self._ended
            or self._pending_subscriptions.qsize()
            or self._pending_unsubscriptions.qsize()
            or messages.qsize()
        ):
            return
        self._activity = asyncio.get_running_loop().create_future()
        try:
            await self._activity
        finally:
            self._activity = None

    def notify_activity(self) -> None:
        activity = self._activity
        if activity is not None and not activity.done():
            activity.set_result(None)

    def next_subscription(self) -> Any:
        """The oldest pending SUBSCRIBE, or None; taking one frees room for the reader."""
        return self._take(self._pending_subscriptions)

    def next_unsubscription(self) -> Any:
        """The oldest pending UNSUBSCRIBE, or None; taking one frees room for the reader."""
        return self._take(self._pending_unsubscriptions)

    def _take(self, queue: LeanQueue[Any]) -> Any:
        if not queue.qsize():
            return None
        item = queue.get_nowait()
        self._wake_reader()
        return item

    def next_message(self, messages: LeanQueue[Any]) -> Any:
        """The oldest of the session's delivered `messages`, or None."""
        return self._take(messages)

    async def wait_disconnect(self) -> Any:
        """The DISCONNECT packet, or None for an abnormal end.

        amqtt resets the waiter right after resolving it, so a disconnect that came before the
        broker's message loop started waiting was reported as None (abnormal: the will fired
        after a proper DISCONNECT) -- the recorded first ending is returned instead.
        """
        if self._disconnect_waiter is not None:
            return await self._disconnect_waiter
        return self._ended_with

    def _watch_keepalive(self, reader: GuardedReader, limit: float) -> None:
        """Check again when the client would be `limit` seconds silent; close it if it is.

        A timer, not a task sleeping in a loop: a task and its coroutine cost every connected
        client about 2 KB more."""
        idle = 0.0 if reader.paused else time.monotonic() - reader.last_packet_at
        if idle < limit:
            loop = asyncio.get_running_loop()
            self._watchdog = loop.call_later(limit - idle, self._watch_keepalive, reader, limit)
            return
        self._watchdog = None
        log.info(
            "client %s sent no packet for %.1fs (keep-alive x %.1f); disconnecting it",
            self.client_id,
            idle,
            self.keepalive_grace,
        )
        self._spawn(self.request_close())

    # -- inflow: received messages the broker has not taken yet --------------------------------

    def _held(self) -> int:
        """Packets of this connection received and not yet done with: handlers still running
        (a PUBACK or PINGRESP not yet written, ...), and messages, subscriptions and
        unsubscriptions not yet taken by the broker's message loop (the one it is processing
        is not counted: the bound is max_inflight_in + 1)."""
        session = self.session
        queued: int = session.delivered_message_queue.qsize() if session is not None else 0
        pending: int = self._pending_subscriptions.qsize() + self._pending_unsubscriptions.qsize()
        return self._handlers_running + queued + pending

    def _wake_reader(self) -> None:
        if self._inflow is not None:
            self._inflow.wake()

    @contextlib.contextmanager
    def _counted(self) -> Iterator[None]:
        """Count a running packet handler for the inflow gate."""
        self._handlers_running += 1
        try:
            yield
        finally:
            self._handlers_running -= 1
            self._wake_reader()

    async def handle_pingreq(self, pingreq: Any) -> None:
        """amqtt's, counted for the inflow gate (a client that never reads its PINGRESPs)."""
        with self._counted():
            await super().handle_pingreq(pingreq)

    async def handle_subscribe(self, subscribe: Any) -> None:
        """amqtt's (queue it for the broker), counted for the inflow gate."""
        with self._counted():
            await super().handle_subscribe(subscribe)

    async def handle_unsubscribe(self, unsubscribe: Any) -> None:
        """amqtt's (queue it for the broker), counted for the inflow gate."""
        with self._counted():
            await super().handle_unsubscribe(unsubscribe)

    async def handle_publish(self, publish_packet: Any) -> None:
        """amqtt's, counted for the inflow gate until it is done (queued, PUBACK sent).

        A QoS 2 PUBLISH is not counted while it waits for its PUBREL (which the stopped reader
        could not read: the client would wait for ever); the queue it then joins is, and the
        messages waiting for PUBREL are bounded by the 65,535 packet ids.
        """
        if publish_packet.qos == QOS_2:
            await super().handle_publish(publish_packet)
            return
        with self._counted():
            await super().handle_publish(publish_packet)

    # -- outgoing deliveries -----------------------------------------------------------------

    def deliver(
        self, topic: str, data: bytes, qos: int, *, retain: bool = False
    ) -> asyncio.Task[Any] | None:
        """Start delivering a message to this client; None if `max_queued_out` deliveries are
        already unfinished (the caller counts the drop).

        amqtt started a task per message per subscriber without limit: a subscriber that stopped
        reading collected one for every message until its write timeout.
        """
        if len(self._deliveries) >= self.max_queued_out:
            return None
        task: asyncio.Task[Any] = asyncio.ensure_future(
            self.mqtt_publish(topic, data, qos, retain=retain)
        )
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)
        return task

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(log_task_failure)

    # -- outgoing QoS 1/2 (defects 6 and 7) --------------------------------------------------

    async def _retry_deliveries(self) -> None:
        """[MQTT-4.4.0-1] Re-send unacknowledged outgoing messages, in order, on (re)connect.

        Replaces amqtt's version, which waited here (blocking the new connection) for every ack
        and then dropped the messages. The sends happen before start() returns, so they precede
        the messages queued while the client was offline; the acks are awaited in background.
        Incoming QoS 2 messages still waiting for PUBREL complete when the client re-sends
        PUBREL (see `handle_pubrel`).
        """
        session = self._current_session()
        pending = list(session.inflight_out.values())
        for message in pending:
            waiter = await self._send_next(message)
            self._spawn(self._outgoing_flow(message, waiter))
        if pending:
            log.info("re-sent %d unacknowledged message(s) to %s", len(pending), self.client_id)

    async def _handle_qos1_message_flow(self, app_message: Any) -> None:
        if app_message.direction == OUTGOING:
            await self._outgoing_flow(app_message)
        else:
            await super()._handle_qos1_message_flow(app_message)

    async def _handle_qos2_message_flow(self, app_message: Any) -> None:
        """Outgoing: our flow. Incoming: amqtt's, except for a PUBLISH whose packet id still
        waits for its PUBREL: [MQTT-4.3.3-2] that is the same message sent again, answered with
        PUBREC once more and not delivered twice. amqtt cancelled the first one, kept the second
        and logged a WARNING for each (a client could fill the log at line rate)."""
        if app_message.direction == OUTGOING:
            await self._outgoing_flow(app_message)
            return
        waiter = self._pubrel_waiters.get(app_message.packet_id)
        if waiter is not None and not waiter.done():
            log.debug("QoS 2 PUBLISH %s again from %s", app_message.packet_id, self.client_id)
            await self._send_packet(PubrecPacket.build(app_message.packet_id))
            return
        await super()._handle_qos2_message_flow(app_message)

    async def _outgoing_flow(self, message: Any, waiter: asyncio.Future[Any] | None = None) -> None:
        """Drive one outgoing QoS 1/2 message until acknowledged, timed out, or disconnected.

        The message stays in `session.inflight_out` until its final ack arrives (here or late in
        the `handle_*` methods), so it is re-sent when the session reconnects.
        """
        while True:
            if waiter is None:
                waiter = await self._send_next(message)
            ack = await self._wait_ack(message, waiter)
            waiter = None
            if ack is None:
                return
            if isinstance(ack, PubrecPacket):
                message.pubrec_packet = ack  # QoS 2, step 2: send PUBREL, wait for PUBCOMP
                continue
            if isinstance(ack, PubackPacket):
                message.puback_packet = ack
            else:
                message.pubcomp_packet = ack
            self._current_session().inflight_out.pop(message.packet_id, None)
            return

    async def _send_next(self, message: Any) -> asyncio.Future[Any]:
        """Send the packet the peer must acknowledge next; return the future for that ack."""
        session = self._current_session()
        packet_id: int = message.packet_id
        session.inflight_out[packet_id] = message
        waiters: dict[int, asyncio.Future[Any]]
        if message.qos == QOS_2 and message.pubrec_packet is not None:
            packet = PubrelPacket.build(packet_id)
            message.pubrel_packet = packet
            waiters = self._pubcomp_waiters
        else:
            packet = message.build_publish_packet(dup=message.publish_packet is not None)
            message.publish_packet = packet
            waiters = self._puback_waiters if message.qos == QOS_1 else self._pubrec_waiters
        previous = waiters.get(packet_id)
        if previous is not None and not previous.done():
            previous.cancel()
        # Registered before sending: the ack may be read while the send is still draining.
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        waiters[packet_id] = waiter
        await self._send_packet(packet)
        return waiter

    async def _wait_ack(self, message: Any, waiter: asyncio.Future[Any]) -> Any:
        """The ack packet, or None if it did not come (the message then stays in flight)."""
        try:
            return await asyncio.wait_for(waiter, self.ack_timeout)
        except TimeoutError:
            log.warning(
                "no ack from %s for packet id %s within %.1fs; kept in flight for redelivery",
                self.client_id,
                message.packet_id,
                self.ack_timeout,
            )
            return None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            # stop() cancelled the waiter: the connection is gone, the message stays in flight.
            log.debug(
                "connection to %s closed; packet id %s kept in flight",
                self.client_id,
                message.packet_id,
            )
            return None
        finally:
            for waiters in (self._puback_waiters, self._pubrec_waiters, self._pubcomp_waiters):
                if waiters.get(message.packet_id) is waiter:
                    del waiters[message.packet_id]

    @staticmethod
    def _resolve(waiters: dict[int, asyncio.Future[Any]], packet_id: int, packet: Any) -> bool:
        waiter = waiters.get(packet_id)
        if waiter is None or waiter.done():
            return False
        waiter.set_result(packet)
        return True

    async def handle_puback(self, puback: Any) -> None:
        packet_id: int = puback.packet_id
        if self._resolve(self._puback_waiters, packet_id, puback):
            return
        inflight = self._current_session().inflight_out
        message = inflight.get(packet_id)
        if message is not None and message.qos == QOS_1:  # a late ack (defect 6)
            message.puback_packet = puback
            del inflight[packet_id]
            log.debug("late PUBACK %s from %s", packet_id, self.client_id)
            return
        log.debug("PUBACK for unknown packet id %s from %s", packet_id, self.client_id)

    async def handle_pubrec(self, pubrec: Any) -> None:
        packet_id: int = pubrec.packet_id
        if self._resolve(self._pubrec_waiters, packet_id, pubrec):
            return
        message = self._current_session().inflight_out.get(packet_id)
        if message is not None and message.qos == QOS_2:
            if packet_id not in self._pubcomp_waiters:  # a late PUBREC: continue with PUBREL
                message.pubrec_packet = pubrec
                self._spawn(self._outgoing_flow(message))
            return
        log.debug("PUBREC for unknown packet id %s from %s", packet_id, self.client_id)

    async def handle_pubcomp(self, pubcomp: Any) -> None:
        packet_id: int = pubcomp.packet_id
        if self._resolve(self._pubcomp_waiters, packet_id, pubcomp):
            return
        inflight = self._current_session().inflight_out
        message = inflight.get(packet_id)
        if message is not None and message.qos == QOS_2:
            message.pubcomp_packet = pubcomp
            del inflight[packet_id]
            log.debug("late PUBCOMP %s from %s", packet_id, self.client_id)
            return
        log.debug("PUBCOMP for unknown packet id %s from %s", packet_id, self.client_id)

    async def handle_pubrel(self, pubrel: Any) -> None:
        """Also answer a PUBREL nobody waits for (re-sent after a reconnect) [MQTT-4.3.3-2].

        amqtt 0.12.1 only logged it, leaving the client waiting forever for PUBCOMP and the
        incoming QoS 2 message undelivered in `session.inflight_in`.
        """
        packet_id: int = pubrel.packet_id
        if self._resolve(self._pubrel_waiters, packet_id, pubrel):
            return
        with self._counted():  # the PUBCOMP may wait for a client that does not read
            session = self._current_session()
            message = session.inflight_in.pop(packet_id, None)
            if message is not None:
                message.pubrel_packet = pubrel
                await session.delivered_message_queue.put(message)
            await self._send_packet(PubcompPacket.build(packet_id))
