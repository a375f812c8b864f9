"""The PostgreSQL store's connection pool, transactions, errors and migrations at open."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any, Self, TypeVar

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type hints

from iotbiz.errors import StoreError
from iotbiz.store.core import Clock
from iotbiz.store.leader import LeaderLock
from iotbiz.store.postgres.schema import migrate

T = TypeVar("T")
Work = Callable[[asyncpg.Connection], Awaitable[T]]
CONNECT_TIMEOUT_S = 10.0
STATEMENT_TIMEOUT_S = 30.0
POOL_SIZE = 10
# Driver errors: the server's (PostgresError), the client's (InterfaceError: a closed pool or
# connection), the network's (OSError) and a statement past its timeout.
DRIVER_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, asyncio.TimeoutError)


def redact(url: str) -> str:
    """The URL without its password, to name the store in messages and logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}@{host}" if parts.username else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


class PostgresCore:
    def __init__(self, pool: asyncpg.Pool, url: str, clock: Clock) -> None:
        self._pool = pool
        self._url = url
        self.name = redact(url)
        self._clock = clock
        self._closed = False

    @classmethod
    async def open(cls, url: str, *, clock: Clock = time.time) -> Self:
        """Connect to the database at `url` and migrate it (once, under an advisory lock, when
        several processes open it together)."""
        name = redact(url)
        try:
            pool = await asyncpg.create_pool(
                url,
                min_size=1,
                max_size=POOL_SIZE,
                timeout=CONNECT_TIMEOUT_S,
                command_timeout=STATEMENT_TIMEOUT_S,
            )
        except (*DRIVER_ERRORS, ValueError) as exc:  # ValueError: a malformed URL
            raise StoreError(f"cannot open store {name}: {_message(exc, url)}") from None
        store = cls(pool, url, clock)
        try:
            await store._call(migrate)
        except StoreError:
            await store.close()
            raise
        return store

    def now(self) -> float:
        return self._clock()

    async def close(self) -> None:
        """Close the pool (again: nothing happens); operations after it raise StoreError."""
        if self._closed:
            return
        self._closed = True
        try:
            await asyncio.wait_for(self._pool.close(), STATEMENT_TIMEOUT_S)
        except DRIVER_ERRORS as exc:
            self._pool.terminate()
            raise StoreError(f"store {self.name} did not close cleanly: {exc}") from exc

    async def _call(self, work: Work[T]) -> T:
        """Run `work(connection)` on a pooled connection, outside a transaction."""
        if self._closed:
            raise StoreError(f"store {self.name} is closed")
        try:
            async with self._pool.acquire(timeout=CONNECT_TIMEOUT_S) as conn:
                return await work(conn)
        except DRIVER_ERRORS as exc:
            raise StoreError(f"store {self.name} failed: {exc}") from exc

    async def _read(self, work: Work[T]) -> T:
        return await self._call(work)

    async def _write(self, work: Work[T]) -> T:
        """Run `work(connection)` as one transaction, rolled back if anything fails."""

        async def transact(conn: asyncpg.Connection) -> T:
            async with conn.transaction():
                return await work(conn)

        return await self._call(transact)

    async def schema_version(self) -> int:
        return int(await self._call(lambda conn: conn.fetchval(
            "SELECT coalesce(max(version), 0) FROM schema_migrations")))  # fmt: skip

    async def ping(self) -> None:
        await self._call(lambda conn: conn.fetchval("SELECT 1"))

    def leader_lock(self) -> LeaderLock:
        """The platform's leader lock on this database (iotbiz.store.leader)."""
        from iotbiz.store.postgres.leader import PostgresLeaderLock

        return PostgresLeaderLock(self._url)


def _message(exc: BaseException, url: str) -> str:
    """The driver's message, with the password taken out should the driver have quoted it."""
    text = str(exc) or type(exc).__name__
    password = urllib.parse.urlsplit(url).password if "://" in url else None
    return text.replace(password, "***") if password else text


async def audit(
    conn: asyncpg.Connection,
    at: float,
    actor: str,
    action: str,
    subject: str,
    detail: dict[str, Any],
) -> None:
    await conn.execute(
        "INSERT INTO audit_log (at, actor, action, subject, detail) VALUES ($1, $2, $3, $4, $5)",
        at,
        actor,
        action,
        subject,
        json.dumps(detail, sort_keys=True),
    )


async def audit_many(
    conn: asyncpg.Connection, entries: list[tuple[float, str, str, str, dict[str, Any]]]
) -> None:
    """Audit entries (at, actor, action, subject, detail) in one statement; their ids follow
    the list's order (WITH ORDINALITY ... ORDER BY)."""
    if entries:
        await conn.execute(
            "INSERT INTO audit_log (at, actor, action, subject, detail)"
            " SELECT at, actor, action, subject, detail FROM unnest($1::float8[], $2::text[],"
            " $3::text[], $4::text[], $5::text[]) WITH ORDINALITY"
            " AS e (at, actor, action, subject, detail, position) ORDER BY position",
            [entry[0] for entry in entries],
            [entry[1] for entry in entries],
            [entry[2] for entry in entries],
            [entry[3] for entry in entries],
            [json.dumps(entry[4], sort_keys=True) for entry in entries],
        )
