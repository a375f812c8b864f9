"""The store: customers, devices and the audit log in one SQLite file.

This is the only module that speaks SQL. One connection (aiosqlite runs it in its own thread) in
WAL mode, so the operator CLI and a running platform can use the same file at once; every write is
one `BEGIN IMMEDIATE` transaction, serialised in-process by a lock and across processes by SQLite
(with a busy timeout). The schema is versioned with `PRAGMA user_version` and migrated forward on
open: the version is read and the missing migrations applied in one write transaction, so that
processes opening a new file together migrate it once.

Errors: every driver error (sqlite3.Error: a full disk, a locked or corrupt file) and every use of
a closed store comes out as a StoreError whose message names the store, with the driver's error as
its cause; a transaction whose statements or COMMIT fail is rolled back.

Each operation is one plain function over the `sqlite3.Connection`, sent to aiosqlite's thread as
a single call: the transaction and all its statements run there in one go. Going through
aiosqlite statement by statement cost about four thread round trips per query (cursor, execute,
fetch, close), about 50 per device enrollment, and each round trip waits for the event loop and
the thread to be scheduled: under an enrollment storm a one-row read took 4 ms.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Iterable
from contextlib import suppress
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from iotbiz.errors import (
    ConflictError,
    NotFoundError,
    RegistrationRefused,
    StoreError,
    StoreNotFound,
)
from iotbiz.models import Account, AuditEntry, Customer, Device, DeviceState, PresenceUpdate
from iotbiz.names import DeviceName

log = logging.getLogger(__name__)

Clock = Callable[[], float]
BUSY_TIMEOUT_MS = 5000
T = TypeVar("T")
Work = Callable[[sqlite3.Connection], T]

# Forward migrations: MIGRATIONS[n] takes a database from schema version n to n + 1.
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

_DEVICE_COLUMNS = (
    "customer_id, device_id, state, password_hash, pending_expires_at, created_at, activated_at,"
    " revoked_at, online, last_seen_at, last_status, last_telemetry"
)
# Devices that count against a customer's limit: active ones and unexpired pending ones.
_COUNTED = "(state = 'active' OR (state = 'pending' AND pending_expires_at > :now))"


class Store:
    """Async access to the SQLite store. Open with `await Store.open(path)`, close when done."""

    def __init__(self, db: aiosqlite.Connection, path: Path, clock: Clock) -> None:
        self._db = db
        self.path = path
        self._clock = clock
        self._lock = asyncio.Lock()
        self._closed = False

    @classmethod
    async def open(cls, path: Path, *, clock: Clock = time.time, create: bool = True) -> Store:
        """Open and migrate the store at `path`, creating the file (and its folder) if needed.

        With `create=False` a missing file is a StoreNotFound and nothing is created (for
        commands that only read the store).
        """
        try:
            if create:
                await asyncio.to_thread(_create_file, path)
            elif not await asyncio.to_thread(path.is_file):
                raise StoreNotFound(f"no store at {path}")
            # mode=rw: SQLite itself never creates the file (nor its folder) here.
            db = await aiosqlite.connect(
                f"file:{urllib.parse.quote(str(path))}?mode={'rwc' if create else 'rw'}",
                uri=True,
                isolation_level=None,
                timeout=BUSY_TIMEOUT_MS / 1000,
            )
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open store {path}: {exc}") from exc
        store = cls(db, path, clock)
        try:
            await store._call(_prepare)
            await store._call(lambda conn: _migrate(conn, path))
        except StoreError as exc:
            await store.close()
            if isinstance(exc.__cause__, sqlite3.Error):
                raise StoreError(f"cannot open store {path}: {exc.__cause__}") from exc.__cause__
            raise
        return store

    def now(self) -> float:
        """The store's clock (seconds since the epoch); tests may set their own."""
        return self._clock()

    async def close(self) -> None:
        """Close the connection (again: nothing happens); operations after it raise StoreError."""
        async with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                await self._db.close()
            except sqlite3.Error as exc:
                raise StoreError(f"store {self.path} did not close cleanly: {exc}") from exc

    async def _call(self, work: Work[T]) -> T:
        """Run `work(connection)` in aiosqlite's thread, in one call, one operation at a time.

        Every driver error (sqlite3.Error) comes out as a StoreError naming the store, so that
        callers catch one exception. aiosqlite offers no public way to run a function in its
        thread; `_execute` is the method its own statements go through (aiosqlite 0.20 to 0.22,
        bounded in setup.cfg).
        """
        async with self._lock:
            if self._closed:
                raise StoreError(f"store {self.path} is closed")
            result: T = await self._db._execute(_on_connection, self._db, self.path, work)  # type: ignore[no-untyped-call]
            return result

    async def _write(self, work: Work[T]) -> T:
        """Run `work(connection)` as one `BEGIN IMMEDIATE` transaction."""
        return await self._call(lambda conn: _in_transaction(conn, self.path, work))

    async def schema_version(self) -> int:
        return int(await self._call(lambda conn: _scalar(conn, "PRAGMA user_version")))

    async def ping(self) -> None:
        """Raise StoreError unless the store answers a query."""
        await self._call(lambda conn: _scalar(conn, "SELECT 1"))

    # -- customers ------------------------------------------------------------------------------

    async def add_customer(self, customer_id: str, device_limit: int, *, actor: str) -> Customer:
        now = self._clock()

        def add(conn: sqlite3.Connection) -> None:
            try:
                conn.execute(
                    "INSERT INTO customers (customer_id, device_limit, created_at)"
                    " VALUES (?, ?, ?)",
                    (customer_id, device_limit, now),
                )
            except sqlite3.IntegrityError as exc:
                raise ConflictError(f"customer {customer_id} exists already") from exc
            _audit(conn, now, actor, "customer.add", customer_id, {"limit": device_limit})

        await self._write(add)
        return Customer(customer_id, device_limit, now)

    async def set_device_limit(self, customer_id: str, device_limit: int, *, actor: str) -> None:
        now = self._clock()

        def update(conn: sqlite3.Connection) -> None:
            cursor = conn.execute(
                "UPDATE customers SET device_limit = ? WHERE customer_id = ?",
                (device_limit, customer_id),
            )
            if cursor.rowcount == 0:
                raise NotFoundError(f"no customer {customer_id}")
            _audit(conn, now, actor, "customer.set_limit", customer_id, {"limit": device_limit})

        await self._write(update)

    async def get_customer(self, customer_id: str) -> Customer | None:
        customers = await self._customers("WHERE c.customer_id = :cid", {"cid": customer_id})
        return customers[0] if customers else None

    async def list_customers(self) -> list[Customer]:
        return await self._customers("", {})

    async def _customers(self, where: str, params: dict[str, Any]) -> list[Customer]:
        sql = f"""
            SELECT c.customer_id, c.device_limit, c.created_at,
                (SELECT count(*) FROM devices d WHERE d.customer_id = c.customer_id
                    AND d.state = 'active') AS active,
                (SELECT count(*) FROM devices d WHERE d.customer_id = c.customer_id
                    AND d.state = 'pending' AND d.pending_expires_at > :now) AS pending
            FROM customers c {where} ORDER BY c.customer_id
        """  # noqa: S608 - `where` is one of this module's constants
        values = {**params, "now": self._clock()}
        rows = await self._call(lambda conn: conn.execute(sql, values).fetchall())
        return [Customer(r[0], r[1], r[2], r[3], r[4]) for r in rows]

    # -- devices --------------------------------------------------------------------------------

    async def get_device(self, name: DeviceName) -> Device | None:
        return await self._call(lambda conn: _device(conn, name))

    async def list_devices(self, customer_id: str | None = None) -> list[Device]:
        sql = f"SELECT {_DEVICE_COLUMNS} FROM devices"  # noqa: S608 - constant column list
        params: tuple[str, ...] = ()
        if customer_id is not None:
            sql += " WHERE customer_id = ?"
            params = (customer_id,)
        sql += " ORDER BY customer_id, device_id"
        rows = await self._call(lambda conn: conn.execute(sql, params).fetchall())
        return [_row_to_device(row) for row in rows]

    async def check_registration(self, name: DeviceName) -> None:
        """Raise RegistrationRefused if registering `name` now would be refused (a cheap pre-check
        that spares bcrypt work on hopeless requests; `register_device` checks again)."""
        now = self._clock()
        await self._call(lambda conn: _refuse_registration(conn, name, now))

    async def register_device(
        self, name: DeviceName, password_hash: bytes, *, ttl_s: float, actor: str
    ) -> Device:
        """Create or renew the pending registration of `name` with a new password hash.

        The limit check and the write are one transaction, so concurrent registrations can never
        exceed a customer's limit. Raises RegistrationRefused with the reason.
        """
        now = self._clock()

        def register(conn: sqlite3.Connection) -> Device | None:
            renewing = _refuse_registration(conn, name, now)
            conn.execute(
                """
                INSERT INTO devices (customer_id, device_id, state, password_hash,
                                     pending_expires_at, created_at)
                VALUES (?, ?, 'pending', ?, ?, ?)
                ON CONFLICT (customer_id, device_id) DO UPDATE SET
                    password_hash = excluded.password_hash,
                    pending_expires_at = excluded.pending_expires_at
                """,
                (*name, password_hash.decode("ascii"), now + ttl_s, now),
            )
            action = "device.register_again" if renewing else "device.register"
            _audit(conn, now, actor, action, str(name), {})
            return _device(conn, name)

        device = await self._write(register)
        assert device is not None  # noqa: S101 - written in this transaction
        return device

    async def activate_device(self, name: DeviceName, password_hash: bytes, *, actor: str) -> bool:
        """Make a pending registration active if it still has `password_hash` and has not expired.

        Returns False when the registration changed meanwhile (a newer password, expiry, revoke).
        """
        now = self._clock()

        def activate(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                """
                UPDATE devices SET state = 'active', activated_at = ?, pending_expires_at = NULL
                WHERE customer_id = ? AND device_id = ? AND state = 'pending'
                    AND password_hash = ? AND pending_expires_at > ?
                """,
                (now, *name, password_hash.decode("ascii"), now),
            )
            if cursor.rowcount == 0:
                return False
            _audit(conn, now, actor, "device.activate", str(name), {})
            return True

        return await self._write(activate)

    async def revoke_device(self, name: DeviceName, *, actor: str) -> Device:
        """Revoke a device: its credentials stop working and it can never register again."""
        now = self._clock()

        def revoke(conn: sqlite3.Connection) -> Device | None:
            cursor = conn.execute(
                """
                UPDATE devices SET state = 'revoked', revoked_at = ?, password_hash = NULL,
                    pending_expires_at = NULL, online = 0
                WHERE customer_id = ? AND device_id = ? AND state != 'revoked'
                """,
                (now, *name),
            )
            if cursor.rowcount == 0:
                device = _device(conn, name)
                if device is None:
                    raise NotFoundError(f"no device {name}")
                return device  # revoked already: nothing changes, nothing to audit
            _audit(conn, now, actor, "device.revoke", str(name), {})
            return _device(conn, name)

        device = await self._write(revoke)
        assert device is not None  # noqa: S101 - updated in this transaction
        return device

    async def reset_device(self, name: DeviceName, *, actor: str) -> Device:
        """Forget a device so that its id may register again (e.g. after a hardware swap).

        Returns the device as it was; its credentials stop working at once.
        """
        now = self._clock()

        def reset(conn: sqlite3.Connection) -> Device:
            device = _device(conn, name)
            if device is None:
                raise NotFoundError(f"no device {name}")
            conn.execute("DELETE FROM devices WHERE customer_id = ? AND device_id = ?", tuple(name))
            _audit(conn, now, actor, "device.reset", str(name), {"state": device.state.value})
            return device

        return await self._write(reset)

    # -- presence -------------------------------------------------------------------------------

    async def record_presence(self, updates: Iterable[PresenceUpdate]) -> None:
        """Write a batch of presence updates in one transaction (not audited: not a change made
        by anyone, and far too frequent)."""
        rows = [
            {
                "online": None if update.online is None else int(update.online),
                "seen_at": update.seen_at,
                "status": _json_or_null(update.status),
                "telemetry": _json_or_null(update.telemetry),
                "customer_id": update.name.customer_id,
                "device_id": update.name.device_id,
            }
            for update in updates
        ]
        await self._write(
            lambda conn: conn.executemany(
                """
                UPDATE devices SET
                    online = coalesce(:online, online),
                    last_seen_at = max(coalesce(last_seen_at, 0), :seen_at),
                    last_status = coalesce(:status, last_status),
                    last_telemetry = coalesce(:telemetry, last_telemetry)
                WHERE customer_id = :customer_id AND device_id = :device_id
                    AND state = 'active'
                """,
                rows,
            )
        )

    async def mark_all_offline(self) -> None:
        """At platform start: nothing is connected yet, whatever a killed process left behind."""
        await self._write(lambda conn: conn.execute("UPDATE devices SET online = 0 WHERE online"))

    # -- accounts -------------------------------------------------------------------------------

    async def add_account(
        self, name: str, password_hash: bytes, *, superuser: bool, actor: str
    ) -> Account:
        now = self._clock()

        def add(conn: sqlite3.Connection) -> None:
            try:
                conn.execute(
                    "INSERT INTO accounts (name, password_hash, superuser, created_at)"
                    " VALUES (?, ?, ?, ?)",
                    (name, password_hash.decode("ascii"), int(superuser), now),
                )
            except sqlite3.IntegrityError as exc:
                raise ConflictError(f"account {name} exists already") from exc
            _audit(conn, now, actor, "account.add", name, {"superuser": superuser})

        await self._write(add)
        return Account(name, superuser, now, password_hash)

    async def get_account(self, name: str) -> Account | None:
        row = await self._call(
            lambda conn: conn.execute(
                "SELECT name, superuser, created_at, password_hash FROM accounts WHERE name = ?",
                (name,),
            ).fetchone()
        )
        return None if row is None else _row_to_account(row)

    async def list_accounts(self) -> list[Account]:
        rows = await self._call(
            lambda conn: conn.execute(
                "SELECT name, superuser, created_at, password_hash FROM accounts ORDER BY name"
            ).fetchall()
        )
        return [_row_to_account(r) for r in rows]

    async def remove_account(self, name: str, *, actor: str) -> None:
        now = self._clock()

        def remove(conn: sqlite3.Connection) -> None:
            cursor = conn.execute("DELETE FROM accounts WHERE name = ?", (name,))
            if cursor.rowcount == 0:
                raise NotFoundError(f"no account {name}")
            _audit(conn, now, actor, "account.remove", name, {})

        await self._write(remove)

    # -- audit log ------------------------------------------------------------------------------

    async def latest_change(self) -> int:
        """The id of the newest audit entry (0 if none): a cursor for `changes_since`."""
        sql = "SELECT coalesce(max(entry_id), 0) FROM audit_log"
        return int(await self._call(lambda conn: _scalar(conn, sql)))

    async def changes_since(self, entry_id: int, *, limit: int = 1000) -> list[AuditEntry]:
        """Audit entries newer than `entry_id`, oldest first: how other processes' changes (the
        CLI revoking a device, say) reach a running platform."""
        rows = await self._call(
            lambda conn: conn.execute(
                "SELECT entry_id, at, actor, action, subject, detail FROM audit_log"
                " WHERE entry_id > ? ORDER BY entry_id LIMIT ?",
                (entry_id, limit),
            ).fetchall()
        )
        return [AuditEntry(r[0], r[1], r[2], r[3], r[4], json.loads(r[5])) for r in rows]

    async def audit_entries(
        self, *, subject: str | None = None, limit: int = 100
    ) -> list[AuditEntry]:
        sql = "SELECT entry_id, at, actor, action, subject, detail FROM audit_log"
        params: list[Any] = []
        if subject is not None:
            sql += " WHERE subject = ?"
            params.append(subject)
        sql += " ORDER BY entry_id DESC LIMIT ?"
        params.append(limit)
        rows = await self._call(lambda conn: conn.execute(sql, params).fetchall())
        return [AuditEntry(r[0], r[1], r[2], r[3], r[4], json.loads(r[5])) for r in rows]


