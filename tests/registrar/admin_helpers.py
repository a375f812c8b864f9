"""Shared by the admin API tests: a real registrar with an admin token, and the error check."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient

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
