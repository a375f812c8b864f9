"""Refusals that matter reach the audit log (what, which device, from which address, the real
reason) and the metrics; repeats are throttled into a count; one customer's registrations are
rate-limited across all addresses."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from iotbiz.models import AuditEntry
from iotbiz.registrar import create_app
from iotbiz.settings import Settings
from iotbiz.store import Store
from tests.registrar.admin_helpers import AUTH, TOKEN, Client, assert_error

MAC = "44:8a:5b:9c:70:93"
DEVICE = f"abc123/{MAC}"


@pytest.fixture
async def api(
    aiohttp_client: Callable[..., Any], make_settings: Callable[..., Settings], store: Store
) -> Client:
    await store.add_customer("abc123", 10, actor="test")
    await store.add_customer("other", 10, actor="test")
    settings = make_settings(
        registrar={"rate_per_customer": 1.0, "customer_burst": 4}, admin={"token": TOKEN}
    )
    result: TestClient[Any, Any] = await aiohttp_client(create_app(settings, store))
    return result


async def refusals(store: Store, subject: str, count: int) -> list[AuditEntry]:
    """The refusal entries about `subject`, once there are `count` (written every second)."""
    for _ in range(100):
        entries = [
            e for e in await store.audit_entries(subject=subject) if e.action.endswith(".refused")
        ]
        if len(entries) >= count:
            return entries
        await asyncio.sleep(0.05)
    raise AssertionError(f"fewer than {count} refusals audited for {subject}")


async def test_a_takeover_attempt_is_audited_once_per_window_and_counted(
    api: Client, store: Store
) -> None:
    body = {"customer_id": "abc123", "mac_address": MAC}
    password = (await (await api.post("/api/v1/register", json=body)).json())["password"]
    activated = await api.post("/api/v1/activate", json={**body, "password": password})
    assert activated.status == 200
    for _ in range(2):  # someone tries to register the activated MAC again, twice
        await assert_error(
            await api.post("/api/v1/register", json=body), 403, "device already activated"
        )
    (entry,) = await refusals(store, DEVICE, 1)
    assert entry.action == "register.refused"
    assert entry.actor == "device-api:127.0.0.1"
    assert entry.detail == {"reason": "device already activated"}
    metrics = await (await api.get("/metrics", headers=AUTH)).text()
    assert 'iotbiz_refusals_total{reason="device already activated",step="register"} 2.0' in metrics


async def test_an_activation_refusal_keeps_its_real_reason_for_operators(
    api: Client, store: Store
) -> None:
    body = {"customer_id": "abc123", "mac_address": MAC, "password": "x" * 32}
    await assert_error(await api.post("/api/v1/activate", json=body), 403)
    (entry,) = await refusals(store, DEVICE, 1)
    assert (entry.action, entry.detail) == ("activate.refused", {"reason": "unknown device"})
    await api.post("/api/v1/register", json={"customer_id": "abc123", "mac_address": MAC})
    await assert_error(await api.post("/api/v1/activate", json=body), 403)
    entries = await refusals(store, DEVICE, 2)
    assert entries[0].detail == {"reason": "wrong password"}


async def test_one_customer_is_rate_limited_across_addresses(api: Client, store: Store) -> None:
    statuses = []
    for index in range(6):
        body = {"customer_id": "abc123", "mac_address": f"44:8a:5b:00:00:{index:02x}"}
        response = await api.post("/api/v1/register", json=body)
        statuses.append(response.status)
    assert statuses[:4] == [201] * 4  # the burst
    assert 429 in statuses[4:]
    limited = await api.post(
        "/api/v1/register", json={"customer_id": "abc123", "mac_address": "44:8a:5b:00:01:00"}
    )
    await assert_error(limited, 429, "too many requests for this customer")
    assert int(limited.headers["Retry-After"]) >= 1
    # another customer is not held up
    other = await api.post(
        "/api/v1/register", json={"customer_id": "other", "mac_address": "44:8a:5b:00:00:01"}
    )
    assert other.status == 201
    (entry, *_) = await refusals(store, "abc123", 1)
    assert (entry.action, entry.detail["reason"]) == ("rate_limit.refused", "per customer")


async def test_a_wrong_admin_token_and_a_wrong_console_login_are_audited(
    api: Client, store: Store
) -> None:
    wrong = {"Authorization": "Bearer not-the-token"}
    await assert_error(await api.get("/api/v1/admin/customers", headers=wrong), 401)
    login = await api.post("/api/v1/console/login", json={"token": "guess"})
    await assert_error(login, 401)
    entries = await refusals(store, "admin", 2)
    assert {(e.action, e.detail["reason"]) for e in entries} == {
        ("admin_auth.refused", "missing or wrong admin token or session"),
        ("admin_auth.refused", "console login with a wrong token"),
    }
    assert {e.actor for e in entries} == {"admin:127.0.0.1"}