# -- in aiosqlite's thread ----------------------------------------------------------------------


def _on_connection(db: aiosqlite.Connection, path: Path, work: Work[T]) -> T:
    """Run `work` on the connection; every driver error leaves the store as a StoreError."""
    try:
        conn = db._conn
    except ValueError as exc:  # aiosqlite: "no active connection"
        raise StoreError(f"store {path} is closed") from exc
    try:
        return work(conn)
    except sqlite3.Error as exc:
        raise StoreError(f"store {path} failed: {exc}") from exc


def _in_transaction(conn: sqlite3.Connection, path: Path, work: Work[T]) -> T:
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as exc:
        raise StoreError(f"store {path} is busy or unwritable: {exc}") from exc
    try:
        result = work(conn)
        conn.execute("COMMIT")  # a failed COMMIT (busy, disk full) leaves the transaction open
    except BaseException:
        _roll_back(conn, path)
        raise
    return result


def _roll_back(conn: sqlite3.Connection, path: Path) -> None:
    """End the open transaction, if SQLite has not ended it already (it does on some I/O
    errors); a failed ROLLBACK is logged, the error that caused it is the one raised."""
    if not conn.in_transaction:
        return
    try:
        conn.execute("ROLLBACK")
    except sqlite3.Error as exc:
        log.warning("store %s: rollback failed: %s", path, exc)


