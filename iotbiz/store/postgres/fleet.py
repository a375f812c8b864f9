"""The fleet list and device tags on PostgreSQL (all of `iotbiz.store.fleet`)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type hints

from iotbiz.errors import NotFoundError
from iotbiz.models import Device, DeviceState
from iotbiz.names import DeviceName
from iotbiz.store.devices import row_to_device
from iotbiz.store.fleet import MAX_PAGE, MAX_TAGS, check_tag_changes
from iotbiz.store.postgres.core import PostgresCore, audit
from iotbiz.store.postgres.devices import DEVICE_COLUMNS

_TAG_MATCH = (
    "EXISTS (SELECT 1 FROM device_tags t WHERE t.customer_id = devices.customer_id"
    " AND t.device_id = devices.device_id AND t.key = ${key} AND t.value = ${value})"
)


class _Args:
    """Positional arguments ($1, $2, ...) collected with the conditions that use them."""

    def __init__(self) -> None:
        self.values: list[Any] = []

    def add(self, value: Any) -> str:
        self.values.append(value)
        return f"${len(self.values)}"


def _tag_conditions(args: _Args, tags: Mapping[str, str] | None) -> list[str]:
    return [
        _TAG_MATCH.format(key=args.add(key)[1:], value=args.add(value)[1:])
        for key, value in (tags or {}).items()
    ]


class PostgresFleetOperations(PostgresCore):
    async def find_devices(
        self,
        *,
        customer_id: str | None = None,
        state: DeviceState | None = None,
        online: bool | None = None,
        tags: Mapping[str, str] | None = None,
        query: str | None = None,
        limit: int = 100,
        after: DeviceName | None = None,
    ) -> tuple[list[Device], int]:
        """As on SQLite: a page in name order after `after`, and the total, in one snapshot."""
        if not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"limit must be from 1 to {MAX_PAGE}")
        args = _Args()
        conditions: list[str] = []
        if customer_id is not None:
            conditions.append(f"customer_id = {args.add(customer_id)}")
        if state is not None:
            conditions.append(f"state = {args.add(state.value)}")
        if online is not None:
            conditions.append(f"online = {args.add(int(online))}")
        conditions += _tag_conditions(args, tags)
        if query:
            # ILIKE: SQLite's LIKE ignores case (of ASCII letters)
            pattern = "%" + re.sub(r"([\\%_])", r"\\\1", query) + "%"
            conditions.append(f"(customer_id || '/' || device_id) ILIKE {args.add(pattern)}")
        where = " AND ".join(conditions) or "TRUE"
        count_sql = f"SELECT count(*) FROM devices WHERE {where}"  # noqa: S608 - constants
        count_args = list(args.values)
        page_where = where
        if after is not None:
            page_where += (
                f" AND (customer_id, device_id) > ({args.add(after.customer_id)},"
                f" {args.add(after.device_id)})"
            )
        page_sql = (
            f"SELECT {DEVICE_COLUMNS} FROM devices WHERE {page_where}"  # noqa: S608 - constants
            f" ORDER BY customer_id, device_id LIMIT {args.add(limit)}"
        )

        async def find(conn: asyncpg.Connection) -> tuple[list[Device], int]:
            # one snapshot: the page and the total agree
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                rows = await conn.fetch(page_sql, *args.values)
                total = int(await conn.fetchval(count_sql, *count_args))
            return [row_to_device(row) for row in rows], total

        return await self._read(find)

    async def device_names(
        self,
        *,
        customer_id: str,
        tags: Mapping[str, str] | None = None,
        state: DeviceState = DeviceState.ACTIVE,
        limit: int = 10_000,
    ) -> list[DeviceName]:
        args = _Args()
        conditions = [f"customer_id = {args.add(customer_id)}", f"state = {args.add(state.value)}"]
        conditions += _tag_conditions(args, tags)
        sql = (
            "SELECT customer_id, device_id FROM devices"  # noqa: S608 - constant pieces
            f" WHERE {' AND '.join(conditions)} ORDER BY customer_id, device_id"
            f" LIMIT {args.add(limit)}"
        )
        rows = await self._read(lambda conn: conn.fetch(sql, *args.values))
        return [DeviceName(row[0], row[1]) for row in rows]

    async def get_tags(self, name: DeviceName) -> dict[str, str]:
        return await self._read(lambda conn: _tags(conn, name))

    async def set_tags(
        self, name: DeviceName, changes: Mapping[str, str | None], *, actor: str
    ) -> dict[str, str]:
        check_tag_changes(changes)
        now = self._clock()

        async def update(conn: asyncpg.Connection) -> dict[str, str]:
            found = await conn.fetchval(
                "SELECT 1 FROM devices WHERE customer_id = $1 AND device_id = $2", *name
            )
            if found is None:
                raise NotFoundError(f"no device {name}")
            for key, value in changes.items():
                if value is None:
                    await conn.execute(
                        "DELETE FROM device_tags WHERE customer_id = $1 AND device_id = $2"
                        " AND key = $3",
                        *name,
                        key,
                    )
                else:
                    await conn.execute(
                        "INSERT INTO device_tags (customer_id, device_id, key, value)"
                        " VALUES ($1, $2, $3, $4) ON CONFLICT (customer_id, device_id, key)"
                        " DO UPDATE SET value = excluded.value",
                        *name,
                        key,
                        value,
                    )
            tags = await _tags(conn, name)
            if len(tags) > MAX_TAGS:
                raise ValueError(f"a device has at most {MAX_TAGS} tags")  # rolled back
            await audit(conn, now, actor, "device.tags", str(name), {"changes": dict(changes)})
            return tags

        return await self._write(update)


async def _tags(conn: asyncpg.Connection, name: DeviceName) -> dict[str, str]:
    rows = await conn.fetch(
        "SELECT key, value FROM device_tags WHERE customer_id = $1 AND device_id = $2 ORDER BY key",
        *name,
    )
    return {row[0]: row[1] for row in rows}
