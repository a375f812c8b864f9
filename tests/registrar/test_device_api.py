"""The device API contract (DESIGN.md, "Device API") against a real server and SQLite file."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from iotbiz.models import DeviceState
from iotbiz.names import DeviceName
from iotbiz.registrar import create_app
from iotbiz.registrar.device_api import ACTIVATION_REFUSED as REFUSED
from iotbiz.registrar.keys import HASHER
from iotbiz.settings import Settings
from iotbiz.store import Store
from tests.conftest import FakeClock

MAC = "44:8a:5b:9c:70:93"
NAME = DeviceName("abc123", MAC)
Client = TestClient[Any, Any]


async def register(client: Client, mac: str = MAC, customer: str = "abc123") -> Any:
    return await client.post("/api/v1/register", json={"customer_id": customer, "mac_address": mac})


async def activate(client: Client, password: str, mac: str = MAC, customer: str = "abc123") -> Any:
    body = {"customer_id": customer, "mac_address": mac, "password": password}
    return await client.post("/api/v1/activate", json=body)


async def assert_error(response: Any, status: int, error: str | None = None) -> str:
    """Every error is JSON with exactly one string field `error`."""
    assert response.status == status
    assert response.content_type == "application/json"
    body = await response.json()
    assert list(body) == ["error"]
    assert isinstance(body["error"], str)
    assert body["error"]
    if error is not None:
        assert body["error"] == error
    return str(body["error"])


async def new_password(client: Client, mac: str = MAC) -> str:
    response = await register(client, mac)
    assert response.status == 201
    body = await response.json()
    assert list(body) == ["password"]
    return str(body["password"])


async def test_the_seed_flow(client: Client, store: Store) -> None:
    # register: pending, the password is not usable yet
    first = await new_password(client)
    device = await store.get_device(NAME)
    assert device is not None
    assert device.state is DeviceState.PENDING
    assert len(first) >= 22  # at least 128 bits in URL-safe base64

    # the response was lost: register again, a new password; the old one stops working
    second = await new_password(client)
    assert second != first
    await assert_error(await activate(client, first), 403, REFUSED)

    # activate: 200, no payload
    response = await activate(client, second)
    assert response.status == 200
    assert await response.read() == b""
    device = await store.get_device(NAME)
    assert device is not None
    assert device.state is DeviceState.ACTIVE

    # activate again with the same password: 200, no other effect
    entries = await store.audit_entries(subject=str(NAME))
    response = await activate(client, second)
    assert response.status == 200
    assert await response.read() == b""
    assert await store.audit_entries(subject=str(NAME)) == entries

    # the activated device can never be registered again, and a wrong password stays wrong
    await assert_error(await register(client), 403, "device already activated")
    await assert_error(await activate(client, first), 403, REFUSED)
    device_after = await store.get_device(NAME)
    assert device_after == device  # nothing changed, the password hash included

    actions = [e.action for e in reversed(await store.audit_entries(subject=str(NAME)))]
    assert actions == ["device.register", "device.register_again", "device.activate"]


async def test_password_is_stored_only_as_a_bcrypt_hash(client: Client, store: Store) -> None:
    password = await new_password(client)
    device = await store.get_device(NAME)
    assert device is not None
    assert device.password_hash is not None
    assert device.password_hash.startswith(b"$2b$06$")  # the default cost
    assert password.encode() not in device.password_hash
    assert password not in repr(device)


@pytest.mark.parametrize(
    "notation",
    ["44:8A:5B:9C:70:93", "44-8a-5b-9c-70-93", "448a5b9c7093", "448A.5B9C.7093", MAC],
)
async def test_mac_notations_name_the_same_device(client: Client, notation: str) -> None:
    password = await new_password(client, notation)
    assert (await activate(client, password, MAC)).status == 200
    await assert_error(await register(client, notation), 403, "device already activated")


async def test_other_device_ids_are_kept_as_given(client: Client, store: Store) -> None:
    password = await new_password(client, "Kiosk_7-lobby:2")
    assert (await activate(client, password, "Kiosk_7-lobby:2")).status == 200
    assert (await store.get_device(DeviceName("abc123", "Kiosk_7-lobby:2"))) is not None


async def test_unknown_customer(client: Client) -> None:
    await assert_error(await register(client, customer="nobody"), 403, "unknown customer")


async def test_device_limit(client: Client, store: Store, clock: FakeClock) -> None:
    await store.set_device_limit("abc123", 2, actor="test")
    a = await new_password(client, "dev-a")
    await new_password(client, "dev-b")
    await assert_error(await register(client, "dev-c"), 403, "device limit reached")
    # renewing a pending registration keeps its slot
    await new_password(client, "dev-b")
    # active devices count too
    assert (await activate(client, a, "dev-a")).status == 200
    await assert_error(await register(client, "dev-c"), 403, "device limit reached")
    # an expired pending registration frees its slot
    clock.advance(86400 + 1)
    await new_password(client, "dev-c")
    await assert_error(await register(client, "dev-b"), 403, "device limit reached")
    # revoked devices do not count
    await store.revoke_device(DeviceName("abc123", "dev-a"), actor="test")
    await new_password(client, "dev-b")


async def test_pending_registration_expires(client: Client, clock: FakeClock) -> None:
    password = await new_password(client)
    clock.advance(86400 - 1)
    clock.advance(2)
    await assert_error(await activate(client, password), 403, REFUSED)
    # the device may register again afterwards
    password = await new_password(client)
    assert (await activate(client, password)).status == 200


async def test_activate_refusals(client: Client, store: Store) -> None:
    await assert_error(await activate(client, "x" * 32), 403, REFUSED)
    password = await new_password(client)
    await assert_error(await activate(client, "x" * 32), 403, REFUSED)
    await store.revoke_device(NAME, actor="test")
    await assert_error(await activate(client, password), 403, REFUSED)
    await assert_error(await register(client), 403, "device revoked")


async def test_reset_allows_registration_again(client: Client, store: Store) -> None:
    password = await new_password(client)
    assert (await activate(client, password)).status == 200
    await store.reset_device(NAME, actor="test")
    await assert_error(await activate(client, password), 403, REFUSED)
    password = await new_password(client)
    assert (await activate(client, password)).status == 200


async def test_concurrent_registrations_respect_the_limit(client: Client, store: Store) -> None:
    responses = await asyncio.gather(*(register(client, f"dev-{i}") for i in range(50)))
    statuses = sorted(r.status for r in responses)
    assert statuses == [201] * 10 + [403] * 40
    for response in responses:
        if response.status == 403:
            await assert_error(response, 403, "device limit reached")
    devices = await store.list_devices("abc123")
    assert len(devices) == 10


async def test_concurrent_activations_of_one_device(client: Client, store: Store) -> None:
    password = await new_password(client)
    responses = await asyncio.gather(*(activate(client, password) for _ in range(8)))
    assert [r.status for r in responses] == [200] * 8
    actions = [e.action for e in await store.audit_entries(subject=str(NAME))]
    assert actions.count("device.activate") == 1


BAD_BODIES: list[tuple[bytes, str]] = [
    (b"", "body must be a JSON object"),
    (b"not json", "body must be a JSON object"),
    (b"\xff\xfe", "body must be a JSON object"),
    (b"[]", "body must be a JSON object"),
    (b'"abc"', "body must be a JSON object"),
    (b"null", "body must be a JSON object"),
    (b"[" * 2000 + b"]" * 2000, "body must be a JSON object"),
    (b"{}", "customer_id must be a string"),
    (b'{"customer_id": 5, "mac_address": "aa"}', "customer_id must be a string"),
    (b'{"customer_id": "abc123"}', "mac_address must be a string"),
    (b'{"customer_id": "abc123", "mac_address": null}', "mac_address must be a string"),
    (b'{"customer_id": "abc123", "mac_address": ["aa"]}', "mac_address must be a string"),
]


@pytest.mark.parametrize(("body", "error"), BAD_BODIES)
@pytest.mark.parametrize("path", ["/api/v1/register", "/api/v1/activate"])
async def test_malformed_bodies_are_400(client: Client, path: str, body: bytes, error: str) -> None:
    await assert_error(await client.post(path, data=body), 400, error)


@pytest.mark.parametrize(
    "device_id",
    [
        "",
        "a/b",
        "a+b",
        "#",
        "dev.1",
        "dev 1",
        "dev\x00",
        "dévice",
        "-lead",
        ":lead",
        "x" * 65,
        "ab\n",
    ],
)
async def test_invalid_device_ids_are_400(client: Client, device_id: str) -> None:
    error = await assert_error(await register(client, device_id), 400)
    assert error.startswith("mac_address is not valid")


@pytest.mark.parametrize("customer_id", ["", "a/b", "+", "#", "a.b", "a b", "é", "_x", "x" * 65])
async def test_invalid_customer_ids_are_400(client: Client, customer_id: str) -> None:
    error = await assert_error(await register(client, customer=customer_id), 400)
    assert error.startswith("customer_id is not valid")


@pytest.mark.parametrize("password", [None, 5, "", "x" * 129])
async def test_bad_passwords_are_400(client: Client, password: object) -> None:
    body = {"customer_id": "abc123", "mac_address": MAC, "password": password}
    response = await client.post("/api/v1/activate", json=body)
    error = await assert_error(response, 400)
    assert error.startswith("password must be")


async def test_body_limit_is_4_kib(client: Client) -> None:
    padding = 4096 - len(json.dumps({"customer_id": "abc123", "mac_address": MAC, "pad": ""}))
    body = json.dumps({"customer_id": "abc123", "mac_address": MAC, "pad": "p" * padding})
    assert len(body) == 4096
    response = await client.post("/api/v1/register", data=body)
    assert response.status == 201
    await assert_error(
        await client.post("/api/v1/register", data=body + " "),
        413,
        "request body too large (at most 4096 bytes)",
    )


async def test_every_error_has_one_shape(client: Client) -> None:
    """One error shape across every route and method, including aiohttp's own 404/405."""
    await assert_error(await client.get("/api/v1/register"), 405, "method not allowed")
    await assert_error(await client.put("/api/v1/activate"), 405, "method not allowed")
    await assert_error(await client.post("/healthz"), 405, "method not allowed")
    await assert_error(await client.get("/nope"), 404, "not found")
    response = await client.get("/api/v1/register")
    assert response.headers["Allow"] == "POST"


