"""The OpenAPI entries of the admin API's staged rollouts (iotbiz.registrar.admin_rollouts)."""

from __future__ import annotations

from typing import Any

from iotbiz.registrar.openapi_schema import (
    APP_NAME,
    CUSTOMER_ID,
    DEVICE_ID,
    READ_ERRORS,
    VERSION,
    body,
    limit,
    object_schema,
    ok,
    operation,
    query,
    responses,
)

RESULTS = ["waiting", "updating", "committed", "failed", "skipped"]
TIME = {"type": "number", "description": "seconds since the epoch"}
ROLLOUT = object_schema(
    {
        "id": {"type": "string", "pattern": "^r-[0-9a-f]{16}$"},
        "app": {"type": "string"},
        "version": {"type": "string"},
        "state": {"type": "string", "enum": ["running", "completed", "stopped", "aborted"]},
        "reason": {"type": ["string", "null"], "description": "why it stopped"},
        "batch_size": {"type": "integer", "minimum": 1},
        "max_failures": {"type": "integer", "minimum": 0},
        "timeout_s": {"type": "number"},
        "force": {"type": "boolean"},
        "created_at": TIME,
        "finished_at": {"type": ["number", "null"]},
        "actor": {"type": "string"},
        "total": {"type": "integer", "minimum": 1},
        **{result: {"type": "integer", "minimum": 0} for result in RESULTS},
        "batch": {"type": "integer", "minimum": 0, "description": "the current batch, from 0"},
        "batches": {"type": "integer", "minimum": 1},
    }
)
ROLLOUT_DEVICE = object_schema(
    {
        "name": {"type": "string", "description": "customer_id/device_id"},
        "batch": {"type": "integer", "minimum": 0},
        "result": {"type": "string", "enum": RESULTS},
        "reason": {"type": ["string", "null"]},
        "command_id": {"type": ["string", "null"]},
    }
)
ROLLOUT_WITH_DEVICES = {
    **ROLLOUT,
    "properties": {
        **ROLLOUT["properties"],
        "devices": {"type": "array", "items": ROLLOUT_DEVICE},
    },
    "required": [*ROLLOUT["required"], "devices"],
}
ROLLOUT_ID = [
    {
        "name": "rollout_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": "^r-[0-9a-f]{16}$"},
    }
]


def rollout_ops() -> dict[str, Any]:
    device_name = {"type": "string", "pattern": f"^{CUSTOMER_ID[1:-1]}/{DEVICE_ID[1:-1]}$"}
    start = {
        "type": "object",
        "properties": {
            "app": {"type": "string", "pattern": APP_NAME},
            "version": {"type": "string", "pattern": VERSION},
            "devices": {"type": "array", "items": device_name, "minItems": 1},
            "customer_id": {"type": "string", "pattern": CUSTOMER_ID},
            "tags": {"type": "object", "additionalProperties": {"type": "string"}},
            "batch_size": {"type": "integer", "minimum": 1, "maximum": 10000},
            "max_failures": {"type": "integer", "minimum": 0},
            "force": {"type": "boolean"},
            "timeout_s": {"type": "number", "minimum": 1, "maximum": 7 * 86400},
        },
        "required": ["app", "version"],
        "additionalProperties": False,
        "description": "exactly one of devices, customer_id (tags only with it)",
    }
    return {
        "/api/v1/admin/rollouts": {
            "post": operation(
                "start a staged rollout of a release to a list, or a customer's (tagged) devices",
                responses({201: ok(ROLLOUT, "running")}, 400, 401, 404, 413, 503),
                requestBody=body(start),
            ),
            "get": operation(
                "rollouts, newest first",
                responses(
                    {
                        200: ok(
                            object_schema(
                                {
                                    "rollouts": {"type": "array", "items": ROLLOUT},
                                    "next_cursor": {"type": ["string", "null"]},
                                }
                            )
                        )
                    },
                    *READ_ERRORS,
                ),
                parameters=[
                    limit(100, 1000),
                    query("cursor", {"type": "string"}, "next_cursor of the previous page"),
                ],
            ),
        },
        "/api/v1/admin/rollouts/{rollout_id}": {
            "parameters": ROLLOUT_ID,
            "get": operation(
                "one rollout with its devices",
                responses({200: ok(ROLLOUT_WITH_DEVICES)}, 400, 401, 404, 503),
            ),
        },
        "/api/v1/admin/rollouts/{rollout_id}/abort": {
            "parameters": ROLLOUT_ID,
            "post": operation(
                "abort a running rollout (409 when it has ended)",
                responses({200: ok(ROLLOUT, "aborted")}, 400, 401, 404, 409, 503),
            ),
        },
    }
