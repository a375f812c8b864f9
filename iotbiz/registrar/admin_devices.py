"""The admin API's devices: the paged fleet list, one device, revoke, reset, tags, telemetry
history and events.

The list pages by keyset on (customer_id, device_id): `next_cursor` is an opaque token for the
last device of a full page (null after a shorter one), so a page costs the same wherever it is.
"""

from __future__ import annotations

from aiohttp import web

from iotbiz.errors import BadRequest, NotFoundError
from iotbiz.models import Device, DeviceState
from iotbiz.names import DeviceName
from iotbiz.registrar.admin_api import MAX_EVENT_ID, MAX_PAGE, actor
from iotbiz.registrar.admin_input import (
    Query,
    customer_id,
    decode_cursor,
    device_name,
    encode_cursor,
    only_keys,
    path_device,
    read_object,
    tag_changes,
    tag_key,
)
from iotbiz.registrar.keys import STORE
from iotbiz.store.interface import PlatformStore

DEVICE_CURSOR = "d"
MAX_TAG_FILTERS = 16
MAX_TAG_CHANGES = 64
MAX_SAMPLES = 10_000
STATES = tuple(state.value for state in DeviceState)
MAX_EPOCH_S = 1e11  # about the year 5138: any real time fits


async def list_devices(request: web.Request) -> web.Response:
    """200 {"devices", "next_cursor", "total"}; every filter given must match."""
    query = Query(
        request,
        ("customer", "state", "online", "tag", "q", "limit", "cursor"),
        repeatable=("tag",),
    )
    customer = query.text("customer", max_length=64)
    if customer is not None:
        customer_id(customer, "customer")
    state = query.choice("state", STATES)
    tags = _tag_filters(query.all("tag"))
    search = query.text("q", max_length=128)
    limit = query.limit(default=100, high=MAX_PAGE)
    cursor = query.text("cursor", max_length=512)
    after = None
    if cursor is not None:
        after = device_name(decode_cursor(cursor, DEVICE_CURSOR), "cursor")
    devices, total = await request.app[STORE].find_devices(
        customer_id=customer,
        state=None if state is None else DeviceState(state),
        online=query.boolean("online"),
        tags=tags,
        query=search,
        limit=limit,
        after=after,
    )
    next_cursor = None
    if len(devices) == limit:
        next_cursor = encode_cursor(DEVICE_CURSOR, devices[-1].name)
    body = {"devices": [d.to_json() for d in devices], "next_cursor": next_cursor, "total": total}
    return web.json_response(body)


def _tag_filters(values: list[str]) -> dict[str, str]:
    if len(values) > MAX_TAG_FILTERS:
        raise BadRequest(f"at most {MAX_TAG_FILTERS} tag filters")
    tags: dict[str, str] = {}
    for value in values:
        key, sep, tag_value = value.partition("=")
        if not sep:
            raise BadRequest("tag must be key=value")
        tag_key(key)
        if len(tag_value) > 256:
            raise BadRequest(f"tag {key}: the value must be at most 256 characters")
        if tags.get(key, tag_value) != tag_value:
            raise BadRequest(f"tag {key} given twice with different values: nothing can match")
        tags[key] = tag_value
    return tags


async def show_device(request: web.Request) -> web.Response:
    Query(request, ())
    return web.json_response((await _existing(request.app[STORE], path_device(request))).to_json())


async def revoke_device(request: web.Request) -> web.Response:
    """200 Device (revoked); revoking a revoked device changes nothing."""
    Query(request, ())
    await _no_body(request)
    device = await request.app[STORE].revoke_device(path_device(request), actor=actor(request))
    return web.json_response(device.to_json())


async def reset_device(request: web.Request) -> web.Response:
    """200 Device as it was; its id may register again."""
    Query(request, ())
    await _no_body(request)
    device = await request.app[STORE].reset_device(path_device(request), actor=actor(request))
    return web.json_response(device.to_json())


async def _no_body(request: web.Request) -> None:
    """Actions take no body; an empty one or `{}` is accepted."""
    if request.can_read_body:
        body = await read_object(request) if request.content_length != 0 else {}
        only_keys(body, ())


async def update_tags(request: web.Request) -> web.Response:
    """PATCH {"tags": {key: value or null}}: 200 {"tags": all of the device's tags}."""
    Query(request, ())
    name = path_device(request)
    body = await read_object(request)
    only_keys(body, ("tags",))
    if "tags" not in body:
        raise BadRequest("tags is required")
    changes = tag_changes(body["tags"])
    if not 0 < len(changes) <= MAX_TAG_CHANGES:
        raise BadRequest(f"tags must hold 1 to {MAX_TAG_CHANGES} changes")
    try:
        tags = await request.app[STORE].set_tags(name, changes, actor=actor(request))
    except ValueError as exc:  # over the store's limit of tags per device
        raise BadRequest(str(exc)) from exc
    return web.json_response({"tags": tags})


async def device_telemetry(request: web.Request) -> web.Response:
    """200 {"samples"}: oldest first, since <= at < until (epoch seconds)."""
    query = Query(request, ("since", "until", "limit"))
    since = query.number("since", low=0, high=MAX_EPOCH_S)
    until = query.number("until", low=0, high=MAX_EPOCH_S)
    if since is not None and until is not None and until < since:
        raise BadRequest("until must not be before since")
    limit = query.limit(default=1000, high=MAX_SAMPLES)
    store = request.app[STORE]
    name = path_device(request)
    await _existing(store, name)
    if until == 0:  # nothing is older than the epoch (and the store reads 0 as "no bound")
        return web.json_response({"samples": []})
    samples = await store.telemetry_samples(name, since=since, until=until, limit=limit)
    return web.json_response({"samples": [sample.to_json() for sample in samples]})


async def device_events(request: web.Request) -> web.Response:
    """200 {"events"}: newest first; `before` an event id (the last of the previous page)."""
    query = Query(request, ("limit", "before"))
    limit = query.limit(default=100, high=MAX_PAGE)
    before = query.integer("before", default=None, low=1, high=MAX_EVENT_ID)
    store = request.app[STORE]
    name = path_device(request)
    await _existing(store, name)
    events = await store.list_events(name=name, limit=limit, before=before)
    return web.json_response({"events": [event.to_json() for event in events]})


async def _existing(store: PlatformStore, name: DeviceName) -> Device:
    device = await store.get_device(name)
    if device is None:
        raise NotFoundError(f"no device {name}")
    return device
