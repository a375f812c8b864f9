"""The admin token: 401 without it, the device API stays public, the token file (0600, created
once, read afterwards), constant-time comparison."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from yarl import URL

from iotbiz.errors import ConfigError
from iotbiz.registrar import create_app
from iotbiz.registrar.admin_auth import load_or_create_admin_token, read_admin_token, token_path
from iotbiz.settings import Settings
from iotbiz.store import Store
from tests.registrar.admin_helpers import ADMIN, AUTH, TOKEN, Client, assert_error, ok_json

WRONG = "missing or wrong admin token"


@pytest.fixture
async def admin(
    aiohttp_client: Callable[..., Any], make_settings: Callable[..., Settings], store: Store
) -> Client:
    client: Client = await aiohttp_client(create_app(make_settings(admin={"token": TOKEN}), store))
    return client


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer é"},
    ],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", f"{ADMIN}/customers"),
        ("POST", f"{ADMIN}/customers"),
        ("GET", f"{ADMIN}/devices/abc123/dev-1"),
        ("GET", f"{ADMIN}/no-such-route"),  # a wrong path does not tell routes apart
        ("GET", "/metrics"),
    ],
)
async def test_without_the_right_token_401(
    admin: Client, headers: dict[str, str], method: str, path: str
) -> None:
    response = await admin.request(method, path, headers=headers, json={"customer_id": "x"})
    await assert_error(response, 401, WRONG)
    assert response.headers["WWW-Authenticate"] == "Bearer"


async def test_with_the_right_token(admin: Client) -> None:
    assert (await ok_json(await admin.get(f"{ADMIN}/customers", headers=AUTH))) == {"customers": []}
    lower = {"Authorization": f"bearer {TOKEN}"}  # the scheme is case-insensitive
    assert (await admin.get(f"{ADMIN}/customers", headers=lower)).status == 200
    assert (await admin.get("/metrics", headers=AUTH)).status == 200


async def test_the_device_api_health_and_openapi_stay_public(admin: Client, store: Store) -> None:
    assert (await admin.get("/healthz")).status == 200
    assert (await admin.get("/api/v1/openapi.json")).status == 200
    await store.add_customer("abc123", 1, actor="test")
    body = {"customer_id": "abc123", "mac_address": "dev-1"}
    assert (await admin.post("/api/v1/register", json=body)).status == 201


async def test_public_metrics(
    aiohttp_client: Callable[..., Any], make_settings: Callable[..., Settings], store: Store
) -> None:
    settings = make_settings(admin={"token": TOKEN, "public_metrics": True})
    client: Client = await aiohttp_client(create_app(settings, store))
    response = await client.get("/metrics")
    assert response.status == 200
    assert "iotbiz_devices" in await response.text()
    await assert_error(await client.get(f"{ADMIN}/customers"), 401, WRONG)


async def test_the_token_file_is_created_0600_and_reused(
    aiohttp_client: Callable[..., Any],
    make_settings: Callable[..., Settings],
    store: Store,
    db_path: Path,
) -> None:
    settings = make_settings()
    path = db_path.parent / "admin.token"
    assert token_path(settings) == path
    assert read_admin_token(settings) is None  # never started: nothing, and nothing created
    assert not path.exists()

    first: Client = await aiohttp_client(create_app(settings, store))
    assert path.is_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = path.read_text().strip()
    assert len(token) >= 43  # 32 random bytes, URL-safe base64
    assert read_admin_token(settings) == token
    assert [p.name for p in db_path.parent.iterdir() if p.name.startswith(".admin")] == []
    response = await first.get(f"{ADMIN}/customers", headers={"Authorization": f"Bearer {token}"})
    assert response.status == 200
    await first.close()

    # a second start reads the file, it does not replace it
    second: Client = await aiohttp_client(create_app(settings, store))
    assert path.read_text().strip() == token
    response = await second.get(f"{ADMIN}/customers", headers={"Authorization": f"Bearer {token}"})
    assert response.status == 200


def test_an_existing_file_is_read_and_the_setting_wins(
    make_settings: Callable[..., Settings], db_path: Path
) -> None:
    path = db_path.parent / "admin.token"
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(descriptor, b"from-the-file-0123456789\n")
    os.close(descriptor)
    assert load_or_create_admin_token(make_settings()) == "from-the-file-0123456789"
    assert path.read_text() == "from-the-file-0123456789\n"
    with_setting = make_settings(admin={"token": TOKEN})
    assert load_or_create_admin_token(with_setting) == TOKEN
    assert read_admin_token(with_setting) == TOKEN


def test_on_postgresql_the_setting_is_the_token_and_is_required(
    make_settings: Callable[..., Settings], db_path: Path
) -> None:
    """Several processes share a PostgreSQL store and there is no store folder: no file is
    read or written, the setting is required."""
    path = db_path.parent / "admin.token"
    path.write_text("from-the-file-0123456789\n")  # a SQLite platform's file: not this one's
    on_postgres = make_settings(store={"url": "postgresql://u@127.0.0.1:1/db"})
    assert read_admin_token(on_postgres) is None
    with pytest.raises(ConfigError) as refused:
        load_or_create_admin_token(on_postgres)
    assert str(refused.value) == (
        "admin.token: required with a PostgreSQL store (store.url): every platform process"
        " must use the same token, and there is no store folder to generate it into"
    )
    path.unlink()
    with_token = make_settings(
        store={"url": "postgresql://u@127.0.0.1:1/db"}, admin={"token": TOKEN}
    )
    assert load_or_create_admin_token(with_token) == TOKEN
    assert read_admin_token(with_token) == TOKEN
    assert not path.exists()


@pytest.mark.parametrize("content", ["", "\n", "has space", "x" * 600, "tab\there"])
def test_an_unusable_token_is_a_config_error(
    make_settings: Callable[..., Settings], db_path: Path, content: str
) -> None:
    (db_path.parent / "admin.token").write_text(content)
    with pytest.raises(ConfigError, match=r"admin\.token"):
        load_or_create_admin_token(make_settings())
    with pytest.raises(ConfigError, match=r"admin\.token"):
        read_admin_token(make_settings(admin={"token": "has space"}))


def test_two_processes_creating_the_file_agree(
    make_settings: Callable[..., Settings], db_path: Path
) -> None:
    """Exclusive creation: whoever comes second reads the first one's token."""
    settings = make_settings()
    tokens = {load_or_create_admin_token(settings) for _ in range(3)}
    assert len(tokens) == 1
    assert (db_path.parent / "admin.token").read_text().strip() in tokens


@pytest.mark.parametrize(
    "raw_path",
    ["/api/v1/%61dmin/customers", "/api/v1/admin/customers/%61bc", "/api/v1/admin"],
)
async def test_encoded_admin_paths_need_the_token_too(admin: Client, raw_path: str) -> None:
    url = URL(str(admin.make_url("/")).rstrip("/") + raw_path, encoded=True)
    async with admin.session.get(url) as response:
        await assert_error(response, 401, WRONG)
