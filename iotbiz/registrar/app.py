"""The registrar's app factory: `create_app(settings, store)` and its route table."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

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

# Starts a long-lived task on behalf of its owner, which notices when the task dies early.
Spawn = Callable[[Coroutine[Any, Any, None], str], "asyncio.Task[None]"]


def _create_task(coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
    """The `spawn` of an app without an owner (tests, a registrar on its own): a task that dies
    is logged."""
    task = asyncio.create_task(coro, name=name)
    task.add_done_callback(_log_death)
    return task


def _log_death(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("task %s died", task.get_name(), exc_info=exc)


def create_app(
    settings: Settings,
    store: Store,
    *,
    hasher: PasswordHasher | None = None,
    service: ServiceLink | None = None,
    presence: PresenceRecorder | None = None,
    spawn: Spawn = _create_task,
) -> web.Application:
    """The registrar as an aiohttp application; the caller owns `store` (and `hasher`, when it
    passes one). With `service` and `presence`, the app runs the platform's service MQTT client,
    which records every device's presence, as a task started with `spawn` (the platform passes
    its own, which notices the task's death)."""
    app = web.Application(middlewares=[error_middleware()], client_max_size=MAX_BODY_BYTES)
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
        app.cleanup_ctx.append(functools.partial(_service_client, spawn=spawn))
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


async def _service_client(app: web.Application, *, spawn: Spawn) -> AsyncIterator[None]:
    client = app[SERVICE_CLIENT]
    task = spawn(client.run(), "service-client")
    try:
        async with asyncio.timeout(SERVICE_CONNECT_TIMEOUT_S):
            await client.connected.wait()
    except TimeoutError:
        log.warning("service client not connected after %s s; going on", SERVICE_CONNECT_TIMEOUT_S)
    yield
    task.cancel()
    await asyncio.wait([task])  # how it ended is for its owner (the spawner) to report


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
