"""Web console sessions: log in with the admin token, then a cookie instead of the bearer header.

`POST /api/v1/console/login {"token"}` answers `{"csrf_token", "expires_at"}` and sets the cookie
`iotbiz_session` (HttpOnly, SameSite=Strict, Path=/, Secure over HTTPS) that lasts
`console.session_ttl_s`. With the cookie, the whole admin API answers as it does to the bearer
token; a request that changes something (any method but GET, HEAD and OPTIONS) must also carry the
header `X-CSRF-Token` with the session's CSRF token, which only a page of the console's own origin
can read (from the login answer or `GET /api/v1/console/session`). SameSite=Strict already keeps
the cookie off cross-site requests; the header is the second lock (an older browser, a sibling
subdomain).

The cookie is `<expires>.<nonce>.<mac>`: the MAC (HMAC-SHA256) is keyed by the admin token, so the
platform keeps no session table, sessions survive a restart, every platform process sharing the
token accepts them, and changing the admin token ends them all. `logout` remembers the session's
nonce until it would have expired (a bounded table, in this process), so a logged-out cookie is
refused even if someone kept a copy. The CSRF token is the HMAC of the nonce under its own key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from iotbiz.errors import BadRequest, Forbidden, HTTPError, TooManyRequests
from iotbiz.registrar.http_server import read_body
from iotbiz.registrar.ratelimit import RateLimiter

COOKIE = "iotbiz_session"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
WRONG_CSRF = "missing or wrong CSRF token"
LOGIN_RATE_PER_S = 10 / 60  # ten tries a minute per client address, after a burst of ten
LOGIN_BURST = 10
MAX_ENDED = 10_000  # logged-out sessions remembered until they expire; the soonest to expire go
MAX_LOGIN_BODY = 1024


@dataclass(frozen=True, slots=True)
class ConsoleSession:
    nonce: str
    expires_at: float
    csrf_token: str


class ConsoleSessions:
    """Opens and checks console sessions for the token set with `set_token`."""

    def __init__(self, ttl_s: float, *, clock: Callable[[], float] = time.time) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._session_key = b""
        self._csrf_key = b""
        self._ended: dict[str, float] = {}
        self.login_limiter = RateLimiter(LOGIN_RATE_PER_S, LOGIN_BURST)

    def set_token(self, token: str) -> None:
        root = token.encode("utf-8")
        self._session_key = hmac.digest(root, b"iotbiz console session v1", hashlib.sha256)
        self._csrf_key = hmac.digest(root, b"iotbiz console csrf v1", hashlib.sha256)

    def open(self) -> tuple[str, ConsoleSession]:
        """A new session and its cookie value."""
        if not self._session_key:
            raise RuntimeError("set_token() first")
        expires_at = int(self._clock() + self.ttl_s)
        nonce = secrets.token_urlsafe(18)
        body = f"{expires_at}.{nonce}"
        return f"{body}.{self._mac(body)}", self._session(nonce, expires_at)

    def check(self, cookie: str | None) -> ConsoleSession | None:
        """The session of a cookie value, or None if it is malformed, forged, expired or ended."""
        if not cookie or not self._session_key or len(cookie) > 200:
            return None
        body, _, mac = cookie.rpartition(".")
        expires, _, nonce = body.partition(".")
        if not expires.isdigit() or not nonce:
            return None
        if not hmac.compare_digest(mac.encode("ascii", "replace"), self._mac(body).encode()):
            return None
        expires_at = int(expires)
        if expires_at <= self._clock() or nonce in self._ended:
            return None
        return self._session(nonce, expires_at)

    def end(self, session: ConsoleSession) -> None:
        now = self._clock()
        for nonce, expires_at in list(self._ended.items()):
            if expires_at <= now:
                del self._ended[nonce]
        self._ended[session.nonce] = session.expires_at
        if len(self._ended) > MAX_ENDED:
            soonest = sorted(self._ended, key=self._ended.__getitem__)
            for nonce in soonest[: len(self._ended) - MAX_ENDED]:
                del self._ended[nonce]

    def check_csrf(self, session: ConsoleSession, given: str | None) -> None:
        if given is None or not hmac.compare_digest(
            given.encode("utf-8", "replace"), session.csrf_token.encode()
        ):
            raise Forbidden(WRONG_CSRF)

    def _session(self, nonce: str, expires_at: int) -> ConsoleSession:
        csrf = _b64(hmac.digest(self._csrf_key, nonce.encode(), hashlib.sha256))
        return ConsoleSession(nonce, float(expires_at), csrf)

    def _mac(self, body: str) -> str:
        return _b64(hmac.digest(self._session_key, body.encode(), hashlib.sha256))


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def session_answer(session: ConsoleSession) -> dict[str, str]:
    return {"csrf_token": session.csrf_token, "expires_at": _iso(session.expires_at)}


async def read_login_token(request: web.Request, *, timeout_s: float) -> str:
    """The `token` of a login body `{"token": "..."}`; BadRequest for anything else."""
    raw = await read_body(request, limit=MAX_LOGIN_BODY, timeout_s=timeout_s)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest("body must be a JSON object") from exc
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    unknown = sorted(set(body) - {"token"})
    if unknown:
        raise BadRequest(f"unknown field: {unknown[0]}")
    token = body.get("token")
    if not isinstance(token, str) or not token:
        raise BadRequest("token must be a non-empty string")
    return token


def limit_logins(sessions: ConsoleSessions, request: web.Request) -> None:
    wait = sessions.login_limiter.acquire(request.remote or "unknown")
    if wait:
        raise TooManyRequests(
            "too many login attempts, try again later", retry_after_s=RateLimiter.retry_after(wait)
        )


def set_cookie(response: web.Response, request: web.Request, cookie: str, max_age: int) -> None:
    response.set_cookie(
        COOKIE,
        cookie,
        max_age=max_age,
        path="/",
        httponly=True,
        samesite="Strict",
        secure=request.secure,
    )


def clear_cookie(response: web.Response, request: web.Request) -> None:
    response.del_cookie(COOKIE, path="/", httponly=True, samesite="Strict", secure=request.secure)


class NotLoggedIn(HTTPError):
    status = 401

    def __init__(self) -> None:
        super().__init__("not logged in")
