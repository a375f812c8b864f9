"""Commands on PostgreSQL (all of `iotbiz.store.commands`: its docstring has the life cycle).

Several platform processes may share the database, so what SQLite's single writer gave for free
is explicit here. (The platform dispatches from one process at a time, the leader's: these rules
hold besides, for a leader that lost its lock but has not noticed yet, and for the CLI.)

- Taking commands to publish: `dispatchable_commands` and `due_commands` lock the rows they
  return (`FOR UPDATE SKIP LOCKED`: a row another transaction holds is left to it) and stamp
  them taken (`scan_taken_at`, `due_taken_at`: columns of this backend only, never in a
  `Command`). A command taken by a scan is not handed to any scan again, in any process, until
  `resend_before` has passed its take, the very rule a sent command follows: two dispatchers
  never both publish it, and one whose publish failed sends it again after `resend_after_s`
  (on SQLite: at its next scan). A command taken by `due_commands` is not handed to another
  `due_commands` for `DUE_TAKEN_S`: every process sees a device come online (its retained
  `online` status) and asks for its commands at about the same time; one of them gets them.
  (A device that comes online twice within `DUE_TAKEN_S`, the broker's connect and then its
  status, gets them once; one that reconnects that fast after a lost delivery gets a sent
  command again with the next resend, not at once as on SQLite.)
  The two stamps are independent (a device coming online gets its commands at once even if a
  scan has just taken them, as on SQLite), so a scan and a due may both publish one command:
  the agent answers a repeated id from memory. Results are the rows as they were, byte for
  byte as on SQLite.
- Creating: the devices' rows are locked (`FOR SHARE`) from the check that they are active to
  the COMMIT, so a revoke or reset waits, then fails the new commands too.
- Finishing and expiring are single UPDATEs whose condition (`state IN ('queued', 'sent')`) is
  checked again on the locked row: a command finishes or expires once, in one process; expiry
  takes disjoint rows in concurrent sweepers (`SKIP LOCKED`).

Ties in the order (equal `created_at` or `expires_at`) are broken by command id here, by
SQLite's plan there: no caller relies on it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type hints

from iotbiz.errors import NotFoundError
from iotbiz.models import Command, CommandReply, CommandState
from iotbiz.names import DeviceName
from iotbiz.store.commands import (
    COMMAND_COLUMNS,
    new_command_id,
    row_to_command,
    storable_error,
    storable_id,
)
from iotbiz.store.core import json_or_null
from iotbiz.store.postgres.core import PostgresCore, audit_many

# seconds a command handed out by `due_commands` is not handed out by it again (any process)
DUE_TAKEN_S = 5.0
_OPEN = "state IN ('queued', 'sent')"  # the very expression of the partial index commands_open
_C_COLUMNS = ", ".join(f"c.{column.strip()}" for column in COMMAND_COLUMNS.split(","))
_NAMES = "(SELECT * FROM unnest($1::text[], $2::text[]))"  # (customer_id, device_id) pairs


class PostgresCommandOperations(PostgresCore):
    async def create_commands(
        self,
        names: Sequence[DeviceName],
        action: str,
        args: dict[str, Any],
        *,
        expires_at: float,
        actor: str,
        batch_id: str,
    ) -> list[Command]:
        """As on SQLite: one command per device (in the order of `names`, once each), one
        audit entry each, NotFoundError naming the devices that are not active. The devices'
        rows stay locked (FOR SHARE) until the COMMIT: a concurrent revoke or reset waits."""
        names = list(dict.fromkeys(names))
        now = self._clock()
        args_text = json.dumps(args, separators=(",", ":"))
        commands = [
            Command(
                command_id=new_command_id(),
                customer_id=name.customer_id,
                device_id=name.device_id,
                action=action,
                args=args,
                state=CommandState.QUEUED,
                created_at=now,
                expires_at=expires_at,
                actor=actor,
                batch_id=batch_id,
            )
            for name in names
        ]

        async def create(conn: asyncpg.Connection) -> None:
            rows = await conn.fetch(
                f"SELECT customer_id, device_id FROM devices WHERE (customer_id, device_id) IN"  # noqa: S608
                f" {_NAMES} AND state = 'active'"
                " ORDER BY customer_id, device_id FOR SHARE",
                [name.customer_id for name in names],
                [name.device_id for name in names],
            )
            active = {DeviceName(row[0], row[1]) for row in rows}
            missing = [str(name) for name in names if name not in active]
            if missing:
                shown = ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else "")
                raise NotFoundError(f"not active devices ({len(missing)}): {shown}")
            await conn.execute(
                f"INSERT INTO commands ({COMMAND_COLUMNS})"  # noqa: S608 - constant columns
                " SELECT id, customer_id, device_id, $4, $5, $6, 'queued', $7, $8,"
                " NULL, NULL, NULL, NULL, $9"
                " FROM unnest($1::text[], $2::text[], $3::text[]) AS n(id, customer_id, device_id)",
                [c.command_id for c in commands],
                [c.customer_id for c in commands],
                [c.device_id for c in commands],
                batch_id,
                action,
                args_text,
                now,
                expires_at,
                actor,
            )
            await audit_many(
                conn,
                [
                    (
                        now,
                        actor,
                        "command.send",
                        c.name,
                        {"id": c.command_id, "action": action, "batch": batch_id},
                    )
                    for c in commands
                ],
            )

        await self._write(create)
        return commands

    async def get_command(self, command_id: str) -> Command | None:
        if not storable_id(command_id):
            return None  # PostgreSQL text cannot hold NUL: no command has such an id
        sql = f"SELECT {COMMAND_COLUMNS} FROM commands WHERE command_id = $1"  # noqa: S608
        row = await self._read(lambda conn: conn.fetchrow(sql, command_id))
        return None if row is None else row_to_command(row)

    async def list_commands(
        self,
        *,
        name: DeviceName | None = None,
        state: CommandState | None = None,
        batch_id: str | None = None,
        limit: int = 100,
        before: str | None = None,
    ) -> list[Command]:
        """Newest first; `before`: a command id (the last of the previous page), keyset on
        (created_at, command_id). An unknown `before` gives an empty page."""
        if not all(storable_id(text) for text in (before or "", batch_id or "")):
            return []  # PostgreSQL text cannot hold NUL: no command matches
        conditions: list[str] = []
        values: list[Any] = []

        def add(value: Any) -> str:
            values.append(value)
            return f"${len(values)}"

        if name is not None:
            conditions.append(
                f"customer_id = {add(name.customer_id)} AND device_id = {add(name.device_id)}"
            )
        if state is not None:
            conditions.append(f"state = {add(state.value)}")
        if batch_id is not None:
            conditions.append(f"batch_id = {add(batch_id)}")
        if before is not None:
            conditions.append(
                "(created_at, command_id) < (SELECT created_at, command_id FROM commands"  # noqa: S608
                f" WHERE command_id = {add(before)})"
            )
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        sql = (
            f"SELECT {COMMAND_COLUMNS} FROM commands {where}"  # noqa: S608 - constant pieces
            f" ORDER BY created_at DESC, command_id DESC LIMIT {add(limit)}"
        )
        rows = await self._read(lambda conn: conn.fetch(sql, *values))
        return [row_to_command(row) for row in rows]

    async def count_commands(self) -> dict[CommandState, int]:
        """How many commands are kept in each state (every state, 0 included)."""
        sql = "SELECT state, count(*) FROM commands GROUP BY state"
        rows = await self._read(lambda conn: conn.fetch(sql))
        counts = dict.fromkeys(CommandState, 0)
        for state, count in rows:
            counts[CommandState(state)] = int(count)
        return counts

    async def due_commands(self, names: Sequence[DeviceName]) -> list[Command]:
        """The open, unexpired commands of `names`, oldest first: what goes out again when
        these devices come online. Each is handed out once per `DUE_TAKEN_S`, whichever
        process asks (see the module's docstring)."""
        if not names:
            return []
        now = self._clock()

        async def due(conn: asyncpg.Connection) -> list[Command]:
            rows = await conn.fetch(
                f"SELECT {COMMAND_COLUMNS} FROM commands"  # noqa: S608 - constant pieces
                f" WHERE (customer_id, device_id) IN {_NAMES} AND {_OPEN} AND expires_at > $3"
                " AND (due_taken_at IS NULL OR due_taken_at <= $4)"
                " ORDER BY created_at, command_id FOR UPDATE SKIP LOCKED",
                [name.customer_id for name in names],
                [name.device_id for name in names],
                now,
                now - DUE_TAKEN_S,
            )
            await _stamp(conn, "due_taken_at", now, rows)
            return [row_to_command(row) for row in rows]

        return await self._write(due)

    async def dispatchable_commands(self, *, resend_before: float, limit: int) -> list[Command]:
        """Open, unexpired commands of online devices: every queued one, and sent ones last
        sent before `resend_before`; soonest to expire first. Each is taken once: not handed
        to a scan again (in any process) until `resend_before` passes its take."""
        now = self._clock()
        sql = f"""
            SELECT {_C_COLUMNS}
            FROM commands c JOIN devices d
                ON d.customer_id = c.customer_id AND d.device_id = c.device_id
            WHERE c.{_OPEN} AND c.expires_at > $1 AND d.online = 1 AND d.state = 'active'
                AND (c.state = 'queued' OR c.sent_at < $2)
                AND (c.scan_taken_at IS NULL OR c.scan_taken_at < $2)
            ORDER BY c.expires_at, c.command_id LIMIT $3
            FOR UPDATE OF c SKIP LOCKED
        """  # noqa: S608 - constant pieces

        async def take(conn: asyncpg.Connection) -> list[Command]:
            rows = await conn.fetch(sql, now, resend_before, limit)
            await _stamp(conn, "scan_taken_at", now, rows)
            return [row_to_command(row) for row in rows]

        return await self._write(take)

    async def mark_sent(self, command_ids: Iterable[str], at: float) -> None:
        """Published: queued -> sent (a sent one gets the new time; a finished one stays)."""
        ids = [command_id for command_id in command_ids if storable_id(command_id)]
        if not ids:
            return
        # the rows are locked in id order: two processes marking the same commands cannot
        # deadlock
        await self._write(
            lambda conn: conn.execute(
                "UPDATE commands SET state = 'sent', sent_at = $1 FROM (SELECT command_id"  # noqa: S608
                f" FROM commands WHERE command_id = ANY($2::text[]) AND {_OPEN}"
                " ORDER BY command_id FOR UPDATE) AS l"
                f" WHERE commands.command_id = l.command_id AND commands.{_OPEN}",
                at,
                ids,
            )
        )

    async def finish_commands(self, replies: Sequence[CommandReply]) -> list[Command | None]:
        """Apply device replies (one transaction); for each, the finished command, or None when
        the id is not an open command OF THAT DEVICE. A reply finishes its command once: the
        UPDATE's condition is checked again on the row it locked, so a second process applying
        the same reply gets None. What a device sends cannot fail the batch, as on SQLite
        (`storable_id`, `storable_error`)."""
        now = self._clock()
        sql = (
            "UPDATE commands SET done_at = $1, result = $2, error = $3, state ="  # noqa: S608
            " CASE WHEN $4 THEN 'done' WHEN expires_at <= $1 THEN 'expired' ELSE 'failed' END"
            f" WHERE command_id = $5 AND customer_id = $6 AND device_id = $7 AND {_OPEN}"
            f" RETURNING {COMMAND_COLUMNS}"
        )

        # applied in id order (a stable sort: replies to one id keep theirs), so that two
        # processes applying the same replies lock the rows in one order and cannot deadlock
        order = sorted(range(len(replies)), key=lambda i: replies[i].command_id)

        async def finish(conn: asyncpg.Connection) -> list[Command | None]:
            finished: list[Command | None] = [None] * len(replies)
            for index in order:
                reply = replies[index]
                if not storable_id(reply.command_id):
                    continue
                row = await conn.fetchrow(
                    sql,
                    now,
                    json_or_null(reply.result),
                    storable_error(reply.error),
                    reply.ok,
                    reply.command_id,
                    reply.name.customer_id,
                    reply.name.device_id,
                )
                finished[index] = None if row is None else row_to_command(row)
            return finished

        return await self._write(finish)

    async def finish_command(
        self, name: DeviceName, command_id: str, *, ok: bool, result: Any, error: str | None
    ) -> Command | None:
        [finished] = await self.finish_commands([CommandReply(name, command_id, ok, result, error)])
        return finished

    async def expire_commands(self, *, limit: int = 1000) -> list[Command]:
        """Open commands past `expires_at` -> expired, at most `limit` (soonest first);
        concurrent sweepers take disjoint rows, each command is expired (and returned) once."""
        now = self._clock()
        sql = (
            "UPDATE commands SET state = 'expired', done_at = $1 WHERE command_id IN"  # noqa: S608
            f" (SELECT command_id FROM commands WHERE {_OPEN} AND expires_at <= $1"
            " ORDER BY expires_at, command_id LIMIT $2 FOR UPDATE SKIP LOCKED)"
            f" AND {_OPEN} RETURNING {COMMAND_COLUMNS}"
        )
        rows = await self._write(lambda conn: conn.fetch(sql, now, limit))
        commands = [row_to_command(row) for row in rows]
        return sorted(commands, key=lambda c: (c.expires_at, c.command_id))

    async def prune_commands(self, *, before: float, limit: int = 1000) -> int:
        """Delete up to `limit` final commands created before `before`; the number deleted."""
        sql = (
            "DELETE FROM commands WHERE command_id IN (SELECT command_id FROM commands"
            " WHERE created_at < $1 AND state IN ('done', 'failed', 'expired')"
            " ORDER BY created_at, command_id LIMIT $2 FOR UPDATE SKIP LOCKED)"
        )
        status = await self._write(lambda conn: conn.execute(sql, before, limit))
        return int(status.split()[-1])


async def _stamp(conn: asyncpg.Connection, column: str, at: float, rows: list[Any]) -> None:
    """Mark the (locked) rows taken at `at`, in the caller's transaction."""
    if rows:
        await conn.execute(
            f"UPDATE commands SET {column} = $1 WHERE command_id = ANY($2::text[])",  # noqa: S608
            at,
            [row["command_id"] for row in rows],
        )
