"""The store: customers, devices, commands, telemetry history and the audit log in one SQLite file.

This package is the only code that speaks SQL. One connection (aiosqlite runs it in its own
thread) in WAL mode, so the operator CLI and a running platform can use the same file at once;
every write is one `BEGIN IMMEDIATE` transaction, serialised in-process by a lock and across
processes by SQLite (with a busy timeout). The schema is versioned with `PRAGMA user_version` and
migrated forward on open (`schema`): the version is read and the missing migrations applied in
one write transaction, so that processes opening a new file together migrate it once.

Errors: every driver error (sqlite3.Error: a full disk, a locked or corrupt file) and every use of
a closed store comes out as a StoreError whose message names the store, with the driver's error as
its cause; a transaction whose statements or COMMIT fail is rolled back.

Each operation is one plain function over the `sqlite3.Connection`, sent to aiosqlite's thread as
a single call: the transaction and all its statements run there in one go. Going through
aiosqlite statement by statement cost about four thread round trips per query (cursor, execute,
fetch, close), about 50 per device enrollment, and each round trip waits for the event loop and
the thread to be scheduled: under an enrollment storm a one-row read took 4 ms.

Modules: `core` (the connection, `_call`/`_write`, errors), `schema` (migrations), and one mixin
per concern, combined into `Store`: `devices` (customers, devices, presence), `fleet` (the
filtered, paged fleet list; tags), `commands` (the command life cycle, see its docstring),
`history` (telemetry samples and device events, their retention policy), `accounts` (operator
accounts, the audit log), `releases` (application releases and their offers to devices),
`rollouts` (staged rollouts of a release, batch by batch).

`postgres`: the same store on PostgreSQL (asyncpg), every operation; the platform and the CLI
open it when `store.url` is set (`opening`). `interface` has the operations of both backends as
Protocols (`DeviceStore`, `CommandOperations`, `HistoryOperations`, `RolloutOperations`, and
all of them: `PlatformStore`), checked by mypy. `leader`: the leader lock.
"""

from __future__ import annotations

from iotbiz.store.accounts import AccountOperations
from iotbiz.store.commands import CommandOperations
from iotbiz.store.core import BUSY_TIMEOUT_MS, Clock
from iotbiz.store.devices import DeviceOperations
from iotbiz.store.fleet import FleetOperations
from iotbiz.store.history import HistoryOperations
from iotbiz.store.releases import Release, ReleaseOperations
from iotbiz.store.rollouts import Rollout, RolloutDevice, RolloutOperations
from iotbiz.store.schema import MIGRATIONS, SCHEMA_VERSION

__all__ = [
    "BUSY_TIMEOUT_MS",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "Clock",
    "Release",
    "Rollout",
    "RolloutDevice",
    "Store",
]


class Store(
    DeviceOperations,
    FleetOperations,
    CommandOperations,
    HistoryOperations,
    AccountOperations,
    ReleaseOperations,
    RolloutOperations,
):
    """Async access to the SQLite store. Open with `await Store.open(path)`, close when done."""
