"""The store's schema: forward migrations, applied at open.

MIGRATIONS[n] takes a database from schema version n (`PRAGMA user_version`) to n + 1. The
version is read and the missing migrations applied in one write transaction, so that processes
opening a new file together migrate it once. A migration is only ever appended, never changed.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from typing import Any

from iotbiz.errors import StoreError

log = logging.getLogger(__name__)

Transact = Callable[[Callable[[sqlite3.Connection], Any]], Any]

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE customers (
        customer_id   TEXT PRIMARY KEY,
        device_limit  INTEGER NOT NULL CHECK (device_limit >= 0),
        created_at    REAL NOT NULL
    );
    CREATE TABLE devices (
        customer_id         TEXT NOT NULL REFERENCES customers (customer_id),
        device_id           TEXT NOT NULL,
        state               TEXT NOT NULL CHECK (state IN ('pending', 'active', 'revoked')),
        password_hash       TEXT,
        pending_expires_at  REAL,
        created_at          REAL NOT NULL,
        activated_at        REAL,
        revoked_at          REAL,
        online              INTEGER NOT NULL DEFAULT 0,
        last_seen_at        REAL,
        last_status         TEXT,
        last_telemetry      TEXT,
        PRIMARY KEY (customer_id, device_id)
    ) WITHOUT ROWID;
    CREATE INDEX devices_by_state ON devices (customer_id, state);
    CREATE TABLE audit_log (
        entry_id  INTEGER PRIMARY KEY AUTOINCREMENT,
        at        REAL NOT NULL,
        actor     TEXT NOT NULL,
        action    TEXT NOT NULL,
        subject   TEXT NOT NULL,
        detail    TEXT NOT NULL DEFAULT '{}'
    );
    """,
    # 2: operator accounts for MQTT (the platform's own service account lives in memory only)
    """
    CREATE TABLE accounts (
        name           TEXT PRIMARY KEY,
        password_hash  TEXT NOT NULL,
        superuser      INTEGER NOT NULL DEFAULT 0,
        created_at     REAL NOT NULL
    );
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


def migrate(conn: sqlite3.Connection, transact: Transact) -> None:
    """Bring the schema to SCHEMA_VERSION: the version is read, and every missing migration
    applied, in one write transaction (`transact`), so that two processes opening a new file at
    once cannot both migrate it (one waits for the other's COMMIT, then finds nothing to do)."""
    if _schema_version(conn) == SCHEMA_VERSION:
        return  # the common case, without the write lock (versions only ever grow)
    transact(_apply_migrations)


def _apply_migrations(conn: sqlite3.Connection) -> None:
    version = _schema_version(conn)
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"the store has schema version {version}, newer than this IoTBiz understands "
            f"({SCHEMA_VERSION}); upgrade IoTBiz"
        )
    for target in range(version + 1, SCHEMA_VERSION + 1):
        log.info("migrating the store to schema version %d", target)
        # Statement by statement: `executescript` would COMMIT the transaction on its own.
        for statement in statements(MIGRATIONS[target - 1]):
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {target}")


def _schema_version(conn: sqlite3.Connection) -> int:
    row = conn.execute("PRAGMA user_version").fetchone()
    return int(row[0])


def statements(script: str) -> list[str]:
    """Split a migration into its statements (`;` inside a string or a trigger body is kept)."""
    found, pending = [], ""
    for part in script.split(";"):
        pending += part + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                found.append(pending.strip())
            pending = ""
    if pending.strip(" \n;"):
        raise StoreError(f"incomplete statement in a migration: {pending.strip()!r}")
    return found
