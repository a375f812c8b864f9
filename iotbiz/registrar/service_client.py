"""The platform's own MQTT client: the service account, an ordinary MQTT client (aiomqtt, on
paho-mqtt), so the same code works against the embedded broker or an external one.

It follows every device's `status`, `events` and `reply` (and `telemetry`, unless the embedded
broker hands telemetry to presence itself, which spares the broker a second delivery of the
busiest topic) into presence, and reconnects for ever with capped, jittered backoff.

`publish` sends the platform's own messages (commands on devices' `cmd` topics) at QoS 1 and
returns once the broker acknowledged them; it raises BrokerUnavailable while disconnected or when
the broker does not acknowledge in time. The number of unacknowledged publishes is the caller's to
bound (the dispatcher's `commands.max_inflight`); paho queues more than `MAX_INFLIGHT` itself.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from dataclasses import dataclass

import aiomqtt

from iotbiz import topics
from iotbiz.errors import BrokerUnavailable
from iotbiz.names import parse_device_name
from iotbiz.presence import PresenceRecorder

log = logging.getLogger(__name__)

BACKOFF_START_S = 0.2
BACKOFF_CAP_S = 10.0
KEEPALIVE_S = 30
PUBLISH_TIMEOUT_S = 10.0
MAX_INFLIGHT = 100  # QoS 1 messages on the wire without a PUBACK (paho's default is 20)
PENDING_CALLS_WARNING = 10_000  # aiomqtt warns beyond this many publishes waiting
FOLLOWED = (topics.STATUS, topics.EVENTS, topics.REPLY)


@dataclass(frozen=True, slots=True)
class ServiceLink:
    """Where and as whom the platform's service client connects."""

    host: str
    port: int
    username: str
    password: str
    follow_telemetry: bool = True  # False: the embedded broker records telemetry directly
    # The MQTT client id (empty: the username). Several platform processes on one external
    # broker need one each: a broker closes a session when another connects with its id.
    client_id: str = ""
    tls_context: ssl.SSLContext | None = None  # MQTT over TLS


class ServiceClient:
    def __init__(
        self, link: ServiceLink, presence: PresenceRecorder, *, following: bool = True
    ) -> None:
        self._link = link
        self._presence = presence
        self._following = following
        self.connected = asyncio.Event()
        self._client: aiomqtt.Client | None = None
        self.published = 0
        followed = (*FOLLOWED, topics.TELEMETRY) if link.follow_telemetry else FOLLOWED
        self._subscriptions = [(topics.all_devices(suffix), 1) for suffix in followed]

    async def run(self) -> None:
        """Stay connected and subscribed until cancelled."""
        backoff = BACKOFF_START_S
        while True:
            try:
                async with aiomqtt.Client(
                    self._link.host,
                    self._link.port,
                    identifier=self._link.client_id or self._link.username,
                    username=self._link.username,
                    password=self._link.password,
                    keepalive=KEEPALIVE_S,
                    clean_session=True,
                    timeout=PUBLISH_TIMEOUT_S,
                    max_inflight_messages=MAX_INFLIGHT,
                    tls_context=self._link.tls_context,
                ) as client:
                    # the dispatcher bounds its publishes in flight (commands.max_inflight);
                    # aiomqtt's own threshold (10) logged a warning for nearly every command
                    # of a bulk send
                    client.pending_calls_threshold = PENDING_CALLS_WARNING
                    self._client = client
                    if self._following:
                        await client.subscribe(self._subscriptions)
                    self.connected.set()
                    backoff = BACKOFF_START_S
                    log.info("service client connected to %s:%d", self._link.host, self._link.port)
                    async for message in client.messages:
                        self.handle(str(message.topic), message.payload, retained=message.retain)
            except aiomqtt.MqttError as exc:
                self.connected.clear()
                self._client = None
                delay = random.uniform(backoff / 2, backoff)  # noqa: S311 - jitter, not crypto
                log.warning("service client disconnected (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                backoff = min(backoff * 2, BACKOFF_CAP_S)

    async def follow(self, enabled: bool) -> None:
        """Follow the devices' topics into presence (the leader) or not (a follower platform
        process: one process writes presence, and the broker sends each message once, not once
        per process). While enabled, every connect subscribes; the broker then sends the
        retained statuses, which say who is online."""
        if enabled == self._following:
            return
        self._following = enabled
        client = self._client
        if client is None:
            return  # the next connect subscribes, or not
        try:
            if enabled:
                await client.subscribe(self._subscriptions)
            else:
                await client.unsubscribe([topic for topic, _ in self._subscriptions])
        except aiomqtt.MqttError as exc:
            log.warning(
                "service client: %s failed (%s)", "subscribe" if enabled else "unsubscribe", exc
            )

    async def publish(self, topic: str, payload: bytes) -> None:
        """Publish at QoS 1 and wait for the broker's PUBACK; BrokerUnavailable if it cannot."""
        client = self._client
        if client is None or not self.connected.is_set():
            raise BrokerUnavailable("the service client is not connected")
        try:
            await client.publish(topic, payload, qos=1)
        except aiomqtt.MqttError as exc:
            raise BrokerUnavailable(f"publish to {topic} failed: {exc}") from exc
        # aiomqtt waits with asyncio.wait_for, which in Python 3.11 may swallow a cancellation
        # that arrives with the PUBACK: honour it here
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise asyncio.CancelledError
        self.published += 1

    def handle(self, topic: str, payload: object, *, retained: bool) -> None:
        if not self._following:
            return  # sent before the unsubscribe took effect
        parsed = topics.parse_device_topic(topic)
        if parsed is None or parse_device_name(str(parsed[0])) != parsed[0]:
            return
        name, suffix = parsed
        data = payload.encode() if isinstance(payload, str) else payload
        if isinstance(data, bytes | bytearray):
            self._presence.message(name, suffix, bytes(data), retained=retained)
