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
subscriptions for each CONNECT and all retained messages for each SUBSCRIBE. Subscriptions now
live in a `SubscriptionIndex` (exact filters by one dict lookup, wildcard filters in a trie, by
client id too) and retained messages in a `RetainedIndex` (`iotbiz.broker.topic_index`). The
index is the one seam: `add_subscription`, `_del_subscription`, `_del_all_subscriptions`,
`_subscriptions_of`, `_run_broadcast` and `_publish_retained_messages_for_subscription` use it,
and amqtt's `_subscriptions` dict stays empty (`subscriptions` returns a snapshot in its shape).
A message matching several of one client's filters reaches it once, at the highest of their
QoS [MQTT-3.3.5-1] (amqtt sent one copy per filter). amqtt's session monitor walked every
session every second to find the disconnected ones to expire; `_session_monitor` looks only at
the sessions that disconnected (`_disconnected`, kept by `_handle_disconnect` and the CONNECT).

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
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import amqtt
from amqtt.broker import Broker
from amqtt.contexts import Action, ListenerType
from amqtt.errors import AMQTTError, BrokerError, CodecError, MQTTError, NoDataError
from amqtt.events import BrokerEvents
from amqtt.mqtt.connack import NOT_AUTHORIZED
from amqtt.mqtt.constants import QOS_1, QOS_2
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.session import Session
from transitions import MachineError

from iotbiz.broker.admission import Admission, LoginBrake
from iotbiz.broker.guards import ConnectionGuardError, GuardedReader, GuardedWriter
from iotbiz.broker.handler import (
    DEFAULT_ACK_TIMEOUT,
    DEFAULT_KEEPALIVE_GRACE,
    DEFAULT_MAX_INFLIGHT_IN,
    HardenedProtocolHandler,
    log_task_failure,
)
from iotbiz.broker.topic_index import RetainedIndex, SubscriptionIndex, is_valid_filter

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

# The QoS of the PUBLISH being handled, for the broadcast it causes (set per client task).
_PUBLISHED_QOS: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "published_qos", default=None
)

# Session attribute an auth plugin may set to the CONNACK return code of its refusal (default 5).
REFUSAL_CODE = "hardened.refusal_code"

SUBACK_FAILURE = 0x80  # SUBACK return code of a refused subscription
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_MAX_PACKET_SIZE = 256 * 1024
DEFAULT_WRITE_TIMEOUT = 30.0
DEFAULT_TAKEOVER_TIMEOUT = 5.0
DEFAULT_MAX_QUEUED_MESSAGES = 1000  # mosquitto's max_queued_messages default
DEFAULT_MAX_BROADCAST_QUEUE = 10_000
FAILED_CONNECT_LOG_PERIOD_S = 10.0
DEFAULT_MAX_KEEPALIVE = 300
DEFAULT_FREE_LOGIN_FAILURES = 10
DEFAULT_MAX_LOGIN_DELAY_S = 8.0  # seconds: a client asking 0 or more gets this
DEFAULT_MAX_CONNECTIONS = 20_000
DEFAULT_MAX_PENDING_PER_ADDRESS = 50
DROP_LOG_PERIOD_S = 10.0  # dropped messages are logged at most this often (and always counted)
# asyncio's default listen backlog is 100: in a reconnect storm of 2,000 devices the kernel dropped
# thousands of SYNs (ListenOverflows), and each dropped client waited for its SYN to be re-sent
# after 1, 3, 7 s... (a 2,000-device warm storm took 12.3 s, its median client 0.8 s). The kernel
# caps it at net.core.somaxconn (4096 on current kernels).
LISTEN_BACKLOG = 4096
BROADCAST_SHUTDOWN_TIMEOUT = 5.0  # amqtt's: deliveries still running at shutdown get this long

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


class _Throttle:
    """`ready()` is true at most once per `period` seconds (for log lines about counted events)."""

    __slots__ = ("_last", "_period")

    def __init__(self, period: float) -> None:
        self._period = period
        self._last = -period

    def ready(self) -> bool:
        now = time.monotonic()
        if now - self._last < self._period:
            return False
        self._last = now
        return True


