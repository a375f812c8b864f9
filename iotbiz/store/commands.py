"""Commands: created queued, sent by the dispatcher, finished by their device's reply or expired.

    queued -> sent            `mark_sent` (published on the device's `cmd` topic)
    queued | sent -> done     `finish_commands`, a reply `ok: true` from THAT device
    queued | sent -> failed   `finish_commands`, a reply `ok: false` before `expires_at`; or the
                              device was revoked or reset (`close_open_commands`)
    queued | sent -> expired  `expire_commands` (no reply by `expires_at`), or a reply `ok: false`
                              that arrives after `expires_at` (the agent's "expired before it
                              arrived"): its error is kept
    done | failed | expired   final: nothing changes them again (a late reply is ignored)

A reply `ok: true` that arrives after `expires_at` but before the sweeper marked the command
expired makes it done: the device did carry it out.
"""

from __future__ import annotations

import json
import re
import secrets
import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

from iotbiz.errors import NotFoundError
from iotbiz.models import Command, CommandReply, CommandState
from iotbiz.names import DeviceName
from iotbiz.store.core import Row, StoreCore, audit, json_or_none, json_or_null

COMMAND_COLUMNS = (
    "command_id, customer_id, device_id, batch_id, action, args, state, created_at, expires_at,"
    " sent_at, done_at, result, error, actor"
)
_OPEN = "state IN ('queued', 'sent')"  # the very expression of the partial index commands_open
_RETURNING = f" RETURNING {COMMAND_COLUMNS}"
NAMES_PER_QUERY = 500  # device names bound in one statement (SQLite allows 32,766 variables)


