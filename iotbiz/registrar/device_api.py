"""The device API: register and activate (the contract in DESIGN.md, "Device API")."""

from __future__ import annotations

import json
import logging
from typing import Any

from aiohttp import web

from iotbiz.errors import BadRequest, Forbidden, RegistrationRefused, TooManyRequests
from iotbiz.models import Device, DeviceState
from iotbiz.names import DeviceName, is_customer_id, normalize_device_id
from iotbiz.passwords import generate_password
from iotbiz.registrar.http_server import read_body
from iotbiz.registrar.keys import (
    CUSTOMER_LIMITER,
    HASHER,
    RATE_LIMITER,
    REFUSALS,
    SETTINGS,
    STORE,
)
from iotbiz.registrar.ratelimit import RateLimiter

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 4096  # a registration is a customer id, a MAC and a password
# activate's one refusal: which of these it was is not told (no device-existence oracle)
ACTIVATION_REFUSED = "unknown device, wrong password, or registration expired or revoked"

MAX_PASSWORD_LENGTH = 128


async def register(request: web.Request) -> web.Response:
    """201 {"password"}: the device is pending; again while pending: a new password."""
    _limit_rate(request)
    body = await _read_object(request)
    name = _device_name(body)
    _limit_customer(request, name)
    store, hasher = request.app[STORE], request.app[HASHER]
    try:
        await store.check_registration(name)  # no bcrypt work for hopeless requests
        if hasher.busy:
            raise TooManyRequests("registrar busy, try again", retry_after_s=1)
        password = generate_password()
        password_hash = await hasher.hash(password)
        ttl_s = request.app[SETTINGS].registrar.pending_ttl_s
        await store.register_device(name, password_hash, ttl_s=ttl_s, actor=_actor(request))
    except RegistrationRefused as exc:
        log.debug("registration of %s refused: %s", name, exc)  # audited, throttled
        request.app[REFUSALS].note("register", str(name), request.remote, str(exc))
        raise Forbidden(str(exc)) from exc
    log.debug("registered %s (pending)", name)  # the audit log has it; INFO would flood in a storm
    return web.json_response({"password": password}, status=201)


async def activate(request: web.Request) -> web.Response:
    """200: the pending credentials are active; idempotent for the same password."""
    _limit_rate(request)
    body = await _read_object(request)
    name = _device_name(body)
    _limit_customer(request, name)
    password = body.get("password")
    if not isinstance(password, str) or not 0 < len(password) <= MAX_PASSWORD_LENGTH:
        raise BadRequest(f"password must be a string of 1 to {MAX_PASSWORD_LENGTH} characters")
    store, hasher = request.app[STORE], request.app[HASHER]
    device = await store.get_device(name)
    # One answer, and one bcrypt check's time, whatever the reason: unknown, revoked, expired
    # or a wrong password. The caller learns nothing of which devices exist.
    usable = (
        device is not None
        and device.state is not DeviceState.REVOKED
        and device.password_hash is not None
        and not device.is_expired(store.now())
    )
    if hasher.busy:
        raise TooManyRequests("registrar busy, try again", retry_after_s=1)
    known_hash = device.password_hash if usable and device is not None else None
    matched = await hasher.check(password, known_hash)
    if not matched or device is None or known_hash is None:
        # the audit log (for operators) has the reason the answer does not tell
        reason = _activation_refusal(device) if not usable else "wrong password"
        request.app[REFUSALS].note("activate", str(name), request.remote, reason)
        raise Forbidden(ACTIVATION_REFUSED)
    if device.state is DeviceState.ACTIVE:
        return web.Response(status=200)  # activated before with this password: no other effect
    if not await store.activate_device(name, known_hash, actor=_actor(request)):
        # Changed while bcrypt ran: activated by a concurrent call with the same password (fine),
        # or re-registered with a new password, expired or revoked (refused).
        current = await store.get_device(name)
        if current is None or current.state is not DeviceState.ACTIVE:
            raise Forbidden("registration changed; register again")
        if current.password_hash != known_hash:
            raise Forbidden(ACTIVATION_REFUSED)
    log.debug("activated %s", name)  # the audit log has it
    return web.Response(status=200)


def _activation_refusal(device: Device | None) -> str:
    if device is None:
        return "unknown device"
    if device.state is DeviceState.REVOKED or device.password_hash is None:
        return "revoked"
    return "registration expired"


def _limit_rate(request: web.Request) -> None:
    """`registrar.rate_per_ip` per client address (before the body is read)."""
    address = request.remote or "unknown"
    wait = request.app[RATE_LIMITER].acquire(address)
    if wait > 0:
        request.app[REFUSALS].note("rate_limit", address, address, "per address")
        raise TooManyRequests("too many requests", retry_after_s=RateLimiter.retry_after(wait))


def _limit_customer(request: web.Request, name: DeviceName) -> None:
    """`registrar.rate_per_customer` for the customer, from all addresses together: many
    addresses cannot flood one customer (a gateway with many devices behind one address has its
    own, larger, per-address budget)."""
    wait = request.app[CUSTOMER_LIMITER].acquire(name.customer_id)
    if wait > 0:
        request.app[REFUSALS].note("rate_limit", name.customer_id, request.remote, "per customer")
        raise TooManyRequests(
            "too many requests for this customer", retry_after_s=RateLimiter.retry_after(wait)
        )


async def _read_object(request: web.Request) -> dict[str, Any]:
    timeout_s = request.app[SETTINGS].http.body_timeout_s
    raw = await read_body(request, limit=MAX_BODY_BYTES, timeout_s=timeout_s)
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BadRequest("body must be a JSON object") from exc
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    return body


def _device_name(body: dict[str, Any]) -> DeviceName:
    customer_id, mac_address = body.get("customer_id"), body.get("mac_address")
    if not isinstance(customer_id, str):
        raise BadRequest("customer_id must be a string")
    if not isinstance(mac_address, str):
        raise BadRequest("mac_address must be a string")
    if not is_customer_id(customer_id):
        raise BadRequest(
            "customer_id is not valid: 1 to 64 of A-Z a-z 0-9 _ - (first alphanumeric)"
        )
    device_id = normalize_device_id(mac_address)
    if device_id is None:
        raise BadRequest(
            "mac_address is not valid: a MAC address, or 1 to 64 of A-Z a-z 0-9 : _ -"
            " (first alphanumeric)"
        )
    return DeviceName(customer_id, device_id)


def _actor(request: web.Request) -> str:
    return f"device-api:{request.remote}"
