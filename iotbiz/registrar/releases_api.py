"""Releases over HTTP: devices download the artifacts offered to them; operators list, upload
and remove releases through the admin API (docs/admin-api.md, "Releases").

Download: `GET /api/v1/releases/{app}/{version}` with HTTP basic auth, the device's own MQTT
username (`customer/device`) and password, checked by the broker's `Authority` exactly like an
MQTT login and through its credential cache (a resumed download costs no bcrypt). 401 without
them, with wrong ones, or for a device that is no longer active (checked in the store on every
request, so a revoke stops downloads at once, before the cache hears of it); 403 for an operator
account; 404 unless the release is offered to that device (an `update` command was sent to it).
`Range: bytes=N-` (or `N-M`) answers 206 with exactly those bytes, a range that cannot be
satisfied 416 (in the JSON error shape, with `Content-Range: bytes */SIZE`); `ETag` is the
quoted sha256. aiohttp's FileResponse sends the file (sendfile, off the event loop).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import BodyPartReader, web
from aiohttp.helpers import ETag
from aiohttp.http_exceptions import HttpProcessingError

from iotbiz import releases
from iotbiz.broker.authority import Authority, Refusal, Role
from iotbiz.errors import (
    BadRequest,
    ConfigError,
    Forbidden,
    HTTPError,
    NotFoundError,
    ServiceUnavailable,
    TooManyRequests,
)
from iotbiz.names import DeviceName
from iotbiz.registrar.admin_api import actor
from iotbiz.registrar.admin_input import Query
from iotbiz.registrar.http_server import (
    BodyCutOff,
    PayloadTooLarge,
    RequestTimeout,
    expect_handler,
)
from iotbiz.registrar.keys import RATE_LIMITER, SETTINGS, STORE
from iotbiz.registrar.ratelimit import RateLimiter

log = logging.getLogger(__name__)

AUTHORITY = web.AppKey("authority", Authority)
REALM = 'Basic realm="IoTBiz releases"'
CONTENT_TYPE = "application/gzip"
NO_AUTHORITY = "downloads need the running platform (no broker authority here)"


class DeviceUnauthorized(HTTPError):
    status = 401

    def __init__(self, message: str = "missing or wrong device credentials") -> None:
        super().__init__(message, headers={"WWW-Authenticate": REALM})


class RangeNotSatisfiable(HTTPError):
    status = 416

    def __init__(self, size: int) -> None:
        super().__init__(
            f"range not satisfiable: the artifact has {size} bytes",
            headers={"Content-Range": f"bytes */{size}"},
        )


class ArtifactResponse(web.FileResponse):
    """aiohttp's FileResponse (ranges, sendfile) whose ETag is the artifact's sha256, not
    aiohttp's mtime-and-size tag: the `etag` setter that FileResponse calls while preparing
    the answer stores ours instead."""

    def __init__(self, path: Path, sha256: str) -> None:
        self._sha256 = sha256
        super().__init__(path, headers={"Content-Type": CONTENT_TYPE})

    @property
    def etag(self) -> ETag | None:
        current: ETag | None = web.StreamResponse.etag.fget(self)  # type: ignore[attr-defined]
        return current

    @etag.setter
    def etag(self, value: object) -> None:
        web.StreamResponse.etag.fset(self, self._sha256)  # type: ignore[attr-defined]


# -- download -----------------------------------------------------------------------------------


async def download(request: web.Request) -> web.StreamResponse:
    """200 or 206 with the artifact's bytes; see the module docstring."""
    Query(request, ())
    app_name, version = _release_path(request)
    wait = request.app[RATE_LIMITER].acquire(request.remote or "unknown")
    if wait > 0:
        raise TooManyRequests("too many requests", retry_after_s=RateLimiter.retry_after(wait))
    name = await _device(request)
    store = request.app[STORE]
    active, release = await store.offered_release(name, app_name, version)
    if not active:
        raise DeviceUnauthorized
    if release is None:
        raise NotFoundError(f"release {app_name} {version} is not offered to {name}")
    path = releases.artifact_path(request.app[SETTINGS], app_name, version)
    try:
        size = (await asyncio.to_thread(path.stat)).st_size
    except OSError as exc:
        log.error("release %s %s: artifact %s unreadable: %s", app_name, version, path, exc)
        raise ServiceUnavailable(f"release {app_name} {version}: artifact unavailable") from exc
    if size != release.size:
        log.error(
            "release %s %s: artifact %s has %d bytes, not %d",
            app_name,
            version,
            path,
            size,
            release.size,
        )
        raise ServiceUnavailable(f"release {app_name} {version}: artifact damaged")
    _check_range(request, size)
    return ArtifactResponse(path, release.sha256)


