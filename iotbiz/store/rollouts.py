"""Staged rollouts: one release to a fixed, ordered list of devices, batch after batch.

    running -> completed   every batch has its results, failures <= max_failures
    running -> stopped     failures > max_failures (`settle_rollout`)
    running -> aborted     the operator (`end_rollout`)

A device is `waiting`, then `updating` (its batch started: its update command is linked), then
`committed` or `failed` (with a reason); `skipped` when the rollout ended before it was updated
(its command still queued then is cancelled: failed "rollout stopped" / "rollout aborted").
A batch's commands are created and linked in ONE transaction that first checks the batch has
not started: a restarted platform never sends a device its update twice. Results of commands
already delivered when the rollout ended are still recorded.
"""

from __future__ import annotations

import json
import math
import secrets
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from iotbiz.errors import ConflictError, NotFoundError
from iotbiz.models import Command, CommandState
from iotbiz.names import DeviceName
from iotbiz.store.commands import COMMAND_COLUMNS, _active_names, new_command_id
from iotbiz.store.core import StoreCore, audit, json_or_none

RESULTS = ("waiting", "updating", "committed", "failed", "skipped")
ROLLOUT_COLUMNS = (
    "rollout_id, app, version, state, reason, batch_size, max_failures, timeout_s, force,"
    " created_at, finished_at, actor, total, batch"
)
CANCELLED = {"stopped": "rollout stopped", "aborted": "rollout aborted"}


@dataclass(frozen=True, slots=True)
class Rollout:
    rollout_id: str
    app: str
    version: str
    state: str
    reason: str | None
    batch_size: int
    max_failures: int
    timeout_s: float
    force: bool
    created_at: float
    finished_at: float | None
    actor: str
    total: int
    batch: int  # the batch started last; -1 before the first
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def batches(self) -> int:
        return math.ceil(self.total / self.batch_size)

    @property
    def running(self) -> bool:
        return self.state == "running"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.rollout_id,
            "app": self.app,
            "version": self.version,
            "state": self.state,
            "reason": self.reason,
            "batch_size": self.batch_size,
            "max_failures": self.max_failures,
            "timeout_s": self.timeout_s,
            "force": self.force,
            "created_at": self.created_at,
            "finished_at": self.finished_at,
            "actor": self.actor,
            "total": self.total,
            **{result: self.counts.get(result, 0) for result in RESULTS},
            "batch": max(self.batch, 0),
            "batches": self.batches,
        }


@dataclass(frozen=True, slots=True)
class RolloutDevice:
    name: DeviceName
    batch: int
    result: str
    reason: str | None
    command_id: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": str(self.name),
            "batch": self.batch,
            "result": self.result,
            "reason": self.reason,
            "command_id": self.command_id,
        }


def new_rollout_id() -> str:
    return f"r-{secrets.token_hex(8)}"


