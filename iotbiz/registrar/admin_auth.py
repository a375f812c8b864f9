"""The admin token: where it comes from, and the middleware that asks for it.

The token is the setting `admin.token` (TOML `[admin] token`, environment `IOTBIZ_ADMIN_TOKEN`);
when that is empty, the file `admin.token` beside the store file: generated at the first start
(`secrets.token_urlsafe(32)`, mode 0600, created exclusively so that two processes starting at
once agree on one token) and read, never replaced, afterwards. The CLI finds the token of a
platform with `read_admin_token(settings)`, the same rule without creating anything.

Requests under `/api/v1/admin/` (and `/metrics`, unless `admin.public_metrics`) need
`Authorization: Bearer <token>`, compared in constant time; without it: 401
`{"error": "missing or wrong admin token"}` with `WWW-Authenticate: Bearer`.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import stat
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from iotbiz.errors import ConfigError, HTTPError
from iotbiz.settings import Settings

log = logging.getLogger(__name__)

TOKEN_FILE = "admin.token"  # noqa: S105 - a file name
ADMIN_PREFIX = "/api/v1/admin/"
METRICS_PATH = "/metrics"
WRONG_TOKEN = "missing or wrong admin token"  # noqa: S105 - a message
MAX_TOKEN_LENGTH = 512
# A bearer token as RFC 6750 draws it (b64token): what can be sent in the header as it is.
_TOKEN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/=")


class Unauthorized(HTTPError):
    status = 401

    def __init__(self) -> None:
        super().__init__(WRONG_TOKEN, headers={"WWW-Authenticate": "Bearer"})


def token_path(settings: Settings) -> Path:
    """The generated token's file: `admin.token` in the store file's folder."""
    return settings.store.path.parent / TOKEN_FILE


def read_admin_token(settings: Settings) -> str | None:
    """The admin token of the platform these settings describe: the setting, else the token
    file's content; None when neither exists (the platform never started). Raises ConfigError
    for an unusable token."""
    if settings.admin.token:
        return _checked(settings.admin.token, "admin.token")
    path = token_path(settings)
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the admin token from {path}: {exc}") from exc
    _warn_if_readable_by_others(path)
    return _checked(text.strip(), str(path))


def load_or_create_admin_token(settings: Settings) -> str:
    """The admin token (see `read_admin_token`), generating the token file when there is none.
    Blocking file I/O: call it from a thread in async code."""
    existing = read_admin_token(settings)
    if existing is not None:
        return existing
    path = token_path(settings)
    token = secrets.token_urlsafe(32)
    if _create_exclusively(path, token):
        log.info("admin token generated in %s", path)
        return token
    found = read_admin_token(settings)  # another process created it first: use its token
    if found is None:
        raise ConfigError(f"admin token file {path} vanished while it was created")
    return found


def _create_exclusively(path: Path, token: str) -> bool:
    """Write `token` to `path` unless the file exists (then False). The file appears whole or not
    at all: written to a temporary file (O_EXCL, 0600), then hard-linked to its name, which
    fails if the name exists."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(descriptor, f"{token}\n".encode("ascii"))
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        try:
            os.link(temporary, path)
        except FileExistsError:
            return False
        return True
    except OSError as exc:
        raise ConfigError(f"cannot write the admin token file {path}: {exc}") from exc
    finally:
        with suppress(FileNotFoundError):
            temporary.unlink()


def _checked(token: str, source: str) -> str:
    if not token or len(token) > MAX_TOKEN_LENGTH or not set(token) <= _TOKEN_CHARS:
        raise ConfigError(
            f"{source}: the admin token must be 1 to {MAX_TOKEN_LENGTH} of"
            " A-Z a-z 0-9 - . _ ~ + / ="
        )
    return token


def _warn_if_readable_by_others(path: Path) -> None:
    with suppress(OSError):
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            log.warning("admin token file %s is readable by others; chmod 600 it", path)


@dataclass(slots=True)
class AdminAuth:
    """The token the running app checks (set at start-up) and whether /metrics is public."""

    public_metrics: bool
    token: bytes | None = None

    def set_token(self, token: str) -> None:
        self.token = token.encode("ascii")

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
            auth.check(request.headers.get("Authorization"))
        return await handler(request)

    return admin_token
