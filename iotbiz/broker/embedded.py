"""The embedded broker: `HardenedBroker` with IoTBiz's plugins, bound to the platform's objects."""

from __future__ import annotations

import errno
import logging
import ssl
from typing import Any

from amqtt.errors import BrokerError

from iotbiz import topics
from iotbiz.broker.admission import Admission, LoginBrake
from iotbiz.broker.authority import Authority
from iotbiz.broker.hardened import HardenedBroker
from iotbiz.broker.plugins import AuthPlugin, PresencePlugin, TopicPlugin, principal_of
from iotbiz.errors import BrokerUnavailable, ConfigError
from iotbiz.names import parse_device_name
from iotbiz.presence import PresenceRecorder
from iotbiz.settings import MQTTSettings

log = logging.getLogger(__name__)

LISTENER = "default"  # plain MQTT: without TLS, or with it only if mqtt.allow_plain
TLS_LISTENER = "tls"
# An explicit plugin list: no anonymous access, no event/packet logging, no $SYS tree.
PLUGINS = [AuthPlugin, TopicPlugin, PresencePlugin]


def broker_config(settings: MQTTSettings, *, tls: bool = False) -> dict[str, Any]:
    """amqtt's configuration: with `tls`, a TLS listener on `mqtts_port` and a plain one on
    `port` only if `allow_plain`; without, the plain one."""
    # amqtt needs a "default" listener (the others inherit its fields); without `bind` it
    # does not listen
    listeners: dict[str, Any] = {LISTENER: {"type": "tcp"}}
    if not tls or settings.allow_plain:
        listeners[LISTENER]["bind"] = f"{settings.host}:{settings.port}"
    if tls:
        bind = f"{settings.host}:{settings.mqtts_port}"
        listeners[TLS_LISTENER] = {"type": "tcp", "bind": bind, "ssl": True}
    return {
        "listeners": listeners,
        "session_expiry_interval": settings.session_expiry_s,
        "plugins": {f"{cls.__module__}.{cls.__qualname__}": {} for cls in PLUGINS},
    }