class CommandOperations(StoreCore):
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
        """Queue one command per device (one transaction, one `command.send` audit entry each),
        in the order of `names` (a name given twice gets one command). Ids: `c-` and 16 hex
        digits. Raises NotFoundError naming the devices that are not active (nothing is created
        then)."""
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

        def create(conn: sqlite3.Connection) -> None:
            active = _active_names(conn, names)
            missing = [str(name) for name in names if name not in active]
            if missing:
                shown = ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else "")
                raise NotFoundError(f"not active devices ({len(missing)}): {shown}")
            conn.executemany(
                f"INSERT INTO commands ({COMMAND_COLUMNS})"  # noqa: S608 - constant columns
                " VALUES (?, ?, ?, ?, ?, ?, 'queued', ?, ?, NULL, NULL, NULL, NULL, ?)",
                [
                    (c.command_id, *c.device, batch_id, action, args_text, now, expires_at, actor)
                    for c in commands
                ],
            )
            for command in commands:
                detail = {"id": command.command_id, "action": action, "batch": batch_id}
                audit(conn, now, actor, "command.send", command.name, detail)

        await self._write(create)
        return commands

    async def get_command(self, command_id: str) -> Command | None:
        sql = f"SELECT {COMMAND_COLUMNS} FROM commands WHERE command_id = ?"  # noqa: S608
        row = await self._call(lambda conn: conn.execute(sql, (command_id,)).fetchone())
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
        """Commands newest first; `before` is a command id (the last of the previous page): the
        page goes on after it, keyset on (created_at, command_id). An unknown `before` gives an
        empty page."""
        conditions: list[str] = []
        params: dict[str, Any] = {"limit": limit}
        if name is not None:
            conditions.append("customer_id = :customer_id AND device_id = :device_id")
            params |= {"customer_id": name.customer_id, "device_id": name.device_id}
        if state is not None:
            conditions.append("state = :state")
            params["state"] = state.value
        if batch_id is not None:
            conditions.append("batch_id = :batch_id")
            params["batch_id"] = batch_id
        if before is not None:
            conditions.append(
                "(created_at, command_id) < (SELECT created_at, command_id FROM commands"
                " WHERE command_id = :before)"
            )
            params["before"] = before
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        sql = (
            f"SELECT {COMMAND_COLUMNS} FROM commands {where}"  # noqa: S608 - constant pieces
            " ORDER BY created_at DESC, command_id DESC LIMIT :limit"
        )
        rows = await self._call(lambda conn: conn.execute(sql, params).fetchall())
        return [row_to_command(row) for row in rows]

    async def count_commands(self) -> dict[CommandState, int]:
        """How many commands are kept in each state (every state, 0 included); one pass over
        the state index."""
        sql = "SELECT state, count(*) FROM commands GROUP BY state"
        rows = await self._call(lambda conn: conn.execute(sql).fetchall())
        counts = dict.fromkeys(CommandState, 0)
        for state, count in rows:
            counts[CommandState(state)] = int(count)
        return counts

    async def due_commands(self, names: Sequence[DeviceName]) -> list[Command]:
        """The open (queued or sent), unexpired commands of `names`, oldest first: what goes out
        again when these devices come online."""
        now = self._clock()

        def due(conn: sqlite3.Connection) -> list[Command]:
            found: list[Command] = []
            for start in range(0, len(names), NAMES_PER_QUERY):
                chunk = names[start : start + NAMES_PER_QUERY]
                pairs = ", ".join("(?, ?)" for _ in chunk)
                rows = conn.execute(
                    f"SELECT {COMMAND_COLUMNS} FROM commands"  # noqa: S608 - placeholders only
                    f" WHERE (customer_id, device_id) IN (VALUES {pairs})"
                    f" AND {_OPEN} AND expires_at > ? ORDER BY created_at",
                    [*(part for name in chunk for part in name), now],
                ).fetchall()
                found.extend(row_to_command(row) for row in rows)
            return found

        return await self._call(due)

    async def dispatchable_commands(self, *, resend_before: float, limit: int) -> list[Command]:
        """Open, unexpired commands of devices that are online: every queued one, and sent ones
        last sent before `resend_before` (their reply may be lost); soonest to expire first."""
        now = self._clock()
        sql = f"""
            SELECT {", ".join(f"c.{column.strip()}" for column in COMMAND_COLUMNS.split(","))}
            FROM commands c JOIN devices d
                ON d.customer_id = c.customer_id AND d.device_id = c.device_id
            WHERE c.{_OPEN} AND c.expires_at > :now AND d.online AND d.state = 'active'
                AND (c.state = 'queued' OR c.sent_at < :resend_before)
            ORDER BY c.expires_at LIMIT :limit
        """  # noqa: S608 - constant pieces
        values = {"now": now, "resend_before": resend_before, "limit": limit}
        rows = await self._call(lambda conn: conn.execute(sql, values).fetchall())
        return [row_to_command(row) for row in rows]

    async def mark_sent(self, command_ids: Iterable[str], at: float) -> None:
        """Commands published to their devices: queued -> sent (a sent one gets the new time;
        one finished meanwhile, its reply faster than this write, stays finished)."""
        rows = [(at, command_id) for command_id in command_ids]
        if not rows:
            return
        await self._write(
            lambda conn: conn.executemany(
                f"UPDATE commands SET state = 'sent', sent_at = ? WHERE command_id = ? AND {_OPEN}",  # noqa: S608
                rows,
            )
        )

    async def finish_commands(self, replies: Sequence[CommandReply]) -> list[Command | None]:
        """Apply device replies (one transaction); for each, the finished command, or None when
        the id is not an open command OF THAT DEVICE (another device's id, unknown, final).
        What a device sends cannot fail the batch: see `storable_error`, `storable_id`."""
        now = self._clock()
        sql = (
            "UPDATE commands SET done_at = :now, result = :result, error = :error, state ="  # noqa: S608
            " CASE WHEN :ok THEN 'done' WHEN expires_at <= :now THEN 'expired' ELSE 'failed' END"
            " WHERE command_id = :id AND customer_id = :customer_id AND device_id = :device_id"
            f" AND {_OPEN}{_RETURNING}"
        )

        def finish(conn: sqlite3.Connection) -> list[Command | None]:
            finished: list[Command | None] = []
            for reply in replies:
                if not storable_id(reply.command_id):
                    finished.append(None)  # no command has such an id
                    continue
                row = conn.execute(
                    sql,
                    {
                        "now": now,
                        "ok": int(reply.ok),
                        "result": json_or_null(reply.result),
                        "error": storable_error(reply.error),
                        "id": reply.command_id,
                        "customer_id": reply.name.customer_id,
                        "device_id": reply.name.device_id,
                    },
                ).fetchone()
                finished.append(None if row is None else row_to_command(row))
            return finished

        return await self._write(finish)

    async def finish_command(
        self, name: DeviceName, command_id: str, *, ok: bool, result: Any, error: str | None
    ) -> Command | None:
        [finished] = await self.finish_commands([CommandReply(name, command_id, ok, result, error)])
        return finished

    async def expire_commands(self, *, limit: int = 1000) -> list[Command]:
        """Open commands past `expires_at` -> expired, at most `limit` of them (soonest first)."""
        now = self._clock()
        sql = (
            "UPDATE commands SET state = 'expired', done_at = :now WHERE command_id IN"  # noqa: S608
            f" (SELECT command_id FROM commands WHERE {_OPEN} AND expires_at <= :now"
            f" ORDER BY expires_at LIMIT :limit){_RETURNING}"
        )
        values = {"now": now, "limit": limit}
        rows = await self._write(lambda conn: conn.execute(sql, values).fetchall())
        return [row_to_command(row) for row in rows]

    async def prune_commands(self, *, before: float, limit: int = 1000) -> int:
        """Delete up to `limit` final commands created before `before`; the number deleted."""
        sql = (
            "DELETE FROM commands WHERE command_id IN (SELECT command_id FROM commands"
            " WHERE created_at < :before AND state IN ('done', 'failed', 'expired')"
            " ORDER BY created_at LIMIT :limit)"
        )
        values = {"before": before, "limit": limit}
        return int(await self._write(lambda conn: conn.execute(sql, values).rowcount))


