"""A real MQTT client (paho-mqtt 2.x) as the device, with bounded async waits.

paho runs its network loop in a thread; every wait here goes through `asyncio.to_thread`, so a
test never blocks the event loop that the in-process broker runs on.
"""

from __future__ import annotations

import asyncio
import queue
import socket
import threading
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

WAIT_S = 10.0


class PahoDevice:
    def __init__(
        self,
        port: int,
        username: str | None,
        password: str | None,
        *,
        client_id: str | None = None,
        keepalive: int = 60,
        clean_session: bool = True,
        will: tuple[str, bytes, int, bool] | None = None,
    ) -> None:
        self.port = port
        self.keepalive = keepalive
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id if client_id is not None else (username or ""),
            clean_session=clean_session,
            protocol=mqtt.MQTTv311,
            reconnect_on_failure=False,
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        if will is not None:
            topic, payload, qos, retain = will
            self.client.will_set(topic, payload, qos, retain)
        self.connack: queue.Queue[int] = queue.Queue()
        self.disconnected = threading.Event()
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.subacks: queue.Queue[list[int]] = queue.Queue()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        self.connack.put(reason.value)

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, _r: Any, _p: Any) -> None:
        self.disconnected.set()

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        self.messages.put(message)

    def _on_subscribe(
        self, _c: Any, _u: Any, _mid: int, codes: list[ReasonCode], _p: Properties | None
    ) -> None:
        self.subacks.put([code.value for code in codes])

    async def connect(self) -> int:
        """Connect and return the CONNACK return code (0: accepted)."""
        # in a thread: with TLS, paho's connect does the handshake, which needs this event loop
        # (the in-process broker's) to go on
        await asyncio.to_thread(
            self.client.connect, "127.0.0.1", self.port, keepalive=self.keepalive
        )
        self.client.loop_start()
        try:
            return await asyncio.to_thread(self.connack.get, timeout=WAIT_S)
        except queue.Empty:
            raise AssertionError("no CONNACK within the time limit") from None

    async def subscribe(self, topic: str, qos: int = 1) -> list[int]:
        self.client.subscribe(topic, qos)
        try:
            return await asyncio.to_thread(self.subacks.get, timeout=WAIT_S)
        except queue.Empty:
            raise AssertionError(f"no SUBACK for {topic}") from None

    async def publish(
        self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False
    ) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        await asyncio.to_thread(info.wait_for_publish, WAIT_S)
        assert info.is_published(), f"publish to {topic} not acknowledged"

    async def next_message(self, timeout: float = WAIT_S) -> mqtt.MQTTMessage | None:
        try:
            return await asyncio.to_thread(self.messages.get, timeout=timeout)
        except queue.Empty:
            return None

    async def wait_disconnected(self, timeout: float = WAIT_S) -> bool:
        return await asyncio.to_thread(self.disconnected.wait, timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def raw_connect(port: int, packet: bytes) -> tuple[socket.socket, bytes]:
    """Open a socket, send `packet`, return the socket and the 4-byte CONNACK."""

    def run() -> tuple[socket.socket, bytes]:
        sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
        sock.sendall(packet)
        return sock, sock.recv(4)

    return await asyncio.to_thread(run)
