"""The platform's own MQTT client: the service account, an ordinary MQTT client (aiomqtt, on
paho-mqtt), so the same code works against the embedded broker or an external one.

It follows every device's `status`, `telemetry`, `events` and `reply` into presence, and
reconnects for ever with capped, jittered backoff.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from dataclasses import dataclass

import aiomqtt

from iotbiz import topics
from iotbiz.names import parse_device_name
from iotbiz.presence import PresenceRecorder

log = logging.getLogger(__name__)

BACKOFF_START_S = 0.2
BACKOFF_CAP_S = 10.0
KEEPALIVE_S = 30
SUBSCRIPTIONS = [
    (topics.all_devices(topics.STATUS), 1),
    (topics.all_devices(topics.TELEMETRY), 1),
    (topics.all_devices(topics.EVENTS), 1),
    (topics.all_devices(topics.REPLY), 1),
]


@dataclass(frozen=True, slots=True)
class ServiceLink:
    """Where and as whom the platform's service client connects."""

    host: str
    port: int
    username: str
    password: str


class ServiceClient:
    def __init__(self, link: ServiceLink, presence: PresenceRecorder) -> None:
        self._link = link
        self._presence = presence
        self.connected = asyncio.Event()
        self.malformed_messages = 0

    async def run(self) -> None:
        """Stay connected and subscribed until cancelled."""
        backoff = BACKOFF_START_S
        while True:
            try:
                async with aiomqtt.Client(
                    self._link.host,
                    self._link.port,
                    identifier=self._link.username,
                    username=self._link.username,
                    password=self._link.password,
                    keepalive=KEEPALIVE_S,
                    clean_session=True,
                ) as client:
                    await client.subscribe(SUBSCRIPTIONS)
                    self.connected.set()
                    backoff = BACKOFF_START_S
                    log.info("service client connected to %s:%d", self._link.host, self._link.port)
                    async for message in client.messages:
                        self.handle(str(message.topic), message.payload, retained=message.retain)
            except aiomqtt.MqttError as exc:
                self.connected.clear()
                delay = random.uniform(backoff / 2, backoff)  # noqa: S311 - jitter, not crypto
                log.warning("service client disconnected (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                backoff = min(backoff * 2, BACKOFF_CAP_S)

    def handle(self, topic: str, payload: object, *, retained: bool) -> None:
        parsed = topics.parse_device_topic(topic)
        if parsed is None or parse_device_name(str(parsed[0])) != parsed[0]:
            return
        name, suffix = parsed
        if suffix not in (topics.STATUS, topics.TELEMETRY):
            self._presence.seen(name)
            return
        try:
            body = json.loads(payload) if isinstance(payload, bytes | bytearray | str) else None
        except (ValueError, RecursionError):
            body = None
        if not isinstance(body, dict):
            self.malformed_messages += 1
            log.info("%s from %s is not a JSON object: ignored", suffix, name)
            return
        if suffix == topics.STATUS:
            self._presence.status(name, body, live=not retained)
        else:
            self._presence.telemetry(name, body)
