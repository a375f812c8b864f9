"""The agent's MQTT link (aiomqtt, on paho-mqtt): connected for ever, or trying to be.

On every connection: the will is a retained `offline` status, the first message a retained
`online` status, then the `cmd` subscription (again after every reconnect) and the queues are
drained in order with QoS 1, the first queue (replies) before the others (telemetry). A session
is two tasks, the sender and the command reader: when either ends (a publish that failed or
timed out, a lost connection) the session ends and the link reconnects. Reconnects back off
exponentially with jitter, capped, so that a fleet does not stampede a restarted platform. A
refused login (CONNACK "not authorised") ends `run` with `NotAuthorized`, for the agent to check
its enrollment. Anything else that goes wrong (a disk error while acknowledging) ends `run`
with that error: the agent treats it as fatal.

A cancellation always ends `run` promptly: no await here suppresses CancelledError, and since
Python 3.11's asyncio.wait_for (behind every aiomqtt wait) can swallow a cancellation that
arrives with the awaited packet, the link and its sender check `Task.cancelling()` after each.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import aiomqtt

from iotbiz import __version__, topics
from iotbiz.agent.identity import Credentials
from iotbiz.agent.outbox import Outbox
from iotbiz.settings import AgentSettings
from iotbiz.tls import client_context

log = logging.getLogger(__name__)

BACKOFF_START_S = 1.0
BACKOFF_CAP_S = 60.0
SEND_BATCH = 50
PUBLISH_TIMEOUT_S = 30.0  # also the CONNACK and SUBACK timeout
CLOSE_TIMEOUT_S = 2.0  # the goodbye `offline` status at shutdown
CANCEL_WAIT_S = 5.0  # for the session's tasks to end once cancelled
NOT_AUTHORIZED = (4, 5, 134, 135)  # bad credentials / not authorised (3.1.1 and 5 numbering)


class NotAuthorized(Exception):
    """The broker refused the credentials."""


class _Client(aiomqtt.Client):
    """aiomqtt's client, except that a connection lost before the CONNACK fails the connect at
    once. aiomqtt 2.x ignores a disconnect that comes before the CONNACK and waits out its whole
    timeout instead: in scripts/soak.py an agent whose connection was cut during the handshake
    stayed offline for the 30 s of that timeout.

    Overrides aiomqtt's `Client._on_disconnect` (its paho-mqtt callback) for that one case only.
    """

    def _on_disconnect(
        self,
        client: Any,
        userdata: Any,
        flags: Any,
        reason_code: Any,
        properties: Any = None,
    ) -> None:
        if not self._connected.done():
            lost = aiomqtt.MqttError(f"connection lost before CONNACK ({reason_code})")
            self._connected.set_exception(lost)  # __aenter__ is waiting for it: raised there
            return
        super()._on_disconnect(client, userdata, flags, reason_code, properties)


class SessionEnded(Exception):
    """The session's connection ended without an error from aiomqtt."""


def status_payload(state: str) -> bytes:
    body = {"state": state, "agent_version": __version__, "ts": round(time.time(), 3)}
    return json.dumps(body).encode()


