"""The OpenAPI 3.1 document of the registrar (device API, admin API, metrics), as data.

It describes exactly the routes of `create_app` (a test walks the router and compares both
ways) and every status each handler can answer, errors with the one error schema
`{"error": string}`. Served without auth at `/api/v1/openapi.json`.
"""

from __future__ import annotations

import copy
from typing import Any

from aiohttp import web

from iotbiz import __version__
from iotbiz.registrar.openapi_rollouts import rollout_ops
from iotbiz.registrar.openapi_schema import (
    ADMIN,
    APP_NAME,
    BEFORE_EVENT,
    CUSTOMER_ID,
    DEVICE_PARAMETERS,
    ERRORS,
    PARAMETERS,
    PUBLIC,
    READ_ERRORS,
    RELEASE_PARAMETERS,
    SCHEMAS,
    VERSION,
    body,
    limit,
    object_schema,
    ok,
    operation,
    query,
    ref,
    responses,
)

DEVICE_API_BODY = object_schema(
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
            "requestBody": body(DEVICE_API_BODY),
            "responses": responses(
                {201: ok(object_schema({"password": {"type": "string"}}), "registered")},
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
            "requestBody": body(
                {
                    **DEVICE_API_BODY,
                    "properties": {
                        **DEVICE_API_BODY["properties"],
                        "password": {"type": "string"},
                    },
                    "required": ["customer_id", "mac_address", "password"],
                }
            ),
            "responses": responses({200: {"description": "active"}}, 400, 403, 413, 429, 503),
        }
    },
    "/healthz": {
        "get": {
            "summary": "200 while every part answers",
            **PUBLIC,
            "responses": responses(
                {
                    200: ok(
                        object_schema(
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
            "responses": {"200": ok({"type": "object"})},
        }
    },
}


def _customer_ops() -> dict[str, Any]:
    customer_body = object_schema(
        {
            "customer_id": {"type": "string", "pattern": CUSTOMER_ID},
            "device_limit": {"type": "integer", "minimum": 0, "maximum": 1_000_000},
        }
    )
    customer_path = [{"$ref": "#/components/parameters/customer_id"}]
    return {
        "/api/v1/admin/customers": {
            "get": operation(
                "all customers",
                responses(
                    {
                        200: ok(
                            object_schema(
                                {"customers": {"type": "array", "items": ref("Customer")}}
                            )
                        )
                    },
                    *READ_ERRORS,
                ),
            ),
            "post": operation(
                "add a customer",
                responses({201: ok(ref("Customer"), "created")}, 400, 401, 409, 413, 503),
                requestBody=body({**customer_body, "additionalProperties": False}),
            ),
        },
        "/api/v1/admin/customers/{customer_id}": {
            "parameters": customer_path,
            "get": operation(
                "one customer", responses({200: ok(ref("Customer"))}, 400, 401, 404, 503)
            ),
            "patch": operation(
                "change a customer's device limit",
                responses({200: ok(ref("Customer"))}, 400, 401, 404, 413, 503),
                requestBody=body(
                    {
                        **object_schema(
                            {"device_limit": customer_body["properties"]["device_limit"]}
                        ),
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
            "get": operation(
                "the fleet: filtered, paged by keyset, with the total",
                responses(
                    {
                        200: ok(
                            object_schema(
                                {
                                    "devices": {"type": "array", "items": ref("Device")},
                                    "next_cursor": {"type": ["string", "null"]},
                                    "total": {"type": "integer", "minimum": 0},
                                }
                            )
                        )
                    },
                    *READ_ERRORS,
                ),
                parameters=[
                    query("customer", {"type": "string", "pattern": CUSTOMER_ID}, "customer id"),
                    query(
                        "state",
                        {"type": "string", "enum": ["pending", "active", "revoked"]},
                        "device state",
                    ),
                    query("online", {"type": "string", "enum": ["true", "false"]}, "online"),
                    query(
                        "tag",
                        {"type": "array", "items": {"type": "string"}, "maxItems": 16},
                        "key=value; repeatable, all must match",
                        style="form",
                        explode=True,
                    ),
                    query(
                        "q",
                        {"type": "string", "minLength": 1, "maxLength": 128},
                        "a substring of the name (case-insensitive)",
                    ),
                    limit(100, 1000),
                    query("cursor", {"type": "string"}, "next_cursor of the previous page"),
                ],
            )
        },
        device: {
            "parameters": DEVICE_PARAMETERS,
            "get": operation("one device", responses({200: ok(ref("Device"))}, *device_errors)),
        },
        f"{device}/revoke": {
            "parameters": DEVICE_PARAMETERS,
            "post": operation(
                "revoke: its credentials stop working, it may never register again",
                responses({200: ok(ref("Device"))}, *action_errors),
            ),
        },
        f"{device}/reset": {
            "parameters": DEVICE_PARAMETERS,
            "post": operation(
                "forget the device so that its id may register again; answers it as it was",
                responses({200: ok(ref("Device"))}, *action_errors),
            ),
        },
        f"{device}/tags": {
            "parameters": DEVICE_PARAMETERS,
            "patch": operation(
                "set (a string) or remove (null) tags",
                responses({200: ok(object_schema({"tags": ref("Tags")}))}, *action_errors),
                requestBody=body(
                    object_schema(
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
            "get": operation(
                "telemetry history, oldest first",
                responses(
                    {
                        200: ok(
                            object_schema({"samples": {"type": "array", "items": ref("Sample")}})
                        )
                    },
                    *device_errors,
                ),
                parameters=[
                    query("since", {"type": "number", "minimum": 0}, "epoch seconds, inclusive"),
                    query("until", {"type": "number", "minimum": 0}, "epoch seconds, exclusive"),
                    limit(1000, 10000),
                ],
            ),
        },
        f"{device}/events": {
            "parameters": DEVICE_PARAMETERS,
            "get": operation(
                "the device's events, newest first",
                responses(
                    {200: ok(object_schema({"events": {"type": "array", "items": ref("Event")}}))},
                    *device_errors,
                ),
                parameters=[limit(100, 1000), BEFORE_EVENT],
            ),
        },
    }


def _log_ops() -> dict[str, Any]:
    return {
        "/api/v1/admin/audit": {
            "get": operation(
                "the audit log, newest first",
                responses(
                    {
                        200: ok(
                            object_schema(
                                {"entries": {"type": "array", "items": ref("AuditEntry")}}
                            )
                        )
                    },
                    *READ_ERRORS,
                ),
                parameters=[
                    query(
                        "subject",
                        {"type": "string", "minLength": 1, "maxLength": 256},
                        "a customer id or device name",
                    ),
                    limit(100, 1000),
                    query(
                        "before",
                        {"type": "integer", "minimum": 1, "maximum": 2**62},
                        "an entry id: the entries older than it (the last id of the previous page)",
                    ),
                ],
            )
        },
        "/api/v1/admin/events": {
            "get": operation(
                "device events of the fleet or one customer, newest first",
                responses(
                    {200: ok(object_schema({"events": {"type": "array", "items": ref("Event")}}))},
                    *READ_ERRORS,
                ),
                parameters=[
                    query("customer", {"type": "string", "pattern": CUSTOMER_ID}, "customer id"),
                    limit(100, 1000),
                    BEFORE_EVENT,
                ],
            )
        },
    }


def _command_ops() -> dict[str, Any]:
    device_name = {"type": "string", "description": "customer_id/device_id"}
    send = {
        "type": "object",
        "properties": {
            "action": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"},
            "args": {"type": "object"},
            "expires_in_s": {"type": "number", "minimum": 1, "maximum": 7 * 86400},
            "device": device_name,
            "devices": {"type": "array", "items": device_name, "minItems": 1},
            "customer_id": {"type": "string", "pattern": CUSTOMER_ID},
            "tags": {"type": "object", "additionalProperties": {"type": "string"}},
        },
        "required": ["action"],
        "additionalProperties": False,
        "description": "exactly one of device, devices, customer_id (tags only with it)",
    }
    return {
        "/api/v1/admin/commands": {
            "post": operation(
                "send a command to one device, a list, or a customer's (tagged) devices",
                responses(
                    {
                        201: ok(
                            object_schema(
                                {
                                    "batch_id": {"type": "string"},
                                    "commands": {"type": "array", "items": ref("Command")},
                                }
                            ),
                            "queued",
                        )
                    },
                    400,
                    401,
                    404,
                    413,
                    503,
                ),
                requestBody=body(send),
            ),
            "get": operation(
                "commands, newest first",
                responses(
                    {
                        200: ok(
                            object_schema(
                                {
                                    "commands": {"type": "array", "items": ref("Command")},
                                    "next_cursor": {"type": ["string", "null"]},
                                }
                            )
                        )
                    },
                    *READ_ERRORS,
                ),
                parameters=[
                    query("device", device_name, "only this device's"),
                    query(
                        "state",
                        {"type": "string", "enum": ["queued", "sent", "done", "failed", "expired"]},
                        "command state",
                    ),
                    query("batch", {"type": "string", "pattern": "^b-[0-9a-f]{16}$"}, "batch id"),
                    limit(100, 1000),
                    query("cursor", {"type": "string"}, "next_cursor of the previous page"),
                ],
            ),
        },
        "/api/v1/admin/commands/{command_id}": {
            "parameters": [
                {
                    "name": "command_id",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "pattern": "^c-[0-9a-f]{16}$"},
                }
            ],
            "get": operation(
                "one command; with wait, once it is final (or when the time is up)",
                responses({200: ok(ref("Command"))}, 400, 401, 404, 503),
                parameters=[
                    query(
                        "wait",
                        {"type": "number", "minimum": 0, "maximum": 60},
                        "seconds to wait for a final state",
                    )
                ],
            ),
        },
    }


def _release_ops() -> dict[str, Any]:
    artifact = {"type": "string", "format": "binary"}
    return {
        "/api/v1/releases/{app}/{version}": {
            "parameters": RELEASE_PARAMETERS,
            "get": {
                "summary": "download a release's artifact offered to this device (Range: resume)",
                "security": [{"deviceBasic": []}],
                "parameters": [
                    {
                        "name": "Range",
                        "in": "header",
                        "schema": {"type": "string", "pattern": "^bytes=[0-9]+-[0-9]*$"},
                        "description": "bytes=N- (the rest from byte N) or bytes=N-M",
                    }
                ],
                "responses": responses(
                    {
                        200: {
                            "description": "the artifact (.tar.gz); ETag: the quoted sha256",
                            "content": {"application/gzip": {"schema": artifact}},
                        },
                        206: {
                            "description": "the bytes of the Range asked for",
                            "content": {"application/gzip": {"schema": artifact}},
                        },
                    },
                    400,
                    401,
                    403,
                    404,
                    416,
                    429,
                    503,
                ),
            },
        },
        "/api/v1/admin/releases": {
            "get": operation(
                "all releases, by app, oldest first",
                responses(
                    {
                        200: ok(
                            object_schema({"releases": {"type": "array", "items": ref("Release")}})
                        )
                    },
                    *READ_ERRORS,
                ),
                parameters=[
                    query("app", {"type": "string", "pattern": APP_NAME}, "only this app's")
                ],
            ),
            "post": operation(
                "add a release: the .tar.gz as the raw body, app and version in the query; or"
                " multipart/form-data with the fields app and version, then the part file"
                " (signed if a signing key is set)",
                responses({201: ok(ref("Release"), "stored")}, 400, 401, 409, 413, 503),
                parameters=[
                    query("app", {"type": "string", "pattern": APP_NAME}, "the app"),
                    query("version", {"type": "string", "pattern": VERSION}, "its version"),
                ],
                requestBody={
                    "required": True,
                    "content": {
                        "application/octet-stream": {"schema": artifact},
                        "multipart/form-data": {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "app": {"type": "string", "pattern": APP_NAME},
                                    "version": {"type": "string", "pattern": VERSION},
                                    "file": artifact,
                                },
                                "required": ["file"],
                            }
                        },
                    },
                },
            ),
        },
        "/api/v1/admin/releases/{app}/{version}": {
            "parameters": RELEASE_PARAMETERS,
            "delete": operation(
                "remove a release, its artifact and its offers; answers it as it was",
                responses({200: ok(ref("Release"))}, 400, 401, 404, 503),
            ),
        },
    }


def _console_ops() -> dict[str, Any]:
    session = ok(
        object_schema({"csrf_token": {"type": "string"}, "expires_at": {"type": "string"}}),
        "logged in (the answer to login also sets the cookie iotbiz_session)",
    )
    any_file = {"description": "the file", "content": {"*/*": {"schema": {}}}}
    return {
        "/": {
            "get": {
                "summary": "the web console's page",
                **PUBLIC,
                "responses": responses(
                    {200: {"description": "HTML", "content": {"text/html": {"schema": {}}}}}, 404
                ),
            }
        },
        "/console/{file}": {
            "get": {
                "summary": "a file of the web console (scripts, styles, icons)",
                **PUBLIC,
                "parameters": [
                    {"name": "file", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": responses({200: any_file}, 404),
            }
        },
        "/api/v1/console/login": {
            "post": {
                "summary": "log in to the web console with the admin token",
                **PUBLIC,
                "requestBody": body(object_schema({"token": {"type": "string", "minLength": 1}})),
                "responses": responses({200: session}, 400, 401, 408, 413, 429),
            }
        },
        "/api/v1/console/session": {
            "get": {
                "summary": "the console session of the cookie, with its CSRF token",
                "security": [{"consoleSession": []}],
                "responses": responses({200: session}, 401),
            }
        },
        "/api/v1/console/logout": {
            "post": {
                "summary": "end the console session (needs its X-CSRF-Token)",
                "security": [{"consoleSession": []}],
                "responses": responses(
                    {200: ok(object_schema({"ok": {"type": "boolean"}}))}, 401, 403
                ),
            }
        },
        "/api/v1/admin/stream": {
            "get": operation(
                "server-sent events of the fleet's changes, coalesced (docs/console.md)",
                {
                    "200": {
                        "description": "an endless text/event-stream",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    **responses({}, *READ_ERRORS),
                },
            )
        },
    }


def _with_common_refusals(paths: dict[str, Any]) -> dict[str, Any]:
    """Every operation that takes a body answers 408 when it does not arrive in time and 413
    when it is too large; every admin operation that changes something answers 403 to a
    console session without its CSRF token."""
    for path, item in paths.items():
        for method, operation_ in item.items():
            if method not in {"get", "post", "patch", "put", "delete"}:
                continue
            extra = [408, 413] if "requestBody" in operation_ else []
            if path.startswith("/api/v1/admin/") and method != "get":
                extra.append(403)
            missing = [status for status in extra if str(status) not in operation_["responses"]]
            if missing:
                operation_["responses"] = {**operation_["responses"], **responses({}, *missing)}
    return paths


def document() -> dict[str, Any]:
    """The whole document (a new dict each call: callers may change it)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "IoTBiz registrar and admin API",
            "version": __version__,
            "description": "See docs/admin-api.md and docs/device-api.md.",
        },
        "paths": _with_common_refusals(
            {
                **copy.deepcopy(PATHS),
                **_customer_ops(),
                **_device_ops(),
                **_command_ops(),
                **_release_ops(),
                **rollout_ops(),
                **_log_ops(),
                **_console_ops(),
            }
        ),
        "components": {
            "schemas": SCHEMAS,
            "parameters": PARAMETERS,
            "responses": {
                f"Error{status}": ok(ref("Error"), description)
                for status, description in ERRORS.items()
            },
            "securitySchemes": {
                "adminToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "setting admin.token, or the file admin.token beside the store",
                },
                "deviceBasic": {
                    "type": "http",
                    "scheme": "basic",
                    "description": "a device's MQTT username (customer/device) and password",
                },
                "consoleSession": {
                    "type": "apiKey",
                    "in": "cookie",
                    "name": "iotbiz_session",
                    "description": "POST /api/v1/console/login; changes need X-CSRF-Token",
                },
            },
        },
    }


async def serve(request: web.Request) -> web.Response:
    return web.json_response(document())
