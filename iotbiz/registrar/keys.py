"""Typed keys of the registrar's aiohttp application."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from aiohttp import web

from iotbiz.models import Command
from iotbiz.names import DeviceName
from iotbiz.passwords import PasswordHasher
from iotbiz.registrar.admin_auth import AdminAuth
from iotbiz.registrar.metrics import CommandCounters, Metrics
from iotbiz.registrar.ratelimit import RateLimiter
from iotbiz.registrar.refusals import RefusalAudit
from iotbiz.registrar.service_client import ServiceClient
from iotbiz.rollouts import RolloutEngine
from iotbiz.settings import Settings
from iotbiz.store.interface import PlatformStore

# A health check returns (name, state) and raises an IotbizError when unhealthy.
HealthCheck = Callable[[], Awaitable[tuple[str, str]]]


class CommandDispatcher(CommandCounters, Protocol):
    """What the admin API (and /metrics) need of the platform's dispatcher
    (`iotbiz.dispatch.Dispatcher`)."""

    async def send(
        self,
        names: Sequence[DeviceName],
        action: str,
        args: dict[str, Any] | None = None,
        *,
        expires_in_s: float | None = None,
        actor: str,
    ) -> tuple[str, list[Command]]: ...

    async def wait(self, command_id: str, timeout_s: float) -> Command: ...


SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", PlatformStore)
HASHER = web.AppKey("hasher", PasswordHasher)
RATE_LIMITER = web.AppKey("rate_limiter", RateLimiter)
CUSTOMER_LIMITER = web.AppKey("customer_limiter", RateLimiter)
REFUSALS = web.AppKey("refusals", RefusalAudit)
HEALTH_CHECKS = web.AppKey("health_checks", list[HealthCheck])
SERVICE_CLIENT = web.AppKey("service_client", ServiceClient)
ADMIN_AUTH = web.AppKey("admin_auth", AdminAuth)
METRICS = web.AppKey("metrics", Metrics)
DISPATCHER = web.AppKey("dispatcher", CommandDispatcher)
ROLLOUTS = web.AppKey("rollouts", RolloutEngine)  # set by the platform, which runs the engine