class IotbizBroker(HardenedBroker):
    """`HardenedBroker` whose ACL check calls IoTBiz's topic plugin directly, and which hands
    devices' telemetry to presence itself.

    amqtt asks every topic plugin through a task per plugin per check, and checks every message
    for every receiver: with one plugin whose decision needs no I/O, calling it synchronously
    gives the same answer without the tasks. Other topic plugins, if configured, still go the
    usual way.

    Telemetry is most of a fleet's traffic. Recording it here (the raw bytes, parsed later by
    presence) instead of through the service client's subscription saves the broker a second
    QoS 1 delivery of every message and the client's work on it.
    """

    def __init__(
        self, *args: Any, tls_context: ssl.SSLContext | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.tls_context = tls_context
        self.presence: PresenceRecorder | None = None
        topic_plugins = [p for p in self.plugins_manager.plugins if hasattr(p, "topic_filtering")]
        self._acl = topic_plugins[0] if len(topic_plugins) == 1 else None
        if not isinstance(self._acl, TopicPlugin):
            self._acl = None

    def _create_ssl_context(self, listener: Any) -> ssl.SSLContext:
        """Replaces amqtt's `Broker._create_ssl_context` (a static method that builds a context
        from the listener's files, with no minimum TLS version): the platform's one server
        context (`iotbiz.tls.ServerTLS`), shared with HTTPS and reloaded in place on SIGHUP."""
        if self.tls_context is None:
            raise ConfigError("a TLS listener without the platform's TLS context")
        return self.tls_context

    async def _topic_filtering(self, session: Any, topic: str, action: Any) -> bool:
        if self._acl is not None:
            allows: bool = self._acl.allows(session, topic, action)
            return allows
        allowed: bool = await super()._topic_filtering(session, topic, action)
        return allowed

    async def _broadcast_message(
        self, session: Any, topic: str | None, data: Any, force_qos: int | None = None
    ) -> None:
        """Every message allowed through the ACL (and every will) passes here."""
        principal = principal_of(session)
        if (
            self.presence is not None
            and principal is not None
            and principal.device is not None
            and topic == principal.telemetry_topic
            and isinstance(data, bytes | bytearray)
        ):
            self.presence.telemetry_payload(principal.device, bytes(data))
        await super()._broadcast_message(session, topic, data, force_qos)


class EmbeddedBroker:
    def __init__(
        self,
        settings: MQTTSettings,
        authority: Authority,
        presence: PresenceRecorder,
        *,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self._settings = settings
        self._tls = tls_context is not None
        authority.login_hash_share = settings.login_hash_share
        authority.login_wait_s = settings.login_wait_s
        self._broker = IotbizBroker(
            broker_config(settings, tls=self._tls),
            tls_context=tls_context,
            ack_timeout=settings.ack_timeout_s,
            keepalive_grace=settings.keepalive_grace,
            connect_timeout=settings.connect_timeout_s,
            max_packet_size=settings.max_packet_bytes,
            max_queued_messages=settings.max_queued_messages,
            max_inflight_in=settings.max_inflight_in,
            max_broadcast_queue=settings.max_broadcast_queue,
            max_keepalive=settings.max_keepalive_s,
            login_brake=LoginBrake(settings.login_failures_free, settings.login_delay_max_s),
            admission=Admission(
                settings.max_connections,
                settings.max_connections_per_address,
                settings.max_pending_per_address,
            ),
        )
        for plugin in self._broker.plugins_manager.plugins:
            if isinstance(plugin, AuthPlugin | TopicPlugin):
                plugin.authority = authority
            elif isinstance(plugin, PresencePlugin):
                plugin.presence = presence
        self._broker.presence = presence
        self._started = False

    @property
    def port(self) -> int:
        """The plain listener's port, or the TLS listener's when there is no plain one."""
        return self._broker.listener_port(LISTENER if self.plain else TLS_LISTENER)

    @property
    def plain(self) -> bool:
        return not self._tls or self._settings.allow_plain

    @property
    def tls_port(self) -> int | None:
        return self._broker.listener_port(TLS_LISTENER) if self._tls else None

    @property
    def broker(self) -> IotbizBroker:
        return self._broker

    async def start(self) -> None:
        try:
            await self._broker.start()
        except BrokerError as exc:
            cause = exc.__cause__
            host = self._settings.host
            port, flag = self._settings.port, "--mqtt-port"
            if self._tls and (not self.plain or f":{self._settings.mqtts_port}" in str(exc)):
                port, flag = self._settings.mqtts_port, "--mqtts-port"
            if isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"MQTT port {port} on {host} is in use; choose another with {flag}"
                ) from exc
            raise ConfigError(f"cannot start the MQTT broker on {host}:{port}: {exc}") from exc
        self._started = True
        if self.plain:
            log.info("MQTT broker listening on mqtt://%s:%d", self._settings.host, self.port)
        if self.tls_port is not None:
            log.info("MQTT over TLS listening on mqtts://%s:%d", self._settings.host, self.tls_port)

    async def kick(self, username: str, *, drop_retained: bool = False) -> None:
        """Disconnect every session of `username` and discard it (after a revoke or reset).

        With `drop_retained`, and if `username` is a device, the retained messages on that
        device's topics are removed afterwards (after: a message it published just before the
        disconnect is still processed during it).
        """
        name = parse_device_name(username)
        is_device = name is not None and str(name) == username
        if is_device:
            # A device may only use its name as client id: one lookup, not a walk over the fleet.
            session = self._broker.sessions.get(username, (None, None))[0]
            client_ids = [username] if session is not None and session.username == username else []
        else:
            client_ids = [
                client_id
                for client_id, (session, _) in list(self._broker.sessions.items())
                if session.username == username
            ]
        for client_id in client_ids:
            if await self._broker.disconnect_client(
                client_id, publish_will=False, discard_session=True
            ):
                log.info(
                    "disconnected %s (client id %s): credentials withdrawn", username, client_id
                )
        if drop_retained and name is not None and is_device:
            prefix = topics.device_topic(name, "")
            dropped = await self._broker.drop_retained(
                lambda topic: topic.startswith(prefix), topic_filter=f"{prefix}#"
            )
            if dropped:
                log.info("dropped %d retained message(s) of %s", dropped, username)

    async def health(self) -> tuple[str, str]:
        if not self._started:
            raise BrokerUnavailable("MQTT broker not listening")
        return "broker", "listening"

    async def stop(self) -> None:
        if self._started:
            self._started = False
            await self._broker.shutdown()
