"""The registrar's one error shape: every error is JSON `{"error": "..."}` with its status.

A StoreError that reaches a handler (a full disk, a locked or closed store) is a 503 with a
fixed message (the store's path stays private), logged as one warning line, at most one every
`STORE_WARNING_INTERVAL_S`: an enrollment storm against a dead store must not flood the log.
"""

from __future__ import annotations

import logging
import time

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from iotbiz.errors import ConflictError, HTTPError, NotFoundError, StoreError

log = logging.getLogger(__name__)

STORE_DOWN = "store unavailable, try again later"
STORE_WARNING_INTERVAL_S = 10.0

# Headers of aiohttp's own HTTP errors that a client needs to act on the error.
_KEPT_HEADERS = ("Allow", "Retry-After")


def json_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def error_middleware() -> Middleware:
    """The middleware of one application (with its own store-warning throttle)."""
    store_warning = _StoreWarning(STORE_WARNING_INTERVAL_S)

    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except HTTPError as exc:
            response = json_error(exc.status, str(exc), exc.headers)
            if exc.close_connection:
                response.force_close()
            return response
        except NotFoundError as exc:
            return json_error(404, str(exc))
        except ConflictError as exc:
            return json_error(409, str(exc))
        except StoreError as exc:
            store_warning.note(request, exc)
            return json_error(503, STORE_DOWN)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            headers = {k: exc.headers[k] for k in _KEPT_HEADERS if k in exc.headers}
            message = _MESSAGES.get(exc.status, (exc.reason or "error").lower())
            return json_error(exc.status, message, headers)
        except Exception:
            log.exception("unexpected error in %s %s", request.method, request.path)
            return json_error(500, "internal error")

    return errors


_MESSAGES = {
    404: "not found",
    405: "method not allowed",
    413: "request body too large (at most 4096 bytes)",
}


class _StoreWarning:
    """Logs a store failure at most once per interval, with how many went unlogged."""

    def __init__(self, interval_s: float) -> None:
        self._interval_s = interval_s
        self._next_at = 0.0
        self._unlogged = 0

    def note(self, request: web.Request, exc: StoreError) -> None:
        now = time.monotonic()
        if now < self._next_at:
            self._unlogged += 1
            return
        unlogged, self._unlogged = self._unlogged, 0
        self._next_at = now + self._interval_s
        log.warning(
            "%s %s: answered 503: %s (%d more store failures since the last warning)",
            request.method,
            request.path,
            exc,
            unlogged,
        )
