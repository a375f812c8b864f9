"""Telemetry history (samples) and device events, with their retention.

Policy (settings `history.*`): presence keeps at most one sample per device per
`sample_interval_s` (default 60 s: the first telemetry flushed in each interval), holds samples
`write_interval_s` (10 min) and writes them device by device with a presence batch (see
`iotbiz.presence` for why: one page write per device instead of one per sample); samples are kept
`samples_keep_s` (1 day). Events (what a device publishes on
`events`: app state changes, update progress) are kept `events_keep_s` (7 days) and at most
`events_per_device` (1000) per device. A pruning pass (`iotbiz.retention`) runs every
`prune_interval_s`, deleting in transactions of at most `prune_batch` devices or rows, so that no
write waits long behind it. Samples and events of a device that is reset go with it.

Samples live in their primary key's b-tree only (customer_id, device_id, at): no rowid and no
second index, pruned per device along that key. Measured (scripts/bench_store.py, 100,000 rows,
MAC device ids): 112 bytes per sample on disk, 243 per event. 10,000 devices at one sample a
minute: 14.4 M rows, 1.6 GB a day; held 10 minutes, 2.8 GB a day written to the WAL (5.6 GB with
the checkpoints). Only active devices get history: a sample or
event of a device reset or revoked meanwhile is not written (and not an error).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

from iotbiz.models import DeviceEvent, TelemetrySample
from iotbiz.names import DeviceName
from iotbiz.store.core import StoreCore

SAMPLE_FIELDS = (
    "cpu_percent",
    "memory_percent",
    "disk_percent",
    "load_1",
    "temperature_c",
    "net_rx_bytes",
    "net_tx_bytes",
)
_ACTIVE = (
    "EXISTS (SELECT 1 FROM devices WHERE customer_id = :customer_id AND device_id = :device_id"
    " AND state = 'active')"
)
_INSERT_SAMPLE = (
    "INSERT OR IGNORE INTO telemetry_samples"
    f" (customer_id, device_id, at, {', '.join(SAMPLE_FIELDS)})"
    f" SELECT :customer_id, :device_id, :at, {', '.join(':' + f for f in SAMPLE_FIELDS)}"
    f" WHERE {_ACTIVE}"
)
_INSERT_EVENT = (
    "INSERT INTO device_events (customer_id, device_id, at, body)"
    f" SELECT :customer_id, :device_id, :at, :body WHERE {_ACTIVE}"
)
EVENT_COLUMNS = "event_id, customer_id, device_id, at, body"

Sample = tuple[DeviceName, TelemetrySample]
Event = tuple[DeviceName, float, dict[str, Any]]


class HistoryOperations(StoreCore):
    async def record_samples(self, samples: Iterable[Sample]) -> None:
        rows = sample_rows(samples)
        await self._write(lambda conn: insert_history(conn, rows, []))

    async def record_events(self, events: Iterable[Event]) -> None:
        rows = event_rows(events)
        await self._write(lambda conn: insert_history(conn, [], rows))

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
            " WHERE customer_id = ? AND device_id = ? AND at >= ? AND at < ? ORDER BY at LIMIT ?"
        )
        params = (*name, -1.0 if since is None else since, until or float("inf"), limit)
        rows = await self._call(lambda conn: conn.execute(sql, params).fetchall())
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
        params: dict[str, Any] = {"limit": limit}
        if name is not None:
            conditions.append("customer_id = :customer_id AND device_id = :device_id")
            params |= {"customer_id": name.customer_id, "device_id": name.device_id}
        elif customer_id is not None:
            conditions.append("customer_id = :customer_id")
            params["customer_id"] = customer_id
        if before is not None:
            conditions.append("event_id < :before")
            params["before"] = before
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        sql = (
            f"SELECT {EVENT_COLUMNS} FROM device_events {where} ORDER BY event_id DESC LIMIT :limit"  # noqa: S608
        )
        rows = await self._call(lambda conn: conn.execute(sql, params).fetchall())
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
        the per-device cap) or `batch` rows (events past their age); returns the rows deleted."""
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
        """For up to `devices` devices after `after`: delete samples older than
        `samples_before` and events beyond the newest `events_per_device`. Returns the rows
        deleted and the last device done (None: no devices were left)."""

        def prune(conn: sqlite3.Connection) -> tuple[int, DeviceName | None]:
            start = ("", "") if after is None else tuple(after)
            names = [
                DeviceName(row[0], row[1])
                for row in conn.execute(
                    "SELECT customer_id, device_id FROM devices"
                    " WHERE (customer_id, device_id) > (?, ?)"
                    " ORDER BY customer_id, device_id LIMIT ?",
                    (*start, devices),
                )
            ]
            deleted = 0
            for name in names:
                deleted += conn.execute(
                    "DELETE FROM telemetry_samples WHERE customer_id = ? AND device_id = ?"
                    " AND at < ?",
                    (*name, samples_before),
                ).rowcount
                deleted += conn.execute(
                    "DELETE FROM device_events WHERE customer_id = ? AND device_id = ?"
                    " AND event_id <= (SELECT event_id FROM device_events"
                    " WHERE customer_id = ? AND device_id = ?"
                    " ORDER BY event_id DESC LIMIT 1 OFFSET ?)",
                    (*name, *name, events_per_device),
                ).rowcount
            return deleted, (names[-1] if names else None)

        return await self._write(prune)

    async def prune_old_events(self, *, before: float, limit: int) -> int:
        """Delete events received before `before` among the `limit` oldest (event ids grow
        with the platform's receive time, so the oldest are first: the scan stays bounded)."""
        sql = (
            "DELETE FROM device_events WHERE event_id IN (SELECT event_id FROM device_events"
            " ORDER BY event_id LIMIT :limit) AND at < :before"
        )
        values = {"before": before, "limit": limit}
        return int(await self._write(lambda conn: conn.execute(sql, values).rowcount))


def sample_rows(samples: Iterable[Sample]) -> list[dict[str, Any]]:
    return [
        {
            "customer_id": name.customer_id,
            "device_id": name.device_id,
            "at": sample.at,
            **{field: getattr(sample, field) for field in SAMPLE_FIELDS},
        }
        for name, sample in samples
    ]


def event_rows(events: Iterable[Event]) -> list[dict[str, Any]]:
    return [
        {
            "customer_id": name.customer_id,
            "device_id": name.device_id,
            "at": at,
            "body": json.dumps(body, separators=(",", ":")),
        }
        for name, at, body in events
    ]


def insert_history(
    conn: sqlite3.Connection, samples: Sequence[dict[str, Any]], events: Sequence[dict[str, Any]]
) -> None:
    """Write sample and event rows (in the caller's transaction)."""
    if samples:
        conn.executemany(_INSERT_SAMPLE, samples)
    if events:
        conn.executemany(_INSERT_EVENT, events)