async def _device(request: web.Request) -> DeviceName:
    login, password = _basic_credentials(request.headers.get("Authorization"))
    authority = request.app.get(AUTHORITY)
    if authority is None:
        raise ServiceUnavailable(NO_AUTHORITY)
    found = await authority.authenticate(login, password, login)
    if found is Refusal.UNAVAILABLE:
        raise ServiceUnavailable("busy, try again later", headers={"Retry-After": "5"})
    if isinstance(found, Refusal):
        raise DeviceUnauthorized
    if found.role is not Role.DEVICE or found.device is None:
        raise Forbidden("only devices download releases here")
    return found.device


def _basic_credentials(header: str | None) -> tuple[str, str]:
    """(username, password) of an `Authorization: Basic ...` header; 401 for anything else."""
    scheme, _, encoded = (header or "").partition(" ")
    if scheme.lower() != "basic":
        raise DeviceUnauthorized
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise DeviceUnauthorized from exc
    login, sep, password = decoded.partition(":")
    if not sep or not login:
        raise DeviceUnauthorized
    return login, password


def _check_range(request: web.Request, size: int) -> None:
    """416 (in our error shape) for a Range that FileResponse would answer with an empty 416."""
    if "Range" not in request.headers:
        return
    try:
        wanted = request.http_range
    except ValueError as exc:
        raise RangeNotSatisfiable(size) from exc
    if wanted.start is not None and wanted.start >= 0 and wanted.start >= size:
        raise RangeNotSatisfiable(size)
    if wanted.stop is not None and wanted.start is not None and wanted.stop <= wanted.start:
        raise RangeNotSatisfiable(size)


def _release_path(request: web.Request) -> tuple[str, str]:
    app_name, version = request.match_info["app"], request.match_info["version"]
    try:
        releases.check_name(app_name, version)
    except releases.ReleaseError as exc:
        raise BadRequest(str(exc)) from exc
    return app_name, version


# -- admin --------------------------------------------------------------------------------------


async def list_releases(request: web.Request) -> web.Response:
    """200 {"releases": [Release]}, by app, oldest first."""
    query = Query(request, ("app",))
    app_name = query.text("app", max_length=64)
    if app_name is not None and not releases.APP_NAME.fullmatch(app_name):
        raise BadRequest(f"app is not valid: {releases.APP_RULE}")
    found = await request.app[STORE].list_releases(app=app_name)
    return web.json_response({"releases": [r.to_json() for r in found]})


async def add_release(request: web.Request) -> web.Response:
    """POST ?app=A&version=V with the .tar.gz as the raw body, or a multipart/form-data body
    with the fields app and version (or those in the query) and then the part `file`: 201
    Release; 409 when it exists; 413 beyond releases.max_bytes."""
    query = Query(request, ("app", "version"))
    app_name, version = query.text("app", max_length=64), query.text("version", max_length=64)
    settings = request.app[SETTINGS]
    limit = settings.releases.max_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body too large (at most {limit} bytes)")
    timeout_s = settings.http.body_timeout_s
    chunks: AsyncIterator[bytes]
    if request.content_type == "multipart/form-data":
        fields, chunks = await _multipart(request, timeout_s)
        app_name, version = app_name or fields.get("app"), version or fields.get("version")
    else:
        chunks = _body_chunks(request, timeout_s)
    if app_name is None or version is None:
        raise BadRequest("app and version are required (query parameters or multipart fields)")
    try:
        releases.check_name(app_name, version)
    except releases.ReleaseError as exc:
        raise BadRequest(str(exc)) from exc
    try:
        release = await releases.add_release(
            request.app[STORE], settings, app_name, version, chunks, actor=actor(request)
        )
    except releases.TooLarge as exc:
        raise PayloadTooLarge(str(exc)) from exc
    except releases.ReleaseError as exc:
        raise BadRequest(str(exc)) from exc
    except ConfigError as exc:
        log.error("cannot add release %s %s: %s", app_name, version, exc)
        raise ServiceUnavailable("the platform's release signing key is unusable") from exc
    return web.json_response(
        release.to_json(),
        status=201,
        headers={"Location": f"/api/v1/admin/releases/{app_name}/{version}"},
    )


