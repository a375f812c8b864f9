"""The registrar's app factory: `create_app(settings, store)` and its route table."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from iotbiz import __version__
from iotbiz.errors import IotbizError, ServiceUnavailable
from iotbiz.passwords import PasswordHasher
from iotbiz.registrar import device_api
from iotbiz.registrar.keys import (
    HASHER,
    HEALTH_CHECKS,
    RATE_LIMITER,
    SETTINGS,
    STORE,
    HealthCheck,
)
from iotbiz.registrar.middlewares import error_middleware
from iotbiz.registrar.ratelimit import RateLimiter
from iotbiz.settings import Settings
from iotbiz.store import Store

MAX_BODY_BYTES = 4096


def create_app(settings: Settings, store: Store) -> web.Application:
    """The registrar as an aiohttp application; the caller owns `store` and closes it."""
    app = web.Application(middlewares=[error_middleware], client_max_size=MAX_BODY_BYTES)
    app[SETTINGS] = settings
    app[STORE] = store
    app[RATE_LIMITER] = RateLimiter(settings.registrar.rate_per_ip, settings.registrar.rate_burst)
    app[HEALTH_CHECKS] = [_check_store(store)]
    app.cleanup_ctx.append(_password_hasher)
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