class RolloutOperations(StoreCore):
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
        active, or the release when it does not exist (nothing is created then)."""
        ordered = sorted(dict.fromkeys(names), key=str)
        now = self._clock()
        rollout_id = new_rollout_id()

        def create(conn: sqlite3.Connection) -> None:
            if (
                conn.execute(
                    "SELECT 1 FROM releases WHERE app = ? AND version = ?", (app, version)
                ).fetchone()
                is None
            ):
                raise NotFoundError(f"no release {app} {version} (add it with iotbiz release add)")
            active = _active_names(conn, ordered)
            missing = [str(name) for name in ordered if name not in active]
            if missing:
                shown = ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else "")
                raise NotFoundError(f"not active devices ({len(missing)}): {shown}")
            conn.execute(
                f"INSERT INTO rollouts ({ROLLOUT_COLUMNS})"  # noqa: S608 - constant columns
                " VALUES (?, ?, ?, 'running', NULL, ?, ?, ?, ?, ?, NULL, ?, ?, -1)",
                (
                    rollout_id,
                    app,
                    version,
                    batch_size,
                    max_failures,
                    timeout_s,
                    int(force),
                    now,
                    actor,
                    len(ordered),
                ),
            )
            conn.executemany(
                "INSERT INTO rollout_devices (rollout_id, position, customer_id, device_id,"
                " batch, result) VALUES (?, ?, ?, ?, ?, 'waiting')",
                [
                    (rollout_id, position, *name, position // batch_size)
                    for position, name in enumerate(ordered)
                ],
            )
            detail = {
                "app": app,
                "version": version,
                "devices": len(ordered),
                "batch_size": batch_size,
                "max_failures": max_failures,
            }
            audit(conn, now, actor, "rollout.start", rollout_id, detail)

        await self._write(create)
        rollout = await self.get_rollout(rollout_id)
        assert rollout is not None  # noqa: S101 - just written
        return rollout

    async def get_rollout(self, rollout_id: str) -> Rollout | None:
        return await self._call(lambda conn: _get(conn, rollout_id))

    async def list_rollouts(self, *, limit: int = 100, before: str | None = None) -> list[Rollout]:
        """Newest first; `before` is the last rollout id of the previous page."""
        condition, params = "", list[Any]([limit])
        if before is not None:
            condition = (
                "WHERE (created_at, rollout_id) < (SELECT created_at, rollout_id FROM rollouts"
                " WHERE rollout_id = ?)"
            )
            params = [before, limit]
        sql = (
            f"SELECT {ROLLOUT_COLUMNS} FROM rollouts {condition}"  # noqa: S608 - constant pieces
            " ORDER BY created_at DESC, rollout_id DESC LIMIT ?"
        )

        def read(conn: sqlite3.Connection) -> list[Rollout]:
            return [_with_counts(conn, row) for row in conn.execute(sql, params).fetchall()]

        return await self._call(read)

    async def rollout_devices(self, rollout_id: str) -> list[RolloutDevice]:
        sql = (
            "SELECT customer_id, device_id, batch, result, reason, command_id"
            " FROM rollout_devices WHERE rollout_id = ? ORDER BY position"
        )
        rows = await self._call(lambda conn: conn.execute(sql, (rollout_id,)).fetchall())
        return [row_to_rollout_device(row) for row in rows]

    async def rollouts_to_follow(self, *, limit: int) -> list[str]:
        """Rollouts the engine looks after: running ones, and ended ones with devices whose
        delivered command has no result yet (oldest first)."""
        sql = (
            "SELECT rollout_id FROM rollouts WHERE state = 'running' OR rollout_id IN"
            " (SELECT rollout_id FROM rollout_devices WHERE result = 'updating')"
            " ORDER BY created_at, rollout_id LIMIT ?"
        )
        rows = await self._call(lambda conn: conn.execute(sql, (limit,)).fetchall())
        return [row[0] for row in rows]

    async def batch_names(self, rollout_id: str, batch: int) -> list[DeviceName]:
        """The devices of a batch still waiting (to offer them the release)."""
        sql = (
            "SELECT customer_id, device_id FROM rollout_devices WHERE rollout_id = ?"
            " AND batch = ? AND result = 'waiting' ORDER BY position"
        )
        rows = await self._call(lambda conn: conn.execute(sql, (rollout_id, batch)).fetchall())
        return [DeviceName(row[0], row[1]) for row in rows]

    async def start_rollout_batch(
        self, rollout_id: str, batch: int, args: dict[str, Any], *, expires_at: float
    ) -> list[Command]:
        """Start batch `batch` (one transaction): one queued update command per waiting device,
        linked to it. Nothing happens (empty list) when that batch has started already, or the
        rollout is no longer running: a repeat after a restart sends nobody a second update."""
        now = self._clock()
        args_text = json.dumps(args, separators=(",", ":"))
        batch_id = f"b-{secrets.token_hex(8)}"

        def start(conn: sqlite3.Connection) -> list[Command]:
            rollout = _get(conn, rollout_id)
            if rollout is None or not rollout.running or rollout.batch != batch - 1:
                return []
            rows = conn.execute(
                "SELECT position, customer_id, device_id FROM rollout_devices"
                " WHERE rollout_id = ? AND batch = ? AND result = 'waiting' ORDER BY position",
                (rollout_id, batch),
            ).fetchall()
            names = [DeviceName(row[1], row[2]) for row in rows]
            active = _active_names(conn, names)
            commands: list[Command] = []
            actor = rollout.actor
            for (position, *_), name in zip(rows, names, strict=True):
                if name not in active:
                    _set_result(conn, rollout, position, name, "failed", "not active", now)
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
                    actor=rollout.actor,
                    batch_id=batch_id,
                )
                conn.execute(
                    f"INSERT INTO commands ({COMMAND_COLUMNS})"  # noqa: S608 - constant columns
                    " VALUES (?, ?, ?, ?, 'update', ?, 'queued', ?, ?, NULL, NULL, NULL, NULL, ?)",
                    (command.command_id, *name, batch_id, args_text, now, expires_at, actor),
                )
                conn.execute(
                    "UPDATE rollout_devices SET result = 'updating', command_id = ?"
                    " WHERE rollout_id = ? AND position = ?",
                    (command.command_id, rollout_id, position),
                )
                detail = {"id": command.command_id, "action": "update", "batch": batch_id}
                audit(conn, now, rollout.actor, "command.send", str(name), detail)
                commands.append(command)
            conn.execute("UPDATE rollouts SET batch = ? WHERE rollout_id = ?", (batch, rollout_id))
            started = {"index": batch, "devices": [str(name) for name in names]}
            audit(conn, now, actor, "rollout.batch", rollout_id, started)
            return commands

        return await self._write(start)

    async def settle_rollout(self, rollout_id: str) -> int | None:
        """Record the results of finished commands, stop the rollout when failures are more than
        its max_failures, complete it when every batch has its results; the index of the batch
        to start next, or None (nothing to start now)."""
        now = self._clock()

        def settle(conn: sqlite3.Connection) -> int | None:
            rollout = _get(conn, rollout_id)
            if rollout is None:
                return None
            rows = conn.execute(
                "SELECT d.position, d.customer_id, d.device_id, c.state, c.result, c.error"
                " FROM rollout_devices d LEFT JOIN commands c ON c.command_id = d.command_id"
                " WHERE d.rollout_id = ? AND d.result = 'updating'"
                " AND (c.state IS NULL OR c.state IN ('done', 'failed', 'expired'))",
                (rollout_id,),
            ).fetchall()
            for position, customer, device, state, result, error in rows:
                outcome, reason = device_result(state, json_or_none(result), error)
                name = DeviceName(customer, device)
                _set_result(conn, rollout, position, name, outcome, reason, now)
            if not rollout.running:
                return None
            counts = _counts(conn, rollout_id)
            failed = counts.get("failed", 0)
            if failed > rollout.max_failures:
                failures = "1 failure" if failed == 1 else f"{failed} failures"
                reason = f"{failures}, more than --max-failures {rollout.max_failures}"
                _end(conn, rollout, "stopped", reason, rollout.actor, now)
                return None
            if counts.get("updating", 0):
                return None
            if rollout.batch + 1 < rollout.batches:
                return rollout.batch + 1
            _end(conn, rollout, "completed", None, rollout.actor, now)
            return None

        return await self._write(settle)

    async def end_rollout(
        self, rollout_id: str, state: str, reason: str | None, actor: str
    ) -> Rollout:
        """End a running rollout (`aborted` by an operator, `stopped` by the engine): its
        queued commands cancelled, devices not updated skipped. NotFoundError for an unknown
        id, ConflictError when it has ended already."""
        now = self._clock()

        def end(conn: sqlite3.Connection) -> None:
            rollout = _get(conn, rollout_id)
            if rollout is None:
                raise NotFoundError(f"no rollout {rollout_id}")
            if not rollout.running:
                raise ConflictError(f"rollout {rollout_id} is already {rollout.state}")
            _end(conn, rollout, state, reason, actor, now)

        await self._write(end)
        ended = await self.get_rollout(rollout_id)
        assert ended is not None  # noqa: S101 - rollouts are never deleted
        return ended


def device_result(state: str | None, result: Any, error: str | None) -> tuple[str, str | None]:
    """A device's result from its finished update command: committed, or failed and why."""
    if state == "done":
        outcome = result.get("outcome") if isinstance(result, dict) else None
        if outcome == "committed":
            return "committed", None
        why = result.get("reason") if isinstance(result, dict) else None
        return "failed", f"{outcome or 'no outcome'}: {why or 'no reason given'}"
    if state == "expired":
        return "failed", "expired"
    if state is None:
        return "failed", "failed: the command is no longer kept"
    return "failed", f"failed: {error or 'no error given'}"


