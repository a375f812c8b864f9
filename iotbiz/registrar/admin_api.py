"""The admin API's customers, audit log and fleet-wide events (the contract: docs/admin-api.md).

Handlers check everything they are given (`admin_input`), raise `iotbiz.errors` exceptions for
the error middleware, and make every change through the store with the actor `admin:<address>`,
so that each lands in the audit log. Devices: `admin_devices`; commands: `admin_commands`.
"""

from __future__ import annotations

from aiohttp import web

from iotbiz.errors import BadRequest, NotFoundError
from iotbiz.registrar.admin_auth import VIA_CONSOLE
from iotbiz.registrar.admin_input import (
    Query,
    customer_id,
    only_keys,
    read_object,
    whole_number,
)
from iotbiz.registrar.keys import STORE

MAX_DEVICE_LIMIT = 1_000_000
MAX_PAGE = 1000
MAX_EVENT_ID = 2**62


def actor(request: web.Request) -> str:
    """Who made a change through the admin API (or the web console), for the audit log."""
    kind = "console" if request.get(VIA_CONSOLE) else "admin"
    return f"{kind}:{request.remote or 'unknown'}"


# -- customers -------------------------------------------------------------------------------


async def list_customers(request: web.Request) -> web.Response:
    Query(request, ())
    customers = await request.app[STORE].list_customers()
    return web.json_response({"customers": [c.to_json() for c in customers]})


async def add_customer(request: web.Request) -> web.Response:
    """201 Customer; 409 when it exists."""
    Query(request, ())
    body = await read_object(request)
    only_keys(body, ("customer_id", "device_limit"))
    new_id = customer_id(body.get("customer_id"))
    limit = whole_number(body.get("device_limit"), "device_limit", low=0, high=MAX_DEVICE_LIMIT)
    customer = await request.app[STORE].add_customer(new_id, limit, actor=actor(request))
    return web.json_response(
        customer.to_json(),
        status=201,
        headers={"Location": f"/api/v1/admin/customers/{new_id}"},
    )


async def show_customer(request: web.Request) -> web.Response:
    Query(request, ())
    wanted = customer_id(request.match_info["customer_id"])
    customer = await request.app[STORE].get_customer(wanted)
    if customer is None:
        raise NotFoundError(f"no customer {wanted}")
    return web.json_response(customer.to_json())


async def update_customer(request: web.Request) -> web.Response:
    """PATCH {"device_limit"}: 200 Customer."""
    Query(request, ())
    wanted = customer_id(request.match_info["customer_id"])
    body = await read_object(request)
    only_keys(body, ("device_limit",))
    if "device_limit" not in body:
        raise BadRequest("device_limit is required")
    limit = whole_number(body["device_limit"], "device_limit", low=0, high=MAX_DEVICE_LIMIT)
    store = request.app[STORE]
    await store.set_device_limit(wanted, limit, actor=actor(request))
    customer = await store.get_customer(wanted)
    if customer is None:
        raise NotFoundError(f"no customer {wanted}")
    return web.json_response(customer.to_json())


# -- audit log and events --------------------------------------------------------------------


async def list_audit(request: web.Request) -> web.Response:
    """Newest first; `subject` (a customer id or device name), `limit`, `before` (an entry id:
    the last of the previous page)."""
    query = Query(request, ("subject", "limit", "before"))
    subject = query.text("subject")
    limit = query.limit(default=100, high=MAX_PAGE)
    before = query.integer("before", default=None, low=1, high=MAX_EVENT_ID)
    entries = await request.app[STORE].audit_entries(subject=subject, limit=limit, before=before)
    return web.json_response({"entries": [entry.to_json() for entry in entries]})


async def list_events(request: web.Request) -> web.Response:
    """Device events of the whole fleet or one customer, newest first (filters never 404: an
    unknown customer has no events)."""
    query = Query(request, ("customer", "limit", "before"))
    customer = query.text("customer", max_length=64)
    if customer is not None:
        customer_id(customer, "customer")
    limit = query.limit(default=100, high=MAX_PAGE)
    before = query.integer("before", default=None, low=1, high=MAX_EVENT_ID)
    events = await request.app[STORE].list_events(customer_id=customer, limit=limit, before=before)
    return web.json_response({"events": [event.to_json() for event in events]})
