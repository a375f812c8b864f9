"""The agent's MQTT link (aiomqtt, on paho-mqtt): connected for ever, or trying to be.

On every connection: the will is a retained `offline` status, the first message a retained
`online` status, then the `cmd` subscription (again after every reconnect) and the outbox is
drained in order with QoS 1. Reconnects back off exponentially with jitter, capped, so that a
fleet does not stampede a restarted platform. A refused login (CONNACK "not authorised") ends
`run` with `NotAuthorized`, for the agent to check its enrollment.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import aiomqtt

from iotbiz import __version__, topics
from iotbiz.agent.identity import Credentials
from iotbiz.agent.outbox import Outbox
from iotbiz.settings import AgentSettings

log = logging.getLogger(__name__)

BACKOFF_START_S = 1.0
BACKOFF_CAP_S = 60.0
SEND_BATCH = 50
NOT_AUTHORIZED = (4, 5, 134, 135)  # bad credentials / not authorised (3.1.1 and 5 numbering)


class NotAuthorized(Exception):
    """The broker refused the credentials."""


def status_payload(state: str) -> bytes:
    body = {"state": state, "agent_version": __version__, "ts": round(time.time(), 3)}
    return json.dumps(body).encode()


class Link:
    def __init__(
        self,
        settings: AgentSettings,
        credentials: Credentials,
        outbox: Outbox,
        on_command: Callable[[bytes], Awaitable[None]],
    ) -> None:
        url = urlsplit(settings.broker_url)
        self._tls = url.scheme == "mqtts"
        self._host = url.hostname or "127.0.0.1"
        self._port = url.port or (8883 if self._tls else 1883)
        self._keepalive = settings.keepalive_s
        self._credentials = credentials
        self._outbox = outbox
        self._on_command = on_command
        self._status_topic = topics.device_topic(credentials.name, topics.STATUS)
        self._command_topic = topics.device_topic(credentials.name, topics.CMD)
        self._client: aiomqtt.Client | None = None
        self.connected = asyncio.Event()
        self.connections = 0

    async def run(self) -> None:
        """Stay connected until cancelled; raises NotAuthorized if the login is refused."""
        backoff = BACKOFF_START_S
        while True:
            before = self.connections
            try:
                await self._session()
                reason = "connection closed"
            except aiomqtt.MqttCodeError as exc:
                if _code(exc) in NOT_AUTHORIZED:
                    raise NotAuthorized(str(exc)) from exc
                reason = str(exc)
            except aiomqtt.MqttError as exc:
                reason = str(exc)
            finally:
                self.connected.clear()
                self._client = None
            if self.connections > before:
                backoff = BACKOFF_START_S  # it was up: a fresh loss starts the backoff again
            delay = _jitter(backoff)
            log.warning("MQTT link down (%s); reconnecting in %.1f s", reason, delay)
            await asyncio.sleep(delay)
            backoff = min(backoff * 2, BACKOFF_CAP_S)

    async def _session(self) -> None:
        name = str(self._credentials.name)
        async with aiomqtt.Client(
            self._host,
            self._port,
            identifier=name,
            username=name,
            password=self._credentials.password,
            keepalive=self._keepalive,
            clean_session=False,  # commands sent while the link was down still arrive
            will=aiomqtt.Will(self._status_topic, status_payload("offline"), qos=1, retain=True),
            tls_context=ssl.create_default_context() if self._tls else None,
            timeout=30,
        ) as client:
            self._client = client
            await client.publish(self._status_topic, status_payload("online"), qos=1, retain=True)
            await client.subscribe(self._command_topic, qos=1)
            self.connections += 1
            self.connected.set()
            log.info("connected to mqtt://%s:%d as %s", self._host, self._port, name)
            sender = asyncio.create_task(self._drain_outbox(client), name="outbox")
            try:
                async for message in client.messages:
                    if isinstance(message.payload, bytes | bytearray):
                        await self._on_command(bytes(message.payload))
            finally:
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                    await sender

    async def _drain_outbox(self, client: aiomqtt.Client) -> None:
        """Send the outbox in order; each batch leaves the disk once the broker acked it."""
        while True:
            await self._outbox.available.wait()
            batch = self._outbox.head(SEND_BATCH)
            if not batch:
                self._outbox.available.clear()
                continue
            for message in batch:
                await client.publish(message.topic, message.payload, qos=message.qos, timeout=30)
            await self._outbox.done(len(batch))

    async def close(self) -> None:
        """Say goodbye: a retained `offline` status, then a clean disconnect."""
        client = self._client
        if client is None:
            return
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            await client.publish(
                self._status_topic, status_payload("offline"), qos=1, retain=True, timeout=5
            )


def _code(exc: aiomqtt.MqttCodeError) -> int | None:
    rc = exc.rc
    value = getattr(rc, "value", rc)
    return value if isinstance(value, int) else None


def _jitter(delay: float) -> float:
    return random.uniform(delay / 2, delay)  # noqa: S311 - jitter, not cryptography
