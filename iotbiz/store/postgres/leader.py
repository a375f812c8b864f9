"""The PostgreSQL store's leader lock (see `iotbiz.store.leader`): a session advisory lock
(`pg_try_advisory_lock`) held on a connection of its own, outside the pool, so that pooled
connections coming and going never drop it.

The server releases the lock when the session ends: at once when the leader's process dies (its
socket closes), and after the TCP keep-alive probes fail when its machine or the network goes
(`TCP_KEEPALIVE`: about 11 s). The leader itself checks its session every time `check()` is
called, with a bound (`CHECK_TIMEOUT_S`): a session that does not answer counts as lost, and the
leader steps down before the server can give the lock to another process.
"""

from __future__ import annotations

import asyncio

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type hints

from iotbiz.errors import StoreError
from iotbiz.store.postgres.core import CONNECT_TIMEOUT_S, DRIVER_ERRORS, _message, redact

# One key for the platform's leadership (a 64-bit number of our own: 'iotbiz' 'ldr').
LEADER_KEY = 0x696F7462697A_4C
CHECK_TIMEOUT_S = 2.0
# The driver's errors, and its InternalClientError: asyncpg raised it (once in many runs) for a
# query on a connection whose session the server had just ended. Either way the lock is lost.
LOCK_ERRORS = (*DRIVER_ERRORS, asyncpg.InternalClientError)
# The server drops the session of a leader gone silent after 5 + 3 x 2 s.
TCP_KEEPALIVE = {
    "tcp_keepalives_idle": "5",
    "tcp_keepalives_interval": "2",
    "tcp_keepalives_count": "3",
    "application_name": "iotbiz-leader",
}


class PostgresLeaderLock:
    def __init__(self, url: str, key: int = LEADER_KEY) -> None:
        self._url = url
        self._key = key
        self.name = f"advisory lock {key} on {redact(url)}"
        self._conn: asyncpg.Connection | None = None

    async def try_acquire(self) -> bool:
        if self._conn is not None:
            return await self.check()
        try:
            conn = await asyncpg.connect(
                self._url, timeout=CONNECT_TIMEOUT_S, server_settings=TCP_KEEPALIVE
            )
        except (*LOCK_ERRORS, ValueError) as exc:
            raise StoreError(
                f"leader lock: cannot reach {redact(self._url)}: {_message(exc, self._url)}"
            ) from None
        try:
            taken = await conn.fetchval(
                "SELECT pg_try_advisory_lock($1)", self._key, timeout=CHECK_TIMEOUT_S
            )
        except LOCK_ERRORS as exc:
            conn.terminate()
            raise StoreError(f"leader lock: {redact(self._url)} failed: {exc}") from exc
        if not taken:
            await _close(conn)
            return False
        self._conn = conn
        return True

    async def check(self) -> bool:
        """True while the session holding the lock answers; False (and the session closed)
        when it does not."""
        conn = self._conn
        if conn is None:
            return False
        try:
            await conn.fetchval("SELECT 1", timeout=CHECK_TIMEOUT_S)
        except LOCK_ERRORS:
            self._conn = None
            conn.terminate()
            return False
        return True

    async def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await _close(conn)  # the session's end releases the lock


async def _close(conn: asyncpg.Connection) -> None:
    try:
        await conn.close(timeout=CHECK_TIMEOUT_S)
    except LOCK_ERRORS:
        conn.terminate()
    except asyncio.CancelledError:
        conn.terminate()
        raise
