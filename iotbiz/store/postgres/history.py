"""Telemetry history and device events on PostgreSQL (all of `iotbiz.store.history`; its
docstring has the retention policy).

Only active devices get history, as on SQLite. Their rows are locked `FOR KEY SHARE` from that
check to the COMMIT (`insert_history`): a reset (a DELETE) in another process waits, then takes
the new rows with the device; without the lock, the reset could commit between the check and
the insert, whose foreign key check would then fail the whole batch. A revoke does not wait (it
changes no key): the batch is then ordered before it. Event ids come from an identity
sequence, taken at insert: two processes writing events at once (the platform writes presence
from its leader only) could commit a smaller id after a larger one, so a reader paging with
`before` at that moment could miss it.

The network counters are BIGINT, as on SQLite (INTEGER): a whole number comes back as an int
there too; one with a fraction is rounded, and one beyond 64 bits is not kept (None) rather
than failing the batch (SQLite would keep such a number as a REAL; agents send whole bytes).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type hints

from iotbiz.models import DeviceEvent, TelemetrySample
from iotbiz.names import DeviceName
from iotbiz.store.history import EVENT_COLUMNS, SAMPLE_FIELDS, Event, Sample
from iotbiz.store.postgres.core import PostgresCore

_INT64 = 2**63
_COUNTERS = ("net_rx_bytes", "net_tx_bytes")
_INSERT_SAMPLES = (
    f"INSERT INTO telemetry_samples (customer_id, device_id, at, {', '.join(SAMPLE_FIELDS)})"  # noqa: S608
    " SELECT * FROM unnest($1::text[], $2::text[], $3::float8[], $4::float8[], $5::float8[],"
    " $6::float8[], $7::float8[], $8::float8[], $9::bigint[], $10::bigint[])"
    " ON CONFLICT DO NOTHING"
)
# ids are given in the order of the SELECT's rows: the batch's
_INSERT_EVENTS = (
    "INSERT INTO device_events (customer_id, device_id, at, body)"
    " SELECT customer_id, device_id, at, body FROM unnest($1::text[], $2::text[], $3::float8[],"
    " $4::text[]) WITH ORDINALITY AS e (customer_id, device_id, at, body, position)"
    " ORDER BY position"
)
_NAMES = "(SELECT * FROM unnest($1::text[], $2::text[]))"  # (customer_id, device_id) pairs


class PostgresHistoryOperations(PostgresCore):
    async def record_samples(self, samples: Iterable[Sample]) -> None:
        sample_list = list(samples)
        await self._write(lambda conn: insert_history(conn, sample_list, []))

    async def record_events(self, events: Iterable[Event]) -> None:
        event_list = list(events)
        await self._write(lambda conn: insert_history(conn, [], event_list))

    async def telemetry_samples(
        self,
        name: DeviceName,
        *,
        since: float | None = None,
        until: float | None = None,
        limit: int = 1000,
    ) -> list[TelemetrySample]:
        """Samples of `name` with since <= at < until, oldest first, at most `limit`."""
        sql = (
            f"SELECT at, {', '.join(SAMPLE_FIELDS)} FROM telemetry_samples"  # noqa: S608
            " WHERE customer_id = $1 AND device_id = $2 AND at >= $3 AND at < $4"
            " ORDER BY at LIMIT $5"
        )
        args = (*name, -1.0 if since is None else since, until or float("inf"), limit)
        rows = await self._read(lambda conn: conn.fetch(sql, *args))
        return [TelemetrySample(*row) for row in rows]

    async def list_events(
        self,
        *,
        name: DeviceName | None = None,
        customer_id: str | None = None,
        limit: int = 100,
        before: int | None = None,
    ) -> list[DeviceEvent]:
        """Events newest first, of one device, one customer or all; `before`: an event id (the
        last of the previous page)."""
        conditions: list[str] = []
        values: list[Any] = []
        if name is not None:
            values += [name.customer_id, name.device_id]
            conditions.append("customer_id = $1 AND device_id = $2")
        elif customer_id is not None:
            values.append(customer_id)
            conditions.append("customer_id = $1")
        if before is not None:
            values.append(before)
            conditions.append(f"event_id < ${len(values)}")
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        values.append(limit)
        sql = (
            f"SELECT {EVENT_COLUMNS} FROM device_events {where}"  # noqa: S608 - constant pieces
            f" ORDER BY event_id DESC LIMIT ${len(values)}"
        )
        rows = await self._read(lambda conn: conn.fetch(sql, *values))
        return [DeviceEvent(row[0], row[1], row[2], row[3], json.loads(row[4])) for row in rows]

    async def prune_history(
        self,
        *,
        samples_keep_s: float,
        events_keep_s: float,
        events_per_device: int,
        batch: int = 500,
    ) -> int:
        """One retention pass, in transactions of at most `batch` devices (samples, events over
        the per-device cap) or `batch` rows (events past their age); returns the rows deleted.
        Two processes pruning at once delete each row once (the counts add up)."""
        now = self._clock()
        deleted, after = 0, None
        while True:
            count, after = await self.prune_devices_batch(
                samples_before=now - samples_keep_s,
                events_per_device=events_per_device,
                after=after,
                devices=batch,
            )
            deleted += count
            if after is None:
                break
        while True:
            count = await self.prune_old_events(before=now - events_keep_s, limit=batch)
            deleted += count
            if count < batch:
                return deleted

    async def prune_devices_batch(
        self,
        *,
        samples_before: float,
        events_per_device: int,
        after: DeviceName | None,
        devices: int,
    ) -> tuple[int, DeviceName | None]:
        """For up to `devices` devices after `after` (in name order): delete samples older
        than `samples_before` and events beyond the newest `events_per_device`. Returns the
        rows deleted and the last device done (None: no devices were left)."""
        start = ("", "") if after is None else tuple(after)

        async def prune(conn: asyncpg.Connection) -> tuple[int, DeviceName | None]:
            rows = await conn.fetch(
                "SELECT customer_id, device_id FROM devices"
                " WHERE (customer_id, device_id) > ($1, $2)"
                " ORDER BY customer_id, device_id LIMIT $3",
                *start,
                devices,
            )
            if not rows:
                return 0, None
            names = [row[0] for row in rows], [row[1] for row in rows]
            samples = await conn.execute(
                "DELETE FROM telemetry_samples"  # noqa: S608 - constant pieces
                f" WHERE (customer_id, device_id) IN {_NAMES} AND at < $3",
                *names,
                samples_before,
            )
            # each device's cut once (MATERIALIZED): inlined, the planner (with statistics)
            # hashed the whole events table and computed the cut once per event row
            events = await conn.execute(
                "WITH k AS MATERIALIZED (SELECT n.c, n.d, (SELECT x.event_id"
                " FROM device_events x WHERE x.customer_id = n.c AND x.device_id = n.d"
                " ORDER BY x.event_id DESC LIMIT 1 OFFSET $3) AS cut"
                " FROM unnest($1::text[], $2::text[]) AS n(c, d))"
                " DELETE FROM device_events e USING k"
                " WHERE e.customer_id = k.c AND e.device_id = k.d AND e.event_id <= k.cut",
                *names,
                events_per_device,
            )
            deleted = _count(samples) + _count(events)
            return deleted, DeviceName(rows[-1][0], rows[-1][1])

        return await self._write(prune)

    async def prune_old_events(self, *, before: float, limit: int) -> int:
        """Delete events received before `before` among the `limit` oldest (by id)."""
        sql = (
            "DELETE FROM device_events WHERE event_id IN (SELECT event_id FROM device_events"
            " ORDER BY event_id LIMIT $1) AND at < $2"
        )
        return _count(await self._write(lambda conn: conn.execute(sql, limit, before)))


def _count(status: str) -> int:
    """The row count of a command status ("DELETE 3")."""
    return int(status.split()[-1])


def _counter(value: float | None) -> int | None:
    if value is None or not -_INT64 <= value < _INT64:
        return None
    return round(value)


async def insert_history(
    conn: asyncpg.Connection, samples: Sequence[Sample], events: Sequence[Event]
) -> None:
    """Write the samples and events of active devices (in the caller's transaction; events in
    their order, so that their ids follow it). The devices' rows stay locked FOR KEY SHARE."""
    if not samples and not events:
        return
    wanted = sorted({item[0] for item in samples} | {item[0] for item in events})
    rows = await conn.fetch(
        "SELECT customer_id, device_id FROM devices"  # noqa: S608 - constant pieces
        f" WHERE (customer_id, device_id) IN {_NAMES} AND state = 'active'"
        " ORDER BY customer_id, device_id FOR KEY SHARE",
        [name.customer_id for name in wanted],
        [name.device_id for name in wanted],
    )
    active = {DeviceName(row[0], row[1]) for row in rows}
    sample_rows = [
        (
            name.customer_id,
            name.device_id,
            sample.at,
            *(
                _counter(getattr(sample, field)) if field in _COUNTERS else getattr(sample, field)
                for field in SAMPLE_FIELDS
            ),
        )
        for name, sample in samples
        if name in active
    ]
    event_rows = [
        (name.customer_id, name.device_id, at, json.dumps(body, separators=(",", ":")))
        for name, at, body in events
        if name in active
    ]
    if sample_rows:
        await conn.execute(
            _INSERT_SAMPLES, *(list(column) for column in zip(*sample_rows, strict=True))
        )
    if event_rows:
        await conn.execute(
            _INSERT_EVENTS, *(list(column) for column in zip(*event_rows, strict=True))
        )
