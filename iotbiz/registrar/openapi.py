"""The OpenAPI 3.1 document of the registrar (device API, admin API, metrics), as data.

It describes exactly the routes of `create_app` (a test walks the router and compares both
ways) and every status each handler can answer, errors with the one error schema
`{"error": string}`. Served without auth at `/api/v1/openapi.json`.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from iotbiz import __version__

JSON = "application/json"
NULLABLE_TIME = {"type": ["string", "null"], "format": "date-time"}
TIME = {"type": "string", "format": "date-time"}
CUSTOMER_ID = "^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
DEVICE_ID = "^[A-Za-z0-9][A-Za-z0-9:._-]{0,63}$"  # MACs in any notation, or a plain id
ERRORS = {
    400: "bad input (the message names the field)",
    401: "missing or wrong admin token",
    403: "refused",
    404: "no such customer, device or command",
    409: "exists already",
    413: "request body too large",
    429: "too many requests or busy: retry after Retry-After seconds",
    503: "store (or broker) unavailable, try again later",
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _object(properties: dict[str, Any], *, required: list[str] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
    }


def _ok(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _responses(ok: dict[int, dict[str, Any]], *errors: int) -> dict[str, Any]:
    answers: dict[str, Any] = {str(status): body for status, body in ok.items()}
    for status in errors:
        answers[str(status)] = {"$ref": f"#/components/responses/Error{status}"}
    return answers


def _query(name: str, schema: dict[str, Any], description: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "in": "query", "schema": schema, "description": description, **extra}


def _limit(default: int, maximum: int) -> dict[str, Any]:
    schema = {"type": "integer", "minimum": 1, "maximum": maximum, "default": default}
    return _query("limit", schema, "page size")


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {JSON: {"schema": schema}}}


ADMIN: dict[str, Any] = {"security": [{"adminToken": []}]}
PUBLIC: dict[str, Any] = {"security": []}
READ_ERRORS = (400, 401, 503)
DEVICE_PARAMETERS = [
    {"$ref": "#/components/parameters/customer_id"},
    {"$ref": "#/components/parameters/device_id"},
]
BEFORE_EVENT = _query(
    "before",
    {"type": "integer", "minimum": 1, "maximum": 2**62},
    "an event id: the events older than it (the last id of the previous page)",
)


def _operation(summary: str, responses: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"summary": summary, **ADMIN, **extra, "responses": responses}


SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "properties": {"error": {"type": "string"}},
        "required": ["error"],
        "additionalProperties": False,
    },
    "Customer": _object(
        {
            "customer_id": {"type": "string"},
            "device_limit": {"type": "integer", "minimum": 0},
            "active_devices": {"type": "integer", "minimum": 0},
            "pending_devices": {"type": "integer", "minimum": 0},
            "created_at": TIME,
        }
    ),
    "Device": _object(
        {
            "name": {"type": "string", "description": "customer_id/device_id"},
            "customer_id": {"type": "string"},
            "device_id": {"type": "string"},
            "state": {"type": "string", "enum": ["pending", "active", "revoked"]},
            "online": {"type": "boolean"},
            "created_at": TIME,
            "pending_expires_at": NULLABLE_TIME,
            "activated_at": NULLABLE_TIME,
            "revoked_at": NULLABLE_TIME,
            "last_seen_at": NULLABLE_TIME,
            "status": {"type": ["object", "null"], "description": "the last status message"},
            "telemetry": {
                "type": ["object", "null"],
                "description": "the last telemetry message (`apps`: name, state, pid, ...)",
            },
            "tags": {"type": "object", "additionalProperties": {"type": "string"}},
        }
    ),
    "Tags": {"type": "object", "additionalProperties": {"type": "string"}},
    "AuditEntry": _object(
        {
            "id": {"type": "integer"},
            "at": TIME,
            "actor": {"type": "string"},
            "action": {"type": "string"},
            "subject": {"type": "string"},
            "detail": {"type": "object"},
        }
    ),
    "Event": _object(
        {
            "id": {"type": "integer"},
            "device": {"type": "string"},
            "at": {**TIME, "description": "when the platform received it"},
            "body": {"type": "object", "description": "as the device sent it"},
        }
    ),
    "Sample": _object(
        {
            "at": TIME,
            "ts": {"type": "number", "description": "seconds since the epoch"},
            **{
                field: {"type": ["number", "null"]}
                for field in (
                    "cpu_percent",
                    "memory_percent",
                    "disk_percent",
                    "load_1",
                    "temperature_c",
                    "net_rx_bytes",
                    "net_tx_bytes",
                )
            },
        }
    ),
}

PARAMETERS = {
    "customer_id": {
        "name": "customer_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": CUSTOMER_ID},
    },
    "device_id": {
        "name": "device_id",
        "in": "path",
        "required": True,
        "description": "the device id; a MAC address in any notation",
        "schema": {"type": "string", "pattern": DEVICE_ID},
    },
}

DEVICE_API_BODY = _object(
    {
        "customer_id": {"type": "string", "pattern": CUSTOMER_ID},
        "mac_address": {"type": "string"},
    }
)

PATHS: dict[str, Any] = {
    "/api/v1/register": {
        "post": {
            "summary": "register a device (pending); again while pending: a new password",
            **PUBLIC,
            "requestBody": _body(DEVICE_API_BODY),
            "responses": _responses(
                {201: _ok(_object({"password": {"type": "string"}}), "registered")},
                400,
                403,
                413,
                429,
                503,
            ),
        }
    },
    "/api/v1/activate": {
        "post": {
            "summary": "activate a pending registration with its password",
            **PUBLIC,
            "requestBody": _body(
                {
                    **DEVICE_API_BODY,
                    "properties": {
                        **DEVICE_API_BODY["properties"],
                        "password": {"type": "string"},
                    },
                    "required": ["customer_id", "mac_address", "password"],
                }
            ),
            "responses": _responses({200: {"description": "active"}}, 400, 403, 413, 429, 503),
        }
    },
    "/healthz": {
        "get": {
            "summary": "200 while every part answers",
            **PUBLIC,
            "responses": _responses(
                {
                    200: _ok(
                        _object(
                            {"status": {"type": "string"}, "version": {"type": "string"}},
                        )
                    )
                },
                503,
            ),
        }
    },
    "/metrics": {
        "get": {
            "summary": "Prometheus metrics (text format); public with admin.public_metrics",
            **ADMIN,
            "responses": {
                "200": {"description": "OK", "content": {"text/plain": {"schema": {}}}},
                "401": {"$ref": "#/components/responses/Error401"},
            },
        }
    },
    "/api/v1/openapi.json": {
        "get": {
            "summary": "this document",
            **PUBLIC,
            "responses": {"200": _ok({"type": "object"})},
        }
    },
}


def _customer_ops() -> dict[str, Any]:
    customer_body = _object(
        {
            "customer_id": {"type": "string", "pattern": CUSTOMER_ID},
            "device_limit": {"type": "integer", "minimum": 0, "maximum": 1_000_000},
        }
    )
    customer_path = [{"$ref": "#/components/parameters/customer_id"}]
    return {
        "/api/v1/admin/customers": {
            "get": _operation(
                "all customers",
                _responses(
                    {
                        200: _ok(
                            _object({"customers": {"type": "array", "items": _ref("Customer")}})
                        )
                    },
                    *READ_ERRORS,
                ),
            ),
            "post": _operation(
                "add a customer",
                _responses({201: _ok(_ref("Customer"), "created")}, 400, 401, 409, 413, 503),
                requestBody=_body({**customer_body, "additionalProperties": False}),
            ),
        },
        "/api/v1/admin/customers/{customer_id}": {
            "parameters": customer_path,
            "get": _operation(
                "one customer", _responses({200: _ok(_ref("Customer"))}, 400, 401, 404, 503)
            ),
            "patch": _operation(
                "change a customer's device limit",
                _responses({200: _ok(_ref("Customer"))}, 400, 401, 404, 413, 503),
                requestBody=_body(
                    {
                        **_object({"device_limit": customer_body["properties"]["device_limit"]}),
                        "additionalProperties": False,
                    }
                ),
            ),
        },
    }


def _device_ops() -> dict[str, Any]:
    device = "/api/v1/admin/devices/{customer_id}/{device_id}"
    device_errors = (400, 401, 404, 503)
    action_errors = (400, 401, 404, 413, 503)
    return {
        "/api/v1/admin/devices": {
            "get": _operation(
                "the fleet: filtered, paged by keyset, with the total",
                _responses(
                    {
                        200: _ok(
                            _object(
                                {
                                    "devices": {"type": "array", "items": _ref("Device")},
                                    "next_cursor": {"type": ["string", "null"]},
                                    "total": {"type": "integer", "minimum": 0},
                                }
                            )
                        )
                    },
                    *READ_ERRORS,
                ),
                parameters=[
                    _query("customer", {"type": "string", "pattern": CUSTOMER_ID}, "customer id"),
                    _query(
                        "state",
                        {"type": "string", "enum": ["pending", "active", "revoked"]},
                        "device state",
                    ),
                    _query("online", {"type": "string", "enum": ["true", "false"]}, "online"),
                    _query(
                        "tag",
                        {"type": "array", "items": {"type": "string"}, "maxItems": 16},
                        "key=value; repeatable, all must match",
                        style="form",
                        explode=True,
                    ),
                    _query(
                        "q",
                        {"type": "string", "minLength": 1, "maxLength": 128},
                        "a substring of the name (case-insensitive)",
                    ),
                    _limit(100, 1000),
                    _query("cursor", {"type": "string"}, "next_cursor of the previous page"),
                ],
            )
        },
        device: {
            "parameters": DEVICE_PARAMETERS,
            "get": _operation("one device", _responses({200: _ok(_ref("Device"))}, *device_errors)),
        },
        f"{device}/revoke": {
            "parameters": DEVICE_PARAMETERS,
            "post": _operation(
                "revoke: its credentials stop working, it may never register again",
                _responses({200: _ok(_ref("Device"))}, *action_errors),
            ),
        },
        f"{device}/reset": {
            "parameters": DEVICE_PARAMETERS,
            "post": _operation(
                "forget the device so that its id may register again; answers it as it was",
                _responses({200: _ok(_ref("Device"))}, *action_errors),
            ),
        },
        f"{device}/tags": {
            "parameters": DEVICE_PARAMETERS,
            "patch": _operation(
                "set (a string) or remove (null) tags",
                _responses({200: _ok(_object({"tags": _ref("Tags")}))}, *action_errors),
                requestBody=_body(
                    _object(
                        {
                            "tags": {
                                "type": "object",
                                "additionalProperties": {"type": ["string", "null"]},
                            }
                        }
                    )
                ),
            ),
        },
        f"{device}/telemetry": {
            "parameters": DEVICE_PARAMETERS,
            "get": _operation(
                "telemetry history, oldest first",
                _responses(
                    {200: _ok(_object({"samples": {"type": "array", "items": _ref("Sample")}}))},
                    *device_errors,
                ),
                parameters=[
                    _query("since", {"type": "number", "minimum": 0}, "epoch seconds, inclusive"),
                    _query("until", {"type": "number", "minimum": 0}, "epoch seconds, exclusive"),
                    _limit(1000, 10000),
                ],
            ),
        },
        f"{device}/events": {
            "parameters": DEVICE_PARAMETERS,
            "get": _operation(
                "the device's events, newest first",
                _responses(
                    {200: _ok(_object({"events": {"type": "array", "items": _ref("Event")}}))},
                    *device_errors,
                ),
                parameters=[_limit(100, 1000), BEFORE_EVENT],
            ),
        },
    }


def _log_ops() -> dict[str, Any]:
    return {
        "/api/v1/admin/audit": {
            "get": _operation(
                "the audit log, newest first",
                _responses(
                    {
                        200: _ok(
                            _object({"entries": {"type": "array", "items": _ref("AuditEntry")}})
                        )
                    },
                    *READ_ERRORS,
                ),
                parameters=[
                    _query(
                        "subject",
                        {"type": "string", "minLength": 1, "maxLength": 256},
                        "a customer id or device name",
                    ),
                    _limit(100, 1000),
                ],
            )
        },
        "/api/v1/admin/events": {
            "get": _operation(
                "device events of the fleet or one customer, newest first",
                _responses(
                    {200: _ok(_object({"events": {"type": "array", "items": _ref("Event")}}))},
                    *READ_ERRORS,
                ),
                parameters=[
                    _query("customer", {"type": "string", "pattern": CUSTOMER_ID}, "customer id"),
                    _limit(100, 1000),
                    BEFORE_EVENT,
                ],
            )
        },
    }


def document() -> dict[str, Any]:
    """The whole document (a new dict each call: callers may change it)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "IoTBiz registrar and admin API",
            "version": __version__,
            "description": "See docs/admin-api.md and docs/device-api.md.",
        },
        "paths": {**PATHS, **_customer_ops(), **_device_ops(), **_log_ops()},
        "components": {
            "schemas": SCHEMAS,
            "parameters": PARAMETERS,
            "responses": {
                f"Error{status}": _ok(_ref("Error"), description)
                for status, description in ERRORS.items()
            },
            "securitySchemes": {
                "adminToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "setting admin.token, or the file admin.token beside the store",
                }
            },
        },
    }


async def serve(request: web.Request) -> web.Response:
    return web.json_response(document())