def row_to_rollout(row: Sequence[Any], counts: dict[str, int]) -> Rollout:
    """A rollouts row (its ROLLOUT_COLUMNS, in order) and its devices' counts by result."""
    return Rollout(
        rollout_id=row[0],
        app=row[1],
        version=row[2],
        state=row[3],
        reason=row[4],
        batch_size=row[5],
        max_failures=row[6],
        timeout_s=row[7],
        force=bool(row[8]),
        created_at=row[9],
        finished_at=row[10],
        actor=row[11],
        total=row[12],
        batch=row[13],
        counts=counts,
    )


def row_to_rollout_device(row: Sequence[Any]) -> RolloutDevice:
    """customer_id, device_id, batch, result, reason, command_id."""
    return RolloutDevice(DeviceName(row[0], row[1]), row[2], row[3], row[4], row[5])


def _get(conn: sqlite3.Connection, rollout_id: str) -> Rollout | None:
    sql = f"SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE rollout_id = ?"  # noqa: S608
    row = conn.execute(sql, (rollout_id,)).fetchone()
    return None if row is None else _with_counts(conn, row)


def _with_counts(conn: sqlite3.Connection, row: sqlite3.Row) -> Rollout:
    return row_to_rollout(row, _counts(conn, row[0]))


def _counts(conn: sqlite3.Connection, rollout_id: str) -> dict[str, int]:
    rows = conn.execute(
        "SELECT result, count(*) FROM rollout_devices WHERE rollout_id = ? GROUP BY result",
        (rollout_id,),
    ).fetchall()
    return {row[0]: int(row[1]) for row in rows}


