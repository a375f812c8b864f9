"""Customers, devices and registration on both backends (SQLite and PostgreSQL), and the
PostgreSQL store's own guarantees: migrations once under concurrency, errors without the
password, the device limit race-free across separate connection pools (as across processes)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import asyncpg
import pytest

from iotbiz.errors import ConflictError, NotFoundError, RegistrationRefused, StoreError
from iotbiz.models import Account, DeviceState
from iotbiz.names import DeviceName
from iotbiz.store import Store
from iotbiz.store.interface import DeviceStore
from iotbiz.store.postgres import SCHEMA_VERSION, PostgresStore
from iotbiz.store.postgres.schema import POSTGRES_ONLY_COLUMNS
from tests.conftest import FakeClock
from tests.services.postgres import PostgresServer

pytestmark = pytest.mark.timeout(60)

HASH = b"$2b$06$hash"
OTHER_HASH = b"$2b$06$other"
NAME = DeviceName("abc123", "dev-1")


async def test_register_and_activate(any_store: DeviceStore, clock: FakeClock) -> None:
    store = any_store
    with pytest.raises(RegistrationRefused, match="unknown customer"):
        await store.register_device(NAME, HASH, ttl_s=60, actor="test")
    await store.add_customer("abc123", 2, actor="test")
    pending = await store.register_device(NAME, HASH, ttl_s=60, actor="test")
    assert pending.state is DeviceState.PENDING
    assert pending.pending_expires_at == clock.now + 60
    assert pending.tags == {}
    # a lost response: registering again renews, with the new hash; the old one cannot activate
    await store.register_device(NAME, OTHER_HASH, ttl_s=60, actor="test")
    assert not await store.activate_device(NAME, HASH, actor="test")
    assert await store.activate_device(NAME, OTHER_HASH, actor="test")
    device = await store.get_device(NAME)
    assert device is not None
    assert (device.state, device.activated_at, device.password_hash) == (
        DeviceState.ACTIVE,
        clock.now,
        OTHER_HASH,
    )
    with pytest.raises(RegistrationRefused, match="device already activated"):
        await store.check_registration(NAME)
    with pytest.raises(RegistrationRefused, match="device already activated"):
        await store.register_device(NAME, HASH, ttl_s=60, actor="test")
    customer = await store.get_customer("abc123")
    assert customer is not None
    assert (customer.active_devices, customer.pending_devices) == (1, 0)
    assert await store.get_customer("nobody") is None


async def test_the_limit_counts_active_and_unexpired_pending(
    any_store: DeviceStore, clock: FakeClock
) -> None:
    store = any_store
    await store.add_customer("abc123", 2, actor="test")
    first, second, third = (DeviceName("abc123", f"dev-{i}") for i in range(3))
    await store.register_device(first, HASH, ttl_s=60, actor="test")
    await store.register_device(second, HASH, ttl_s=10, actor="test")
    with pytest.raises(RegistrationRefused, match="device limit reached"):
        await store.check_registration(third)
    with pytest.raises(RegistrationRefused, match="device limit reached"):
        await store.register_device(third, HASH, ttl_s=60, actor="test")
    clock.advance(11)  # the second's registration expired: its slot is free again
    assert not await store.activate_device(second, HASH, actor="test")
    await store.register_device(third, HASH, ttl_s=60, actor="test")
    [customer] = await store.list_customers()
    assert (customer.active_devices, customer.pending_devices) == (0, 2)
    devices = await store.list_devices("abc123")
    assert [d.device_id for d in devices] == ["dev-0", "dev-1", "dev-2"]
    assert await store.list_devices("nobody") == []
    await store.add_customer("zzz999", 1, actor="test")
    await store.register_device(DeviceName("zzz999", "a"), HASH, ttl_s=60, actor="test")
    assert [d.name for d in await store.list_devices()] == [
        "abc123/dev-0",
        "abc123/dev-1",
        "abc123/dev-2",
        "zzz999/a",
    ]


async def test_concurrent_registrations_never_exceed_the_limit(any_store: DeviceStore) -> None:
    store = any_store
    await store.add_customer("abc123", 10, actor="test")
    results = await asyncio.gather(
        *(
            store.register_device(DeviceName("abc123", f"d{i}"), HASH, ttl_s=60, actor="test")
            for i in range(50)
        ),
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, RegistrationRefused)]
    assert len(refused) == 40
    assert {str(r) for r in refused} == {"device limit reached"}
    assert len(await store.list_devices("abc123")) == 10


# -- PostgreSQL only ----------------------------------------------------------------------------


async def test_two_pools_on_one_database_keep_the_limit(
    postgres_url: str, clock: FakeClock
) -> None:
    """Two stores with their own pools (as two platform processes have): 50 registrations split
    over them against a limit of 10 create exactly 10."""
    one, two = await asyncio.gather(
        PostgresStore.open(postgres_url, clock=clock), PostgresStore.open(postgres_url, clock=clock)
    )
    try:
        await one.add_customer("abc123", 10, actor="test")
        results = await asyncio.gather(
            *(
                (one if i % 2 else two).register_device(
                    DeviceName("abc123", f"d{i}"), HASH, ttl_s=60, actor="test"
                )
                for i in range(50)
            ),
            return_exceptions=True,
        )
        created = [r for r in results if not isinstance(r, BaseException)]
        refused = [r for r in results if isinstance(r, RegistrationRefused)]
        assert (len(created), len(refused)) == (10, 40)
        assert len(await two.list_devices("abc123")) == 10
    finally:
        await one.close()
        await two.close()


async def test_processes_opening_a_new_database_together_migrate_it_once(
    postgres_url: str,
) -> None:
    stores = await asyncio.gather(*(PostgresStore.open(postgres_url) for _ in range(4)))
    try:
        assert [await s.schema_version() for s in stores] == [SCHEMA_VERSION] * 4
    finally:
        for store in stores:
            await store.close()
    conn = await asyncpg.connect(postgres_url, timeout=10)
    try:
        versions = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
        assert [r["version"] for r in versions] == list(range(1, SCHEMA_VERSION + 1))
    finally:
        await conn.close()
    again = await PostgresStore.open(postgres_url)  # nothing to migrate, nothing lost
    await again.close()


async def test_migrations_keep_data(postgres_url: str) -> None:
    store = await PostgresStore.open(postgres_url)
    await store.add_customer("abc123", 3, actor="test")
    await store.close()
    store = await PostgresStore.open(postgres_url)
    try:
        customer = await store.get_customer("abc123")
        assert customer is not None
        assert customer.device_limit == 3
    finally:
        await store.close()


async def test_a_newer_schema_is_refused(postgres_url: str) -> None:
    store = await PostgresStore.open(postgres_url)
    await store.close()
    conn = await asyncpg.connect(postgres_url, timeout=10)
    try:
        await conn.execute("INSERT INTO schema_migrations VALUES ($1, 0)", SCHEMA_VERSION + 1)
    finally:
        await conn.close()
    with pytest.raises(StoreError, match="newer than this IoTBiz understands"):
        await PostgresStore.open(postgres_url)


async def test_errors_name_the_store_without_its_password(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    wrong = postgres_url.replace(postgres_server.password, "not-the-password")
    with pytest.raises(StoreError) as refused:
        await PostgresStore.open(wrong)
    message = str(refused.value)
    assert message.startswith(
        f"cannot open store postgresql://iotbiz_test@127.0.0.1:{postgres_server.port}/"
    )
    assert "password authentication failed" in message
    assert "not-the-password" not in message
    assert refused.value.__cause__ is None  # the driver's error may hold the URL

    store = await PostgresStore.open(postgres_url)
    await store.close()
    with pytest.raises(StoreError, match="is closed") as closed:
        await store.get_customer("abc123")
    assert postgres_server.password not in str(closed.value)


async def test_nothing_listening_is_a_store_error(postgres_server: PostgresServer) -> None:
    from tests.services.postgres import free_port

    url = f"postgresql://u:secret@127.0.0.1:{free_port()}/db"
    with pytest.raises(StoreError, match=r"cannot open store postgresql://u@127\.0\.0\.1:\d+/db: "):
        await PostgresStore.open(url)


async def test_a_customer_twice_is_a_conflict_and_rolls_back(postgres_url: str) -> None:
    store = await PostgresStore.open(postgres_url)
    try:
        await store.add_customer("abc123", 3, actor="test")
        with pytest.raises(ConflictError, match="customer abc123 exists already"):
            await store.add_customer("abc123", 5, actor="test")
        conn = await asyncpg.connect(postgres_url, timeout=10)
        try:
            # the failed transaction left no audit entry behind
            assert await conn.fetchval("SELECT count(*) FROM audit_log") == 1
        finally:
            await conn.close()
    finally:
        await store.close()


async def test_both_schemas_have_the_same_tables_and_columns(
    postgres_url: str, tmp_path: Path
) -> None:
    """A migration added to one backend and not the other fails here (the PostgreSQL store's
    own columns are named in POSTGRES_ONLY_COLUMNS)."""
    sqlite_store = await Store.open(tmp_path / "s.db")
    await sqlite_store.close()
    with sqlite3.connect(tmp_path / "s.db") as raw:
        tables = [r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        sqlite_columns = {
            table: [r[1] for r in raw.execute(f"PRAGMA table_info({table})")]
            for table in tables
            if table != "sqlite_sequence"
        }
    store = await PostgresStore.open(postgres_url)
    await store.close()
    conn = await asyncpg.connect(postgres_url, timeout=10)
    try:
        rows = await conn.fetch(
            "SELECT table_name, column_name FROM information_schema.columns"
            " WHERE table_schema = 'public' AND table_name != 'schema_migrations'"
            " ORDER BY table_name, ordinal_position"
        )
    finally:
        await conn.close()
    postgres_columns: dict[str, list[str]] = {}
    for row in rows:
        postgres_columns.setdefault(row["table_name"], []).append(row["column_name"])
    # ... but for the PostgreSQL store's own columns, which SQLite's single writer needs not
    for table, columns in POSTGRES_ONLY_COLUMNS.items():
        assert postgres_columns[table][-len(columns) :] == list(columns)
        del postgres_columns[table][-len(columns) :]
    assert postgres_columns == sqlite_columns


async def test_accounts_and_the_audit_log(any_store: DeviceStore, clock: FakeClock) -> None:
    store = any_store
    assert await store.latest_change() == 0
    account = await store.add_account("ops", HASH, superuser=True, actor="admin")
    assert account.superuser
    with pytest.raises(ConflictError, match="account ops exists already"):
        await store.add_account("ops", HASH, superuser=False, actor="admin")
    await store.add_account("bob", OTHER_HASH, superuser=False, actor="admin")
    assert [a.name for a in await store.list_accounts()] == ["bob", "ops"]
    assert await store.get_account("bob") == Account("bob", False, clock.now, OTHER_HASH)
    assert await store.get_account("nobody") is None
    await store.remove_account("bob", actor="admin")
    with pytest.raises(NotFoundError, match="no account bob"):
        await store.remove_account("bob", actor="admin")
    await store.audit_refusals([("device.refused", "abc123/x", "1.2.3.4", {"why": "limit"})])
    newest = await store.latest_change()
    entries = await store.audit_entries()
    assert [(e.action, e.subject) for e in entries] == [
        ("device.refused", "abc123/x"),
        ("account.remove", "bob"),
        ("account.add", "bob"),
        ("account.add", "ops"),
    ]
    assert entries[0].entry_id == newest
    assert entries[0].detail == {"why": "limit"}
    assert entries[-1].detail == {"superuser": True}
    [older] = await store.audit_entries(limit=1, before=entries[1].entry_id)
    assert older == entries[2]
    assert [e.action for e in await store.audit_entries(subject="bob")] == [
        "account.remove",
        "account.add",
    ]
    since = await store.changes_since(entries[2].entry_id)
    assert [e.action for e in since] == ["account.remove", "device.refused"]
    assert await store.changes_since(newest) == []


async def test_mark_all_offline(any_store: DeviceStore) -> None:
    store = any_store
    await store.add_customer("abc123", 2, actor="test")
    await store.register_device(NAME, HASH, ttl_s=60, actor="test")
    await store.mark_all_offline()  # nothing online: nothing happens, nothing fails
    device = await store.get_device(NAME)
    assert device is not None
    assert not device.online


async def test_revoke_and_reset_fail_open_commands_on_postgresql(postgres_url: str) -> None:
    # (commands in each state, written directly; tests/test_store_commands.py has the rest)
    store = await PostgresStore.open(postgres_url)
    conn = await asyncpg.connect(postgres_url, timeout=10)
    try:
        await store.add_customer("abc123", 3, actor="test")
        other = DeviceName("abc123", "dev-2")
        for name in (NAME, other):
            await store.register_device(name, HASH, ttl_s=60, actor="test")
            assert await store.activate_device(name, HASH, actor="test")
        for command_id, name, state in (
            ("c1", NAME, "queued"),
            ("c2", NAME, "done"),
            ("c3", other, "sent"),
        ):
            await conn.execute(
                "INSERT INTO commands (command_id, customer_id, device_id, batch_id, action,"
                " state, created_at, expires_at, actor) VALUES ($1, $2, $3, 'b', 'reboot', $4,"
                " 0, 1e12, 'test')",
                command_id,
                name.customer_id,
                name.device_id,
                state,
            )
        await store.revoke_device(NAME, actor="test")
        await store.reset_device(other, actor="test")
        rows = await conn.fetch("SELECT command_id, state, error FROM commands ORDER BY 1")
        assert [tuple(r) for r in rows] == [
            ("c1", "failed", "device revoked"),
            ("c2", "done", None),
            ("c3", "failed", "device reset"),
        ]
    finally:
        await conn.close()
        await store.close()


async def test_names_sort_by_their_bytes_whatever_the_locale(any_store: DeviceStore) -> None:
    # The PostgreSQL test databases collate as ICU en-US, which would sort a, a_1, a-2, B.
    store = any_store
    for customer_id in ("a_1", "B", "a-2", "a"):
        await store.add_customer(customer_id, 1, actor="test")
    assert [c.customer_id for c in await store.list_customers()] == ["B", "a", "a-2", "a_1"]
