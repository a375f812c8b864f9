"""Typed keys of the registrar's aiohttp application."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from iotbiz.passwords import PasswordHasher
from iotbiz.registrar.admin_auth import AdminAuth
from iotbiz.registrar.metrics import Metrics
from iotbiz.registrar.ratelimit import RateLimiter
from iotbiz.registrar.service_client import ServiceClient
from iotbiz.settings import Settings
from iotbiz.store import Store

# A health check returns (name, state) and raises an IotbizError when unhealthy.
HealthCheck = Callable[[], Awaitable[tuple[str, str]]]

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
HASHER = web.AppKey("hasher", PasswordHasher)
RATE_LIMITER = web.AppKey("rate_limiter", RateLimiter)
HEALTH_CHECKS = web.AppKey("health_checks", list[HealthCheck])
SERVICE_CLIENT = web.AppKey("service_client", ServiceClient)
ADMIN_AUTH = web.AppKey("admin_auth", AdminAuth)
METRICS = web.AppKey("metrics", Metrics)
