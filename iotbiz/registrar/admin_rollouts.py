"""The admin API's staged rollouts: start, list, show, abort (the engine is iotbiz.rollouts).

A rollout names its devices in ONE of two ways: `devices` (a list of "c/d") or `customer_id`
(its active devices, optionally only those with all of `tags`), resolved once, at the start.
"""

from __future__ import annotations

import re

from aiohttp import web

from iotbiz.errors import BadRequest, NotFoundError, ServiceUnavailable
from iotbiz.registrar.admin_api import MAX_PAGE, actor
from iotbiz.registrar.admin_input import (
    Query,
    customer_id,
    decode_cursor,
    device_name,
    encode_cursor,
    number,
    only_keys,
    read_object,
    tag_changes,
    whole_number,
)
from iotbiz.registrar.keys import ROLLOUTS, SETTINGS, STORE
from iotbiz.releases import ReleaseError, check_name

ROLLOUT_CURSOR = "r"
ROLLOUT_ID = re.compile(r"r-[0-9a-f]{16}", re.ASCII)
MAX_BATCH = 10000
MAX_FAILURES = 10**9
KEYS = (
    "app",
    "version",
    "devices",
    "customer_id",
    "tags",
    "batch_size",
    "max_failures",
    "force",
    "timeout_s",
)
NO_ENGINE = "rollouts need the running platform (no rollout engine here)"


async def start_rollout(request: web.Request) -> web.Response:
    """201 Rollout: created running; its first batch starts at once."""
    Query(request, ())
    settings = request.app[SETTINGS]
    body = await read_object(request)
    only_keys(body, KEYS)
    app, version = body.get("app"), body.get("version")
    if not isinstance(app, str) or not isinstance(version, str):
        raise BadRequest("app and version are required strings")
    try:
        check_name(app, version)
    except ReleaseError as exc:
        raise BadRequest(str(exc)) from exc
    given = [key for key in ("devices", "customer_id") if key in body]
    if len(given) != 1:
        raise BadRequest("give exactly one of devices, customer_id")
    if "tags" in body and given != ["customer_id"]:
        raise BadRequest("tags select among a customer's devices: give customer_id with them")
    batch_size = settings.rollouts.batch_size
    if "batch_size" in body:
        batch_size = whole_number(body["batch_size"], "batch_size", low=1, high=MAX_BATCH)
    max_failures = 0
    if "max_failures" in body:
        max_failures = whole_number(body["max_failures"], "max_failures", low=0, high=MAX_FAILURES)
    force = body.get("force", False)
    if not isinstance(force, bool):
        raise BadRequest("force must be true or false")
    timeout_s = settings.rollouts.device_timeout_s
    if "timeout_s" in body:
        timeout_s = number(body["timeout_s"], "timeout_s", low=1, high=settings.commands.max_ttl_s)
    most = settings.rollouts.max_devices
    store = request.app[STORE]
    if "devices" in body:
        devices = body["devices"]
        if not isinstance(devices, list) or not 1 <= len(devices) <= most:
            raise BadRequest(f"devices must be a list of 1 to {most} device names")
        names = [device_name(item, "devices[]") for item in devices]
    else:
        customer = customer_id(body["customer_id"])
        tags = tag_changes(body.get("tags", {}))
        if any(value is None for value in tags.values()):
            raise BadRequest("tags must map keys to string values")
        if await store.get_customer(customer) is None:
            raise NotFoundError(f"no customer {customer}")
        matching = {key: value for key, value in tags.items() if value is not None}
        names = await store.device_names(customer_id=customer, tags=matching, limit=most + 1)
        if not names:
            raise BadRequest(f"no active devices of customer {customer} match")
        if len(names) > most:
            raise BadRequest(f"more than {most} devices match: narrow it down with tags")
    if ROLLOUTS not in request.app:
        raise ServiceUnavailable(NO_ENGINE)
    try:
        rollout = await store.create_rollout(
            names,
            app=app,
            version=version,
            batch_size=batch_size,
            max_failures=max_failures,
            timeout_s=timeout_s,
            force=force,
            actor=actor(request),
        )
    except NotFoundError as exc:  # devices not active, or no such release: the request is wrong
        raise BadRequest(str(exc)) from exc
    request.app[ROLLOUTS].wake()
    return web.json_response(rollout.to_json(), status=201)


async def list_rollouts(request: web.Request) -> web.Response:
    """200 {"rollouts", "next_cursor"}: newest first."""
    query = Query(request, ("limit", "cursor"))
    limit = query.limit(default=100, high=MAX_PAGE)
    cursor = query.text("cursor", max_length=512)
    before = None
    if cursor is not None:
        before = decode_cursor(cursor, ROLLOUT_CURSOR)
        if not ROLLOUT_ID.fullmatch(before):
            raise BadRequest("cursor is not valid (use next_cursor as it is)")
    rollouts = await request.app[STORE].list_rollouts(limit=limit, before=before)
    next_cursor = None
    if len(rollouts) == limit:
        next_cursor = encode_cursor(ROLLOUT_CURSOR, rollouts[-1].rollout_id)
    return web.json_response(
        {"rollouts": [r.to_json() for r in rollouts], "next_cursor": next_cursor}
    )


def _rollout_id(request: web.Request) -> str:
    rollout_id = request.match_info["rollout_id"]
    if not ROLLOUT_ID.fullmatch(rollout_id):
        raise BadRequest("rollout_id is not valid: r- and 16 hex digits")
    return rollout_id


async def show_rollout(request: web.Request) -> web.Response:
    """200 Rollout with its devices."""
    Query(request, ())
    rollout_id = _rollout_id(request)
    store = request.app[STORE]
    rollout = await store.get_rollout(rollout_id)
    if rollout is None:
        raise NotFoundError(f"no rollout {rollout_id}")
    devices = await store.rollout_devices(rollout_id)
    return web.json_response({**rollout.to_json(), "devices": [d.to_json() for d in devices]})


async def abort_rollout(request: web.Request) -> web.Response:
    """200 Rollout, aborted; 404 unknown; 409 when it has ended."""
    Query(request, ())
    rollout_id = _rollout_id(request)
    rollout = await request.app[STORE].end_rollout(rollout_id, "aborted", None, actor(request))
    if ROLLOUTS in request.app:
        request.app[ROLLOUTS].wake()
    return web.json_response(rollout.to_json())