class Link:
    def __init__(
        self,
        settings: AgentSettings,
        credentials: Credentials,
        queues: Sequence[Outbox],
        on_command: Callable[[bytes], Awaitable[None]],
        *,
        publish_timeout_s: float = PUBLISH_TIMEOUT_S,
    ) -> None:
        url = urlsplit(settings.broker_url)
        tls = url.scheme == "mqtts"
        self._host = url.hostname or "127.0.0.1"
        self._port = url.port or (8883 if tls else 1883)
        # mqtts: the platform's certificate and host name verified (ca_file or the system's)
        self._tls_context = client_context(settings.ca_file) if tls else None
        self._keepalive = settings.keepalive_s
        self._credentials = credentials
        self._queues = tuple(queues)
        self._on_command = on_command
        self._publish_timeout_s = publish_timeout_s
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
                reason = await self._session_until_lost()
            finally:
                self.connected.clear()
                self._client = None
            # Cancelled, but the session ended with an error instead (aiomqtt's __aexit__
            # raises MqttError when its disconnect times out, which replaces the
            # CancelledError)? The cancellation wins: never reconnect after it.
            _raise_if_cancelled()
            if self.connections > before:
                backoff = BACKOFF_START_S  # it was up: a fresh loss starts the backoff again
            delay = _jitter(backoff)
            log.warning("MQTT link down (%s); reconnecting in %.1f s", reason, delay)
            await asyncio.sleep(delay)
            backoff = min(backoff * 2, BACKOFF_CAP_S)

    async def _session_until_lost(self) -> str:
        """Run one session; return why it ended (the errors that mean "reconnect")."""
        try:
            await self._session()
        except aiomqtt.MqttCodeError as exc:
            if _code(exc) in NOT_AUTHORIZED:
                raise NotAuthorized(str(exc)) from exc
            return str(exc)
        except (aiomqtt.MqttError, SessionEnded) as exc:
            return str(exc)
        return "connection closed"

    async def _session(self) -> None:
        name = str(self._credentials.name)
        async with _Client(
            self._host,
            self._port,
            identifier=name,
            username=name,
            password=self._credentials.password,
            keepalive=self._keepalive,
            clean_session=False,  # commands sent while the link was down still arrive
            will=aiomqtt.Will(self._status_topic, status_payload("offline"), qos=1, retain=True),
            tls_context=self._tls_context,
            timeout=self._publish_timeout_s,
        ) as client:
            _raise_if_cancelled()  # each aiomqtt wait may have swallowed it (see below)
            self._client = client
            # subscribed before saying `online`: the platform sends the commands that waited
            # for this device when it says so, and a new broker session (a first connect, a
            # restarted platform) has no subscription until this one
            await client.subscribe(self._command_topic, qos=1)
            _raise_if_cancelled()
            await client.publish(self._status_topic, status_payload("online"), qos=1, retain=True)
            _raise_if_cancelled()
            self.connections += 1
            self.connected.set()
            log.info("connected to mqtt://%s:%d as %s", self._host, self._port, name)
            # One session, two tasks: whichever ends first (a publish that timed out, a lost
            # connection) ends the session with its error, so that `run` reconnects.
            await _first_to_end(
                asyncio.create_task(self._drain_outbox(client), name="outbox"),
                asyncio.create_task(self._read_commands(client), name="commands"),
            )

    async def _read_commands(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            if isinstance(message.payload, bytes | bytearray):
                await self._on_command(bytes(message.payload))
        raise SessionEnded("the broker closed the connection")

    async def _drain_outbox(self, client: aiomqtt.Client) -> None:
        """Send the queues in order, the first queue before the others; each batch leaves the
        disk once the broker acked it. A publish that fails or times out ends the session.

        aiomqtt's publish waits with `asyncio.wait_for`, which in Python 3.11 swallows a
        cancellation that arrives as the PUBACK does (it returns the result instead): this task
        then went on to wait for the next message, "cancelling" for ever, and the link, which
        awaits it, never ended (issue 8 fault 9). So the sender checks after every publish."""
        while True:
            queue = next((q for q in self._queues if len(q)), None)
            if queue is None:
                for empty in self._queues:
                    empty.available.clear()  # all empty: wait for the next put
                await _wait_any([q.available for q in self._queues])
                continue
            batch = queue.head(SEND_BATCH)
            for entry in batch:
                message = entry.message
                await client.publish(
                    message.topic, message.payload, qos=message.qos, timeout=self._publish_timeout_s
                )
                _raise_if_cancelled()
            await queue.done([entry.id for entry in batch])

    async def close(self) -> None:
        """Say goodbye: a retained `offline` status, then a clean disconnect."""
        client = self._client
        if client is None:
            return
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            await client.publish(
                self._status_topic,
                status_payload("offline"),
                qos=1,
                retain=True,
                timeout=CLOSE_TIMEOUT_S,
            )


def _raise_if_cancelled() -> None:
    """Raise CancelledError if this task was cancelled and the cancellation was swallowed on the
    way (asyncio.wait_for in Python 3.11, used by every aiomqtt wait, returns a result that
    arrived with the cancellation instead of raising)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _code(exc: aiomqtt.MqttCodeError) -> int | None:
    rc = exc.rc
    value = getattr(rc, "value", rc)
    return value if isinstance(value, int) else None


def _jitter(delay: float) -> float:
    return random.uniform(delay / 2, delay)  # noqa: S311 - jitter, not cryptography


async def _first_to_end(*tasks: asyncio.Task[None]) -> None:
    """Wait until one of `tasks` ends, cancel and await the others, and raise the first one's
    error. Not a TaskGroup: Python 3.11's leaves the parent task marked as cancelling after a
    child's error. A cancellation of the calling task is never swallowed: `asyncio.wait` does not
    raise the tasks' own CancelledError, only the caller's."""
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        _, pending = await asyncio.wait(tasks, timeout=CANCEL_WAIT_S)
        for task in pending:  # a bug; better an orphan task than a link that never ends
            log.error("task %s did not end when cancelled; left behind", task.get_name())
    errors = [
        error
        for task in sorted(tasks, key=lambda task: task not in done)  # the first to end first
        if task.done() and not task.cancelled() and (error := task.exception()) is not None
    ]
    if errors:
        raise errors[0]


async def _wait_any(events: Sequence[asyncio.Event]) -> None:
    """Until one of `events` is set (cancellable: the waiters go with it)."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