def _prepare(conn: sqlite3.Connection) -> None:
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")  # before anything that may wait
    _switch_to_wal(conn)
    conn.execute("PRAGMA synchronous = NORMAL")  # durable against a killed process in WAL
    conn.execute("PRAGMA foreign_keys = ON")


def _switch_to_wal(conn: sqlite3.Connection) -> None:
    """Put the file in WAL mode (once per file; it stays so). The switch needs an exclusive lock
    and SQLite answers "database is locked" at once, without the busy timeout, while another
    connection holds any lock, as it does when several processes open a new file together: so
    retry, within the busy timeout, in this (aiosqlite's) thread."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    delay_s = 0.001
    while True:
        try:
            mode = str(_scalar(conn, "PRAGMA journal_mode = WAL")).lower()
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                raise
            time.sleep(delay_s)
            delay_s = min(delay_s * 2, 0.05)
            continue
        if mode != "wal":
            raise StoreError(f"cannot switch the store to WAL mode (got {mode})")
        return


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Bring the schema to SCHEMA_VERSION: the version is read, and every missing migration
    applied, in one write transaction, so that two processes opening a new file at once cannot
    both migrate it (one waits for the other's COMMIT, then finds nothing to do)."""
    if _schema_version(conn) == SCHEMA_VERSION:
        return  # the common case, without the write lock (versions only ever grow)
    _in_transaction(conn, path, _apply_migrations)


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
        for statement in _statements(MIGRATIONS[target - 1]):
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {target}")


