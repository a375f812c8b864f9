"""The web console: its page at `/`, its files under `/console/`, and its login.

The console is static files (`iotbiz/console/`: HTML, ES modules, CSS; no build step) that talk to
the admin API with a session cookie (`console_auth`) and follow the fleet through the admin API's
event stream (`fleet_feed`). Its files are listed once when the app is made: `/console/{file}`
serves only those names, so no path from a request ever reaches the file system.

Every console file goes out with a Content-Security-Policy that allows scripts, styles and
connections from the platform itself only (no inline script, no inline style, no frames), so
that a device name or an app's log line that holds markup can never run in an operator's browser.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from iotbiz.errors import HTTPError
from iotbiz.registrar.console_auth import (
    COOKIE,
    CSRF_HEADER,
    MAX_LOGIN_BODY,
    NotLoggedIn,
    clear_cookie,
    limit_logins,
    read_login_token,
    session_answer,
    set_cookie,
)
from iotbiz.registrar.http_server import expect_handler
from iotbiz.registrar.keys import ADMIN_AUTH, SETTINGS

CONSOLE_DIR = Path(__file__).resolve().parent.parent / "console"
SERVED_SUFFIXES = (".html", ".js", ".css", ".svg", ".png", ".ico")
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidated (ETag), so an upgraded platform serves its own
}
CONSOLE_FILES = web.AppKey("console_files", dict[str, Path])


def console_files(folder: Path = CONSOLE_DIR) -> dict[str, Path]:
    """The files the console may serve, by name."""
    if not folder.is_dir():
        return {}
    return {
        path.name: path
        for path in folder.iterdir()
        if path.is_file() and path.suffix in SERVED_SUFFIXES
    }


def add_console_routes(app: web.Application) -> None:
    app[CONSOLE_FILES] = console_files()
    app.router.add_get("/", index)
    app.router.add_get("/console/{file}", asset)
    app.router.add_post(
        "/api/v1/console/login", login, expect_handler=expect_handler(MAX_LOGIN_BODY)
    )
    app.router.add_get("/api/v1/console/session", show_session)
    app.router.add_post("/api/v1/console/logout", logout)


async def index(request: web.Request) -> web.FileResponse:
    return _serve(request, "index.html")


async def asset(request: web.Request) -> web.FileResponse:
    return _serve(request, request.match_info["file"])


def _serve(request: web.Request, name: str) -> web.FileResponse:
    path = request.app[CONSOLE_FILES].get(name)
    if path is None:
        raise web.HTTPNotFound
    return web.FileResponse(path, headers=SECURITY_HEADERS)


async def login(request: web.Request) -> web.Response:
    """`{"token"}` -> 200 `{"csrf_token", "expires_at"}` with the session cookie; 401 for a wrong
    token, 429 after too many tries from one address."""
    auth = request.app[ADMIN_AUTH]
    limit_logins(auth.sessions, request)
    token = await read_login_token(request, timeout_s=request.app[SETTINGS].http.body_timeout_s)
    try:
        auth.check(f"Bearer {token}")
    except HTTPError:
        auth.refused(request, "console login with a wrong token")
        raise
    cookie, session = auth.sessions.open()
    response = web.json_response(session_answer(session), headers={"Cache-Control": "no-store"})
    set_cookie(response, request, cookie, max_age=int(auth.sessions.ttl_s))
    return response


async def show_session(request: web.Request) -> web.Response:
    """200 `{"csrf_token", "expires_at"}` for a valid session cookie, else 401."""
    session = request.app[ADMIN_AUTH].sessions.check(request.cookies.get(COOKIE))
    if session is None:
        raise NotLoggedIn
    return web.json_response(session_answer(session), headers={"Cache-Control": "no-store"})


async def logout(request: web.Request) -> web.Response:
    """Ends the session of the cookie (the CSRF header needed) and clears the cookie."""
    sessions = request.app[ADMIN_AUTH].sessions
    session = sessions.check(request.cookies.get(COOKIE))
    if session is None:
        raise NotLoggedIn
    sessions.check_csrf(session, request.headers.get(CSRF_HEADER))
    sessions.end(session)
    response = web.json_response({"ok": True})
    clear_cookie(response, request)
    return response