def _set_result(
    conn: sqlite3.Connection,
    rollout: Rollout,
    position: int,
    name: DeviceName,
    result: str,
    reason: str | None,
    now: float,
) -> None:
    conn.execute(
        "UPDATE rollout_devices SET result = ?, reason = ? WHERE rollout_id = ? AND position = ?",
        (result, reason, rollout.rollout_id, position),
    )
    detail = {"device": str(name), "result": result, "reason": reason}
    audit(conn, now, rollout.actor, "rollout.device", rollout.rollout_id, detail)


def _end(
    conn: sqlite3.Connection,
    rollout: Rollout,
    state: str,
    reason: str | None,
    actor: str,
    now: float,
) -> None:
    rollout_id = rollout.rollout_id
    if state in CANCELLED:
        error = CANCELLED[state]
        cancelled = conn.execute(
            "UPDATE commands SET state = 'failed', done_at = ?, error = ? WHERE state = 'queued'"
            " AND command_id IN (SELECT command_id FROM rollout_devices WHERE rollout_id = ?"
            " AND result = 'updating') RETURNING command_id",
            (now, error, rollout_id),
        ).fetchall()
        conn.executemany(
            "UPDATE rollout_devices SET result = 'skipped', reason = ?"
            " WHERE rollout_id = ? AND command_id = ?",
            [(error, rollout_id, row[0]) for row in cancelled],
        )
        conn.execute(
            "UPDATE rollout_devices SET result = 'skipped', reason = ?"
            " WHERE rollout_id = ? AND result = 'waiting'",
            (error, rollout_id),
        )
    conn.execute(
        "UPDATE rollouts SET state = ?, reason = ?, finished_at = ? WHERE rollout_id = ?",
        (state, reason, now, rollout_id),
    )
    action = {"aborted": "rollout.abort"}.get(state, f"rollout.{state}")
    audit(conn, now, actor, action, rollout_id, {"reason": reason})
