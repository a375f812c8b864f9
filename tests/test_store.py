"""The store's own guarantees: WAL, file mode, migrations, audit log, two processes at once."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

import pytest

from iotbiz.errors import ConflictError, NotFoundError, StoreError
from iotbiz.models import DeviceState
from iotbiz.names import DeviceName
from iotbiz.store import SCHEMA_VERSION, Store
from iotbiz.store.interface import DeviceStore

NAME = DeviceName("abc123", "dev-1")


async def test_new_store_is_wal_private_and_current(db_path: Path, store: Store) -> None:
    assert await store.schema_version() == SCHEMA_VERSION
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600
    with sqlite3.connect(db_path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    with sqlite3.connect(path) as raw:
        raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer than this IoTBiz understands"):
        await Store.open(path)


async def test_migrations_run_once_and_keep_data(db_path: Path) -> None:
    store = await Store.open(db_path)
    await store.add_customer("abc123", 3, actor="test")
    await store.close()
    store = await Store.open(db_path)  # opening again migrates nothing and loses nothing
    customer = await store.get_customer("abc123")
    await store.close()
    assert customer is not None
    assert customer.device_limit == 3


async def test_a_file_that_is_not_sqlite_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="cannot open store"):
        await Store.open(path)


async def test_customers(any_store: DeviceStore) -> None:
    store = any_store
    await store.add_customer("abc123", 3, actor="test")
    with pytest.raises(ConflictError):
        await store.add_customer("abc123", 5, actor="test")
    await store.set_device_limit("abc123", 7, actor="test")
    with pytest.raises(NotFoundError):
        await store.set_device_limit("nobody", 7, actor="test")
    [customer] = await store.list_customers()
    assert (customer.customer_id, customer.device_limit) == ("abc123", 7)


async def test_revoke_and_reset(any_store: DeviceStore) -> None:
    store = any_store
    await store.add_customer("abc123", 3, actor="test")
    with pytest.raises(NotFoundError):
        await store.revoke_device(NAME, actor="test")
    with pytest.raises(NotFoundError):
        await store.reset_device(NAME, actor="test")
    await store.register_device(NAME, b"$2b$06$hash", ttl_s=60, actor="test")
    device = await store.revoke_device(NAME, actor="test")
    assert device.state is DeviceState.REVOKED
    assert device.password_hash is None
    again = await store.revoke_device(NAME, actor="test")  # idempotent, not audited twice
    assert again == device
    await store.reset_device(NAME, actor="test")
    assert await store.get_device(NAME) is None
    actions = [e.action for e in reversed(await store.audit_entries(subject=str(NAME)))]
    assert actions == ["device.register", "device.revoke", "device.reset"]


async def test_two_connections_share_the_file(db_path: Path) -> None:
    """The CLI and a running platform each open the file: both see each other's writes."""
    first = await Store.open(db_path)
    second = await Store.open(db_path)
    try:
        await first.add_customer("abc123", 3, actor="platform")
        await second.set_device_limit("abc123", 9, actor="cli")
        customer = await first.get_customer("abc123")
        assert customer is not None
        assert customer.device_limit == 9
    finally:
        await first.close()
        await second.close()


async def test_a_version_2_store_migrates_with_its_devices(tmp_path: Path) -> None:
    """Schema 3 (commands, tags, history) on top of a store written by the previous release."""
    from iotbiz.store import MIGRATIONS
    from iotbiz.store.schema import statements

    path = tmp_path / "v2.db"
    with sqlite3.connect(path) as raw:
        for script in MIGRATIONS[:2]:
            for statement in statements(script):
                raw.execute(statement)
        raw.execute("PRAGMA user_version = 2")
        raw.execute("INSERT INTO customers VALUES ('abc123', 5, 1.0)")
        raw.execute(
            "INSERT INTO devices (customer_id, device_id, state, created_at)"
            " VALUES ('abc123', 'dev-1', 'active', 1.0)"
        )
    store = await Store.open(path)
    try:
        assert await store.schema_version() == SCHEMA_VERSION
        page, total = await store.find_devices(customer_id="abc123")
        assert (total, page[0].device_id, page[0].tags) == (1, "dev-1", {})
        assert await store.set_tags(NAME, {"site": "x"}, actor="test") == {"site": "x"}
    finally:
        await store.close()
