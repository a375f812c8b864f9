"""Operator accounts and the audit log on PostgreSQL (all of `iotbiz.store.accounts`)."""

from __future__ import annotations

from typing import Any

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type hints

from iotbiz.errors import ConflictError, NotFoundError
from iotbiz.models import Account, AuditEntry
from iotbiz.store.accounts import row_to_account, row_to_audit_entry
from iotbiz.store.postgres.core import PostgresCore, audit

_ACCOUNT = "SELECT name, superuser, created_at, password_hash FROM accounts"
_ENTRY = "SELECT entry_id, at, actor, action, subject, detail FROM audit_log"


class PostgresAccountOperations(PostgresCore):
    # -- accounts -------------------------------------------------------------------------------

    async def add_account(
        self, name: str, password_hash: bytes, *, superuser: bool, actor: str
    ) -> Account:
        now = self._clock()

        async def add(conn: asyncpg.Connection) -> None:
            try:
                await conn.execute(
                    "INSERT INTO accounts (name, password_hash, superuser, created_at)"
                    " VALUES ($1, $2, $3, $4)",
                    name,
                    password_hash.decode("ascii"),
                    int(superuser),
                    now,
                )
            except asyncpg.UniqueViolationError as exc:
                raise ConflictError(f"account {name} exists already") from exc
            await audit(conn, now, actor, "account.add", name, {"superuser": superuser})

        await self._write(add)
        return Account(name, superuser, now, password_hash)

    async def get_account(self, name: str) -> Account | None:
        row = await self._read(lambda conn: conn.fetchrow(_ACCOUNT + " WHERE name = $1", name))
        return None if row is None else row_to_account(row)

    async def list_accounts(self) -> list[Account]:
        rows = await self._read(lambda conn: conn.fetch(_ACCOUNT + " ORDER BY name"))
        return [row_to_account(r) for r in rows]

    async def remove_account(self, name: str, *, actor: str) -> None:
        now = self._clock()

        async def remove(conn: asyncpg.Connection) -> None:
            status = await conn.execute("DELETE FROM accounts WHERE name = $1", name)
            if status == "DELETE 0":
                raise NotFoundError(f"no account {name}")
            await audit(conn, now, actor, "account.remove", name, {})

        await self._write(remove)

    # -- audit log ------------------------------------------------------------------------------

    async def audit_refusals(self, entries: list[tuple[str, str, str, dict[str, Any]]]) -> None:
        now = self._clock()

        async def write(conn: asyncpg.Connection) -> None:
            for action, subject, actor, detail in entries:
                await audit(conn, now, actor, action, subject, detail)

        await self._write(write)

    async def latest_change(self) -> int:
        sql = "SELECT coalesce(max(entry_id), 0) FROM audit_log"
        return int(await self._read(lambda conn: conn.fetchval(sql)))

    async def changes_since(self, entry_id: int, *, limit: int = 1000) -> list[AuditEntry]:
        sql = _ENTRY + " WHERE entry_id > $1 ORDER BY entry_id LIMIT $2"
        rows = await self._read(lambda conn: conn.fetch(sql, entry_id, limit))
        return [row_to_audit_entry(r) for r in rows]

    async def audit_entries(
        self, *, subject: str | None = None, limit: int = 100, before: int | None = None
    ) -> list[AuditEntry]:
        """Newest first; `before`: an entry id (the entries older than it: the next page)."""
        conditions: list[str] = []
        args: list[Any] = []
        if subject is not None:
            args.append(subject)
            conditions.append(f"subject = ${len(args)}")
        if before is not None:
            args.append(before)
            conditions.append(f"entry_id < ${len(args)}")
        sql = _ENTRY
        if conditions:
            sql += " WHERE " + " AND ".join(conditions)
        args.append(limit)
        sql += f" ORDER BY entry_id DESC LIMIT ${len(args)}"
        rows = await self._read(lambda conn: conn.fetch(sql, *args))
        return [row_to_audit_entry(r) for r in rows]