# Text neither backend can take: lone surrogates (JSON may carry "\ud800"; they have no UTF-8
# encoding: the driver raised UnicodeEncodeError, not a StoreError, and the dispatcher's reply
# task died) and NUL (PostgreSQL text cannot hold it).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable_id(command_id: str) -> bool:
    """False for an id no command can have (it holds unstorable text): it matches nothing."""
    return _UNSTORABLE.search(command_id) is None


def storable_error(error: str | None) -> str | None:
    """A device's error text as both backends store it: unstorable characters become U+FFFD."""
    return None if error is None else _UNSTORABLE.sub("\ufffd", error)


def new_command_id() -> str:
    return f"c-{secrets.token_hex(8)}"


def close_open_commands(conn: sqlite3.Connection, name: DeviceName, now: float, error: str) -> None:
    """Fail the open commands of a device that was revoked or reset (in the caller's
    transaction): nothing will ever answer them."""
    conn.execute(
        "UPDATE commands SET state = 'failed', done_at = ?, error = ?"  # noqa: S608
        f" WHERE customer_id = ? AND device_id = ? AND {_OPEN}",
        (now, error, *name),
    )


def _active_names(conn: sqlite3.Connection, names: Sequence[DeviceName]) -> set[DeviceName]:
    active: set[DeviceName] = set()
    for start in range(0, len(names), NAMES_PER_QUERY):
        chunk = names[start : start + NAMES_PER_QUERY]
        pairs = ", ".join("(?, ?)" for _ in chunk)
        rows = conn.execute(
            "SELECT customer_id, device_id FROM devices"  # noqa: S608 - placeholders only
            f" WHERE (customer_id, device_id) IN (VALUES {pairs}) AND state = 'active'",
            [part for name in chunk for part in name],
        ).fetchall()
        active.update(DeviceName(row[0], row[1]) for row in rows)
    return active


def row_to_command(row: Row) -> Command:
    return Command(
        command_id=row["command_id"],
        customer_id=row["customer_id"],
        device_id=row["device_id"],
        action=row["action"],
        args=json.loads(row["args"]),
        state=CommandState(row["state"]),
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        sent_at=row["sent_at"],
        done_at=row["done_at"],
        result=json_or_none(row["result"]),
        error=row["error"],
        actor=row["actor"],
        batch_id=row["batch_id"],
    )
