"""The PostgreSQL store's schema: its own forward migrations, versioned in `schema_migrations`.

MIGRATIONS[n] takes the database from version n to n + 1 (version 1 is the SQLite schema's
version 6, translated: the PostgreSQL store starts there; version 2 is SQLite's 7; version 3 adds
this backend's own columns, POSTGRES_ONLY_COLUMNS; a test checks that both schemas have the same
tables and columns, but for those). They are applied at open under an advisory
lock, each in its own transaction with its row in `schema_migrations`, so that processes
opening a new database together migrate it once: the others wait for the lock (bounded), then
find nothing to do. A migration is only ever appended, never changed.

Names and keys are TEXT COLLATE "C": ordered by their bytes, as SQLite orders them, whatever the
database's locale (with en_US, "a-2" would sort before "a_1"; the lists and the keyset paging
must agree with the SQLite store).
"""

from __future__ import annotations

import logging
import time

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type hints

from iotbiz.errors import StoreError

log = logging.getLogger(__name__)

# pg_advisory_lock key of the migrations: any constant of this application's own
MIGRATION_LOCK = 0x10_7B12_0001
LOCK_TIMEOUT_S = 30.0

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE customers (
        customer_id   TEXT COLLATE "C" PRIMARY KEY,
        device_limit  INTEGER NOT NULL CHECK (device_limit >= 0),
        created_at    DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE devices (
        customer_id         TEXT COLLATE "C" NOT NULL REFERENCES customers (customer_id),
        device_id           TEXT COLLATE "C" NOT NULL,
        state               TEXT NOT NULL CHECK (state IN ('pending', 'active', 'revoked')),
        password_hash       TEXT,
        pending_expires_at  DOUBLE PRECISION,
        created_at          DOUBLE PRECISION NOT NULL,
        activated_at        DOUBLE PRECISION,
        revoked_at          DOUBLE PRECISION,
        online              INTEGER NOT NULL DEFAULT 0,
        last_seen_at        DOUBLE PRECISION,
        last_status         TEXT,
        last_telemetry      TEXT,
        PRIMARY KEY (customer_id, device_id)
    );
    CREATE INDEX devices_by_presence ON devices (customer_id, state, online);
    CREATE TABLE audit_log (
        entry_id  BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        at        DOUBLE PRECISION NOT NULL,
        actor     TEXT NOT NULL,
        action    TEXT NOT NULL,
        subject   TEXT COLLATE "C" NOT NULL,
        detail    TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX audit_by_subject ON audit_log (subject, entry_id);
    CREATE TABLE accounts (
        name           TEXT COLLATE "C" PRIMARY KEY,
        password_hash  TEXT NOT NULL,
        superuser      INTEGER NOT NULL DEFAULT 0,
        created_at     DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE device_tags (
        customer_id  TEXT COLLATE "C" NOT NULL,
        device_id    TEXT COLLATE "C" NOT NULL,
        key          TEXT COLLATE "C" NOT NULL,
        value        TEXT NOT NULL,
        PRIMARY KEY (customer_id, device_id, key),
        FOREIGN KEY (customer_id, device_id) REFERENCES devices (customer_id, device_id)
            ON DELETE CASCADE
    );
    CREATE INDEX device_tags_by_value ON device_tags (key, value);
    CREATE TABLE commands (
        command_id   TEXT COLLATE "C" PRIMARY KEY,
        customer_id  TEXT COLLATE "C" NOT NULL,
        device_id    TEXT COLLATE "C" NOT NULL,
        batch_id     TEXT COLLATE "C" NOT NULL,
        action       TEXT NOT NULL,
        args         TEXT NOT NULL DEFAULT '{}',
        state        TEXT NOT NULL
            CHECK (state IN ('queued', 'sent', 'done', 'failed', 'expired')),
        created_at   DOUBLE PRECISION NOT NULL,
        expires_at   DOUBLE PRECISION NOT NULL,
        sent_at      DOUBLE PRECISION,
        done_at      DOUBLE PRECISION,
        result       TEXT,
        error        TEXT,
        actor        TEXT NOT NULL
    );
    CREATE INDEX commands_by_time ON commands (created_at, command_id);
    CREATE INDEX commands_by_device ON commands (customer_id, device_id, created_at);
    CREATE INDEX commands_by_batch ON commands (batch_id);
    CREATE INDEX commands_open ON commands (expires_at) WHERE state IN ('queued', 'sent');
    CREATE INDEX commands_by_state ON commands (state);
    CREATE TABLE telemetry_samples (
        customer_id     TEXT COLLATE "C" NOT NULL,
        device_id       TEXT COLLATE "C" NOT NULL,
        at              DOUBLE PRECISION NOT NULL,
        cpu_percent     DOUBLE PRECISION,
        memory_percent  DOUBLE PRECISION,
        disk_percent    DOUBLE PRECISION,
        load_1          DOUBLE PRECISION,
        temperature_c   DOUBLE PRECISION,
        net_rx_bytes    BIGINT,
        net_tx_bytes    BIGINT,
        PRIMARY KEY (customer_id, device_id, at),
        FOREIGN KEY (customer_id, device_id) REFERENCES devices (customer_id, device_id)
            ON DELETE CASCADE
    );
    CREATE TABLE device_events (
        event_id     BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        customer_id  TEXT COLLATE "C" NOT NULL,
        device_id    TEXT COLLATE "C" NOT NULL,
        at           DOUBLE PRECISION NOT NULL,
        body         TEXT NOT NULL,
        FOREIGN KEY (customer_id, device_id) REFERENCES devices (customer_id, device_id)
            ON DELETE CASCADE
    );
    CREATE INDEX device_events_by_device ON device_events (customer_id, device_id, event_id);
    CREATE INDEX device_events_by_customer ON device_events (customer_id, event_id);
    CREATE TABLE releases (
        app         TEXT COLLATE "C" NOT NULL,
        version     TEXT COLLATE "C" NOT NULL,
        sha256      TEXT NOT NULL,
        size        BIGINT NOT NULL CHECK (size >= 0),
        signature   TEXT,
        created_at  DOUBLE PRECISION NOT NULL,
        actor       TEXT NOT NULL,
        PRIMARY KEY (app, version)
    );
    CREATE TABLE release_offers (
        customer_id  TEXT COLLATE "C" NOT NULL,
        device_id    TEXT COLLATE "C" NOT NULL,
        app          TEXT COLLATE "C" NOT NULL,
        version      TEXT COLLATE "C" NOT NULL,
        offered_at   DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (customer_id, device_id, app, version),
        FOREIGN KEY (customer_id, device_id) REFERENCES devices (customer_id, device_id)
            ON DELETE CASCADE,
        FOREIGN KEY (app, version) REFERENCES releases (app, version) ON DELETE CASCADE
    );
    CREATE INDEX release_offers_by_release ON release_offers (app, version);
    """,
    # 2: staged rollouts (the SQLite schema's version 7)
    """
    CREATE TABLE rollouts (
        rollout_id    TEXT COLLATE "C" PRIMARY KEY,
        app           TEXT COLLATE "C" NOT NULL,
        version       TEXT COLLATE "C" NOT NULL,
        state         TEXT NOT NULL
            CHECK (state IN ('running', 'completed', 'stopped', 'aborted')),
        reason        TEXT,
        batch_size    INTEGER NOT NULL CHECK (batch_size >= 1),
        max_failures  INTEGER NOT NULL CHECK (max_failures >= 0),
        timeout_s     DOUBLE PRECISION NOT NULL,
        force         INTEGER NOT NULL,
        created_at    DOUBLE PRECISION NOT NULL,
        finished_at   DOUBLE PRECISION,
        actor         TEXT NOT NULL,
        total         INTEGER NOT NULL,
        batch         INTEGER NOT NULL DEFAULT -1
    );
    CREATE INDEX rollouts_by_time ON rollouts (created_at, rollout_id);
    CREATE INDEX rollouts_by_state ON rollouts (state);
    CREATE TABLE rollout_devices (
        rollout_id   TEXT COLLATE "C" NOT NULL REFERENCES rollouts (rollout_id) ON DELETE CASCADE,
        position     INTEGER NOT NULL,
        customer_id  TEXT COLLATE "C" NOT NULL,
        device_id    TEXT COLLATE "C" NOT NULL,
        batch        INTEGER NOT NULL,
        result       TEXT NOT NULL
            CHECK (result IN ('waiting', 'updating', 'committed', 'failed', 'skipped')),
        reason       TEXT,
        command_id   TEXT COLLATE "C",
        PRIMARY KEY (rollout_id, position)
    );
    CREATE INDEX rollout_devices_by_result ON rollout_devices (rollout_id, result, batch);
    CREATE INDEX rollout_devices_updating ON rollout_devices (rollout_id)
        WHERE result = 'updating';
    """,
    # 3: when a dispatcher (of any process sharing the database) last took a command to publish
    # it, by a scan or when its device came online (iotbiz/store/postgres/commands.py): this
    # backend's own columns, never in a Command; SQLite's single writer needs none
    """
    ALTER TABLE commands ADD COLUMN scan_taken_at DOUBLE PRECISION,
        ADD COLUMN due_taken_at DOUBLE PRECISION;
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)
# columns the SQLite schema does not have (the schemas test allows exactly these)
POSTGRES_ONLY_COLUMNS = {"commands": ("scan_taken_at", "due_taken_at")}


async def migrate(conn: asyncpg.Connection) -> None:
    """Bring the schema to SCHEMA_VERSION, once, under the migrations' advisory lock."""
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK, timeout=LOCK_TIMEOUT_S)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations"
            " (version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
        )
        version = int(
            await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations")
        )
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the store has schema version {version}, newer than this IoTBiz understands "
                f"({SCHEMA_VERSION}); upgrade IoTBiz"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            log.info("migrating the store to schema version %d", target)
            async with conn.transaction():
                await conn.execute(MIGRATIONS[target - 1])
                await conn.execute(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
                    target,
                    time.time(),
                )
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
