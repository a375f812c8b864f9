"""Checking what the admin API is given: bodies, query parameters, ids in paths, cursors.

Every check raises an HTTP error with a message that names the field (400, 413); nothing the
client sends can reach the store unchecked, nor become a 500.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Collection
from typing import Any

from aiohttp import web

from iotbiz.errors import BadRequest
from iotbiz.names import DeviceName, is_customer_id, normalize_device_id, parse_device_name
from iotbiz.registrar.http_server import read_body
from iotbiz.registrar.keys import SETTINGS

MAX_BODY_BYTES = 64 * 1024  # admin request bodies (the device API keeps its 4 KiB)
MAX_QUERY_TEXT = 256
TAG_KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}", re.ASCII)
MAX_TAG_VALUE = 256
CUSTOMER_ID_RULE = "1 to 64 of A-Z a-z 0-9 _ - (first alphanumeric)"
DEVICE_ID_RULE = "a MAC address, or 1 to 64 of A-Z a-z 0-9 : _ - (first alphanumeric)"


async def read_object(request: web.Request, *, limit: int = MAX_BODY_BYTES) -> dict[str, Any]:
    """The request's body as a JSON object, read up to `limit` bytes (413 beyond) within
    `http.body_timeout_s` (408)."""
    timeout_s = request.app[SETTINGS].http.body_timeout_s
    raw = await read_body(request, limit=limit, timeout_s=timeout_s)
    try:
        body = json.loads(raw, parse_constant=_refuse_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise BadRequest("body must be a JSON object") from exc
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    return body


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")  # NaN, Infinity


def only_keys(body: dict[str, Any], allowed: Collection[str]) -> None:
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r} (known: {', '.join(sorted(allowed))})")


def whole_number(value: Any, field: str, *, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequest(f"{field} must be a whole number from {low} to {high}")
    return value


def number(value: Any, field: str, *, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"{field} must be a number from {low:g} to {high:g}")
    result = float(value)
    if not math.isfinite(result) or not low <= result <= high:
        raise BadRequest(f"{field} must be a number from {low:g} to {high:g}")
    return result


def customer_id(value: Any, field: str = "customer_id") -> str:
    if not isinstance(value, str) or not is_customer_id(value):
        raise BadRequest(f"{field} is not valid: {CUSTOMER_ID_RULE}")
    return value


def device_name(value: Any, field: str = "device") -> DeviceName:
    """`customer_id/device_id` (the device id in any accepted notation)."""
    name = parse_device_name(value) if isinstance(value, str) else None
    if name is None:
        raise BadRequest(f"{field} must be customer_id/device_id ({DEVICE_ID_RULE})")
    return name


def path_device(request: web.Request) -> DeviceName:
    customer = customer_id(request.match_info["customer_id"])
    device_id = normalize_device_id(request.match_info["device_id"])
    if device_id is None:
        raise BadRequest(f"device_id is not valid: {DEVICE_ID_RULE}")
    return DeviceName(customer, device_id)


def tag_changes(value: Any, field: str = "tags") -> dict[str, str | None]:
    """{key: value or null}: keys 1 to 64 of A-Z a-z 0-9 _ . -, values up to 256 characters."""
    if not isinstance(value, dict):
        raise BadRequest(f"{field} must be an object of tag: value")
    for key, tag_value in value.items():
        tag_key(key)
        if tag_value is not None and (
            not isinstance(tag_value, str) or len(tag_value) > MAX_TAG_VALUE
        ):
            raise BadRequest(f"tag {key}: the value must be a string of at most 256 characters")
    return value


def tag_key(key: Any) -> str:
    if not isinstance(key, str) or not TAG_KEY.fullmatch(key):
        raise BadRequest(f"tag key {key!r} is not valid: 1 to 64 of A-Z a-z 0-9 _ . -")
    return key


# -- cursors ---------------------------------------------------------------------------------


def encode_cursor(kind: str, value: str) -> str:
    """An opaque page cursor (base64url of `kind:value`)."""
    return base64.urlsafe_b64encode(f"{kind}:{value}".encode()).decode("ascii").rstrip("=")


def decode_cursor(text: str, kind: str) -> str:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise BadRequest("cursor is not valid (use next_cursor as it is)") from exc
    found, sep, value = raw.partition(":")
    if found != kind or not sep or not value:
        raise BadRequest("cursor is not valid (use next_cursor as it is)")
    return value


# -- query parameters ------------------------------------------------------------------------


class Query:
    """The query parameters of a request, checked: unknown or repeated ones are refused."""

    def __init__(
        self, request: web.Request, known: Collection[str], *, repeatable: Collection[str] = ()
    ) -> None:
        self._query = request.query
        for key in self._query:
            if key not in known:
                raise BadRequest(f"unknown query parameter {key!r} (known: {', '.join(known)})")
            if key not in repeatable and len(self._query.getall(key)) > 1:
                raise BadRequest(f"query parameter {key!r} given more than once")

    def text(self, key: str, *, max_length: int = MAX_QUERY_TEXT) -> str | None:
        value = self._query.get(key)
        if value is not None and not 0 < len(value) <= max_length:
            raise BadRequest(f"{key} must be 1 to {max_length} characters")
        return value

    def all(self, key: str) -> list[str]:
        return list(self._query.getall(key, []))

    def integer(self, key: str, *, default: int | None, low: int, high: int) -> int | None:
        value = self._query.get(key)
        if value is None:
            return default
        if not re.fullmatch(r"-?[0-9]{1,18}", value, re.ASCII):
            raise BadRequest(f"{key} must be a whole number from {low} to {high}")
        return whole_number(int(value), key, low=low, high=high)

    def limit(self, *, default: int, high: int) -> int:
        value = self.integer("limit", default=default, low=1, high=high)
        assert value is not None  # noqa: S101 - it has a default
        return value

    def number(self, key: str, *, low: float, high: float) -> float | None:
        value = self._query.get(key)
        if value is None:
            return None
        try:
            parsed = float(value)
        except ValueError as exc:
            raise BadRequest(f"{key} must be a number from {low:g} to {high:g}") from exc
        return number(parsed, key, low=low, high=high)

    def boolean(self, key: str) -> bool | None:
        value = self._query.get(key)
        if value is None:
            return None
        if value not in ("true", "false"):
            raise BadRequest(f"{key} must be true or false")
        return value == "true"

    def choice(self, key: str, choices: Collection[str]) -> str | None:
        value = self._query.get(key)
        if value is not None and value not in choices:
            raise BadRequest(f"{key} must be one of {', '.join(choices)}")
        return value
