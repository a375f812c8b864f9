"""The session and connection registry of `HardenedBroker` (part of `iotbiz.broker.hardened`).

`SessionRegistry` is amqtt's `Broker` with its session table changed only after authentication:
one live connection per client id (`_connections`), closed and awaited before another takes over
(`_end_live_connection`); a stored session resumed only for the same user (`_adopt_session`);
wills checked against the PUBLISH ACL (`_handle_disconnect`, defect 4). `HardenedBroker`
inherits it and sets its attributes in `__init__`. Fits amqtt==0.12.1, which
`iotbiz.broker.hardened` checks on import.

amqtt's session monitor walked every session every second to find the disconnected ones to
expire; `_session_monitor` looks only at the sessions that disconnected (`_disconnected`, kept
by `_handle_disconnect` and the CONNECT).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.session import Session

from iotbiz.broker.guards import GuardedWriter
from iotbiz.broker.handler import HardenedProtocolHandler

__all__ = ["Connection", "SessionRegistry"]

log = logging.getLogger("iotbiz.broker.hardened")  # the logger name from before the split


@dataclass(eq=False)
class Connection:
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


class SessionRegistry(Broker):
    """amqtt's `Broker` with its session table kept as the module docstring says."""

    # Set by HardenedBroker.__init__.
    takeover_timeout: float
    _connections: dict[str, Connection]
    _disconnected: dict[str, Session]  # sessions to check for expiry

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

    async def _end_live_connection(self, client_id: str) -> None:
        """[MQTT-3.1.4-2] Close the live connection of `client_id`, if any, and wait for it."""
        while (connection := self._connections.get(client_id)) is not None:
            log.info("client %s connected again; closing its previous connection", client_id)
            await self._close_connection(client_id, connection)

    async def _close_connection(self, client_id: str, connection: Connection) -> None:
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
