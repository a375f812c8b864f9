"""`HardenedBroker`: amqtt's `Broker` with measured amqtt 0.12.1 defects fixed.

This module overrides private amqtt internals and fits **amqtt==0.12.1 exactly**; importing it
with any other amqtt version raises ImportError. Re-read every override below before changing
the pin.

Defects fixed, and where:

1. A CONNECT with a wrong password but a victim's client id destroyed the victim's session and/or
   disconnected the victim, because amqtt deleted/merged/took over the session *before*
   authenticating. -> `HardenedBroker._handle_client_session` authenticates the incoming
   (fresh) session first and refuses it without touching the session table. Only an
   authenticated client closes a live connection with its client id (`_end_live_connection`)
   and resumes or replaces the stored session (`_adopt_session`).
2. Every CONNECT was sent the retained messages matching *every* client's subscriptions.
   -> `_handle_client_session` sends retained messages only for the client's own (persisted)
   subscriptions, each through the RECEIVE ACL.
3. Retained messages sent on SUBSCRIBE skipped the RECEIVE ACL.
   -> `_publish_retained_messages_for_subscription` asks `_topic_filtering(..., RECEIVE)`.
4. Will messages skipped the PUBLISH ACL. -> `_handle_disconnect` checks the will topic with
   `_topic_filtering(..., PUBLISH)` (and the MQTT topic-name rules) and drops a denied will.
5. Keep-alive was not enforced. -> `HardenedProtocolHandler` runs a watchdog: no complete
   control packet for `keepalive_grace` (1.5) x keep-alive seconds is an abnormal disconnect,
   so the will fires. Keep-alive 0 disables it.
6. Outgoing QoS 1/2 messages were discarded 5 s after sending when no ack came.
   -> `HardenedProtocolHandler` waits `ack_timeout` seconds (60 by default); on that timeout,
   or when the connection drops, the message *stays* in `session.inflight_out`. A late
   PUBACK/PUBREC/PUBCOMP still completes it.
7. Unacknowledged QoS 1/2 messages were not re-sent when a persistent session reconnected.
   -> `HardenedProtocolHandler._retry_deliveries` re-sends them in their original order
   (PUBLISH with DUP=1, or PUBREL for QoS 2 messages already PUBREC'd) before messages queued
   while the client was offline are delivered [MQTT-4.4.0-1].

Connection hygiene: every connection's reader is a `GuardedReader`, which follows the MQTT
framing to refuse packets larger than `max_packet_size` (before buffering them) and to time
the last complete packet for the keep-alive watchdog; every writer is a `GuardedWriter`, which
aborts a peer that stops reading for `write_timeout` seconds. A connection that does not
complete its CONNECT within `connect_timeout` seconds, or sends junk, is closed.

Leaving right after publishing (found while testing; amqtt lost data or kept ghosts):
`_client_message_loop` processes the messages a client published before its DISCONNECT (or
EOF) ahead of the disconnect, instead of dropping the rest of the queue; `GuardedReader` yields
once at EOF so amqtt's reader loop does not cancel the handlers of packets that arrived with
the FIN; `HardenedProtocolHandler.handle_disconnect`/`wait_disconnect`/`start` remember a
disconnect that happens before the broker waits for it, so the session does not stay
"connected" forever and a proper DISCONNECT never fires the will.

Smaller fixes made while copying amqtt code: queued offline messages are delivered with
RETAIN=0 [MQTT-3.3.1-9]; retained messages are delivered at min(granted QoS, message QoS);
waiting for acknowledgements never blocks a client's message loop; a PUBREL that nobody waits
for is answered with PUBCOMP; a clean session's state is never resumed; a stored session is
only resumed by the same username; a client whose message loop ends without a disconnect
(e.g. an invalid PUBLISH topic) is disconnected, and CLIENT_DISCONNECTED always follows
CLIENT_CONNECTED.

Semantics and cost, found by the conformance scenarios and the benchmarks: messages and wills are
delivered at min(message QoS, subscription QoS) [MQTT-3.8.4-6] (`_run_broadcast`, with the
published QoS passed on by `_handle_message_delivery`); the broadcast loop runs each message
inline, without amqtt's per-filter log formatting or a task per message; TCP listeners use a
listen backlog of `LISTEN_BACKLOG`; sessions and their queues are lean (`iotbiz.broker.sessions`).

Cost at fleet scale: amqtt walked every subscription of every client for each PUBLISH, all
subscriptions for each CONNECT, all retained messages for each SUBSCRIBE and every session every
second; see `iotbiz.broker.delivery` (the subscription and retained indexes) and
`iotbiz.broker.registry` (the session monitor).

Bounds on what one client can make the broker hold (amqtt bounded none of them): a connection's
received-but-unprocessed packets (`max_inflight_in`; beyond it the reader stops, so TCP slows
the client: `iotbiz.broker.guards.InflowGate`); accepted messages waiting for the broadcast loop
(`max_broadcast_queue`; while full, publishers' message loops wait, and so their readers); the
deliveries one connected client has unfinished (`max_queued_messages`; a new one beyond it is
dropped and counted in `dropped_deliveries`); the messages queued for one offline persistent
session (`max_queued_messages` too; the oldest is dropped and counted in
`dropped_queued_messages`). Drops are logged at most every `DROP_LOG_PERIOD_S`.

Refusal codes: amqtt answers every refused CONNECT with CONNACK 5 (not authorised); an auth plugin
may instead set the session attribute `REFUSAL_CODE` (e.g. to 3, server unavailable, when it could
not check the credentials), which `_handle_client_session` sends.

Public additions: `HardenedBroker.listener_port()`, `is_connected()`,
`connected_client_ids()`, `disconnect_client()` and `drop_retained()` (see their docstrings).

Layout: `HardenedBroker` (here: construction and limits, connection set-up, authentication and
the message loop) inherits `SessionRegistry` (`iotbiz.broker.registry`: live connections,
take-over, session adoption and expiry, wills) and `SubscriptionDelivery`
(`iotbiz.broker.delivery`: the subscription and retained indexes, broadcast and delivery), both
amqtt `Broker` subclasses; the log filters and the throttle are in `iotbiz.broker.log_filters`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

import amqtt
from amqtt.contexts import ListenerType
from amqtt.errors import AMQTTError, BrokerError, CodecError, MQTTError, NoDataError
from amqtt.events import BrokerEvents
from amqtt.mqtt.connack import NOT_AUTHORIZED
from amqtt.session import Session
from transitions import MachineError

from iotbiz.broker.admission import Admission, LoginBrake
from iotbiz.broker.delivery import BROADCAST_SHUTDOWN_TIMEOUT as BROADCAST_SHUTDOWN_TIMEOUT
from iotbiz.broker.delivery import DROP_LOG_PERIOD_S, SubscriptionDelivery
from iotbiz.broker.delivery import SUBACK_FAILURE as SUBACK_FAILURE
from iotbiz.broker.guards import ConnectionGuardError, GuardedReader, GuardedWriter
from iotbiz.broker.handler import (
    DEFAULT_ACK_TIMEOUT,
    DEFAULT_KEEPALIVE_GRACE,
    DEFAULT_MAX_INFLIGHT_IN,
    HardenedProtocolHandler,
)
from iotbiz.broker.log_filters import FAILED_CONNECT_LOG_PERIOD_S as FAILED_CONNECT_LOG_PERIOD_S
from iotbiz.broker.log_filters import FAILED_CONNECTS as FAILED_CONNECTS
from iotbiz.broker.log_filters import StartupFailureFilter, Throttle
from iotbiz.broker.registry import Connection, SessionRegistry
from iotbiz.broker.sessions import LeanQueue
from iotbiz.broker.topic_index import RetainedIndex, SubscriptionIndex

AMQTT_VERSION = "0.12.1"
if amqtt.__version__ != AMQTT_VERSION:
    raise ImportError(
        f"iotbiz.broker.hardened overrides amqtt internals and fits amqtt=={AMQTT_VERSION} "
        f"exactly, but amqtt {amqtt.__version__} is installed"
    )

__all__ = [
    "AMQTT_VERSION",
    "REFUSAL_CODE",
    "ConnectionGuardError",
    "GuardedReader",
    "GuardedWriter",
    "HardenedBroker",
    "HardenedProtocolHandler",
]

log = logging.getLogger(__name__)

# Session attribute an auth plugin may set to the CONNACK return code of its refusal (default 5).
REFUSAL_CODE = "hardened.refusal_code"

DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_MAX_PACKET_SIZE = 256 * 1024
DEFAULT_WRITE_TIMEOUT = 30.0
DEFAULT_TAKEOVER_TIMEOUT = 5.0
DEFAULT_MAX_QUEUED_MESSAGES = 1000  # mosquitto's max_queued_messages default
DEFAULT_MAX_BROADCAST_QUEUE = 10_000
DEFAULT_MAX_KEEPALIVE = 300
DEFAULT_FREE_LOGIN_FAILURES = 10
DEFAULT_MAX_LOGIN_DELAY_S = 8.0  # seconds: a client asking 0 or more gets this
DEFAULT_MAX_CONNECTIONS = 20_000
DEFAULT_MAX_PENDING_PER_ADDRESS = 50
# asyncio's default listen backlog is 100: in a reconnect storm of 2,000 devices the kernel dropped
# thousands of SYNs (ListenOverflows), and each dropped client waited for its SYN to be re-sent
# after 1, 3, 7 s... (a 2,000-device warm storm took 12.3 s, its median client 0.8 s). The kernel
# caps it at net.core.somaxconn (4096 on current kernels).
LISTEN_BACKLOG = 4096
MESSAGES_PER_TURN = 32  # a connection's messages processed before the others get a turn

# What parsing an untrusted CONNECT can raise in amqtt 0.12.1 (besides our own guard errors).
_CONNECT_ERRORS = (
    AMQTTError,
    MQTTError,
    NoDataError,
    CodecError,
    ValueError,
    IndexError,
    EOFError,
    OSError,
)


class HardenedBroker(SessionRegistry, SubscriptionDelivery):
    """amqtt 0.12.1 `Broker` with the defects listed in the module docstring fixed.

    Args:
        config, loop, plugin_namespace: as for `amqtt.broker.Broker` (the config dict is an
            amqtt `BrokerConfig`; ACL/auth plugins go under its `plugins:` key).
        ack_timeout: seconds to wait for the ack of an outgoing QoS 1/2 packet before giving up
            *waiting* (the message stays in flight and is re-sent on reconnect).
        keepalive_grace: a client silent for keepalive_grace x its keep-alive is disconnected.
        connect_timeout: seconds a new connection has to deliver its CONNECT packet.
        max_packet_size: largest accepted remaining length of any packet, in bytes.
        write_timeout: seconds a peer may refuse to read before its connection is aborted.
        takeover_timeout: seconds to wait for a replaced or kicked connection to finish.
        max_queued_messages: QoS 1/2 messages kept for one offline persistent session; when it
            is full the oldest is dropped and counted (`dropped_queued_messages`), as mosquitto
            does with its max_queued_messages. Also the deliveries one connected client may
            have unfinished (being written or waiting for their ack); beyond that a new message
            for it is dropped and counted (`dropped_deliveries`): a subscriber that stops reading
            cannot make the broker hold every message until its write timeout.
        max_inflight_in: packets of one connection received and not yet processed (messages,
            subscriptions, acks and PINGRESPs not yet written); while that many are held the
            broker stops reading the connection (TCP backpressure).
        max_broadcast_queue: accepted messages waiting for the broadcast loop; while it is full,
            the message loops wait, so their connections' readers stop too. Nothing is dropped.
    """

    def __init__(
        self,
        config: Any = None,
        loop: asyncio.AbstractEventLoop | None = None,
        plugin_namespace: str | None = None,
        *,
        ack_timeout: float = DEFAULT_ACK_TIMEOUT,
        keepalive_grace: float = DEFAULT_KEEPALIVE_GRACE,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
        write_timeout: float = DEFAULT_WRITE_TIMEOUT,
        takeover_timeout: float = DEFAULT_TAKEOVER_TIMEOUT,
        max_queued_messages: int = DEFAULT_MAX_QUEUED_MESSAGES,
        max_inflight_in: int = DEFAULT_MAX_INFLIGHT_IN,
        max_broadcast_queue: int = DEFAULT_MAX_BROADCAST_QUEUE,
        max_keepalive: int = DEFAULT_MAX_KEEPALIVE,
        admission: Admission | None = None,
        login_brake: LoginBrake | None = None,
    ) -> None:
        limits = {
            "max_keepalive": max_keepalive,
            "ack_timeout": ack_timeout,
            "keepalive_grace": keepalive_grace,
            "connect_timeout": connect_timeout,
            "max_packet_size": max_packet_size,
            "write_timeout": write_timeout,
            "takeover_timeout": takeover_timeout,
            "max_queued_messages": max_queued_messages,
            "max_inflight_in": max_inflight_in,
            "max_broadcast_queue": max_broadcast_queue,
        }
        for name, value in limits.items():
            if value <= 0:
                raise ValueError(f"{name} must be positive, not {value!r}")
        if keepalive_grace < 1:
            raise ValueError(f"keepalive_grace must be at least 1, not {keepalive_grace!r}")
        super().__init__(config, loop, plugin_namespace)
        self.ack_timeout = ack_timeout
        self.keepalive_grace = keepalive_grace
        self.connect_timeout = connect_timeout
        self.max_packet_size = max_packet_size
        self.write_timeout = write_timeout
        self.takeover_timeout = takeover_timeout
        self.max_queued_messages = max_queued_messages
        self.max_inflight_in = max_inflight_in
        self.max_keepalive = max_keepalive
        self.login_brake = login_brake or LoginBrake(
            DEFAULT_FREE_LOGIN_FAILURES, DEFAULT_MAX_LOGIN_DELAY_S
        )
        self.admission = admission or Admission(
            DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_PENDING_PER_ADDRESS
        )
        # amqtt's queue was unbounded; a full one makes publishers' message loops wait.
        self._broadcast_queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(
            maxsize=max_broadcast_queue
        )
        self.dropped_queued_messages = 0  # oldest messages dropped from full offline queues
        self.dropped_deliveries = 0  # messages not sent to a connected client that is behind
        self._queue_drops_logged = Throttle(DROP_LOG_PERIOD_S)
        self._delivery_drops_logged = Throttle(DROP_LOG_PERIOD_S)
        self._connections: dict[str, Connection] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._index: SubscriptionIndex[Session] = SubscriptionIndex()
        self._disconnected: dict[str, Session] = {}  # sessions to check for expiry
        # amqtt's own code (retain_message, shutdown) keeps using it as its dict.
        self._retained: RetainedIndex[Any] = RetainedIndex()
        self._retained_messages = self._retained

    async def _create_server_instance(
        self,
        listener_name: str,
        listener_type: Any,
        address: str | None,
        port: int,
        ssl_context: Any,
    ) -> Any:
        """amqtt's, with a listen backlog fit for a reconnect storm (TCP listeners)."""
        if listener_type != ListenerType.TCP:
            return await super()._create_server_instance(
                listener_name, listener_type, address, port, ssl_context
            )
        return await asyncio.start_server(
            functools.partial(self.stream_connected, listener_name=listener_name),
            address,
            port,
            reuse_address=True,
            ssl=ssl_context,
            backlog=LISTEN_BACKLOG,
        )

    # -- public helpers ----------------------------------------------------------------------

    def listener_port(self, listener_name: str = "default") -> int:
        """The TCP port a started listener is bound to (useful with port 0)."""
        server = self._servers[listener_name]
        port: int = server.instance.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        """amqtt's `Broker.start`, without the traceback amqtt logs when it fails.

        amqtt logs "Broker startup failed" with the whole traceback (15 lines for a port in use)
        and then raises `BrokerError` from the cause anyway; reporting that is the caller's job
        (`EmbeddedBroker.start` turns a port in use into one line naming the port and the flag).
        Only that record is dropped, and only while this start runs.
        """
        quiet = StartupFailureFilter()
        self.logger.addFilter(quiet)
        self._index.clear()  # as amqtt clears its subscriptions (a restarted broker)
        try:
            await super().start()
        finally:
            self.logger.removeFilter(quiet)

    async def shutdown(self) -> None:
        await super().shutdown()
        pending = [task for task in self._background if not task.done()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    # -- connection set-up -------------------------------------------------------------------

    async def _client_connected(self, listener_name: str, reader: Any, writer: Any) -> None:
        """amqtt's, behind the connection caps (`admission`): a connection over one is closed
        at once, before amqtt logs or reads anything."""
        peer = writer.get_peer_info()
        address = str(peer[0]) if peer else "unknown"
        ticket = self.admission.admit(address)
        if ticket is None:
            log.debug("MQTT connection from %s closed: over the connection caps", address)
            await GuardedWriter(writer, self.write_timeout).close()
            return
        guarded_writer = GuardedWriter(writer, self.write_timeout)
        guarded_writer.ticket = ticket
        guarded_reader = GuardedReader(reader, self.max_packet_size)
        try:
            await super()._client_connected(listener_name, guarded_reader, guarded_writer)
        finally:
            ticket.release()
            await guarded_writer.close()

    async def _initialize_client_session(
        self, reader: Any, writer: Any, remote_address: str, remote_port: int
    ) -> tuple[HardenedProtocolHandler, Session]:
        """Read and check the CONNECT, within `connect_timeout`; nothing else.

        amqtt 0.12.1 also deleted/merged the stored session here, before authentication
        (defect 1); that now happens in `_handle_client_session`, after it.
        """
        peer = f"{remote_address}:{remote_port}"
        try:
            async with asyncio.timeout(self.connect_timeout):
                handler, session = await HardenedProtocolHandler.init_from_connect(
                    reader, writer, self.plugins_manager
                )
        except TimeoutError as exc:
            # amqtt's _client_connected logs the MQTTError below as a warning.
            await writer.close()
            raise MQTTError(f"no CONNECT from {peer} within {self.connect_timeout}s") from exc
        except _CONNECT_ERRORS as exc:
            await writer.close()
            raise MQTTError(f"bad CONNECT from {peer}: {exc!r}") from exc
        ticket = getattr(writer, "ticket", None)
        if ticket is not None:
            ticket.connect_read()  # no longer one of its address's sockets waiting for CONNECT
        if not 0 < session.keep_alive <= self.max_keepalive:
            # 0 (no keep-alive) or more than the server allows: a silent client would count as
            # online for ever; MQTT 3.1.1 has no way to tell it, so the broker just applies its own
            session.keep_alive = self.max_keepalive
        handler.ack_timeout = self.ack_timeout
        handler.keepalive_grace = self.keepalive_grace
        handler.max_inflight_in = self.max_inflight_in
        handler.max_queued_out = self.max_queued_messages
        return handler, session

    async def _handle_client_session(
        self,
        reader: Any,
        writer: Any,
        client_session: Session,
        handler: HardenedProtocolHandler,
        server: Any,
        listener_name: str,
    ) -> None:
        """Authenticate, take over, register and serve one connection.

        A copy of amqtt's method with these changes: authentication comes first and a refused
        client never touches the session table (defect 1), and is answered with the plugin's
        `REFUSAL_CODE` if it set one; the take-over of a live connection
        waits for that connection to finish; retained messages are sent only for the client's
        own subscriptions (defect 2); the connection is always finished as a disconnect.
        """
        if not await self._authenticate(client_session, self.listeners_config[listener_name]):
            code = client_session.attributes.get(REFUSAL_CODE, NOT_AUTHORIZED)
            log.debug(  # counted, and summed up by the authority: a flood must not flood the log
                "refused CONNECT of client id %r (user %r) from %s:%s: CONNACK %s",
                client_session.client_id,
                client_session.username,
                client_session.remote_address,
                client_session.remote_port,
                code,
            )
            if code == NOT_AUTHORIZED:  # not for CONNACK 3 (busy): those credentials may be right
                await asyncio.sleep(self.login_brake.refused(client_session.remote_address))
            client_session.parent = 0
            handler.attach(client_session, reader, writer)
            await handler.mqtt_connack_refuse(code)
            await writer.close()
            return

        client_id: str | None = client_session.client_id
        if not client_id:
            raise BrokerError("Client ID was not correctly created/set.")
        await self._end_live_connection(client_id)
        session = await self._adopt_session(client_session)
        # From the check in _end_live_connection to the registration below nothing suspends
        # (amqtt's _delete_session never awaits anything real), so no other connection with
        # this client id can register in between.
        try:
            session.transitions.connect()
        except (MachineError, ValueError):  # still "connected" after a forced take-over
            session.transitions.disconnect()
            session.transitions.connect()
        handler.attach(session, reader, writer)
        self._sessions[client_id] = (session, handler)
        self._disconnected.pop(client_id, None)
        connection = Connection(handler, writer)
        self._connections[client_id] = connection
        try:
            await handler.mqtt_connack_authorize(True)
            await self.plugins_manager.fire_event(
                BrokerEvents.CLIENT_CONNECTED, client_id=client_id, client_session=session
            )
            await handler.start()  # re-sends unacknowledged messages first (defect 7)
            await self._publish_session_retained_messages(session)
            for subscription in self._subscriptions_of(session):  # defect 2
                await self._publish_retained_messages_for_subscription(subscription, session)
            await self._client_message_loop(session, handler)
        finally:
            try:
                if (
                    session.transitions.is_connected()
                    and self._sessions.get(client_id, (None, None))[1] is handler
                ):
                    # The loop ended without a disconnect (amqtt breaks out of it on an invalid
                    # PUBLISH topic and then left the connection open): treat as abnormal.
                    closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                    closed.set_result(None)
                    await self._handle_disconnect(session, handler, closed)
            finally:
                if self._connections.get(client_id) is connection:
                    del self._connections[client_id]
                connection.done.set()

    async def _client_message_loop(self, client_session: Session, handler: Any) -> None:
        """Serve one connection: subscriptions, unsubscriptions, published messages, disconnect.

        amqtt's loop, changed: it waits once for any of them (`handler.wait_activity`: the
        queues tell the handler when something is put in them) instead of keeping a task on
        each of the four and an `asyncio.wait` for the first, for every message; and when the
        client disconnects, what it sent before is processed first (amqtt handled the
        disconnect first and dropped whatever was still queued, so a device that published a
        few readings and disconnected at once lost most of them). Each wake-up takes, in
        amqtt's order, the pending subscriptions, unsubscriptions and messages, yielding to the
        other connections every `MESSAGES_PER_TURN` messages. An invalid PUBLISH topic still
        ends the loop (amqtt's rule); `_handle_client_session` then finishes the connection as
        an abnormal disconnect.
        """
        messages = client_session.delivered_message_queue
        if not isinstance(messages, LeanQueue):
            raise BrokerError(f"session of {client_session.client_id} is not a LeanSession")
        messages.listener = handler.notify_activity
        try:
            while True:
                await handler.wait_activity(messages)
                while (subscription := handler.next_subscription()) is not None:
                    await self._handle_subscription(client_session, handler, _ready(subscription))
                while (unsubscription := handler.next_unsubscription()) is not None:
                    await self._handle_unsubscription(
                        client_session, handler, _ready(unsubscription)
                    )
                for _ in range(MESSAGES_PER_TURN):
                    message = handler.next_message(messages)
                    if message is None:
                        break
                    if not await self._handle_message_delivery(
                        client_session, handler, _ready(message)
                    ):
                        return
                else:
                    await asyncio.sleep(0)  # more may be queued: let the other connections run
                    continue
                if handler.ended and not messages.qsize():
                    ended = _ready(handler.ended_with)
                    await self._handle_disconnect(client_session, handler, ended)
                    return
        except asyncio.CancelledError:
            log.debug("message loop of %s cancelled", client_session.client_id)
            raise
        finally:
            if messages.listener == handler.notify_activity:
                messages.listener = None


def _ready(value: Any) -> asyncio.Future[Any]:
    """A future already holding `value`: amqtt's handlers take the waiter they were woken by."""
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future
