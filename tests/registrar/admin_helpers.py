"""Shared by the admin API tests: a real registrar with an admin token, and the error check."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest_asyncio
from aiohttp.test_utils import TestClient

from iotbiz.platform import Platform
from iotbiz.settings import Settings

TOKEN = "test-admin-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ADMIN = "/api/v1/admin"
Client = TestClient[Any, Any]


async def assert_error(response: Any, status: int, error: str | None = None) -> str:
    """Every error is JSON with exactly one non-empty string field `error`."""
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    body = await response.json()
    assert list(body) == ["error"], body
    assert isinstance(body["error"], str)
    assert body["error"]
    if error is not None:
        assert body["error"] == error
    return str(body["error"])


async def ok_json(response: Any, status: int = 200) -> Any:
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    return await response.json()


@pytest_asyncio.fixture
async def platform(make_settings: Callable[..., Settings]) -> AsyncIterator[Platform]:
    """A real platform (broker, dispatcher, registrar, store) on ports 0 with the admin token;
    customer `abc123` may have 10 devices. Import it by name into a test module."""
    running = Platform(make_settings(admin={"token": TOKEN}, http={"host": "127.0.0.1"}))
    await running.start()
    await running.store.add_customer("abc123", 10, actor="test")
    try:
        yield running
    finally:
        await running.stop()


async def enroll(api: aiohttp.ClientSession, device_id: str) -> str:
    """Register and activate a device of `abc123` over HTTP; return its password."""
    body: dict[str, Any] = {"customer_id": "abc123", "mac_address": device_id}
    async with api.post("/api/v1/register", json=body) as response:
        assert response.status == 201
        body["password"] = (await response.json())["password"]
    async with api.post("/api/v1/activate", json=body) as response:
        assert response.status == 200
    return str(body["password"])
