"""The middleware that asks for the admin token (where the token comes from:
`iotbiz.admin_token`, re-exported here).

Requests under `/api/v1/admin/` (and `/metrics`, unless `admin.public_metrics`) need
`Authorization: Bearer <token>`, compared in constant time, or a web console session cookie
(`iotbiz.registrar.console_auth`: with the CSRF header on changes); without either: 401
`{"error": "missing or wrong admin token"}` with `WWW-Authenticate: Bearer`.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from iotbiz.admin_token import (
    TOKEN_FILE,
    load_or_create_admin_token,
    read_admin_token,
    token_path,
)
from iotbiz.errors import HTTPError
from iotbiz.registrar.console_auth import COOKIE, CSRF_HEADER, SAFE_METHODS, ConsoleSessions

log = logging.getLogger(__name__)

__all__ = [
    "TOKEN_FILE",
    "AdminAuth",
    "auth_middleware",
    "load_or_create_admin_token",
    "read_admin_token",
    "token_path",
]

# True on a request authenticated by a console session (its actor in the audit log: console:...)
VIA_CONSOLE = web.RequestKey("via_console", bool)

ADMIN_PREFIX = "/api/v1/admin/"
METRICS_PATH = "/metrics"
WRONG_TOKEN = "missing or wrong admin token"  # noqa: S105 - a message


class Unauthorized(HTTPError):
    status = 401

    def __init__(self) -> None:
        super().__init__(WRONG_TOKEN, headers={"WWW-Authenticate": "Bearer"})


@dataclass(slots=True)
class AdminAuth:
    """The token the running app checks (set at start-up), the console sessions it opens, and
    whether /metrics is public."""

    public_metrics: bool
    sessions: ConsoleSessions
    token: bytes | None = None
    # told of every refused request (the audit log's refusals: `iotbiz.registrar.refusals`)
    on_refused: Callable[[web.Request, str], None] | None = None

    def refused(self, request: web.Request, reason: str) -> None:
        if self.on_refused is not None:
            self.on_refused(request, reason)

    def set_token(self, token: str) -> None:
        self.token = token.encode("ascii")
        self.sessions.set_token(token)

    def protects(self, path: str) -> bool:
        if path.startswith(ADMIN_PREFIX) or path == ADMIN_PREFIX.rstrip("/"):
            return True
        return path == METRICS_PATH and not self.public_metrics

    def check(self, header: str | None) -> None:
        """Raise Unauthorized unless `header` is `Bearer <the token>`."""
        expected = self.token
        if expected is None or header is None:
            raise Unauthorized
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer":
            raise Unauthorized
        # compare_digest takes time independent of where the bytes differ
        if not hmac.compare_digest(given.strip().encode("utf-8", "replace"), expected):
            raise Unauthorized


def _authenticate(auth: AdminAuth, request: web.Request) -> None:
    header = request.headers.get("Authorization")
    if header is None and COOKIE in request.cookies:
        session = auth.sessions.check(request.cookies[COOKIE])
        if session is None:
            raise Unauthorized
        if request.method not in SAFE_METHODS:
            auth.sessions.check_csrf(session, request.headers.get(CSRF_HEADER))
        request[VIA_CONSOLE] = True
    else:
        auth.check(header)


def auth_middleware(auth: AdminAuth) -> Middleware:
    """Asks for the admin token on the admin API (and /metrics unless it is public); the
    device API and /healthz stay open. Runs inside `error_middleware`."""

    @web.middleware
    async def admin_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        route = "" if resource is None else resource.canonical
        # by the path asked for (a wrong admin path is a 401 too, not a 404 that tells routes
        # apart) and by the route it matched
        if auth.protects(request.path) or auth.protects(route):
            try:
                _authenticate(auth, request)
            except Unauthorized:
                auth.refused(request, "missing or wrong admin token or session")
                raise
            except HTTPError as exc:  # a console session's change without its CSRF token
                auth.refused(request, str(exc))
                raise
        return await handler(request)

    return admin_token
