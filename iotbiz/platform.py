"""The platform process: the embedded MQTT broker and the registrar around one store.

Start order: store -> broker (devices can connect) -> registrar with its service MQTT client ->
HTTP. Stop order is the reverse, so nothing is used after it is closed. Long-lived tasks (the
presence writer, the store change follower) are owned here and cancelled on stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import secrets
import signal
from collections.abc import Coroutine
from typing import Any

from aiohttp import web

from iotbiz.broker.authority import Authority
from iotbiz.broker.embedded import EmbeddedBroker
from iotbiz.errors import ConfigError
from iotbiz.passwords import PasswordHasher
from iotbiz.presence import PresenceRecorder
from iotbiz.registrar import create_app
from iotbiz.registrar.keys import HEALTH_CHECKS
from iotbiz.registrar.service_client import ServiceLink
from iotbiz.settings import Settings
from iotbiz.store import Store

log = logging.getLogger(__name__)

# The platform's own MQTT account; account names never contain '/', device names always do.
SERVICE_USERNAME = "iotbiz-platform"


class Platform:
    """Everything `python -m iotbiz.broker` runs, started and stopped as one."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._store: Store | None = None
        self._hasher: PasswordHasher | None = None
        self._presence: PresenceRecorder | None = None
        self.authority: Authority | None = None
        self.broker: EmbeddedBroker | None = None
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def store(self) -> Store:
        if self._store is None:
            raise RuntimeError("platform not started")
        return self._store

    @property
    def http_port(self) -> int:
        """The registrar's real port (useful when the setting is 0)."""
        if self._runner is None or not self._runner.addresses:
            raise RuntimeError("platform not started")
        return int(self._runner.addresses[0][1])

    @property
    def mqtt_port(self) -> int:
        if self.broker is None:
            raise RuntimeError("platform not started")
        return self.broker.port

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        settings = self.settings
        store = self._store = await Store.open(settings.store.path)
        await store.mark_all_offline()
        registrar = settings.registrar
        hasher = self._hasher = PasswordHasher(
            registrar.bcrypt_cost,
            threads=registrar.hash_threads,
            max_queued=registrar.max_queued_hashes,
        )
        presence = self._presence = PresenceRecorder(store)
        service_password = secrets.token_urlsafe(32)
        self.authority = Authority(
            store, hasher, service_username=SERVICE_USERNAME, service_password=service_password
        )
        self.broker = EmbeddedBroker(settings.mqtt, self.authority, presence)
        await self.broker.start()
        self._spawn(presence.run(), "presence")
        self._spawn(self.authority.follow_changes(self.broker.kick), "store-changes")

        service = ServiceLink(
            _connect_host(settings.mqtt.host),
            self.broker.port,
            SERVICE_USERNAME,
            service_password,
            follow_telemetry=False,  # the embedded broker hands telemetry to presence
        )
        app = create_app(settings, store, hasher=hasher, service=service, presence=presence)
        app[HEALTH_CHECKS].append(self.broker.health)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=5.0)
        await self._runner.setup()
        http = settings.http
        site = web.TCPSite(self._runner, http.host, http.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            raise _listen_error("HTTP", http.host, http.port, "--http-port", exc) from exc
        log.info("registrar listening on http://%s:%d", http.host, self.http_port)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(_log_crash)
        self._tasks.append(task)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()  # stops the service client first
            self._runner = None
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self.broker is not None:
            await self.broker.stop()  # disconnects every device
            self.broker = None
        if self._presence is not None:
            await self._presence.flush()
            self._presence = None
        if self._store is not None:
            with contextlib.suppress(Exception):
                await self._store.mark_all_offline()
            await self._store.close()
            self._store = None
        if self._hasher is not None:
            self._hasher.close()
            self._hasher = None


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("task %s stopped", task.get_name(), exc_info=task.exception())


def _connect_host(listen_host: str) -> str:
    """Where a local client reaches a listener bound to `listen_host`."""
    return "127.0.0.1" if listen_host in ("0.0.0.0", "", "::") else listen_host  # noqa: S104


def _listen_error(what: str, host: str, port: int, flag: str, exc: OSError) -> ConfigError:
    if exc.errno == errno.EADDRINUSE:
        return ConfigError(f"{what} port {port} on {host} is in use; choose another with {flag}")
    return ConfigError(f"cannot listen for {what} on {host}:{port} ({exc.strerror}); see {flag}")


# A reconnect storm allocates fast, and amqtt leaves every finished connection in reference
# cycles. With Python's default thresholds (700, 10, 10), three 2,000-device storms set off 16
# full collections, each 0.1 to 0.3 s of a stopped event loop that freed almost nothing; the warm
# storms took 0.90 to 2.22 s. With generation 0 at 20,000, one full collection happened and the
# warm storms took 0.58 to 0.92 s. (Two runs with the defaults, three with 20,000.)
GC_THRESHOLDS = (20_000, 10, 10)


def run_platform(settings: Settings) -> None:
    """The platform's process: `serve` on uvloop (a faster event loop: the broker's per-message
    work is mostly event-loop overhead), or on asyncio's own loop where uvloop is not installed."""
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        import uvloop  # not installed on Windows
    except ImportError:
        asyncio.run(serve(settings))
    else:
        uvloop.run(serve(settings))


async def serve(settings: Settings) -> None:
    """Run the platform until SIGTERM or SIGINT, then shut it down cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    platform = Platform(settings)
    try:
        await platform.start()
        await stop.wait()
        log.info("shutting down")
    finally:
        await platform.stop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    log.info("stopped")
