"""Bad input to every admin route is a 400 (or 404) `{"error": ...}` naming what is wrong, never
a 500; and paging through 250 devices with filters, each device once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from iotbiz.names import DeviceName
from iotbiz.registrar import create_app
from iotbiz.settings import Settings
from iotbiz.store import Store
from tests.registrar.admin_helpers import ADMIN, AUTH, TOKEN, Client, assert_error, ok_json
from tests.store_helpers import active_devices

DEV = f"{ADMIN}/devices/abc123/dev-00000"


@pytest.fixture
async def admin(
    aiohttp_client: Callable[..., Any], make_settings: Callable[..., Settings], store: Store
) -> Client:
    await active_devices(store, "abc123", 1)
    client: Client = await aiohttp_client(
        create_app(make_settings(admin={"token": TOKEN}), store), headers=AUTH
    )
    return client


BAD = [
    # (method, path, query, body, status, a word the error must hold)
    ("POST", "/customers", None, {"device_limit": 1}, 400, "customer_id"),
    ("POST", "/customers", None, {"customer_id": "a/b", "device_limit": 1}, 400, "customer_id"),
    ("POST", "/customers", None, {"customer_id": "", "device_limit": 1}, 400, "customer_id"),
    ("POST", "/customers", None, {"customer_id": 7, "device_limit": 1}, 400, "customer_id"),
    ("POST", "/customers", None, {"customer_id": "x" * 65, "device_limit": 1}, 400, "customer"),
    ("POST", "/customers", None, {"customer_id": "acme"}, 400, "device_limit"),
    ("POST", "/customers", None, {"customer_id": "a", "device_limit": -1}, 400, "device_limit"),
    ("POST", "/customers", None, {"customer_id": "a", "device_limit": 1.5}, 400, "device_limit"),
    ("POST", "/customers", None, {"customer_id": "a", "device_limit": True}, 400, "device_limit"),
    ("POST", "/customers", None, {"customer_id": "a", "device_limit": "5"}, 400, "device_limit"),
    ("POST", "/customers", None, {"customer_id": "a", "device_limit": 10**7}, 400, "device_limit"),
    ("POST", "/customers", None, {"customer_id": "a", "device_limit": 1, "x": 1}, 400, "unknown"),
    ("POST", "/customers", {"x": "1"}, {"customer_id": "a", "device_limit": 1}, 400, "unknown"),
    ("PATCH", "/customers/abc123", None, {}, 400, "device_limit"),
    ("PATCH", "/customers/abc123", None, {"device_limit": None}, 400, "device_limit"),
    ("PATCH", "/customers/a%20b", None, {"device_limit": 1}, 400, "customer_id"),
    ("GET", "/customers/-bad", None, None, 400, "customer_id"),
    ("GET", "/customers", {"limit": "1"}, None, 400, "unknown"),
    ("GET", "/devices", {"limit": "0"}, None, 400, "limit"),
    ("GET", "/devices", {"limit": "1001"}, None, 400, "limit"),
    ("GET", "/devices", {"limit": "ten"}, None, 400, "limit"),
    ("GET", "/devices", {"limit": "1e3"}, None, 400, "limit"),
    ("GET", "/devices", {"limit": "9" * 40}, None, 400, "limit"),
    ("GET", "/devices", {"state": "lost"}, None, 400, "state"),
    ("GET", "/devices", {"online": "yes"}, None, 400, "online"),
    ("GET", "/devices", {"customer": "a/b"}, None, 400, "customer"),
    ("GET", "/devices", {"tag": "novalue"}, None, 400, "tag"),
    ("GET", "/devices", {"tag": "bad key=1"}, None, 400, "tag"),
    ("GET", "/devices", {"tag": "=1"}, None, 400, "tag"),
    ("GET", "/devices", {"q": ""}, None, 400, "q"),
    ("GET", "/devices", {"q": "x" * 200}, None, 400, "q"),
    ("GET", "/devices", {"cursor": "!!!"}, None, 400, "cursor"),
    ("GET", "/devices", {"cursor": "YWJj"}, None, 400, "cursor"),  # "abc"
    ("GET", "/devices", {"cursor": "ZDpub3NsYXNo"}, None, 400, "cursor"),  # "d:noslash"
    ("GET", "/devices", {"cursor": "Yzpj"}, None, 400, "cursor"),  # a command cursor
    ("GET", "/devices", {"State": "active"}, None, 400, "unknown"),
    ("GET", "/devices?limit=1&limit=2", None, None, 400, "more than once"),
    ("GET", "/devices/abc123/-x", None, None, 400, "device_id"),
    ("GET", "/devices/a%2Fb/dev-00000", None, None, 400, "customer_id"),
    ("GET", "/devices/abc123/nope", None, None, 404, "no device"),
    ("GET", "/devices/nobody/dev-00000", None, None, 404, "no device"),
    ("POST", "/devices/abc123/nope/revoke", None, None, 404, "no device"),
    ("POST", "/devices/abc123/dev-00000/revoke", None, {"x": 1}, 400, "unknown"),
    ("POST", "/devices/abc123/dev-00000/reset", None, [1], 400, "JSON object"),
    ("PATCH", "/devices/abc123/dev-00000/tags", None, {}, 400, "tags"),
    ("PATCH", "/devices/abc123/dev-00000/tags", None, {"tags": {}}, 400, "tags"),
    ("PATCH", "/devices/abc123/dev-00000/tags", None, {"tags": []}, 400, "tags"),
    ("PATCH", "/devices/abc123/dev-00000/tags", None, {"tags": {"a b": "x"}}, 400, "tag key"),
    ("PATCH", "/devices/abc123/dev-00000/tags", None, {"tags": {"a": 1}}, 400, "tag a"),
    ("PATCH", "/devices/abc123/dev-00000/tags", None, {"tags": {"a": "x" * 257}}, 400, "tag a"),
    ("PATCH", "/devices/abc123/dev-00000/tags", None, {"tags": {"k": "v"}, "x": 1}, 400, "unknown"),
    ("GET", "/devices/abc123/dev-00000/telemetry", {"since": "x"}, None, 400, "since"),
    ("GET", "/devices/abc123/dev-00000/telemetry", {"since": "nan"}, None, 400, "since"),
    ("GET", "/devices/abc123/dev-00000/telemetry", {"until": "inf"}, None, 400, "until"),
    ("GET", "/devices/abc123/dev-00000/telemetry", {"since": "-1"}, None, 400, "since"),
    (
        "GET",
        "/devices/abc123/dev-00000/telemetry",
        {"since": "9", "until": "1"},
        None,
        400,
        "until",
    ),
    ("GET", "/devices/abc123/dev-00000/telemetry", {"limit": "10001"}, None, 400, "limit"),
    ("GET", "/devices/abc123/dev-00000/events", {"before": "0"}, None, 400, "before"),
    ("GET", "/devices/abc123/dev-00000/events", {"before": "x"}, None, 400, "before"),
    ("GET", "/events", {"customer": "a b"}, None, 400, "customer"),
    ("GET", "/events", {"limit": "-5"}, None, 400, "limit"),
    ("GET", "/audit", {"limit": "100000"}, None, 400, "limit"),
    ("GET", "/audit", {"subject": ""}, None, 400, "subject"),
]


@pytest.mark.parametrize(
    ("method", "path", "query", "body", "status", "word"),
    BAD,
    ids=[f"{m} {p} {q or ''} {b if b is not None else ''}"[:80] for m, p, q, b, *_ in BAD],
)
async def test_bad_input(
    admin: Client,
    method: str,
    path: str,
    query: dict[str, str] | None,
    body: Any,
    status: int,
    word: str,
) -> None:
    response = await admin.request(method, f"{ADMIN}{path}", params=query, json=body)
    error = await assert_error(response, status)
    assert word in error


async def test_nothing_changed_by_bad_input(admin: Client, store: Store) -> None:
    before = await store.latest_change()
    for method, path, query, body, *_ in BAD:
        await admin.request(method, f"{ADMIN}{path}", params=query, json=body)
    assert await store.latest_change() == before


async def test_paging_through_250_devices_with_filters(admin: Client, store: Store) -> None:
    names = [DeviceName("abc123", "dev-00000")]
    names += await active_devices(store, "zeta", 248)  # dev-00000 .. dev-00247 of zeta
    names += [DeviceName("zeta", "dev-00248")]
    await store.register_device(names[-1], b"h", ttl_s=60, actor="test")  # one pending
    for index, name in enumerate(names):
        if index % 3 == 0:
            await store.set_tags(name, {"site": "berlin", "row": str(index % 2)}, actor="test")

    async def walk(query: dict[str, str]) -> tuple[list[str], set[int]]:
        seen: list[str] = []
        totals: set[int] = set()
        cursor = None
        for _ in range(100):
            page_query = {**query, **({"cursor": cursor} if cursor else {})}
            page = await ok_json(await admin.get(f"{ADMIN}/devices", params=page_query))
            seen += [d["name"] for d in page["devices"]]
            totals.add(page["total"])
            assert len(page["devices"]) <= int(query.get("limit", 100))
            cursor = page["next_cursor"]
            if cursor is None:
                return seen, totals
        raise AssertionError("paging did not end")

    every, totals = await walk({"limit": "7"})
    assert every == sorted(str(n) for n in names)  # each once, in (customer, device) order
    assert totals == {250}

    berlin, totals = await walk({"tag": "site=berlin", "limit": "10"})
    expected = [str(n) for i, n in enumerate(names) if i % 3 == 0]
    assert berlin == sorted(expected)
    assert totals == {len(expected)}

    row1, totals = await admin_walk_tags(walk)
    assert row1 == sorted(str(n) for i, n in enumerate(names) if i % 3 == 0 and i % 2 == 1)
    assert totals == {len(row1)}

    zeta_active, totals = await walk({"customer": "zeta", "state": "active", "limit": "100"})
    assert len(zeta_active) == 248
    assert totals == {248}
    pending, totals = await walk({"state": "pending"})
    assert pending == ["zeta/dev-00248"]
    searched, totals = await walk({"q": "DEV-0024", "limit": "3"})  # case-insensitive substring
    assert searched == [f"zeta/dev-0024{i}" for i in range(9)]
    assert totals == {9}
    offline, _ = await walk({"online": "false", "limit": "1000"})
    assert len(offline) == 250
    online, totals = await walk({"online": "true"})
    assert (online, totals) == ([], {0})


async def admin_walk_tags(walk: Any) -> tuple[list[str], set[int]]:
    """Two tag filters: both must match."""
    result: tuple[list[str], set[int]] = await walk(
        {"tag": ["site=berlin", "row=1"], "limit": "25"}  # type: ignore[dict-item]
    )
    return result
