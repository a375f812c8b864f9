"""The store's connection: opening, the one-call-per-operation rule, transactions, errors.

`StoreCore` holds the aiosqlite connection; the concern modules (`devices`, `accounts`,
`commands`, `history`) add their operations to it as mixins, and `iotbiz.store.Store` combines
them. Every operation is one plain function over the `sqlite3.Connection`, sent to aiosqlite's
thread as a single call (`_call`, or `_write` for one `BEGIN IMMEDIATE` transaction).
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
from typing import Any, Protocol, Self, TypeVar

import aiosqlite

from iotbiz.errors import StoreError, StoreNotFound
from iotbiz.store.leader import FileLeaderLock, LeaderLock
from iotbiz.store.schema import migrate

log = logging.getLogger(__name__)

Clock = Callable[[], float]
BUSY_TIMEOUT_MS = 5000
T = TypeVar("T")


class Row(Protocol):
    """A result row indexed by column name or position: sqlite3.Row and asyncpg.Record both
    are, so the row -> dataclass conversions are shared by both backends."""

    def __getitem__(self, key: str | int, /) -> Any: ...


Work = Callable[[sqlite3.Connection], T]


class StoreCore:
    """Async access to the SQLite file. Open with `await Store.open(path)`, close when done."""

    def __init__(self, db: aiosqlite.Connection, path: Path, clock: Clock) -> None:
        self._db = db
        self.path = path
        self._clock = clock
        self._lock = asyncio.Lock()
        self._closed = False

    @classmethod
    async def open(cls, path: Path, *, clock: Clock = time.time, create: bool = True) -> Self:
        """Open and migrate the store at `path`, creating the file (and its folder) if needed.

        With `create=False` a missing file is a StoreNotFound and nothing is created (for
        commands that only read the store).
        """
        try:
            if create:
                await asyncio.to_thread(_create_file, path)
            elif not await asyncio.to_thread(path.is_file):
                raise StoreNotFound(f"no store at {path}")
            await asyncio.to_thread(_make_private, path)
            # mode=rw: SQLite itself never creates the file (nor its folder) here.
            connecting = aiosqlite.connect(
                f"file:{urllib.parse.quote(str(path))}?mode={'rwc' if create else 'rw'}",
                uri=True,
                isolation_level=None,
                timeout=BUSY_TIMEOUT_MS / 1000,
            )
            # aiosqlite's thread is not a daemon: a store left open (a crash between open and
            # close) kept the process alive at exit, for ever. SQLite is safe against a thread
            # killed at exit. aiosqlite 0.22 keeps the thread in `_thread`; before, the
            # connection was the thread.
            worker: Any = getattr(connecting, "_thread", connecting)
            worker.daemon = True
            db = await connecting
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open store {path}: {exc}") from exc
        store = cls(db, path, clock)
        try:
            await store._call(_prepare)
            await store._call(
                lambda conn: migrate(conn, lambda work: in_transaction(conn, path, work))
            )
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
        return await self._call(lambda conn: in_transaction(conn, self.path, work))

    async def schema_version(self) -> int:
        return int(await self._call(lambda conn: scalar(conn, "PRAGMA user_version")))

    async def ping(self) -> None:
        """Raise StoreError unless the store answers a query."""
        await self._call(lambda conn: scalar(conn, "SELECT 1"))

    def leader_lock(self) -> LeaderLock:
        """The platform's leader lock for this store file (iotbiz.store.leader)."""
        return FileLeaderLock(self.path)


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


def in_transaction(conn: sqlite3.Connection, path: Path, work: Work[T]) -> T:
    """Run `work` in one `BEGIN IMMEDIATE` transaction, rolled back if anything fails."""
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
            mode = str(scalar(conn, "PRAGMA journal_mode = WAL")).lower()
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                raise
            time.sleep(delay_s)
            delay_s = min(delay_s * 2, 0.05)
            continue
        if mode != "wal":
            raise StoreError(f"cannot switch the store to WAL mode (got {mode})")
        return


def _create_file(path: Path) -> None:
    """Create the store file (and the folders it needs) if missing, for its owner only: it
    holds password hashes. Folders made here are 0700, files 0600, whatever the umask."""
    missing = [folder for folder in (path.parent, *path.parent.parents) if not folder.exists()]
    for folder in reversed(missing):
        with suppress(FileExistsError):
            folder.mkdir(mode=0o700)
            os.chmod(folder, 0o700)  # mkdir's mode is masked by the umask
    with suppress(FileExistsError):
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.chmod(path, 0o600)


def _make_private(path: Path) -> None:
    """An existing store file (and its WAL and shared-memory files, which SQLite creates with
    the store's own mode) that others may read is made 0600, with one warning; one owned by
    another user is left as it is, with a warning."""
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            info = file.stat()
        except FileNotFoundError:
            continue
        if not info.st_mode & 0o077:
            continue
        if info.st_uid != os.geteuid():
            log.warning("store file %s is readable by others and not ours to chmod", file)
            continue
        os.chmod(file, 0o600)
        log.warning(
            "store file %s was mode %04o (readable by others): made it 0600",
            file,
            info.st_mode & 0o777,
        )


def scalar(conn: sqlite3.Connection, sql: str, params: Iterable[Any] | dict[str, Any] = ()) -> Any:
    row = conn.execute(sql, params if isinstance(params, dict) else tuple(params)).fetchone()
    if row is None:
        raise StoreError(f"no result for {sql!r}")
    return row[0]


def audit(
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


def json_or_none(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def json_or_null(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))
