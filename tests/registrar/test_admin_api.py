"""Every admin route's happy path and error shapes, against a real server and SQLite file; every
change lands in the audit log with the actor `admin:<address>`."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from iotbiz.models import DeviceState, TelemetrySample
from iotbiz.names import DeviceName
from iotbiz.registrar import create_app
from iotbiz.settings import Settings
from iotbiz.store import Store
from tests.conftest import FakeClock
from tests.registrar.admin_helpers import ADMIN, AUTH, TOKEN, Client, assert_error, ok_json
from tests.store_helpers import active_devices


@pytest.fixture
async def admin(
    aiohttp_client: Callable[..., Any], make_settings: Callable[..., Settings], store: Store
) -> Client:
    client: Client = await aiohttp_client(
        create_app(make_settings(admin={"token": TOKEN}), store), headers=AUTH
    )
    return client


def admin_actor(entry: dict[str, Any]) -> bool:
    return str(entry["actor"]).startswith("admin:")


async def test_customers(admin: Client, store: Store) -> None:
    body = {"customer_id": "acme", "device_limit": 5}
    created = await ok_json(await admin.post(f"{ADMIN}/customers", json=body), 201)
    assert created["customer_id"] == "acme"
    assert created["device_limit"] == 5
    assert created["active_devices"] == 0
    assert isinstance(created["created_at"], str)

    await assert_error(
        await admin.post(f"{ADMIN}/customers", json=body), 409, "customer acme exists already"
    )
    listed = await ok_json(await admin.get(f"{ADMIN}/customers"))
    assert [c["customer_id"] for c in listed["customers"]] == ["acme"]
    shown = await ok_json(await admin.get(f"{ADMIN}/customers/acme"))
    assert shown == created

    patched = await ok_json(await admin.patch(f"{ADMIN}/customers/acme", json={"device_limit": 9}))
    assert patched["device_limit"] == 9
    await assert_error(await admin.get(f"{ADMIN}/customers/nobody"), 404, "no customer nobody")
    await assert_error(
        await admin.patch(f"{ADMIN}/customers/nobody", json={"device_limit": 1}),
        404,
        "no customer nobody",
    )
    entries = await ok_json(await admin.get(f"{ADMIN}/audit", params={"subject": "acme"}))
    actions = [(e["action"], e["detail"]) for e in entries["entries"]]
    assert actions == [("customer.set_limit", {"limit": 9}), ("customer.add", {"limit": 5})]
    assert all(admin_actor(e) for e in entries["entries"])


async def test_a_device_show_tags_revoke_reset(admin: Client, store: Store) -> None:
    [name] = await active_devices(store, "abc123", 1)
    path = f"{ADMIN}/devices/{name.customer_id}/{name.device_id}"
    shown = await ok_json(await admin.get(path))
    assert shown["name"] == str(name)
    assert shown["state"] == "active"
    assert shown["online"] is False
    assert shown["tags"] == {}
    assert "password_hash" not in shown

    tags = await ok_json(
        await admin.patch(f"{path}/tags", json={"tags": {"site": "berlin", "rack": "7"}})
    )
    assert tags == {"tags": {"rack": "7", "site": "berlin"}}
    tags = await ok_json(await admin.patch(f"{path}/tags", json={"tags": {"rack": None}}))
    assert tags == {"tags": {"site": "berlin"}}
    assert (await ok_json(await admin.get(path)))["tags"] == {"site": "berlin"}

    revoked = await ok_json(await admin.post(f"{path}/revoke"))
    assert revoked["state"] == "revoked"
    assert isinstance(revoked["revoked_at"], str)
    assert (await ok_json(await admin.post(f"{path}/revoke", json={})))["state"] == "revoked"

    as_it_was = await ok_json(await admin.post(f"{path}/reset"))
    assert as_it_was["state"] == "revoked"
    assert await store.get_device(name) is None
    await assert_error(await admin.get(path), 404, f"no device {name}")
    for action in ("revoke", "reset"):
        await assert_error(await admin.post(f"{path}/{action}"), 404, f"no device {name}")
    await assert_error(
        await admin.patch(f"{path}/tags", json={"tags": {"a": "b"}}), 404, f"no device {name}"
    )

    entries = (await ok_json(await admin.get(f"{ADMIN}/audit", params={"subject": str(name)})))[
        "entries"
    ]
    by_admin = [e["action"] for e in entries if admin_actor(e)]
    assert by_admin == ["device.reset", "device.revoke", "device.tags", "device.tags"]


async def test_a_mac_in_any_notation_names_the_device(admin: Client, store: Store) -> None:
    await store.add_customer("abc123", 5, actor="test")
    name = DeviceName("abc123", "44:8a:5b:9c:70:93")
    await store.register_device(name, b"$2b$06$hash", ttl_s=60, actor="test")
    for notation in ("44:8a:5b:9c:70:93", "448a5b9c7093", "44-8A-5B-9C-70-93"):
        shown = await ok_json(await admin.get(f"{ADMIN}/devices/abc123/{notation}"))
        assert shown["device_id"] == "44:8a:5b:9c:70:93"
        assert shown["state"] == "pending"


async def test_telemetry_history_and_events(admin: Client, store: Store, clock: FakeClock) -> None:
    [name] = await active_devices(store, "abc123", 1)
    path = f"{ADMIN}/devices/{name.customer_id}/{name.device_id}"
    start = clock.now
    await store.record_samples(
        [(name, TelemetrySample(at=start + i * 60, cpu_percent=float(i))) for i in range(5)]
    )
    samples = (await ok_json(await admin.get(f"{path}/telemetry")))["samples"]
    assert [s["cpu_percent"] for s in samples] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert samples[0]["ts"] == start
    assert samples[0]["memory_percent"] is None
    window = {"since": str(start + 60), "until": str(start + 180), "limit": "10"}
    samples = (await ok_json(await admin.get(f"{path}/telemetry", params=window)))["samples"]
    assert [s["cpu_percent"] for s in samples] == [1.0, 2.0]
    for empty in ({"until": "0"}, {"since": str(start + 60), "until": str(start + 60)}):
        assert await ok_json(await admin.get(f"{path}/telemetry", params=empty)) == {"samples": []}

    await store.record_events([(name, start + i, {"event": "app", "n": i}) for i in range(3)])
    events = (await ok_json(await admin.get(f"{path}/events")))["events"]
    assert [e["body"]["n"] for e in events] == [2, 1, 0]
    assert events[0]["device"] == str(name)
    older = await ok_json(await admin.get(f"{path}/events", params={"before": events[0]["id"]}))
    assert [e["body"]["n"] for e in older["events"]] == [1, 0]
    fleet = (await ok_json(await admin.get(f"{ADMIN}/events", params={"limit": "2"})))["events"]
    assert [e["body"]["n"] for e in fleet] == [2, 1]
    other = await ok_json(await admin.get(f"{ADMIN}/events", params={"customer": "other"}))
    assert other == {"events": []}

    await assert_error(await admin.get(f"{ADMIN}/devices/abc123/nope/telemetry"), 404)
    await assert_error(await admin.get(f"{ADMIN}/devices/abc123/nope/events"), 404)


async def test_audit_limit(admin: Client) -> None:
    for index in range(3):
        body = {"customer_id": f"c{index}", "device_limit": 1}
        await ok_json(await admin.post(f"{ADMIN}/customers", json=body), 201)
    entries = (await ok_json(await admin.get(f"{ADMIN}/audit", params={"limit": "2"})))["entries"]
    assert [e["subject"] for e in entries] == ["c2", "c1"]
    assert set(entries[0]) == {"id", "at", "actor", "action", "subject", "detail"}


async def test_audit_pages_with_before(admin: Client) -> None:
    for index in range(5):
        body = {"customer_id": f"c{index}", "device_limit": 1}
        await ok_json(await admin.post(f"{ADMIN}/customers", json=body), 201)
        patch = {"device_limit": 2}
        await ok_json(await admin.patch(f"{ADMIN}/customers/c{index}", json=patch))
    seen: list[str] = []
    params = {"limit": "3"}
    while True:
        page = (await ok_json(await admin.get(f"{ADMIN}/audit", params=params)))["entries"]
        seen += [f"{e['subject']}:{e['action']}" for e in page]
        if len(page) < 3:
            break
        params = {"limit": "3", "before": str(page[-1]["id"])}
    created = [s for s in reversed(seen) if s.startswith("c")]
    assert len(created) == 10  # every entry once, none repeated
    assert len(set(created)) == 10
    one = {"subject": "c2", "limit": "1"}
    newest = (await ok_json(await admin.get(f"{ADMIN}/audit", params=one)))["entries"]
    older = {**one, "before": str(newest[0]["id"])}
    oldest = (await ok_json(await admin.get(f"{ADMIN}/audit", params=older)))["entries"]
    assert [e["subject"] for e in newest + oldest] == ["c2", "c2"]
    assert oldest[0]["id"] < newest[0]["id"]
    for bad in ("0", "-1", "x", str(2**63)):
        await assert_error(await admin.get(f"{ADMIN}/audit", params={"before": bad}), 400)


async def test_admin_bodies_up_to_64_kib_the_device_api_keeps_4_kib(admin: Client) -> None:
    big = {"customer_id": "acme", "device_limit": 1, "x": "a" * 60_000}
    # 60 kB is read (and refused for its unknown field, not its size)
    await assert_error(await admin.post(f"{ADMIN}/customers", json=big), 400)
    huge = {"customer_id": "acme", "device_limit": 1, "x": "a" * 70_000}
    await assert_error(
        await admin.post(f"{ADMIN}/customers", json=huge),
        413,
        "request body too large (at most 65536 bytes)",
    )

    # the same without Content-Length (chunked): still bounded
    async def chunks() -> Any:
        for _ in range(20):
            yield b"a" * 4096

    await assert_error(
        await admin.post(
            f"{ADMIN}/customers", data=chunks(), headers={"Content-Type": "application/json"}
        ),
        413,
        "request body too large (at most 65536 bytes)",
    )
    device_body = {"customer_id": "acme", "mac_address": "dev-1", "x": "a" * 5000}
    await assert_error(
        await admin.post("/api/v1/register", json=device_body),
        413,
        "request body too large (at most 4096 bytes)",
    )


async def test_errors_are_json_for_unknown_routes_and_methods(admin: Client) -> None:
    await assert_error(await admin.get(f"{ADMIN}/nothing"), 404, "not found")
    response = await admin.delete(f"{ADMIN}/customers")
    await assert_error(response, 405, "method not allowed")
    assert "GET" in response.headers["Allow"]


async def test_a_body_that_is_not_json_is_400(admin: Client) -> None:
    for raw in (b"", b"{", b"[]", b'"x"', b"\xff", b'{"device_limit": NaN}', b"1" * 5):
        response = await admin.patch(
            f"{ADMIN}/customers/acme", data=raw, headers={"Content-Type": "application/json"}
        )
        await assert_error(response, 400, "body must be a JSON object")
    deep = b"[" * 100_000
    response = await admin.post(f"{ADMIN}/customers", data=deep)
    await assert_error(response, 413)
    deep = b"[" * 60_000
    await assert_error(await admin.post(f"{ADMIN}/customers", data=deep), 400)


async def test_the_device_list_json(admin: Client, store: Store) -> None:
    names = await active_devices(store, "abc123", 2)
    await store.register_device(DeviceName("abc123", "pending-1"), b"h", ttl_s=60, actor="t")
    await store.set_tags(names[0], {"site": "berlin"}, actor="test")
    page = await ok_json(await admin.get(f"{ADMIN}/devices"))
    assert page["total"] == 3
    assert page["next_cursor"] is None
    assert [d["device_id"] for d in page["devices"]] == ["dev-00000", "dev-00001", "pending-1"]
    assert page["devices"][0]["tags"] == {"site": "berlin"}
    assert {d["state"] for d in page["devices"]} == {"active", "pending"}
    device = await store.get_device(names[0])
    assert device is not None
    assert page["devices"][0] == json.loads(json.dumps(device.to_json()))
    assert device.state is DeviceState.ACTIVE
