"""The registrar's app factory: `create_app(settings, store)` and its route table."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from aiohttp import web

from iotbiz import __version__
from iotbiz.broker.authority import Authority
from iotbiz.broker.embedded import EmbeddedBroker
from iotbiz.errors import IotbizError, ServiceUnavailable
from iotbiz.passwords import PasswordHasher
from iotbiz.presence import PresenceRecorder
from iotbiz.registrar import (
    admin_api,
    admin_commands,
    admin_devices,
    admin_input,
    admin_rollouts,
    broker_auth,
    device_api,
    fleet_feed,
    openapi,
    releases_api,
)
from iotbiz.registrar.admin_auth import AdminAuth, auth_middleware, load_or_create_admin_token
from iotbiz.registrar.console import add_console_routes
from iotbiz.registrar.console_auth import ConsoleSessions
from iotbiz.registrar.fleet_feed import FLEET_FEED, FleetFeed
from iotbiz.registrar.http_server import expect_handler, server_header
from iotbiz.registrar.keys import (
    ADMIN_AUTH,
    CUSTOMER_LIMITER,
    DISPATCHER,
    HASHER,
    HEALTH_CHECKS,
    METRICS,
    RATE_LIMITER,
    REFUSALS,
    SERVICE_CLIENT,
    SETTINGS,
    STORE,
    CommandDispatcher,
    HealthCheck,
)
from iotbiz.registrar.metrics import (
    CommandCollector,
    Metrics,
    MQTTCollector,
    StoreCounts,
    count_fleet,
    http_middleware,
    metrics_handler,
    run_lag_probe,
)
from iotbiz.registrar.middlewares import error_middleware
from iotbiz.registrar.ratelimit import RateLimiter
from iotbiz.registrar.refusals import RefusalAudit
from iotbiz.registrar.service_client import ServiceClient, ServiceLink
from iotbiz.settings import Settings
from iotbiz.store.interface import PlatformStore

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
    store: PlatformStore,
    *,
    hasher: PasswordHasher | None = None,
    service: ServiceLink | None = None,
    presence: PresenceRecorder | None = None,
    authority: Authority | None = None,
    broker: EmbeddedBroker | None = None,
    dispatcher: CommandDispatcher | None = None,
    spawn: Spawn = _create_task,
    wait_for_service: bool = True,
) -> web.Application:
    """The registrar as an aiohttp application; the caller owns `store` (and `hasher`, when it
    passes one). With `service` and `presence`, the app runs the platform's service MQTT client,
    which records every device's presence, as a task started with `spawn` (the platform passes
    its own, which notices the task's death); the app's start waits (a bounded time) for it to
    connect unless `wait_for_service` is False (an external broker that asks this very app
    about the service client's login). `authority` and `broker` feed /metrics; the admin
    API sends commands through `dispatcher` (without one, sending answers 503); the web console
    (`/`) follows what `presence` writes through the admin API's event stream.

    The admin token is loaded (or generated, see `admin_auth`) when the app starts; the event
    loop's lag probe runs while it is up."""
    metrics = Metrics(StoreCounts(functools.partial(count_fleet, store)))
    metrics.add_collector(MQTTCollector(authority, broker))
    auth = AdminAuth(
        public_metrics=settings.admin.public_metrics,
        sessions=ConsoleSessions(settings.console.session_ttl_s),
    )
    app = web.Application(
        middlewares=[http_middleware(metrics), error_middleware(), auth_middleware(auth)],
        client_max_size=MAX_BODY_BYTES,  # the device API's; admin bodies are read with their own
    )
    app[SETTINGS] = settings
    app[STORE] = store
    registrar = settings.registrar
    app[RATE_LIMITER] = RateLimiter(registrar.rate_per_ip, registrar.rate_burst)
    app[CUSTOMER_LIMITER] = RateLimiter(registrar.rate_per_customer, registrar.customer_burst)
    refusals = app[REFUSALS] = RefusalAudit(store, metrics.refusals)
    auth.on_refused = lambda request, reason: refusals.note(
        "admin_auth", "admin", request.remote, reason
    )
    app[HEALTH_CHECKS] = [_check_store(store)]
    app[METRICS] = metrics
    app[ADMIN_AUTH] = auth
    feed = app[FLEET_FEED] = FleetFeed(
        store,
        interval_s=settings.console.stream_interval_s,
        max_streams=settings.console.max_streams,
    )
    app.on_shutdown.append(fleet_feed.close_feed)
    if presence is not None:
        presence.on_recorded.append(feed.note)
    if authority is not None:
        app[releases_api.AUTHORITY] = authority  # release downloads check device logins
        broker_auth.add_routes(app, authority, settings.broker_auth)  # an external broker's
    if dispatcher is not None:
        app[DISPATCHER] = dispatcher
        metrics.add_collector(CommandCollector(dispatcher))
    app.cleanup_ctx.append(_admin_token)
    app.cleanup_ctx.append(functools.partial(_lag_probe, spawn=spawn))
    app.cleanup_ctx.append(functools.partial(_refusal_audit, spawn=spawn))
    if hasher is None:
        app.cleanup_ctx.append(_password_hasher)
    else:
        app[HASHER] = hasher
    if service is not None and presence is not None:
        app[SERVICE_CLIENT] = ServiceClient(service, presence)
        wait_s = SERVICE_CONNECT_TIMEOUT_S if wait_for_service else 0.0
        app.cleanup_ctx.append(functools.partial(_service_client, spawn=spawn, wait_s=wait_s))
    device_body = expect_handler(device_api.MAX_BODY_BYTES)
    app.router.add_post("/api/v1/register", device_api.register, expect_handler=device_body)
    app.router.add_post("/api/v1/activate", device_api.activate, expect_handler=device_body)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_handler(metrics))
    app.router.add_get("/api/v1/openapi.json", openapi.serve)
    app.router.add_get("/api/v1/releases/{app}/{version}", releases_api.download)
    _add_admin_routes(app.router)
    add_console_routes(app)
    app.on_response_prepare.append(server_header)
    return app