class _StartupFailureFilter(logging.Filter):
    """Drops amqtt's "Broker startup failed" record (its exception is raised to the caller)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == "Broker startup failed" and record.exc_info)


class _FailedConnectSummary(logging.Filter):
    """amqtt logs a WARNING for every connection that sent no CONNECT in time or a bad one: a
    pool of silent sockets, reopened as they time out, wrote lines without end. Those records
    are dropped and counted; one INFO line at most every FAILED_CONNECT_LOG_PERIOD_S sums them
    up (the latest's reason with it)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self._logged = 0
        self._throttle = _Throttle(FAILED_CONNECT_LOG_PERIOD_S)

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Failed to initialize client session"):
            return True
        self.count += 1
        if self._throttle.ready():
            log.info(
                "connections closed without a good CONNECT: %d since the last such line"
                " (the latest: %s)",
                self.count - self._logged,
                str(record.getMessage()).removeprefix("Failed to initialize client session: "),
            )
            self._logged = self.count
        return False


FAILED_CONNECTS = _FailedConnectSummary()
logging.getLogger("amqtt.broker").addFilter(FAILED_CONNECTS)


@dataclass(eq=False)
class _Connection:
    """A live (CONNACKed, not yet finished) connection of one client id."""

    handler: HardenedProtocolHandler
    writer: GuardedWriter
    done: asyncio.Event = field(default_factory=asyncio.Event)


async def _wait_event(event: asyncio.Event, seconds: float) -> bool:
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        return False
    return True


def _is_topic_name(topic: str | None) -> bool:
    """A valid PUBLISH topic name for a client (as amqtt checks in _handle_message_delivery)."""
    if not topic:
        return False
    return not ("#" in topic or "+" in topic or topic.startswith("$"))


class HardenedBroker(Broker):
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
        self._queue_drops_logged = _Throttle(DROP_LOG_PERIOD_S)
        self._delivery_drops_logged = _Throttle(DROP_LOG_PERIOD_S)
        self._connections: dict[str, _Connection] = {}
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

    def connected_client_ids(self) -> list[str]:
        """Client ids with a live connection."""
        return list(self._connections)

    def is_connected(self, client_id: str) -> bool:
        return client_id in self._connections

    async def disconnect_client(
        self, client_id: str, *, publish_will: bool = True, discard_session: bool = False
    ) -> bool:
        """Close the live connection of `client_id`; False if it had none.

        Returns once the broker has finished the disconnect (will handled, CLIENT_DISCONNECTED
        fired). The will is published (through the PUBLISH ACL) unless `publish_will` is False;
        `discard_session` also deletes a persistent session (subscriptions, queued messages).
        """
        connection = self._connections.get(client_id)
        if connection is not None:
            if not publish_will:
                connection.handler.session.will_flag = False
            await self._close_connection(client_id, connection)
        if discard_session and client_id not in self._connections:
            await self._delete_session(client_id)
        return connection is not None

    async def start(self) -> None:
        """amqtt's `Broker.start`, without the traceback amqtt logs when it fails.

        amqtt logs "Broker startup failed" with the whole traceback (15 lines for a port in use)
        and then raises `BrokerError` from the cause anyway; reporting that is the caller's job
        (`EmbeddedBroker.start` turns a port in use into one line naming the port and the flag).
        Only that record is dropped, and only while this start runs.
        """
        quiet = _StartupFailureFilter()
        self.logger.addFilter(quiet)
        self._index.clear()  # as amqtt clears its subscriptions (a restarted broker)
        try:
            await super().start()
        finally:
            self.logger.removeFilter(quiet)

    async def drop_retained(
        self, matches: Callable[[str], bool], *, topic_filter: str | None = None
    ) -> int:
        """Remove the retained messages whose topic `matches`; return how many.

        With `topic_filter`, only the messages that filter selects are considered (found in
        the retained index, not by a walk over all of them). Each goes through amqtt's own
        clearing path (`retain_message` with an empty payload, [MQTT-3.3.1-10]), which also
        fires the RETAINED_MESSAGE event.
        """
        candidates = (
            list(self._retained_messages)
            if topic_filter is None
            else [topic for topic, _ in self._retained.matching(topic_filter)]
        )
        doomed = [topic for topic in candidates if matches(topic)]
        for topic in doomed:
            await self.retain_message(None, topic, b"")
        return len(doomed)

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
        connection = _Connection(handler, writer)
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

        Copy of amqtt's loop, changed: when the client disconnects, the messages it published
        before are processed first. amqtt handled the disconnect first and dropped whatever
        was still queued, so a device that published a few readings and disconnected at once
        lost most of them. An invalid PUBLISH topic still ends the loop (amqtt's rule);
        `_handle_client_session` then finishes the connection as an abnormal disconnect.
        """
        disconnect_waiter = asyncio.ensure_future(handler.wait_disconnect())
        subscribe_waiter = asyncio.ensure_future(handler.get_next_pending_subscription())
        unsubscribe_waiter = asyncio.ensure_future(handler.get_next_pending_unsubscription())
        wait_deliver = asyncio.ensure_future(handler.mqtt_deliver_next_message())
        try:
            while True:
                done, _ = await asyncio.wait(
                    [disconnect_waiter, subscribe_waiter, unsubscribe_waiter, wait_deliver],
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if subscribe_waiter in done:
                    await self._handle_subscription(client_session, handler, subscribe_waiter)
                    subscribe_waiter = asyncio.ensure_future(
                        handler.get_next_pending_subscription()
                    )
                if unsubscribe_waiter in done:
                    await self._handle_unsubscription(client_session, handler, unsubscribe_waiter)
                    unsubscribe_waiter = asyncio.ensure_future(
                        handler.get_next_pending_unsubscription()
                    )
                if wait_deliver in done:
                    if not await self._handle_message_delivery(
                        client_session, handler, wait_deliver
                    ):
                        return
                    wait_deliver = asyncio.ensure_future(handler.mqtt_deliver_next_message())
                if disconnect_waiter in done:
                    # Stop the delivery waiter first (keeping a message it already took).
                    wait_deliver.cancel()
                    taken = await asyncio.gather(wait_deliver, return_exceptions=True)
                    first = None if isinstance(taken[0], BaseException) else taken[0]
                    await self._deliver_queued_messages(client_session, handler, first)
                    await self._handle_disconnect(client_session, handler, disconnect_waiter)
                    return
        except asyncio.CancelledError:
            log.debug("message loop of %s cancelled", client_session.client_id)
            raise
        finally:
            waiters = [disconnect_waiter, subscribe_waiter, unsubscribe_waiter, wait_deliver]
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)

    async def _deliver_queued_messages(
        self, client_session: Session, handler: Any, first: Any
    ) -> None:
        """Process the messages a disconnecting client published before it disconnected."""
        queue = client_session.delivered_message_queue
        message = first
        while message is not None or not queue.empty():
            if message is None:
                message = queue.get_nowait()
            received: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            received.set_result(message)
            message = None
            if not await self._handle_message_delivery(client_session, handler, received):
                return

    async def _end_live_connection(self, client_id: str) -> None:
        """[MQTT-3.1.4-2] Close the live connection of `client_id`, if any, and wait for it."""
        while (connection := self._connections.get(client_id)) is not None:
            log.info("client %s connected again; closing its previous connection", client_id)
            await self._close_connection(client_id, connection)

    async def _close_connection(self, client_id: str, connection: _Connection) -> None:
        await connection.handler.request_close()
        if await _wait_event(connection.done, self.takeover_timeout):
            return
        log.warning("connection of %s did not finish; aborting its socket", client_id)
        connection.writer.abort()
        if await _wait_event(connection.done, self.takeover_timeout):
            return
        log.error("connection of %s is stuck; forgetting it and its session", client_id)
        if self._connections.get(client_id) is connection:
            del self._connections[client_id]
        if self._sessions.get(client_id, (None, None))[1] is connection.handler:
            await self._delete_session(client_id)

    async def _adopt_session(self, incoming: Session) -> Session:
        """The session an authenticated CONNECT continues with (amqtt did this before auth).

        A persistent session is resumed only for a persistent CONNECT by the same username, and
        never from a clean session that the session monitor has not removed yet.
        """
        client_id: str = incoming.client_id
        existing: Session | None = self._sessions.get(client_id, (None, None))[0]
        incoming.parent = 0
        if existing is None:
            return incoming
        if incoming.clean_session or existing.clean_session:
            await self._delete_session(client_id)
            return incoming
        if existing.username is not None and existing.username != incoming.username:
            log.warning(
                "client id %s: stored session belongs to user %r, not %r; starting a new one",
                client_id,
                existing.username,
                incoming.username,
            )
            await self._delete_session(client_id)
            return incoming
        # The new connection brings its own will, keep-alive, credentials and peer (amqtt
        # 0.12.1 forgot will_retain and the peer) and whatever the auth plugins stored.
        for name in (
            "will_flag",
            "will_message",
            "will_topic",
            "will_qos",
            "will_retain",
            "keep_alive",
            "username",
            "password",
            "remote_address",
            "remote_port",
            "ssl_object",
            "is_anonymous",
            "clean_session",
        ):
            setattr(existing, name, getattr(incoming, name))
        existing.attributes.update(incoming.attributes)
        existing.parent = 1
        log.debug("resuming stored session of %s", client_id)
        return existing

    def _subscriptions_of(self, session: Session) -> list[tuple[str, int]]:
        """The client's own subscriptions, from the index (no walk over everyone's)."""
        return self._index.filters_of(session.client_id)

    # -- subscriptions (the index is the seam: iotbiz.broker.topic_index) ---------------------

    @property
    def subscriptions(self) -> dict[str, list[tuple[Session, int]]]:
        """amqtt's `{filter: [(session, qos), ...]}`, as a snapshot of the index (amqtt's
        property returned its live dict, which the broker no longer fills)."""
        return self._index.as_dict()

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        """amqtt's `Broker.add_subscription`, storing into the `SubscriptionIndex`.

        Same checks in the same order (filter syntax, SUBSCRIBE ACL, `max-qos`), and also an
        empty filter refused [MQTT-4.7.3-1] (amqtt accepted it). A second SUBSCRIBE to the same
        filter replaces the QoS [MQTT-3.8.4-3] (amqtt kept the first one).
        """
        topic_filter, qos = subscription
        if not is_valid_filter(topic_filter):
            return SUBACK_FAILURE
        if not await self._topic_filtering(session, topic_filter, Action.SUBSCRIBE):
            return SUBACK_FAILURE
        max_qos = self.config.get("max-qos", qos)
        if not isinstance(max_qos, int):
            max_qos = qos
        qos = min(qos, max_qos)
        self._index.add(session.client_id, session, topic_filter, qos)
        return qos

    def _del_subscription(self, a_filter: str, session: Session) -> int:
        """amqtt's (UNSUBSCRIBE one filter), in the index: only this client's entry."""
        return 1 if self._index.remove(session.client_id, a_filter) else 0

    async def _del_all_subscriptions(self, session: Session) -> None:
        """amqtt's (a session deleted or cleaned up) walked every filter; now only the
        client's own entries are touched."""
        self._index.remove_client(session.client_id)

    # -- delivery ----------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(log_task_failure)

    async def _may_receive(self, session: Session, topic: str) -> bool:
        allowed: bool = await self._topic_filtering(session, topic=topic, action=Action.RECEIVE)
        if not allowed:
            log.info("%s may not receive %r; not delivered", session.client_id, topic)
        return allowed

    async def _publish_session_retained_messages(self, session: Session) -> None:
        """Deliver the messages queued while the session was offline.

        Copy of amqtt's method, changed: each message passes the RECEIVE ACL again (it may have
        changed since), goes out with RETAIN=0 [MQTT-3.3.1-9] (amqtt set 1), and its ack is not
        awaited here (that blocked the client's message loop).
        """
        handler = self._get_handler(session)
        if handler is None:
            return
        while not session.retained_messages.empty():
            queued = session.retained_messages.get_nowait()
            if await self._may_receive(session, queued.topic):
                self._deliver(handler, session, queued.topic, queued.data, queued.qos)

    async def _handle_message_delivery(
        self, client_session: Session, handler: Any, wait_deliver: asyncio.Future[Any]
    ) -> bool:
        """amqtt's, with the published message's QoS passed on to its broadcast."""
        message = wait_deliver.result()
        token = _PUBLISHED_QOS.set(getattr(message, "qos", None))
        try:
            handled: bool = await super()._handle_message_delivery(
                client_session, handler, wait_deliver
            )
            return handled
        finally:
            _PUBLISHED_QOS.reset(token)

    async def _broadcast_message(
        self, session: Any, topic: str | None, data: Any, force_qos: int | None = None
    ) -> None:
        """Every message allowed through the ACL (and every will) passes here; `force_qos` is
        the message's QoS (amqtt passed it for wills only)."""
        if force_qos is None:
            force_qos = _PUBLISHED_QOS.get()
        await super()._broadcast_message(session, topic, data, force_qos)

    async def _broadcast_loop(self) -> None:
        """Broadcast queued messages until the broker shuts down.

        Replaces amqtt's loop, which wrapped every message in a task of its own and raced it
        against the shutdown future with `asyncio.wait`: here each message is broadcast inline,
        and shutting down (amqtt resolves `_broadcast_shutdown_waiter`) cancels this task.
        Tasks left in `running` are reaped in order, failures logged, as amqtt did; deliveries
        are not among them any more (see `_deliver`).
        """
        running = self._tasks_queue
        shutdown = self._broadcast_shutdown_waiter
        this = asyncio.current_task()
        if this is not None:
            shutdown.add_done_callback(lambda _: this.cancel())
        try:
            while True:
                while running and running[0].done():
                    log_task_failure(running.popleft())
                await self._run_broadcast(running)
        except asyncio.CancelledError:
            if not shutdown.done():
                raise  # cancelled by someone else: not a shutdown
        finally:
            for task in running:
                task.cancel()
            if running:
                await asyncio.wait(running, timeout=BROADCAST_SHUTDOWN_TIMEOUT)

    async def _run_broadcast(self, running_tasks: deque[asyncio.Task[Any]]) -> None:
        """Deliver one message to the sessions subscribed to it.

        Replaces amqtt's method, changed: a message goes out at the lower of its own QoS and
        the subscription's [MQTT-3.8.4-6] (amqtt used the subscription's, so a QoS 0 message
        reached a QoS 2 subscriber at QoS 2 and was queued for offline sessions, and a QoS 2
        will reached a QoS 0 subscriber at QoS 2); each delivery is started by `_deliver`
        (bounded per client, not kept in `running_tasks`); and no log text is built per
        subscription (amqtt formatted several f-strings for every filter of every session,
        matching or not, for every message, whatever the log level). The subscribers come
        from the `SubscriptionIndex` (amqtt compared the topic with every filter of every
        client), each once at the highest QoS of its matching filters [MQTT-3.3.5-1]; they are
        collected before anything is awaited, so subscriptions changing meanwhile cannot break
        the iteration.
        """
        broadcast = await self._broadcast_queue.get()
        topic: str = broadcast["topic"]
        message_qos: int | None = broadcast.get("qos")
        for target, sub_qos in self._index.match(topic):
            qos = sub_qos if message_qos is None else min(message_qos, sub_qos)
            if not await self._may_receive(target, topic):
                continue
            if target.transitions.state != "connected":
                # Kept for a persistent session at QoS 1 and 2 [MQTT-3.1.2-5] (amqtt's rule:
                # not for anonymous clients).
                if not target.clean_session and qos in (QOS_1, QOS_2) and not target.is_anonymous:
                    await self._retain_broadcast_message(broadcast, qos, target)
                continue
            handler = self._get_handler(target)
            if handler is not None:
                self._deliver(handler, target, topic, broadcast["data"], qos)

    def _deliver(
        self,
        handler: Any,
        target: Session,
        topic: str,
        data: Any,
        qos: int,
        *,
        retain: bool = False,
    ) -> None:
        """Start one delivery, owned by the client's handler (and cancelled at shutdown), or
        count it as dropped when the client already has `max_queued_messages` unfinished.

        Broadcasts, retained messages on SUBSCRIBE and queued messages on reconnect all come
        this way. amqtt kept every broadcast delivery task in `running_tasks`, reaped only from
        its head (one subscriber that stopped reading held back the reaping of every later
        delivery), and spawned one per retained message per SUBSCRIBE without limit.
        """
        delivery = handler.deliver(topic, data, qos, retain=retain)
        if delivery is None:
            self.dropped_deliveries += 1
            if self._delivery_drops_logged.ready():
                log.warning(
                    "client %s is %d deliveries behind: message on %r dropped "
                    "(%d dropped in all; logged at most every %.0f s)",
                    target.client_id,
                    self.max_queued_messages,
                    topic,
                    self.dropped_deliveries,
                    DROP_LOG_PERIOD_S,
                )
            return
        self._background.add(delivery)
        delivery.add_done_callback(self._background.discard)
        delivery.add_done_callback(log_task_failure)

    async def _retain_broadcast_message(
        self, broadcast: dict[str, Any], qos: int, target_session: Session
    ) -> None:
        """amqtt's method (queue a message for an offline persistent session), with a cap.

        amqtt queued without limit for as long as the session lived (7 days by default): a
        device that stays away while commands keep coming held them all in memory. Now at most
        `max_queued_messages` wait; when full, the oldest is dropped and counted (the newest
        commands matter most to a device coming back), and the drops are logged at most every
        `DROP_LOG_PERIOD_S`.
        """
        queue = target_session.retained_messages
        while queue.qsize() >= self.max_queued_messages:
            queue.get_nowait()
            self.dropped_queued_messages += 1
            if self._queue_drops_logged.ready():
                log.warning(
                    "queue of offline client %s full (%d): dropped its oldest message "
                    "(%d dropped in all; logged at most every %.0f s)",
                    target_session.client_id,
                    self.max_queued_messages,
                    self.dropped_queued_messages,
                    DROP_LOG_PERIOD_S,
                )
        await super()._retain_broadcast_message(broadcast, qos, target_session)

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        """Send the retained messages matching a subscription (defects 2 and 3).

        Copy of amqtt's method, changed: each message passes the RECEIVE ACL; QoS is
        min(subscription, message) (amqtt sent QoS-0 messages at the subscription's QoS); acks
        are not awaited here; the messages come from the `RetainedIndex` (amqtt matched the
        filter against every retained message: one lookup now for a filter without wildcards).
        """
        topic_filter, sub_qos = subscription
        handler = self._get_handler(session)
        if handler is None:
            return
        for topic, retained in self._retained.matching(topic_filter):
            if not await self._may_receive(session, topic):
                continue
            qos = sub_qos if retained.qos is None else min(sub_qos, retained.qos)
            self._deliver(handler, session, retained.topic, retained.data, qos, retain=True)

    async def _handle_disconnect(
        self, client_session: Session, handler: Any, disconnect_waiter: asyncio.Future[Any]
    ) -> None:
        """amqtt's disconnect handling, after checking the will against the PUBLISH ACL."""
        result = disconnect_waiter.result()
        if (
            client_session.will_flag
            and not isinstance(result, DisconnectPacket)
            and not await self._will_allowed(client_session)
        ):
            client_session.will_flag = False  # the next CONNECT sets it again
        await super()._handle_disconnect(client_session, handler, disconnect_waiter)
        client_id = client_session.client_id
        if self._sessions.get(client_id, (None, None))[0] is client_session:
            self._disconnected[client_id] = client_session  # for the session monitor

    async def _session_monitor(self) -> None:
        """Every second, remove disconnected clean (or anonymous) sessions and persistent ones
        disconnected longer than `session_expiry_interval`.

        Replaces amqtt's monitor, which applied these rules by walking every session (10,000
        connected devices: 20,000 checks a second); this one checks only the sessions that
        disconnected since (`_disconnected`), and forgets those that came back or are gone.
        """
        log.debug("session expiry monitor started")
        while True:
            expiry = self.config.session_expiry_interval
            retain_after = None if expiry is None else math.floor(time.time() - expiry)
            doomed: list[tuple[str, Session]] = []
            for client_id, session in list(self._disconnected.items()):
                current = self._sessions.get(client_id, (None, None))[0]
                if current is not session or session.transitions.state != "disconnected":
                    del self._disconnected[client_id]  # reconnected, replaced or deleted
                    continue
                disconnected_at = session.last_disconnect_time
                if (
                    session.is_anonymous
                    or session.clean_session
                    or (
                        retain_after is not None
                        and disconnected_at
                        and disconnected_at < retain_after
                    )
                ):
                    doomed.append((client_id, session))
            for client_id, session in doomed:
                self._disconnected.pop(client_id, None)
                current = self._sessions.get(client_id, (None, None))[0]
                if current is session and session.transitions.state == "disconnected":
                    await self._cleanup_session(client_id)  # (not if it came back meanwhile)
            await asyncio.sleep(1)

    async def _will_allowed(self, session: Session) -> bool:
        """Defect 4: a will is published on behalf of its client, so it needs PUBLISH rights."""
        topic: str | None = session.will_topic
        if not _is_topic_name(topic):
            log.warning("dropped will of %s: invalid topic %r", session.client_id, topic)
            return False
        allowed: bool = await self._topic_filtering(session, topic=topic, action=Action.PUBLISH)
        if not allowed:
            log.warning("dropped will of %s: may not publish to %r", session.client_id, topic)
        return allowed