async def test_healthz(client: Client) -> None:
    response = await client.get("/healthz")
    assert response.status == 200
    body = await response.json()
    assert body["status"] == "ok"
    assert body["store"] == "ok"


async def test_healthz_reports_a_dead_store(client: Client, store: Store) -> None:
    await store.close()
    await assert_error(await client.get("/healthz"), 503)


async def test_rate_limit_answers_429_with_retry_after(
    aiohttp_client: Callable[..., Any], make_settings: Callable[..., Settings], store: Store
) -> None:
    await store.add_customer("abc123", 100, actor="test")
    settings = make_settings(registrar={"rate_per_ip": 0.5, "rate_burst": 3})
    client = await aiohttp_client(create_app(settings, store))
    statuses = [(await register(client, f"dev-{i}")).status for i in range(3)]
    assert statuses == [201, 201, 201]
    response = await register(client, "dev-4")
    await assert_error(response, 429, "too many requests")
    assert int(response.headers["Retry-After"]) >= 1
    # healthz is not limited
    assert (await client.get("/healthz")).status == 200


async def test_a_full_hash_queue_answers_429(
    aiohttp_client: Callable[..., Any], make_settings: Callable[..., Settings], store: Store
) -> None:
    await store.add_customer("abc123", 100, actor="test")
    settings = make_settings(
        registrar={"bcrypt_cost": 12, "hash_threads": 1, "max_queued_hashes": 1}
    )
    client = await aiohttp_client(create_app(settings, store))
    responses = await asyncio.gather(*(register(client, f"dev-{i}") for i in range(6)))
    statuses = sorted(r.status for r in responses)
    assert statuses.count(201) >= 2
    assert 429 in statuses
    for response in responses:
        if response.status == 429:
            await assert_error(response, 429, "registrar busy, try again")
            assert response.headers["Retry-After"] == "1"


