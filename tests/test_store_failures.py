"""The store when SQLite fails: every driver error is a StoreError, and a failed write leaves no
transaction open behind it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from iotbiz.errors import StoreError
from iotbiz.store import Store


async def test_a_failed_commit_rolls_back(store: Store) -> None:
    """A COMMIT can fail (here a deferred foreign key; in life a busy or full disk): the
    transaction must end, or every later write fails with "cannot start a transaction within a
    transaction"."""

    def orphan_device(conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA defer_foreign_keys = ON")  # checked at COMMIT, not at INSERT
        conn.execute(
            "INSERT INTO devices (customer_id, device_id, state, created_at)"
            " VALUES ('nobody', 'dev-1', 'pending', 0)"
        )

    with pytest.raises(StoreError, match="FOREIGN KEY constraint failed") as raised:
        await store._write(orphan_device)
    assert isinstance(raised.value.__cause__, sqlite3.IntegrityError)
    await store.add_customer("abc123", 1, actor="test")  # the next write works
    assert [c.customer_id for c in await store.list_customers()] == ["abc123"]
    assert await store.list_devices() == []


async def test_driver_errors_are_store_errors_naming_the_store(store: Store, db_path: Path) -> None:
    with pytest.raises(StoreError, match=f"store {db_path} failed: no such table") as raised:
        await store._call(lambda conn: conn.execute("SELECT * FROM nothing_here").fetchall())
    assert isinstance(raised.value.__cause__, sqlite3.OperationalError)


async def test_a_closed_store_raises_store_error(db_path: Path) -> None:
    store = await Store.open(db_path)
    await store.close()
    await store.close()  # again: nothing happens
    with pytest.raises(StoreError, match="is closed"):
        await store.list_customers()
