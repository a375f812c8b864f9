"""The pieces of the OpenAPI document: schemas, shared parameters and responses, helpers."""

from __future__ import annotations

from typing import Any

JSON = "application/json"
NULLABLE_TIME = {"type": ["string", "null"], "format": "date-time"}
TIME = {"type": "string", "format": "date-time"}
CUSTOMER_ID = "^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
DEVICE_ID = "^[A-Za-z0-9][A-Za-z0-9:._-]{0,63}$"  # MACs in any notation, or a plain id
ERRORS = {
    400: "bad input (the message names the field)",
    401: "missing or wrong admin token (or console session)",
    403: "refused (a console session's change without its X-CSRF-Token)",
    404: "no such customer, device, command or release (or the release is not offered to you)",
    408: "the request's body did not arrive in time (http.body_timeout_s)",
    409: "exists already",
    413: "request body too large",
    416: "range not satisfiable (Content-Range: bytes */SIZE)",
    429: "too many requests or busy: retry after Retry-After seconds",
    503: "store (or broker) unavailable, try again later",
}


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def object_schema(
    properties: dict[str, Any], *, required: list[str] | None = None
) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
    }


def ok(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def responses(ok: dict[int, dict[str, Any]], *errors: int) -> dict[str, Any]:
    answers: dict[str, Any] = {str(status): body for status, body in ok.items()}
    for status in errors:
        answers[str(status)] = {"$ref": f"#/components/responses/Error{status}"}
    return answers


def query(name: str, schema: dict[str, Any], description: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "in": "query", "schema": schema, "description": description, **extra}


def limit(default: int, maximum: int) -> dict[str, Any]:
    schema = {"type": "integer", "minimum": 1, "maximum": maximum, "default": default}
    return query("limit", schema, "page size")


def body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {JSON: {"schema": schema}}}


# the bearer token, or a web console session (with X-CSRF-Token on changes: 403 without it)
ADMIN: dict[str, Any] = {"security": [{"adminToken": []}, {"consoleSession": []}]}
PUBLIC: dict[str, Any] = {"security": []}
READ_ERRORS = (400, 401, 503)
DEVICE_PARAMETERS = [
    {"$ref": "#/components/parameters/customer_id"},
    {"$ref": "#/components/parameters/device_id"},
]
BEFORE_EVENT = query(
    "before",
    {"type": "integer", "minimum": 1, "maximum": 2**62},
    "an event id: the events older than it (the last id of the previous page)",
)


def operation(summary: str, responses: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"summary": summary, **ADMIN, **extra, "responses": responses}


SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "properties": {"error": {"type": "string"}},
        "required": ["error"],
        "additionalProperties": False,
    },
    "Customer": object_schema(
        {
            "customer_id": {"type": "string"},
            "device_limit": {"type": "integer", "minimum": 0},
            "active_devices": {"type": "integer", "minimum": 0},
            "pending_devices": {"type": "integer", "minimum": 0},
            "created_at": TIME,
        }
    ),
    "Device": object_schema(
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
    "AuditEntry": object_schema(
        {
            "id": {"type": "integer"},
            "at": TIME,
            "actor": {"type": "string"},
            "action": {"type": "string"},
            "subject": {"type": "string"},
            "detail": {"type": "object"},
        }
    ),
    "Event": object_schema(
        {
            "id": {"type": "integer"},
            "device": {"type": "string"},
            "at": {**TIME, "description": "when the platform received it"},
            "body": {"type": "object", "description": "as the device sent it"},
        }
    ),
    "Command": object_schema(
        {
            "id": {"type": "string"},
            "device": {"type": "string", "description": "customer_id/device_id"},
            "action": {"type": "string"},
            "args": {"type": "object"},
            "state": {"type": "string", "enum": ["queued", "sent", "done", "failed", "expired"]},
            "created_at": TIME,
            "sent_at": NULLABLE_TIME,
            "done_at": NULLABLE_TIME,
            "expires_at": TIME,
            "result": {"description": "the device's answer (any JSON), null until done"},
            "error": {"type": ["string", "null"]},
            "actor": {"type": "string"},
            "batch_id": {"type": "string"},
        }
    ),
    "Release": object_schema(
        {
            "app": {"type": "string"},
            "version": {"type": "string"},
            "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
            "size": {"type": "integer", "minimum": 0},
            "signature": {
                "type": ["string", "null"],
                "description": "base64 Ed25519 signature of the raw sha256 digest",
            },
            "url": {"type": "string", "description": "where devices download it"},
            "created_at": TIME,
            "actor": {"type": "string"},
        }
    ),
    "Sample": object_schema(
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

APP_NAME = "^[A-Za-z0-9_.-]{1,64}$"
VERSION = "^[A-Za-z0-9_.+-]{1,64}$"
RELEASE_PARAMETERS = [
    {
        "name": "app",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": APP_NAME},
    },
    {
        "name": "version",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": VERSION},
    },
]