async def test_activate_does_not_tell_which_devices_exist(client: Client, store: Store) -> None:
    """Unknown, pending with a wrong password, revoked: the same answer, and each costs one
    bcrypt check (the decoy's for a device that does not exist)."""
    app_hasher = client.app[HASHER]
    password = await new_password(client)
    answers = []
    for mac in ("44:8a:5b:00:00:99", NAME.device_id):  # unknown, then the pending one
        before = app_hasher.operations
        response = await client.post(
            "/api/v1/activate",
            json={"customer_id": NAME.customer_id, "mac_address": mac, "password": "x" * 32},
        )
        answers.append((response.status, await response.json()))
        assert app_hasher.operations == before + 1
    assert answers[0] == answers[1] == (403, {"error": REFUSED})
    await store.revoke_device(NAME, actor="test")
    before = app_hasher.operations
    await assert_error(await activate(client, password), 403, REFUSED)
    assert app_hasher.operations == before + 1


@pytest.mark.parametrize("password", ["\udc80", "\ud800abc", "p\u00e4ss\u0000"])
async def test_activate_with_any_string_is_a_refusal_not_a_500(
    client: Client, password: str
) -> None:
    await new_password(client)
    body = json.dumps(
        {"customer_id": NAME.customer_id, "mac_address": NAME.device_id, "password": password}
    )
    response = await client.post(
        "/api/v1/activate", data=body, headers={"Content-Type": "application/json"}
    )
    await assert_error(response, 403, REFUSED)
