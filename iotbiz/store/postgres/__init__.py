"""The store on PostgreSQL (through asyncpg): the same interface as `iotbiz.store.Store`.

Every operation of the SQLite store exists here: `core`, `devices` (presence included),
`fleet`, `commands`, `history`, `accounts`, `releases` and `rollouts`, and the leader lock
(`leader`). The platform and the CLI's store commands open it when `store.url` is set
(`iotbiz.store.opening`). Several processes may share the database: each module's docstring
says how its operations stay race-free across them. Each
concern is one mixin over `PostgresCore`, as on SQLite: an operation is one `_read` or one
`_write` (a transaction on one pooled connection); every driver error comes out as a StoreError
naming the store (its URL without the password). Row -> dataclass conversions are shared with
the SQLite modules (asyncpg.Record and sqlite3.Row both index by column name).
"""

from __future__ import annotations

from iotbiz.store.postgres.accounts import PostgresAccountOperations
from iotbiz.store.postgres.commands import PostgresCommandOperations
from iotbiz.store.postgres.core import PostgresCore, redact
from iotbiz.store.postgres.devices import PostgresDeviceOperations
from iotbiz.store.postgres.fleet import PostgresFleetOperations
from iotbiz.store.postgres.history import PostgresHistoryOperations
from iotbiz.store.postgres.releases import PostgresReleaseOperations
from iotbiz.store.postgres.rollouts import PostgresRolloutOperations
from iotbiz.store.postgres.schema import MIGRATIONS, SCHEMA_VERSION

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "PostgresStore", "redact"]


class PostgresStore(
    PostgresDeviceOperations,
    PostgresFleetOperations,
    PostgresCommandOperations,
    PostgresHistoryOperations,
    PostgresAccountOperations,
    PostgresReleaseOperations,
    PostgresRolloutOperations,
    PostgresCore,
):
    """Async access to a PostgreSQL store. Open with `await PostgresStore.open(url)`."""