def _add_admin_routes(router: web.UrlDispatcher) -> None:
    """The admin API (docs/admin-api.md); `openapi` documents exactly these routes."""
    admin = "/api/v1/admin"
    device = f"{admin}/devices/{{customer_id}}/{{device_id}}"
    body = {"expect_handler": expect_handler(admin_input.MAX_BODY_BYTES)}
    router.add_get(f"{admin}/customers", admin_api.list_customers)
    router.add_post(f"{admin}/customers", admin_api.add_customer, **body)
    router.add_get(f"{admin}/customers/{{customer_id}}", admin_api.show_customer)
    router.add_patch(f"{admin}/customers/{{customer_id}}", admin_api.update_customer, **body)
    router.add_get(f"{admin}/devices", admin_devices.list_devices)
    router.add_get(device, admin_devices.show_device)
    router.add_post(f"{device}/revoke", admin_devices.revoke_device, **body)
    router.add_post(f"{device}/reset", admin_devices.reset_device, **body)
    router.add_patch(f"{device}/tags", admin_devices.update_tags, **body)
    router.add_get(f"{device}/telemetry", admin_devices.device_telemetry)
    router.add_get(f"{device}/events", admin_devices.device_events)
    router.add_post(f"{admin}/commands", admin_commands.send_command, **body)
    router.add_get(f"{admin}/commands", admin_commands.list_commands)
    router.add_get(f"{admin}/commands/{{command_id}}", admin_commands.show_command)
    router.add_post(f"{admin}/rollouts", admin_rollouts.start_rollout, **body)
    router.add_get(f"{admin}/rollouts", admin_rollouts.list_rollouts)
    router.add_get(f"{admin}/rollouts/{{rollout_id}}", admin_rollouts.show_rollout)
    router.add_post(f"{admin}/rollouts/{{rollout_id}}/abort", admin_rollouts.abort_rollout, **body)
    router.add_get(f"{admin}/releases", releases_api.list_releases)
    upload = {"expect_handler": releases_api.expect_upload}
    router.add_post(f"{admin}/releases", releases_api.add_release, **upload)
    router.add_delete(f"{admin}/releases/{{app}}/{{version}}", releases_api.remove_release)
    router.add_get(f"{admin}/audit", admin_api.list_audit)
    router.add_get(f"{admin}/events", admin_api.list_events)
    router.add_get(f"{admin}/stream", fleet_feed.stream)


async def _admin_token(app: web.Application) -> AsyncIterator[None]:
    token = await asyncio.to_thread(load_or_create_admin_token, app[SETTINGS])
    app[ADMIN_AUTH].set_token(token)
    yield


async def _lag_probe(app: web.Application, *, spawn: Spawn) -> AsyncIterator[None]:
    task = spawn(run_lag_probe(app[METRICS]), "event-loop-lag")
    yield
    task.cancel()
    await asyncio.wait([task])


async def _refusal_audit(app: web.Application, *, spawn: Spawn) -> AsyncIterator[None]:
    refusals = app[REFUSALS]
    task = spawn(refusals.run(), "refusal-audit")
    yield
    task.cancel()
    await asyncio.wait([task])
    await refusals.flush()  # what was noted last


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


async def _service_client(
    app: web.Application, *, spawn: Spawn, wait_s: float
) -> AsyncIterator[None]:
    client = app[SERVICE_CLIENT]
    task = spawn(client.run(), "service-client")
    if wait_s > 0:
        try:
            async with asyncio.timeout(wait_s):
                await client.connected.wait()
        except TimeoutError:
            log.warning("service client not connected after %s s; going on", wait_s)
    yield
    task.cancel()
    await asyncio.wait([task])  # how it ended is for its owner (the spawner) to report


def _check_store(store: PlatformStore) -> HealthCheck:
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
