"""Staged rollouts on PostgreSQL (all of `iotbiz.store.rollouts`, whose docstring has the life
cycle; the dataclasses, row conversions and `device_result` are shared with it).

Several platform processes may share the database, each with its rollout engine. SQLite's single
writer put every change of a rollout after the other; here each operation that changes one
(`start_rollout_batch`, `settle_rollout`, `end_rollout`) first locks the rollout's row
(SELECT ... FOR UPDATE) and decides on what it reads under that lock, so the changes of one
rollout still happen one after the other, whichever processes make them. Two engines starting
the same batch: the second waits for the first's COMMIT, then finds that batch started and
does nothing (an empty list), so no device is sent its update twice.

A batch's active devices stay locked (FOR SHARE) from the check to the COMMIT: a device revoked
meanwhile either is seen as not active (the batch waits for the revoke's COMMIT) and fails as
"not active", or its revoke waits for the batch and then fails its new command, as it fails any
open command. `end_rollout` locks the queued commands it cancels in command id order (others
that lock several commands in that order cannot deadlock with it). Reads are single
statements: a rollout and its counts are one snapshot.

No migration of its own: the tables are the PostgreSQL schema's version 2 (SQLite's 7).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from typing import Any

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type hints

from iotbiz.errors import ConflictError, NotFoundError
from iotbiz.models import Command, CommandState
from iotbiz.names import DeviceName
from iotbiz.store.commands import COMMAND_COLUMNS, new_command_id
from iotbiz.store.core import json_or_none
from iotbiz.store.postgres.core import PostgresCore, audit, audit_many
from iotbiz.store.rollouts import (
    CANCELLED,
    ROLLOUT_COLUMNS,
    Rollout,
    RolloutDevice,
    device_result,
    new_rollout_id,
    row_to_rollout,
    row_to_rollout_device,
)

# A rollout's devices counted by result, as a JSON object in byte order of the results.
_COUNTS = """(
    SELECT json_object_agg(c.result, c.n ORDER BY c.result COLLATE "C")::text
    FROM (SELECT d.result, count(*) AS n FROM rollout_devices d
          WHERE d.rollout_id = rollouts.rollout_id GROUP BY d.result) AS c
) AS counts"""
_WITH_COUNTS = f"SELECT {ROLLOUT_COLUMNS}, {_COUNTS} FROM rollouts"  # noqa: S608 - constants
# (at, actor, action, subject, detail): audit entries for `audit_many` (ids in the list's order)
AuditRow = tuple[float, str, str, str, dict[str, Any]]


class PostgresRolloutOperations(PostgresCore):
    async def create_rollout(
        self,
        names: Sequence[DeviceName],
        *,
        app: str,
        version: str,
        batch_size: int,
        max_failures: int,
        timeout_s: float,
        force: bool,
        actor: str,
    ) -> Rollout:
        """A running rollout of `names` (deduplicated, ordered by name) in batches of
        `batch_size`; nothing started yet. NotFoundError naming the devices that are not
        active, or the release when it does not exist (nothing is created then). The release's
        row is held (FOR KEY SHARE) until the COMMIT: it cannot be removed meanwhile."""
        ordered = sorted(dict.fromkeys(names), key=str)
        now = self._clock()
        rollout_id = new_rollout_id()

        async def create(conn: asyncpg.Connection) -> Rollout:
            release = await conn.fetchval(
                "SELECT 1 FROM releases WHERE app = $1 AND version = $2 FOR KEY SHARE",
                app,
                version,
            )
            if release is None:
                raise NotFoundError(f"no release {app} {version} (add it with iotbiz release add)")
            active = await _active_names(conn, ordered, lock=False)
            missing = [str(name) for name in ordered if name not in active]
            if missing:
                shown = ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else "")
                raise NotFoundError(f"not active devices ({len(missing)}): {shown}")
            await conn.execute(
                f"INSERT INTO rollouts ({ROLLOUT_COLUMNS})"  # noqa: S608 - constant columns
                " VALUES ($1, $2, $3, 'running', NULL, $4, $5, $6, $7, $8, NULL, $9, $10, -1)",
                rollout_id,
                app,
                version,
                batch_size,
                max_failures,
                float(timeout_s),
                int(force),
                now,
                actor,
                len(ordered),
            )
            await conn.execute(
                "INSERT INTO rollout_devices (rollout_id, position, customer_id, device_id,"
                " batch, result)"
                " SELECT $1, t.position - 1, t.customer_id, t.device_id,"
                " (t.position - 1) / $2, 'waiting'"
                " FROM unnest($3::text[], $4::text[]) WITH ORDINALITY"
                " AS t (customer_id, device_id, position)",
                rollout_id,
                batch_size,
                [name.customer_id for name in ordered],
                [name.device_id for name in ordered],
            )
            detail = {
                "app": app,
                "version": version,
                "devices": len(ordered),
                "batch_size": batch_size,
                "max_failures": max_failures,
            }
            await audit(conn, now, actor, "rollout.start", rollout_id, detail)
            rollout = await _get(conn, rollout_id)
            assert rollout is not None  # noqa: S101 - written in this transaction
            return rollout

        return await self._write(create)

    async def get_rollout(self, rollout_id: str) -> Rollout | None:
        return await self._read(lambda conn: _get(conn, rollout_id))

    async def list_rollouts(self, *, limit: int = 100, before: str | None = None) -> list[Rollout]:
        """Newest first; `before` is the last rollout id of the previous page (an unknown one
        gives an empty page)."""
        args: list[Any] = [limit]
        condition = ""
        if before is not None:
            condition = (
                " WHERE (created_at, rollout_id) < (SELECT b.created_at, b.rollout_id"
                " FROM rollouts b WHERE b.rollout_id = $2)"
            )
            args.append(before)
        sql = f"{_WITH_COUNTS}{condition} ORDER BY created_at DESC, rollout_id DESC LIMIT $1"
        rows = await self._read(lambda conn: conn.fetch(sql, *args))
        return [_row_to_rollout(row) for row in rows]

    async def rollout_devices(self, rollout_id: str) -> list[RolloutDevice]:
        sql = (
            "SELECT customer_id, device_id, batch, result, reason, command_id"
            " FROM rollout_devices WHERE rollout_id = $1 ORDER BY position"
        )
        rows = await self._read(lambda conn: conn.fetch(sql, rollout_id))
        return [row_to_rollout_device(row) for row in rows]

    async def rollouts_to_follow(self, *, limit: int) -> list[str]:
        """Rollouts the engine looks after: running ones, and ended ones with devices whose
        delivered command has no result yet (oldest first)."""
        sql = (
            "SELECT rollout_id FROM rollouts WHERE state = 'running' OR rollout_id IN"
            " (SELECT rollout_id FROM rollout_devices WHERE result = 'updating')"
            " ORDER BY created_at, rollout_id LIMIT $1"
        )
        rows = await self._read(lambda conn: conn.fetch(sql, limit))
        return [row[0] for row in rows]

    async def batch_names(self, rollout_id: str, batch: int) -> list[DeviceName]:
        """The devices of a batch still waiting (to offer them the release)."""
        sql = (
            "SELECT customer_id, device_id FROM rollout_devices WHERE rollout_id = $1"
            " AND batch = $2 AND result = 'waiting' ORDER BY position"
        )
        rows = await self._read(lambda conn: conn.fetch(sql, rollout_id, batch))
        return [DeviceName(row[0], row[1]) for row in rows]

    async def start_rollout_batch(
        self, rollout_id: str, batch: int, args: dict[str, Any], *, expires_at: float
    ) -> list[Command]:
        """Start batch `batch` (one transaction): one queued update command per waiting device,
        linked to it. Nothing happens (empty list) when that batch has started already, or the
        rollout is no longer running: a repeat after a restart, or by another process's engine
        at the same time (it waits for the rollout's row lock), sends nobody a second update."""
        now = self._clock()
        args_text = json.dumps(args, separators=(",", ":"))
        batch_id = f"b-{secrets.token_hex(8)}"

        async def start(conn: asyncpg.Connection) -> list[Command]:
            rollout = await _lock(conn, rollout_id)
            if rollout is None or not rollout.running or rollout.batch != batch - 1:
                return []
            rows = await conn.fetch(
                "SELECT position, customer_id, device_id FROM rollout_devices"
                " WHERE rollout_id = $1 AND batch = $2 AND result = 'waiting' ORDER BY position",
                rollout_id,
                batch,
            )
            names = [DeviceName(row[1], row[2]) for row in rows]
            active = await _active_names(conn, names, lock=True)
            actor = rollout.actor
            commands: list[Command] = []
            failed: list[tuple[int, DeviceName, str, str | None]] = []
            positions: list[int] = []
            audits: list[AuditRow] = []
            for row, name in zip(rows, names, strict=True):
                position = row[0]
                if name not in active:
                    failed.append((position, name, "failed", "not active"))
                    audits.append(_device_audit(rollout, now, name, "failed", "not active"))
                    continue
                command = Command(
                    command_id=new_command_id(),
                    customer_id=name.customer_id,
                    device_id=name.device_id,
                    action="update",
                    args=args,
                    state=CommandState.QUEUED,
                    created_at=now,
                    expires_at=expires_at,
                    actor=actor,
                    batch_id=batch_id,
                )
                commands.append(command)
                positions.append(position)
                detail = {"id": command.command_id, "action": "update", "batch": batch_id}
                audits.append((now, actor, "command.send", str(name), detail))
            await _set_results(conn, rollout_id, failed)
            ids = [command.command_id for command in commands]
            await conn.execute(
                f"INSERT INTO commands ({COMMAND_COLUMNS})"  # noqa: S608 - constant columns
                " SELECT t.command_id, t.customer_id, t.device_id, $4, 'update', $5, 'queued',"
                " $6, $7, NULL, NULL, NULL, NULL, $8"
                " FROM unnest($1::text[], $2::text[], $3::text[])"
                " AS t (command_id, customer_id, device_id)",
                ids,
                [command.customer_id for command in commands],
                [command.device_id for command in commands],
                batch_id,
                args_text,
                now,
                expires_at,
                actor,
            )
            await conn.execute(
                "UPDATE rollout_devices d SET result = 'updating', command_id = t.command_id"
                " FROM unnest($2::int[], $3::text[]) AS t (position, command_id)"
                " WHERE d.rollout_id = $1 AND d.position = t.position",
                rollout_id,
                positions,
                ids,
            )
            await conn.execute(
                "UPDATE rollouts SET batch = $1 WHERE rollout_id = $2", batch, rollout_id
            )
            started = {"index": batch, "devices": [str(name) for name in names]}
            audits.append((now, actor, "rollout.batch", rollout_id, started))
            await audit_many(conn, audits)
            return commands

        return await self._write(start)

    async def settle_rollout(self, rollout_id: str) -> int | None:
        """Record the results of finished commands, stop the rollout when failures are more than
        its max_failures, complete it when every batch has its results; the index of the batch
        to start next, or None (nothing to start now). Under the rollout's row lock: two
        engines settling it at once record each result once."""
        now = self._clock()

        async def settle(conn: asyncpg.Connection) -> int | None:
            rollout = await _lock(conn, rollout_id)
            if rollout is None:
                return None
            rows = await conn.fetch(
                "SELECT d.position, d.customer_id, d.device_id, c.state, c.result, c.error"
                " FROM rollout_devices d LEFT JOIN commands c ON c.command_id = d.command_id"
                " WHERE d.rollout_id = $1 AND d.result = 'updating'"
                " AND (c.state IS NULL OR c.state IN ('done', 'failed', 'expired'))"
                " ORDER BY d.position",
                rollout_id,
            )
            results: list[tuple[int, DeviceName, str, str | None]] = []
            for position, customer, device, state, result, error in rows:
                outcome, reason = device_result(state, json_or_none(result), error)
                results.append((position, DeviceName(customer, device), outcome, reason))
            await _set_results(conn, rollout_id, results)
            await audit_many(
                conn, [_device_audit(rollout, now, n, result, why) for _, n, result, why in results]
            )
            if not rollout.running:
                return None
            counts = await _counts(conn, rollout_id)
            failed = counts.get("failed", 0)
            if failed > rollout.max_failures:
                failures = "1 failure" if failed == 1 else f"{failed} failures"
                reason = f"{failures}, more than --max-failures {rollout.max_failures}"
                await _end(conn, rollout, "stopped", reason, rollout.actor, now)
                return None
            if counts.get("updating", 0):
                return None
            if rollout.batch + 1 < rollout.batches:
                return rollout.batch + 1
            await _end(conn, rollout, "completed", None, rollout.actor, now)
            return None

        return await self._write(settle)

    async def end_rollout(
        self, rollout_id: str, state: str, reason: str | None, actor: str
    ) -> Rollout:
        """End a running rollout (`aborted` by an operator, `stopped` by the engine): its
        queued commands cancelled, devices not updated skipped. NotFoundError for an unknown
        id, ConflictError when it has ended already (also when another process ended it
        first: it waited for that one's row lock)."""
        now = self._clock()

        async def end(conn: asyncpg.Connection) -> Rollout:
            rollout = await _lock(conn, rollout_id)
            if rollout is None:
                raise NotFoundError(f"no rollout {rollout_id}")
            if not rollout.running:
                raise ConflictError(f"rollout {rollout_id} is already {rollout.state}")
            await _end(conn, rollout, state, reason, actor, now)
            ended = await _get(conn, rollout_id)
            assert ended is not None  # noqa: S101 - rollouts are never deleted
            return ended

        return await self._write(end)


def _row_to_rollout(row: asyncpg.Record) -> Rollout:
    """A row of _WITH_COUNTS: the rollout's columns, then its counts as JSON (NULL: none)."""
    counts: dict[str, int] = json.loads(row["counts"]) if row["counts"] is not None else {}
    return row_to_rollout(row, counts)


async def _get(conn: asyncpg.Connection, rollout_id: str) -> Rollout | None:
    row = await conn.fetchrow(f"{_WITH_COUNTS} WHERE rollout_id = $1", rollout_id)
    return None if row is None else _row_to_rollout(row)


async def _lock(conn: asyncpg.Connection, rollout_id: str) -> Rollout | None:
    """The rollout, its row locked until the transaction ends. Its counts are read by a second
    statement, after the lock is granted: a statement that waited for a lock sees the locked row
    as it is now, but the rest of its reads as they were when it began."""
    row = await conn.fetchrow(
        f"SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE rollout_id = $1 FOR UPDATE",  # noqa: S608
        rollout_id,
    )
    return None if row is None else row_to_rollout(row, await _counts(conn, rollout_id))


async def _counts(conn: asyncpg.Connection, rollout_id: str) -> dict[str, int]:
    rows = await conn.fetch(
        "SELECT result, count(*) FROM rollout_devices WHERE rollout_id = $1"
        ' GROUP BY result ORDER BY result COLLATE "C"',
        rollout_id,
    )
    return {row[0]: int(row[1]) for row in rows}


async def _active_names(
    conn: asyncpg.Connection, names: Sequence[DeviceName], *, lock: bool
) -> set[DeviceName]:
    """Those of `names` that are active devices; with `lock`, their rows are held (FOR SHARE)
    until the transaction ends, so that none is revoked or reset meanwhile."""
    if not names:
        return set()
    sql = (
        "SELECT customer_id, device_id FROM devices"
        " WHERE (customer_id, device_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))"
        " AND state = 'active'"
    )
    rows = await conn.fetch(
        sql + (" FOR SHARE" if lock else ""),
        [name.customer_id for name in names],
        [name.device_id for name in names],
    )
    return {DeviceName(row[0], row[1]) for row in rows}


async def _set_results(
    conn: asyncpg.Connection,
    rollout_id: str,
    results: Sequence[tuple[int, DeviceName, str, str | None]],
) -> None:
    """(position, name, result, reason) of the rollout's devices, in one statement."""
    if not results:
        return
    await conn.execute(
        "UPDATE rollout_devices d SET result = t.result, reason = t.reason"
        " FROM unnest($2::int[], $3::text[], $4::text[]) AS t (position, result, reason)"
        " WHERE d.rollout_id = $1 AND d.position = t.position",
        rollout_id,
        [position for position, _, _, _ in results],
        [result for _, _, result, _ in results],
        [reason for _, _, _, reason in results],
    )


def _device_audit(
    rollout: Rollout, now: float, name: DeviceName, result: str, reason: str | None
) -> AuditRow:
    detail = {"device": str(name), "result": result, "reason": reason}
    return (now, rollout.actor, "rollout.device", rollout.rollout_id, detail)


async def _end(
    conn: asyncpg.Connection,
    rollout: Rollout,
    state: str,
    reason: str | None,
    actor: str,
    now: float,
) -> None:
    rollout_id = rollout.rollout_id
    if state in CANCELLED:
        # queued commands failed (locked in id order), their devices and the waiting ones
        # skipped; a command sent meanwhile keeps its device updating (its result will come)
        await conn.execute(
            """
            WITH queued AS (
                SELECT c.command_id FROM commands c
                JOIN rollout_devices d ON d.command_id = c.command_id
                WHERE d.rollout_id = $3 AND d.result = 'updating' AND c.state = 'queued'
                ORDER BY c.command_id FOR UPDATE OF c
            ), cancelled AS (
                UPDATE commands SET state = 'failed', done_at = $1, error = $2
                WHERE state = 'queued' AND command_id IN (SELECT command_id FROM queued)
                RETURNING command_id
            )
            UPDATE rollout_devices SET result = 'skipped', reason = $2
            WHERE rollout_id = $3
                AND (result = 'waiting' OR command_id IN (SELECT command_id FROM cancelled))
            """,
            now,
            CANCELLED[state],
            rollout_id,
        )
    await conn.execute(
        "UPDATE rollouts SET state = $1, reason = $2, finished_at = $3 WHERE rollout_id = $4",
        state,
        reason,
        now,
        rollout_id,
    )
    action = {"aborted": "rollout.abort"}.get(state, f"rollout.{state}")
    await audit(conn, now, actor, action, rollout_id, {"reason": reason})
