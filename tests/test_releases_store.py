"""The store's releases and offers: add, list, remove, offer, withdraw, the download check."""

from __future__ import annotations

import pytest

from iotbiz.errors import ConflictError, NotFoundError
from iotbiz.names import DeviceName
from iotbiz.store.interface import DeviceStore
from tests.store_helpers import active_devices

SHA = "ab" * 32


@pytest.fixture
def store(any_store: DeviceStore) -> DeviceStore:
    """Every test here runs on both backends."""
    return any_store


async def test_add_list_get_remove(store: DeviceStore) -> None:
    web1 = await store.add_release("web", "1.0", sha256=SHA, size=10, signature=None, actor="t")
    await store.add_release("web", "1.1", sha256=SHA, size=11, signature="c2ln", actor="t")
    await store.add_release("api", "2", sha256=SHA, size=12, signature=None, actor="t")
    assert web1.url == "/api/v1/releases/web/1.0"
    assert [(r.app, r.version) for r in await store.list_releases()] == [
        ("api", "2"),
        ("web", "1.0"),
        ("web", "1.1"),
    ]
    assert [r.version for r in await store.list_releases(app="web")] == ["1.0", "1.1"]
    assert await store.get_release("web", "1.1") == (await store.list_releases(app="web"))[1]
    assert (await store.get_release("web", "1.1")).signature == "c2ln"  # type: ignore[union-attr]
    with pytest.raises(ConflictError, match=r"release web 1\.0 exists already"):
        await store.add_release("web", "1.0", sha256=SHA, size=1, signature=None, actor="t")
    removed = await store.remove_release("web", "1.0", actor="t")
    assert removed.size == 10
    assert await store.get_release("web", "1.0") is None
    with pytest.raises(NotFoundError, match=r"no release web 1\.0"):
        await store.remove_release("web", "1.0", actor="t")
    actions = [e.action for e in await store.audit_entries(subject="web/1.0")]
    assert actions == ["release.remove", "release.add"]


async def test_offers_and_the_download_check(store: DeviceStore) -> None:
    one, two = await active_devices(store, "abc123", 2)
    await store.add_release("web", "1.0", sha256=SHA, size=10, signature=None, actor="t")
    assert await store.offered_release(one, "web", "1.0") == (True, None)
    assert await store.offered_release(DeviceName("abc123", "nobody"), "web", "1.0") == (
        False,
        None,
    )
    ghost = DeviceName("abc123", "ghost")
    assert await store.offer_release([one, one, ghost], "web", "1.0") == [one]
    assert await store.offer_release([one, two], "web", "1.0") == [two]  # one had it already
    active, release = await store.offered_release(one, "web", "1.0")
    assert active
    assert release is not None
    assert release.sha256 == SHA
    assert await store.release_offers("web", "1.0") == [one, two]
    with pytest.raises(NotFoundError, match="no release web 9"):
        await store.offer_release([one], "web", "9")

    await store.withdraw_offers([two], "web", "1.0")
    assert await store.offered_release(two, "web", "1.0") == (True, None)

    await store.revoke_device(one, actor="t")
    active, release = await store.offered_release(one, "web", "1.0")
    assert not active
    assert release is not None

    await store.remove_release("web", "1.0", actor="t")  # its offers go with it
    assert await store.release_offers("web", "1.0") == []
    await store.add_release("web", "1.0", sha256=SHA, size=10, signature=None, actor="t")
    assert await store.offered_release(one, "web", "1.0") == (False, None)


async def test_offers_go_with_a_reset_device(store: DeviceStore) -> None:
    [one] = await active_devices(store, "abc123", 1)
    await store.add_release("web", "1.0", sha256=SHA, size=10, signature=None, actor="t")
    await store.offer_release([one], "web", "1.0")
    await store.reset_device(one, actor="t")
    assert await store.release_offers("web", "1.0") == []
