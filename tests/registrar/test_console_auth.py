"""The web console's login: a session cookie in place of the bearer token, CSRF on changes,
logout that ends the session, and the console's files with their security headers."""

from __future__ import annotations

from collections.abc import Callable
from http.cookies import SimpleCookie
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from iotbiz.registrar import create_app
from iotbiz.registrar.console_auth import COOKIE, ConsoleSessions
from iotbiz.settings import Settings
from iotbiz.store import Store
from tests.conftest import FakeClock
from tests.registrar.admin_helpers import ADMIN, AUTH, TOKEN, Client, assert_error, ok_json

LOGIN = "/api/v1/console/login"
SESSION = "/api/v1/console/session"
LOGOUT = "/api/v1/console/logout"


@pytest.fixture
async def console(
    aiohttp_client: Callable[..., Any], make_settings: Callable[..., Settings], store: Store
) -> Client:
    await store.add_customer("abc123", 10, actor="test")
    result: TestClient[Any, Any] = await aiohttp_client(
        create_app(make_settings(admin={"token": TOKEN}), store)
    )
    return result


async def log_in(console: Client) -> tuple[str, str]:
    """Log in; return (cookie value, CSRF token)."""
    response = await console.post(LOGIN, json={"token": TOKEN})
    body = await ok_json(response)
    assert set(body) == {"csrf_token", "expires_at"}
    return response.cookies[COOKIE].value, body["csrf_token"]


async def test_login_sets_an_httponly_samesite_cookie(console: Client) -> None:
    response = await console.post(LOGIN, json={"token": TOKEN})
    await ok_json(response)
    header = response.headers["Set-Cookie"]
    morsel = SimpleCookie(header)[COOKIE]
    assert morsel["httponly"] is True
    assert morsel["samesite"] == "Strict"
    assert morsel["path"] == "/"
    assert morsel["max-age"] == "43200"
    assert not morsel["secure"]  # plain HTTP here; Secure over HTTPS
    assert response.headers["Cache-Control"] == "no-store"


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"[]",
        b'"token"',
        b'{"token": ""}',
        b'{"token": 5}',
        b'{"token": "x", "a": 1}',
    ],
)
async def test_login_refuses_bad_bodies(console: Client, body: bytes) -> None:
    response = await console.post(LOGIN, data=body, headers={"Content-Type": "application/json"})
    await assert_error(response, 400)
    assert COOKIE not in response.cookies


async def test_login_refuses_an_oversized_body(console: Client) -> None:
    response = await console.post(LOGIN, json={"token": "x" * 5000})
    await assert_error(response, 413, "request body too large (at most 1024 bytes)")


async def test_a_wrong_token_is_401_and_repeated_tries_are_429(console: Client) -> None:
    response = await console.post(LOGIN, json={"token": "wrong"})
    await assert_error(response, 401, "missing or wrong admin token")
    assert COOKIE not in response.cookies
    statuses = [(await console.post(LOGIN, json={"token": "wrong"})).status for _ in range(12)]
    assert statuses[:9] == [401] * 9  # a burst of ten tries, the first one above included
    limited = await console.post(LOGIN, json={"token": TOKEN})
    await assert_error(limited, 429, "too many login attempts, try again later")
    assert int(limited.headers["Retry-After"]) >= 1


async def test_the_cookie_opens_the_admin_api_and_changes_need_the_csrf_token(
    console: Client, store: Store
) -> None:
    await assert_error(await console.get(f"{ADMIN}/customers"), 401)
    _, csrf = await log_in(console)
    body = await ok_json(await console.get(f"{ADMIN}/customers"))
    assert [c["customer_id"] for c in body["customers"]] == ["abc123"]

    new = {"customer_id": "zeta", "device_limit": 3}
    forbidden = "missing or wrong CSRF token"
    await assert_error(await console.post(f"{ADMIN}/customers", json=new), 403, forbidden)
    wrong = {"X-CSRF-Token": csrf[:-1] + ("A" if csrf[-1] != "A" else "B")}
    await assert_error(
        await console.post(f"{ADMIN}/customers", json=new, headers=wrong), 403, forbidden
    )
    assert [c.customer_id for c in await store.list_customers()] == ["abc123"]

    created = await console.post(f"{ADMIN}/customers", json=new, headers={"X-CSRF-Token": csrf})
    await ok_json(created, 201)
    audit = await ok_json(await console.get(f"{ADMIN}/audit", params={"subject": "zeta"}))
    assert audit["entries"][0]["actor"] == "console:127.0.0.1"


async def test_the_bearer_token_needs_no_csrf_token(console: Client) -> None:
    new = {"customer_id": "zeta", "device_limit": 3}
    await ok_json(await console.post(f"{ADMIN}/customers", json=new, headers=AUTH), 201)


async def test_session_and_logout(console: Client) -> None:
    await assert_error(await console.get(SESSION), 401, "not logged in")
    cookie, csrf = await log_in(console)
    assert (await ok_json(await console.get(SESSION)))["csrf_token"] == csrf

    await assert_error(await console.post(LOGOUT), 403, "missing or wrong CSRF token")
    response = await console.post(LOGOUT, headers={"X-CSRF-Token": csrf})
    assert await ok_json(response) == {"ok": True}
    assert response.cookies[COOKIE].value == ""  # cleared in the browser
    # a copy of the cookie kept by someone no longer works
    console.session.cookie_jar.clear()
    kept = {"Cookie": f"{COOKIE}={cookie}"}
    await assert_error(await console.get(f"{ADMIN}/customers", headers=kept), 401)
    await assert_error(await console.get(SESSION, headers=kept), 401, "not logged in")


@pytest.mark.parametrize(
    "forge",
    [
        lambda c: "",
        lambda c: "garbage",
        lambda c: "1.2.3",
        lambda c: str(int(c.split(".")[0]) + 1000) + c[c.index(".") :],  # a later expiry
        lambda c: c[:-2] + ("AA" if not c.endswith("AA") else "BB"),  # another MAC
        lambda c: c + "." + "x" * 300,
    ],
)
async def test_a_forged_cookie_is_refused(console: Client, forge: Callable[[str], str]) -> None:
    cookie, _ = await log_in(console)
    console.session.cookie_jar.clear()
    headers = {"Cookie": f"{COOKIE}={forge(cookie)}"}
    await assert_error(await console.get(f"{ADMIN}/customers", headers=headers), 401)


def test_sessions_expire_and_end_when_the_token_changes(clock: FakeClock) -> None:
    sessions = ConsoleSessions(600, clock=clock)
    sessions.set_token("token-a")
    cookie, session = sessions.open()
    assert sessions.check(cookie) == session
    clock.advance(599)
    assert sessions.check(cookie) == session
    clock.advance(2)
    assert sessions.check(cookie) is None
    cookie, _ = sessions.open()
    sessions.set_token("token-b")
    assert sessions.check(cookie) is None


async def test_the_console_page_and_files_carry_the_security_headers(console: Client) -> None:
    page = await console.get("/")
    assert page.status == 200
    assert page.content_type == "text/html"
    html = await page.text()
    assert "/console/app.js" in html
    policy = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy
    assert "frame-ancestors 'none'" in policy
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    script = await console.get("/console/app.js")
    assert script.status == 200
    assert script.content_type in {"text/javascript", "application/javascript"}
    assert "Content-Security-Policy" in script.headers


@pytest.mark.parametrize(
    "path", ["/console/nothing.js", "/console/..%2Fregistrar%2Fapp.py", "/console/", "/console"]
)
async def test_only_the_console_files_are_served(console: Client, path: str) -> None:
    await assert_error(await console.get(path), 404, "not found")