def _schema_version(conn: sqlite3.Connection) -> int:
    return int(_scalar(conn, "PRAGMA user_version"))


def _statements(script: str) -> list[str]:
    """Split a migration into its statements (`;` inside a string or a trigger body is kept)."""
    statements, pending = [], ""
    for part in script.split(";"):
        pending += part + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                statements.append(pending.strip())
            pending = ""
    if pending.strip(" \n;"):
        raise StoreError(f"incomplete statement in a migration: {pending.strip()!r}")
    return statements


def _create_file(path: Path) -> None:
    """Create the store file (and its folder) if missing, readable by its owner only: it holds
    password hashes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with suppress(FileExistsError):
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))


def _scalar(conn: sqlite3.Connection, sql: str, params: Iterable[Any] | dict[str, Any] = ()) -> Any:
    row = conn.execute(sql, params if isinstance(params, dict) else tuple(params)).fetchone()
    if row is None:
        raise StoreError(f"no result for {sql!r}")
    return row[0]


def _device(conn: sqlite3.Connection, name: DeviceName) -> Device | None:
    row = conn.execute(
        f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE customer_id = ? AND device_id = ?",  # noqa: S608
        tuple(name),
    ).fetchone()
    return None if row is None else _row_to_device(row)


def _row_to_device(row: sqlite3.Row) -> Device:
    return Device(
        customer_id=row["customer_id"],
        device_id=row["device_id"],
        state=DeviceState(row["state"]),
        password_hash=None if row["password_hash"] is None else row["password_hash"].encode(),
        pending_expires_at=row["pending_expires_at"],
        created_at=row["created_at"],
        activated_at=row["activated_at"],
        revoked_at=row["revoked_at"],
        online=bool(row["online"]),
        last_seen_at=row["last_seen_at"],
        last_status=_json_or_none(row["last_status"]),
        telemetry=_json_or_none(row["last_telemetry"]),
    )


def _json_or_none(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _json_or_null(value: dict[str, Any] | None) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


def _row_to_account(row: sqlite3.Row) -> Account:
    return Account(row[0], bool(row[1]), row[2], row[3].encode())


def _refuse_registration(conn: sqlite3.Connection, name: DeviceName, now: float) -> bool:
    """Raise RegistrationRefused if `name` may not register now; return True if it renews a
    pending registration (which already holds one of the customer's slots)."""
    customer = conn.execute(
        "SELECT device_limit FROM customers WHERE customer_id = ?", (name.customer_id,)
    ).fetchone()
    if customer is None:
        raise RegistrationRefused("unknown customer")
    device = _device(conn, name)
    if device is not None and device.state is DeviceState.ACTIVE:
        raise RegistrationRefused("device already activated")
    if device is not None and device.state is DeviceState.REVOKED:
        raise RegistrationRefused("device revoked")
    if device is not None and not device.is_expired(now):
        return True  # a pending registration whose response was lost: it keeps its slot
    used = _scalar(
        conn,
        f"SELECT count(*) FROM devices WHERE customer_id = :cid AND {_COUNTED}",  # noqa: S608
        {"cid": name.customer_id, "now": now},
    )
    if used >= customer[0]:
        raise RegistrationRefused("device limit reached")
    return False


def _audit(
    conn: sqlite3.Connection,
    at: float,
    actor: str,
    action: str,
    subject: str,
    detail: dict[str, Any],
) -> None:
    conn.execute(
        "INSERT INTO audit_log (at, actor, action, subject, detail) VALUES (?, ?, ?, ?, ?)",
        (at, actor, action, subject, json.dumps(detail, sort_keys=True)),
    )
