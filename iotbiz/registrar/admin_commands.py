"""The admin API's commands: send (through the platform's dispatcher), list, show and wait.

A send names its devices in ONE of three ways: `device` ("c/d"), `devices` (a list of them), or
`customer_id` (its active devices, optionally only those with all of `tags`). Devices that are
unknown or not active make the whole send a 400 naming them; nothing is queued then.

`update` (args `app`, `version`, optionally `force`) is filled in from its release before it is
stored (`iotbiz.releases.prepare_update`: url, sha256, size, signature) and the release offered
to the devices (they may download it); no such release is a 400 naming it.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from aiohttp import web

from iotbiz import releases
from iotbiz.errors import BadRequest, NotFoundError, ServiceUnavailable
from iotbiz.models import Command, CommandState
from iotbiz.names import DeviceName
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
)
from iotbiz.registrar.keys import DISPATCHER, SETTINGS, STORE
from iotbiz.store.interface import PlatformStore

COMMAND_CURSOR = "c"
COMMAND_ID = re.compile(r"c-[0-9a-f]{16}", re.ASCII)
BATCH_ID = re.compile(r"b-[0-9a-f]{16}", re.ASCII)
ACTION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", re.ASCII)
MAX_WAIT_S = 60.0
POLL_S = 0.5
STATES = tuple(state.value for state in CommandState)
TARGETS = ("device", "devices", "customer_id")
NO_DISPATCHER = "commands need the running platform (no dispatcher here)"
UPDATE = "update"


async def send_command(request: web.Request) -> web.Response:
    """201 {"batch_id", "commands"}: one queued command per device."""
    Query(request, ())
    settings = request.app[SETTINGS].commands
    body = await read_object(request)
    only_keys(body, ("action", "args", "expires_in_s", *TARGETS, "tags"))
    action = body.get("action")
    if not isinstance(action, str) or not ACTION.fullmatch(action):
        raise BadRequest("action must be 1 to 64 of A-Z a-z 0-9 _ . - (first alphanumeric)")
    args = body.get("args", {})
    if not isinstance(args, dict):
        raise BadRequest("args must be a JSON object")
    expires_in_s = None
    if "expires_in_s" in body:
        expires_in_s = number(body["expires_in_s"], "expires_in_s", low=1, high=settings.max_ttl_s)
    names = await _targets(request, body, settings.max_devices)
    if DISPATCHER not in request.app:
        raise ServiceUnavailable(NO_DISPATCHER)
    withdraw_offers = None
    try:
        if action == UPDATE:  # the release's url, sha256, size, signature; offered to names
            args, withdraw_offers = await releases.prepare_update(request.app[STORE], names, args)
        try:
            batch_id, commands = await request.app[DISPATCHER].send(
                names, action, args, expires_in_s=expires_in_s, actor=actor(request)
            )
        except BaseException:
            if withdraw_offers is not None:
                await withdraw_offers()
            raise
    except NotFoundError as exc:  # devices that are not active: the request is wrong
        raise BadRequest(str(exc)) from exc
    except ValueError as exc:
        raise BadRequest(str(exc)) from exc
    return web.json_response(
        {"batch_id": batch_id, "commands": [c.to_json() for c in commands]}, status=201
    )


async def _targets(request: web.Request, body: dict[str, Any], most: int) -> list[DeviceName]:
    given = [key for key in TARGETS if key in body]
    if len(given) != 1:
        raise BadRequest("give exactly one of device, devices, customer_id")
    if "tags" in body and given != ["customer_id"]:
        raise BadRequest("tags select among a customer's devices: give customer_id with them")
    if "device" in body:
        return [device_name(body["device"])]
    if "devices" in body:
        devices = body["devices"]
        if not isinstance(devices, list) or not 1 <= len(devices) <= most:
            raise BadRequest(f"devices must be a list of 1 to {most} device names")
        return [device_name(item, "devices[]") for item in devices]
    customer = customer_id(body["customer_id"])
    tags = tag_changes(body.get("tags", {}))
    if any(value is None for value in tags.values()):
        raise BadRequest("tags must map keys to string values")
    store = request.app[STORE]
    if await store.get_customer(customer) is None:
        raise NotFoundError(f"no customer {customer}")
    matching = {key: value for key, value in tags.items() if value is not None}
    names = await store.device_names(customer_id=customer, tags=matching, limit=most + 1)
    if not names:
        raise BadRequest(f"no active devices of customer {customer} match")
    if len(names) > most:
        raise BadRequest(f"more than {most} devices match: narrow it down with tags")
    return names


async def list_commands(request: web.Request) -> web.Response:
    """200 {"commands", "next_cursor"}: newest first."""
    query = Query(request, ("device", "state", "batch", "limit", "cursor"))
    device = query.text("device")
    name = None if device is None else device_name(device)
    state = query.choice("state", STATES)
    batch = query.text("batch", max_length=64)
    if batch is not None and not BATCH_ID.fullmatch(batch):
        raise BadRequest("batch is not valid: b- and 16 hex digits")
    limit = query.limit(default=100, high=MAX_PAGE)
    cursor = query.text("cursor", max_length=512)
    before = None
    if cursor is not None:
        before = decode_cursor(cursor, COMMAND_CURSOR)
        if not COMMAND_ID.fullmatch(before):
            raise BadRequest("cursor is not valid (use next_cursor as it is)")
    commands = await request.app[STORE].list_commands(
        name=name,
        state=None if state is None else CommandState(state),
        batch_id=batch,
        limit=limit,
        before=before,
    )
    next_cursor = None
    if len(commands) == limit:
        next_cursor = encode_cursor(COMMAND_CURSOR, commands[-1].command_id)
    return web.json_response(
        {"commands": [c.to_json() for c in commands], "next_cursor": next_cursor}
    )


async def show_command(request: web.Request) -> web.Response:
    """200 Command; with `wait` (seconds, up to 60), once it is final or the time is up."""
    query = Query(request, ("wait",))
    wait_s = query.number("wait", low=0, high=MAX_WAIT_S)
    command_id = request.match_info["command_id"]
    if not COMMAND_ID.fullmatch(command_id):
        raise BadRequest("command_id is not valid: c- and 16 hex digits")
    if wait_s and DISPATCHER in request.app:
        command = await request.app[DISPATCHER].wait(command_id, wait_s)
    else:
        command = await _poll(request.app[STORE], command_id, wait_s or 0.0)
    return web.json_response(command.to_json())


async def _poll(store: PlatformStore, command_id: str, wait_s: float) -> Command:
    """The command once final or after `wait_s`, looking every `POLL_S` (a registrar without
    the platform's dispatcher: the commands are finished by another process)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while True:
        command = await store.get_command(command_id)
        if command is None:
            raise NotFoundError(f"no command {command_id}")
        remaining = deadline - loop.time()
        if command.final or remaining <= 0:
            return command
        await asyncio.sleep(min(POLL_S, remaining))
