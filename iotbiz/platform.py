"""The platform process: the registrar (and, next, the embedded MQTT broker) around one store."""

from __future__ import annotations

import asyncio
import errno
import logging
import signal

from aiohttp import web

from iotbiz.errors import ConfigError
from iotbiz.registrar import create_app
from iotbiz.settings import Settings
from iotbiz.store import Store

log = logging.getLogger(__name__)


class Platform:
    """Everything `python -m iotbiz.broker` runs, started and stopped as one."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._store: Store | None = None
        self._runner: web.AppRunner | None = None

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

    async def start(self) -> None:
        self._store = await Store.open(self.settings.store.path)
        try:
            app = create_app(self.settings, self._store)
            self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=5.0)
            await self._runner.setup()
            http = self.settings.http
            site = web.TCPSite(self._runner, http.host, http.port, reuse_address=True)
            try:
                await site.start()
            except OSError as exc:
                raise _listen_error("HTTP", http.host, http.port, "--http-port", exc) from exc
        except BaseException:
            await self.stop()
            raise
        log.info("registrar listening on http://%s:%d", self.settings.http.host, self.http_port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._store is not None:
            await self._store.close()
            self._store = None


def _listen_error(what: str, host: str, port: int, flag: str, exc: OSError) -> ConfigError:
    if exc.errno == errno.EADDRINUSE:
        return ConfigError(f"{what} port {port} on {host} is in use; choose another with {flag}")
    return ConfigError(f"cannot listen for {what} on {host}:{port} ({exc.strerror}); see {flag}")


async def serve(settings: Settings) -> None:
    """Run the platform until SIGTERM or SIGINT, then shut it down cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    platform = Platform(settings)
    await platform.start()
    try:
        await stop.wait()
        log.info("shutting down")
    finally:
        await platform.stop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    log.info("stopped")
