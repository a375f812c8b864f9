"""The registrar's one error shape: every error is JSON `{"error": "..."}` with its status."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from iotbiz.errors import HTTPError

log = logging.getLogger(__name__)

# Headers of aiohttp's own HTTP errors that a client needs to act on the error.
_KEPT_HEADERS = ("Allow", "Retry-After")


def json_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except HTTPError as exc:
        return json_error(exc.status, str(exc), exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: exc.headers[k] for k in _KEPT_HEADERS if k in exc.headers}
        message = _MESSAGES.get(exc.status, (exc.reason or "error").lower())
        return json_error(exc.status, message, headers)
    except Exception:
        log.exception("unexpected error in %s %s", request.method, request.path)
        return json_error(500, "internal error")


_MESSAGES = {
    404: "not found",
    405: "method not allowed",
    413: "request body too large (at most 4096 bytes)",
}
