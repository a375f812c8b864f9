"""The fleet list: every filter, keyset paging with a total, tags and their validation."""

from __future__ import annotations

import pytest

from iotbiz.errors import NotFoundError
from iotbiz.models import DeviceState, PresenceUpdate
from iotbiz.names import DeviceName
from iotbiz.store.interface import DeviceStore, PlatformStore
from tests.conftest import FakeClock
from tests.store_helpers import HASH, active_devices


async def test_keyset_pages_cover_everything_once_with_a_total(any_store: DeviceStore) -> None:
    store = any_store
    names = await active_devices(store, "abc123", 7) + await active_devices(store, "zed", 3)
    seen: list[DeviceName] = []
    after = None
    while True:
        page, total = await store.find_devices(limit=3, after=after)
        assert total == 10
        if not page:
            break
        seen += [DeviceName(d.customer_id, d.device_id) for d in page]
        after = seen[-1]
    assert seen == sorted(names)


async def test_filters_combine(any_store: PlatformStore, clock: FakeClock) -> None:
    store = any_store
    names = await active_devices(store, "abc123", 6)
    await active_devices(store, "other", 2)
    await store.register_device(DeviceName("abc123", "pending-1"), HASH, ttl_s=60, actor="test")
    await store.revoke_device(names[5], actor="test")
    await store.record_presence([PresenceUpdate(n, clock.now, online=True) for n in names[:3]])
    for name in names[1:4]:
        await store.set_tags(name, {"site": "berlin"}, actor="op")
    await store.set_tags(names[2], {"rack": "r1"}, actor="op")

    async def find(**filters: object) -> tuple[list[str], int]:
        page, total = await store.find_devices(**filters)  # type: ignore[arg-type]
        return [d.device_id for d in page], total

    assert await find(customer_id="abc123") == (
        ["dev-00000", "dev-00001", "dev-00002", "dev-00003", "dev-00004", "dev-00005", "pending-1"],
        7,
    )
    assert (await find(state=DeviceState.PENDING))[0] == ["pending-1"]
    assert (await find(state=DeviceState.REVOKED))[0] == ["dev-00005"]
    assert await find(online=True) == (["dev-00000", "dev-00001", "dev-00002"], 3)
    assert (await find(online=False, customer_id="abc123"))[1] == 4
    assert await find(tags={"site": "berlin"}) == (["dev-00001", "dev-00002", "dev-00003"], 3)
    assert await find(tags={"site": "berlin", "rack": "r1"}) == (["dev-00002"], 1)
    assert await find(tags={"site": "berlin"}, online=True, limit=1) == (["dev-00001"], 2)
    assert await find(query="DEV-0000") == (
        [f"dev-0000{i}" for i in range(6)] + ["dev-00000", "dev-00001"],
        8,
    )
    assert await find(query="other/") == (["dev-00000", "dev-00001"], 2)
    assert await find(query="%") == ([], 0)  # LIKE wildcards are literal
    assert await find(query="_") == ([], 0)
    with pytest.raises(ValueError, match="limit"):
        await store.find_devices(limit=0)


async def test_tags_set_remove_validate_and_audit(any_store: DeviceStore) -> None:
    store = any_store
    [a] = await active_devices(store, "abc123", 1)
    assert await store.set_tags(a, {"site": "berlin", "floor": "2"}, actor="op") == {
        "floor": "2",
        "site": "berlin",
    }
    assert await store.set_tags(a, {"floor": None, "site": "paris"}, actor="op") == {
        "site": "paris"
    }
    assert await store.get_tags(a) == {"site": "paris"}
    device = await store.get_device(a)
    assert device is not None
    assert device.tags == {"site": "paris"}
    assert device.to_json()["tags"] == {"site": "paris"}
    [entry] = await store.audit_entries(subject=str(a), limit=1)
    assert (entry.action, entry.detail) == (
        "device.tags",
        {"changes": {"floor": None, "site": "paris"}},
    )
    for bad in ({"a b": "x"}, {"": "x"}, {"k" * 65: "x"}, {"k": "v" * 257}):
        with pytest.raises(ValueError, match="tag"):
            await store.set_tags(a, bad, actor="op")
    with pytest.raises(ValueError, match="at most 64 tags"):
        await store.set_tags(a, {f"k{i}": "v" for i in range(64)}, actor="op")
    assert await store.get_tags(a) == {"site": "paris"}  # the refused change rolled back
    with pytest.raises(NotFoundError):
        await store.set_tags(DeviceName("abc123", "ghost"), {"a": "b"}, actor="op")
    await store.reset_device(a, actor="op")
    assert await store.get_tags(a) == {}  # tags go with the device


async def test_device_names_for_addressing_commands(any_store: DeviceStore) -> None:
    store = any_store
    names = await active_devices(store, "abc123", 4)
    await store.revoke_device(names[3], actor="op")
    await store.set_tags(names[1], {"site": "berlin"}, actor="op")
    assert await store.device_names(customer_id="abc123") == names[:3]
    assert await store.device_names(customer_id="abc123", tags={"site": "berlin"}) == [names[1]]
    assert await store.device_names(customer_id="abc123", limit=2) == names[:2]
