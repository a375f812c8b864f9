"""Application releases and their offers to devices on PostgreSQL (all of
`iotbiz.store.releases`)."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type hints

from iotbiz.errors import ConflictError, NotFoundError
from iotbiz.names import DeviceName
from iotbiz.store.postgres.core import PostgresCore, audit
from iotbiz.store.releases import RELEASE_COLUMNS, Release, row_to_release

_OFFERED = f"""
    SELECT d.state = 'active',
        {", ".join(f"r.{column.strip()}" for column in RELEASE_COLUMNS.split(","))}
    FROM devices d
    LEFT JOIN release_offers o
        ON o.customer_id = d.customer_id AND o.device_id = d.device_id
        AND o.app = $1 AND o.version = $2
    LEFT JOIN releases r ON r.app = o.app AND r.version = o.version
    WHERE d.customer_id = $3 AND d.device_id = $4
"""  # noqa: S608 - constant pieces


class PostgresReleaseOperations(PostgresCore):
    async def add_release(
        self,
        app: str,
        version: str,
        *,
        sha256: str,
        size: int,
        signature: str | None,
        actor: str,
    ) -> Release:
        """Raises ConflictError when (app, version) exists already."""
        now = self._clock()
        release = Release(app, version, sha256, size, signature, now, actor)

        async def add(conn: asyncpg.Connection) -> None:
            try:
                await conn.execute(
                    f"INSERT INTO releases ({RELEASE_COLUMNS})"  # noqa: S608
                    " VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    app,
                    version,
                    sha256,
                    size,
                    signature,
                    now,
                    actor,
                )
            except asyncpg.UniqueViolationError as exc:
                raise ConflictError(f"release {app} {version} exists already") from exc
            detail = {"sha256": sha256, "size": size, "signed": signature is not None}
            await audit(conn, now, actor, "release.add", f"{app}/{version}", detail)

        await self._write(add)
        return release

    async def get_release(self, app: str, version: str) -> Release | None:
        sql = f"SELECT {RELEASE_COLUMNS} FROM releases WHERE app = $1 AND version = $2"  # noqa: S608
        row = await self._read(lambda conn: conn.fetchrow(sql, app, version))
        return None if row is None else row_to_release(tuple(row))

    async def list_releases(self, *, app: str | None = None) -> list[Release]:
        """By app, then oldest first."""
        sql = f"SELECT {RELEASE_COLUMNS} FROM releases"  # noqa: S608 - constant columns
        args: tuple[str, ...] = ()
        if app is not None:
            sql += " WHERE app = $1"
            args = (app,)
        sql += " ORDER BY app, created_at, version"
        rows = await self._read(lambda conn: conn.fetch(sql, *args))
        return [row_to_release(tuple(row)) for row in rows]

    async def remove_release(self, app: str, version: str, *, actor: str) -> Release:
        """Remove it (and its offers); the release as it was. NotFoundError if there is none."""
        now = self._clock()

        async def remove(conn: asyncpg.Connection) -> Release:
            row = await conn.fetchrow(
                "DELETE FROM releases WHERE app = $1 AND version = $2"  # noqa: S608
                f" RETURNING {RELEASE_COLUMNS}",
                app,
                version,
            )
            if row is None:
                raise NotFoundError(f"no release {app} {version}")
            await audit(conn, now, actor, "release.remove", f"{app}/{version}", {})
            return row_to_release(tuple(row))

        return await self._write(remove)

    async def offer_release(
        self, names: Sequence[DeviceName], app: str, version: str
    ) -> list[DeviceName]:
        """Let `names` download (app, version); the names that had no offer yet. Names of
        devices that do not exist are skipped; NotFoundError when the release does not."""
        now = self._clock()

        async def offer(conn: asyncpg.Connection) -> list[DeviceName]:
            exists = await conn.fetchval(
                "SELECT 1 FROM releases WHERE app = $1 AND version = $2", app, version
            )
            if exists is None:
                raise NotFoundError(f"no release {app} {version}")
            new: list[DeviceName] = []
            for name in dict.fromkeys(names):
                status = await conn.execute(
                    "INSERT INTO release_offers"
                    " (customer_id, device_id, app, version, offered_at)"
                    " SELECT customer_id, device_id, $1, $2, $3 FROM devices"
                    " WHERE customer_id = $4 AND device_id = $5"
                    " ON CONFLICT DO NOTHING",
                    app,
                    version,
                    now,
                    name.customer_id,
                    name.device_id,
                )
                if status != "INSERT 0 0":
                    new.append(name)
            return new

        return await self._write(offer)

    async def withdraw_offers(self, names: Sequence[DeviceName], app: str, version: str) -> None:
        rows = [(*name, app, version) for name in names]
        if not rows:
            return
        await self._write(
            lambda conn: conn.executemany(
                "DELETE FROM release_offers"
                " WHERE customer_id = $1 AND device_id = $2 AND app = $3 AND version = $4",
                rows,
            )
        )

    async def offered_release(
        self, name: DeviceName, app: str, version: str
    ) -> tuple[bool, Release | None]:
        """(whether the device is active, the release if it is offered to the device)."""
        row = await self._read(
            lambda conn: conn.fetchrow(_OFFERED, app, version, name.customer_id, name.device_id)
        )
        if row is None:
            return False, None
        active = bool(row[0])
        if row[1] is None:
            return active, None
        return active, row_to_release(tuple(row)[1:])

    async def release_offers(self, app: str, version: str) -> list[DeviceName]:
        """The devices a release is offered to."""
        rows = await self._read(
            lambda conn: conn.fetch(
                "SELECT customer_id, device_id FROM release_offers"
                " WHERE app = $1 AND version = $2 ORDER BY customer_id, device_id",
                app,
                version,
            )
        )
        return [DeviceName(row[0], row[1]) for row in rows]