async def _body_chunks(request: web.Request, timeout_s: float) -> AsyncIterator[bytes]:
    """The body's chunks, each within `timeout_s` of the previous one (408): a large upload
    may take long, a stalled one may not."""
    while True:
        try:
            async with asyncio.timeout(timeout_s):
                chunk, _ = await request.content.readchunk()
        except TimeoutError as exc:
            raise RequestTimeout(f"request body stalled for {timeout_s:g} s") from exc
        except ConnectionResetError as exc:
            raise BodyCutOff("request body cut off") from exc
        if not chunk:
            return
        yield chunk


async def _multipart(
    request: web.Request, timeout_s: float
) -> tuple[dict[str, str], AsyncIterator[bytes]]:
    """The text fields before the part `file`, and that part's chunks."""
    fields: dict[str, str] = {}
    try:
        async with asyncio.timeout(timeout_s):
            reader = await request.multipart()
            while True:
                part = await reader.next()
                if part is None:
                    raise BadRequest("multipart body without a part named file")
                if not isinstance(part, BodyPartReader):
                    raise BadRequest("nested multipart bodies are not taken")
                if part.name == "file":
                    return fields, _part_chunks(part, timeout_s)
                if part.name not in ("app", "version"):
                    raise BadRequest(
                        f"unknown multipart field {part.name!r} (known: app, version, file)"
                    )
                value = (await part.read()).decode("utf-8", "replace")
                if not 0 < len(value) <= 64:
                    raise BadRequest(f"{part.name} must be 1 to 64 characters")
                fields[part.name] = value
    except TimeoutError as exc:
        raise RequestTimeout(f"request body not received within {timeout_s:g} s") from exc
    except ConnectionResetError as exc:
        raise BodyCutOff("request body cut off") from exc
    except (ValueError, RuntimeError, HttpProcessingError) as exc:  # aiohttp's multipart parser
        raise BadRequest("malformed multipart body") from exc


async def _part_chunks(part: BodyPartReader, timeout_s: float) -> AsyncIterator[bytes]:
    while True:
        try:
            async with asyncio.timeout(timeout_s):
                chunk = await part.read_chunk(releases.CHUNK_BYTES)
        except TimeoutError as exc:
            raise RequestTimeout(f"request body stalled for {timeout_s:g} s") from exc
        except ConnectionResetError as exc:
            raise BodyCutOff("request body cut off") from exc
        except (ValueError, RuntimeError, HttpProcessingError) as exc:
            raise BadRequest("malformed multipart body") from exc
        if not chunk:
            return
        yield chunk


async def remove_release(request: web.Request) -> web.Response:
    """DELETE: 200 Release (as it was); its artifact and offers go too."""
    Query(request, ())
    app_name, version = _release_path(request)
    release = await releases.remove_release(
        request.app[STORE], request.app[SETTINGS], app_name, version, actor=actor(request)
    )
    return web.json_response(release.to_json())


async def expect_upload(request: web.Request) -> web.StreamResponse | None:
    """`Expect: 100-continue` on an upload: 413 before the body when it is announced larger
    than releases.max_bytes."""
    limit = request.app[SETTINGS].releases.max_bytes
    answer: web.StreamResponse | None = await expect_handler(limit)(request)
    return answer
