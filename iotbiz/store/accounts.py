"""Operator accounts and the audit log."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from iotbiz.errors import ConflictError, NotFoundError
from iotbiz.models import Account, AuditEntry
from iotbiz.store.core import Row, StoreCore, audit, scalar


class AccountOperations(StoreCore):
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
            audit(conn, now, actor, "account.add", name, {"superuser": superuser})

        await self._write(add)
        return Account(name, superuser, now, password_hash)

    async def get_account(self, name: str) -> Account | None:
        row = await self._call(
            lambda conn: conn.execute(
                "SELECT name, superuser, created_at, password_hash FROM accounts WHERE name = ?",
                (name,),
            ).fetchone()
        )
        return None if row is None else row_to_account(row)

    async def list_accounts(self) -> list[Account]:
        rows = await self._call(
            lambda conn: conn.execute(
                "SELECT name, superuser, created_at, password_hash FROM accounts ORDER BY name"
            ).fetchall()
        )
        return [row_to_account(r) for r in rows]

    async def remove_account(self, name: str, *, actor: str) -> None:
        now = self._clock()

        def remove(conn: sqlite3.Connection) -> None:
            cursor = conn.execute("DELETE FROM accounts WHERE name = ?", (name,))
            if cursor.rowcount == 0:
                raise NotFoundError(f"no account {name}")
            audit(conn, now, actor, "account.remove", name, {})

        await self._write(remove)

    # -- audit log ------------------------------------------------------------------------------

    async def audit_refusals(self, entries: list[tuple[str, str, str, dict[str, Any]]]) -> None:
        """Record refused requests (action, subject, actor, detail) in the audit log, in one
        transaction (the registrar batches and throttles them: `iotbiz.registrar.refusals`)."""
        now = self._clock()

        def write(conn: sqlite3.Connection) -> None:
            for action, subject, actor, detail in entries:
                audit(conn, now, actor, action, subject, detail)

        await self._write(write)

    async def latest_change(self) -> int:
        """The id of the newest audit entry (0 if none): a cursor for `changes_since`."""
        sql = "SELECT coalesce(max(entry_id), 0) FROM audit_log"
        return int(await self._call(lambda conn: scalar(conn, sql)))

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
        return [row_to_audit_entry(r) for r in rows]

    async def audit_entries(
        self, *, subject: str | None = None, limit: int = 100, before: int | None = None
    ) -> list[AuditEntry]:
        """Newest first; `before`: an entry id (the entries older than it: the next page)."""
        sql = "SELECT entry_id, at, actor, action, subject, detail FROM audit_log"
        conditions: list[str] = []
        params: list[Any] = []
        if subject is not None:
            conditions.append("subject = ?")
            params.append(subject)
        if before is not None:
            conditions.append("entry_id < ?")
            params.append(before)
        if conditions:
            sql += " WHERE " + " AND ".join(conditions)
        sql += " ORDER BY entry_id DESC LIMIT ?"
        params.append(limit)
        rows = await self._call(lambda conn: conn.execute(sql, params).fetchall())
        return [row_to_audit_entry(r) for r in rows]


def row_to_account(row: Row) -> Account:
    """Shared by both backends, as is `row_to_audit_entry`."""
    return Account(row[0], bool(row[1]), row[2], row[3].encode())


def row_to_audit_entry(row: Row) -> AuditEntry:
    return AuditEntry(row[0], row[1], row[2], row[3], row[4], json.loads(row[5]))
