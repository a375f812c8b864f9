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
    # 3: commands, device tags, telemetry history and device events (issue 9). Sized for 10,000
    # devices: the fleet list filters from an index holding (customer_id, state, online) and the
    # key; tags are found through their primary key (one probe per device) or by value; samples
    # are stored in their primary key's b-tree alone (no rowid, no second index), pruned per
    # device through it; only open commands are in the dispatcher's partial index.
    """
    DROP INDEX devices_by_state;
    CREATE INDEX devices_by_presence ON devices (customer_id, state, online);
    CREATE TABLE device_tags (
        customer_id  TEXT NOT NULL,
        device_id    TEXT NOT NULL,
        key          TEXT NOT NULL,
        value        TEXT NOT NULL,
        PRIMARY KEY (customer_id, device_id, key),
        FOREIGN KEY (customer_id, device_id) REFERENCES devices (customer_id, device_id)
            ON DELETE CASCADE
    ) WITHOUT ROWID;
    CREATE INDEX device_tags_by_value ON device_tags (key, value);
    CREATE TABLE commands (
        command_id   TEXT PRIMARY KEY,
        customer_id  TEXT NOT NULL,
        device_id    TEXT NOT NULL,
        batch_id     TEXT NOT NULL,
        action       TEXT NOT NULL,
        args         TEXT NOT NULL DEFAULT '{}',
        state        TEXT NOT NULL
            CHECK (state IN ('queued', 'sent', 'done', 'failed', 'expired')),
        created_at   REAL NOT NULL,
        expires_at   REAL NOT NULL,
        sent_at      REAL,
        done_at      REAL,
        result       TEXT,
        error        TEXT,
        actor        TEXT NOT NULL
    );
    CREATE INDEX commands_by_time ON commands (created_at, command_id);
    CREATE INDEX commands_by_device ON commands (customer_id, device_id, created_at);
    CREATE INDEX commands_by_batch ON commands (batch_id);
    CREATE INDEX commands_open ON commands (expires_at) WHERE state IN ('queued', 'sent');
    CREATE TABLE telemetry_samples (
        customer_id     TEXT NOT NULL,
        device_id       TEXT NOT NULL,
        at              REAL NOT NULL,
        cpu_percent     REAL,
        memory_percent  REAL,
        disk_percent    REAL,
        load_1          REAL,
        temperature_c   REAL,
        net_rx_bytes    INTEGER,
        net_tx_bytes    INTEGER,
        PRIMARY KEY (customer_id, device_id, at),
        FOREIGN KEY (customer_id, device_id) REFERENCES devices (customer_id, device_id)
            ON DELETE CASCADE
    ) WITHOUT ROWID;
    CREATE TABLE device_events (
        event_id     INTEGER PRIMARY KEY AUTOINCREMENT,
        customer_id  TEXT NOT NULL,
        device_id    TEXT NOT NULL,
        at           REAL NOT NULL,
        body         TEXT NOT NULL,
        FOREIGN KEY (customer_id, device_id) REFERENCES devices (customer_id, device_id)
            ON DELETE CASCADE
    );
    CREATE INDEX device_events_by_device ON device_events (customer_id, device_id, event_id);
    CREATE INDEX device_events_by_customer ON device_events (customer_id, event_id);
    """,
    # 4: commands counted by state (for /metrics) from an index, not a scan of the table
    """
    CREATE INDEX commands_by_state ON commands (state);
    """,
    # 5: one subject's audit entries, newest first and paged by id, from an index
    """
    CREATE INDEX audit_by_subject ON audit_log (subject, entry_id);
    """,
    # 6: application releases (their artifacts are files beside the store: iotbiz.releases) and
    # which device may download which (an update command offered it)
    """
    CREATE TABLE releases (
        app         TEXT NOT NULL,
        version     TEXT NOT NULL,
        sha256      TEXT NOT NULL,
        size        INTEGER NOT NULL CHECK (size >= 0),
        signature   TEXT,
        created_at  REAL NOT NULL,
        actor       TEXT NOT NULL,
        PRIMARY KEY (app, version)
    ) WITHOUT ROWID;
    CREATE TABLE release_offers (
        customer_id  TEXT NOT NULL,
        device_id    TEXT NOT NULL,
        app          TEXT NOT NULL,
        version      TEXT NOT NULL,
        offered_at   REAL NOT NULL,
        PRIMARY KEY (customer_id, device_id, app, version),
        FOREIGN KEY (customer_id, device_id) REFERENCES devices (customer_id, device_id)
            ON DELETE CASCADE,
        FOREIGN KEY (app, version) REFERENCES releases (app, version) ON DELETE CASCADE
    ) WITHOUT ROWID;
    CREATE INDEX release_offers_by_release ON release_offers (app, version);
    """,
    # 7: staged rollouts (iotbiz.rollouts): one release to a fixed, ordered list of devices in
    # batches; each device's update command is linked to it when its batch starts
    """
    CREATE TABLE rollouts (
        rollout_id    TEXT PRIMARY KEY,
        app           TEXT NOT NULL,
        version       TEXT NOT NULL,
        state         TEXT NOT NULL
            CHECK (state IN ('running', 'completed', 'stopped', 'aborted')),
        reason        TEXT,
        batch_size    INTEGER NOT NULL CHECK (batch_size >= 1),
        max_failures  INTEGER NOT NULL CHECK (max_failures >= 0),
        timeout_s     REAL NOT NULL,
        force         INTEGER NOT NULL,
        created_at    REAL NOT NULL,
        finished_at   REAL,
        actor         TEXT NOT NULL,
        total         INTEGER NOT NULL,
        batch         INTEGER NOT NULL DEFAULT -1
    );
    CREATE INDEX rollouts_by_time ON rollouts (created_at, rollout_id);
    CREATE INDEX rollouts_by_state ON rollouts (state);
    CREATE TABLE rollout_devices (
        rollout_id   TEXT NOT NULL REFERENCES rollouts (rollout_id) ON DELETE CASCADE,
        position     INTEGER NOT NULL,
        customer_id  TEXT NOT NULL,
        device_id    TEXT NOT NULL,
        batch        INTEGER NOT NULL,
        result       TEXT NOT NULL
            CHECK (result IN ('waiting', 'updating', 'committed', 'failed', 'skipped')),
        reason       TEXT,
        command_id   TEXT,
        PRIMARY KEY (rollout_id, position)
    ) WITHOUT ROWID;
    CREATE INDEX rollout_devices_by_result ON rollout_devices (rollout_id, result, batch);
    CREATE INDEX rollout_devices_updating ON rollout_devices (rollout_id) WHERE result = 'updating';
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
