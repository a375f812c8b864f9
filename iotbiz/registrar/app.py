"""The registrar's app factory: `create_app(settings, store)` and its route table."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from iotbiz import __version__
from iotbiz.errors import IotbizError, ServiceUnavailable
from iotbiz.passwords import PasswordHasher
from iotbiz.presence import PresenceRecorder
from iotbiz.registrar import device_api
from iotbiz.registrar.keys import (
    HASHER,
    HEALTH_CHECKS,
    RATE_LIMITER,
    SERVICE_CLIENT,
    SETTINGS,
    STORE,
    HealthCheck,
)
from iotbiz.registrar.middlewares import error_middleware
from iotbiz.registrar.ratelimit import RateLimiter
from iotbiz.registrar.service_client import ServiceClient, ServiceLink
from iotbiz.settings import Settings
from iotbiz.store import Store

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 4096
SERVICE_CONNECT_TIMEOUT_S = 10.0


def create_app(
    settings: Settings,
    store: Store,
    *,
    hasher: PasswordHasher | None = None,
    service: ServiceLink | None = None,
    presence: PresenceRecorder | None = None,
) -> web.Application:
    """The registrar as an aiohttp application; the caller owns `store` (and `hasher`, when it
    passes one). With `service` and `presence`, the app runs the platform's service MQTT client,
    which records every device's presence."""
    app = web.Application(middlewares=[error_middleware], client_max_size=MAX_BODY_BYTES)
    app[SETTINGS] = settings
    app[STORE] = store
    app[RATE_LIMITER] = RateLimiter(settings.registrar.rate_per_ip, settings.registrar.rate_burst)
    app[HEALTH_CHECKS] = [_check_store(store)]
    if hasher is None:
        app.cleanup_ctx.append(_password_hasher)
    else:
        app[HASHER] = hasher
    if service is not None and presence is not None:
        app[SERVICE_CLIENT] = ServiceClient(service, presence)
        app.cleanup_ctx.append(_service_client)
    app.router.add_post("/api/v1/register", device_api.register)
    app.router.add_post("/api/v1/activate", device_api.activate)
    app.router.add_get("/healthz", healthz)
    return app


async def _password_hasher(app: web.Application) -> AsyncIterator[None]:
    registrar = app[SETTINGS].registrar
    hasher = PasswordHasher(
        registrar.bcrypt_cost,
        threads=registrar.hash_threads,
        max_queued=registrar.max_queued_hashes,
    )
    app[HASHER] = hasher
    yield
    hasher.close()


async def _service_client(app: web.Application) -> AsyncIterator[None]:
    client = app[SERVICE_CLIENT]
    task = asyncio.create_task(client.run(), name="service-client")
    try:
        async with asyncio.timeout(SERVICE_CONNECT_TIMEOUT_S):
            await client.connected.wait()
    except TimeoutError:
        log.warning("service client not connected after %s s; going on", SERVICE_CONNECT_TIMEOUT_S)
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _check_store(store: Store) -> HealthCheck:
    async def check() -> tuple[str, str]:
        await store.ping()
        return "store", "ok"

    return check


async def healthz(request: web.Request) -> web.Response:
    """200 {"status": "ok", ...} when every part answers, else 503 {"error": ...}."""
    report = {"status": "ok", "version": __version__}
    for check in request.app[HEALTH_CHECKS]:
        try:
            part, state = await check()
        except IotbizError as exc:
            raise ServiceUnavailable(str(exc)) from exc
        report[part] = state
    return web.json_response(report)
