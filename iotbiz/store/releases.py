"""Application releases and their offers to devices.

A release is (app, version) with the sha256, size and optional Ed25519 signature of its
artifact; the artifact itself is a file beside the store (`iotbiz.releases` writes and removes
it). An offer says that a device may download a release: the admin API records one for each
device it sends an `update` command to. Offers go with their device (reset) and their release
(removed): ON DELETE CASCADE.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

from iotbiz.errors import ConflictError, NotFoundError
from iotbiz.models import iso_time
from iotbiz.names import DeviceName
from iotbiz.store.core import StoreCore, audit

RELEASE_COLUMNS = "app, version, sha256, size, signature, created_at, actor"


@dataclass(frozen=True, slots=True)
class Release:
    app: str
    version: str
    sha256: str  # 64 hex digits
    size: int
    signature: str | None  # base64 Ed25519 signature of the raw sha256 digest, or None
    created_at: float
    actor: str = ""

    @property
    def url(self) -> str:
        """Where a device downloads it, on the registrar."""
        return f"/api/v1/releases/{self.app}/{self.version}"

    def to_json(self) -> dict[str, object]:
        return {
            "app": self.app,
            "version": self.version,
            "sha256": self.sha256,
            "size": self.size,
            "signature": self.signature,
            "url": self.url,
            "created_at": iso_time(self.created_at),
            "actor": self.actor,
        }


class ReleaseOperations(StoreCore):
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

        def add(conn: sqlite3.Connection) -> None:
            try:
                conn.execute(
                    f"INSERT INTO releases ({RELEASE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                    (app, version, sha256, size, signature, now, actor),
                )
            except sqlite3.IntegrityError as exc:
                raise ConflictError(f"release {app} {version} exists already") from exc
            detail = {"sha256": sha256, "size": size, "signed": signature is not None}
            audit(conn, now, actor, "release.add", f"{app}/{version}", detail)

        await self._write(add)
        return release

    async def get_release(self, app: str, version: str) -> Release | None:
        sql = f"SELECT {RELEASE_COLUMNS} FROM releases WHERE app = ? AND version = ?"  # noqa: S608
        row = await self._call(lambda conn: conn.execute(sql, (app, version)).fetchone())
        return None if row is None else row_to_release(row)

    async def list_releases(self, *, app: str | None = None) -> list[Release]:
        """By app, then oldest first."""
        sql = f"SELECT {RELEASE_COLUMNS} FROM releases"  # noqa: S608 - constant columns
        params: tuple[str, ...] = ()
        if app is not None:
            sql += " WHERE app = ?"
            params = (app,)
        sql += " ORDER BY app, created_at, version"
        rows = await self._call(lambda conn: conn.execute(sql, params).fetchall())
        return [row_to_release(row) for row in rows]

    async def remove_release(self, app: str, version: str, *, actor: str) -> Release:
        """Remove it (and its offers); the release as it was. NotFoundError if there is none."""
        now = self._clock()

        def remove(conn: sqlite3.Connection) -> Release:
            row = conn.execute(
                f"DELETE FROM releases WHERE app = ? AND version = ? RETURNING {RELEASE_COLUMNS}",  # noqa: S608
                (app, version),
            ).fetchone()
            if row is None:
                raise NotFoundError(f"no release {app} {version}")
            audit(conn, now, actor, "release.remove", f"{app}/{version}", {})
            return row_to_release(row)

        return await self._write(remove)

    async def offer_release(
        self, names: Sequence[DeviceName], app: str, version: str
    ) -> list[DeviceName]:
        """Let `names` download (app, version); the names that had no offer yet (to withdraw
        them again with `withdraw_offers` if what the offer was for does not happen). Names of
        devices that do not exist are skipped; NotFoundError when the release does not."""
        now = self._clock()

        def offer(conn: sqlite3.Connection) -> list[DeviceName]:
            exists = conn.execute(
                "SELECT 1 FROM releases WHERE app = ? AND version = ?", (app, version)
            ).fetchone()
            if exists is None:
                raise NotFoundError(f"no release {app} {version}")
            new: list[DeviceName] = []
            for name in dict.fromkeys(names):
                cursor = conn.execute(
                    "INSERT OR IGNORE INTO release_offers"
                    " (customer_id, device_id, app, version, offered_at)"
                    " SELECT customer_id, device_id, ?, ?, ? FROM devices"
                    " WHERE customer_id = ? AND device_id = ?",
                    (app, version, now, *name),
                )
                if cursor.rowcount:
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
                " WHERE customer_id = ? AND device_id = ? AND app = ? AND version = ?",
                rows,
            )
        )

    async def offered_release(
        self, name: DeviceName, app: str, version: str
    ) -> tuple[bool, Release | None]:
        """(whether the device is active, the release if it is offered to the device): what a
        download checks, in one query."""
        sql = f"""
            SELECT d.state = 'active',
                {", ".join(f"r.{column.strip()}" for column in RELEASE_COLUMNS.split(","))}
            FROM devices d
            LEFT JOIN release_offers o
                ON o.customer_id = d.customer_id AND o.device_id = d.device_id
                AND o.app = :app AND o.version = :version
            LEFT JOIN releases r ON r.app = o.app AND r.version = o.version
            WHERE d.customer_id = :customer_id AND d.device_id = :device_id
        """  # noqa: S608 - constant pieces
        values = {"app": app, "version": version, **name._asdict()}
        row = await self._call(lambda conn: conn.execute(sql, values).fetchone())
        if row is None:
            return False, None
        active = bool(row[0])
        if row[1] is None:
            return active, None
        return active, row_to_release(tuple(row)[1:])

    async def release_offers(self, app: str, version: str) -> list[DeviceName]:
        """The devices a release is offered to."""
        rows = await self._call(
            lambda conn: conn.execute(
                "SELECT customer_id, device_id FROM release_offers WHERE app = ? AND version = ?"
                " ORDER BY customer_id, device_id",
                (app, version),
            ).fetchall()
        )
        return [DeviceName(row[0], row[1]) for row in rows]


def row_to_release(row: Sequence[object]) -> Release:
    app, version, sha256, size, signature, created_at, actor = row
    return Release(
        app=str(app),
        version=str(version),
        sha256=str(sha256),
        size=int(size),  # type: ignore[call-overload]
        signature=None if signature is None else str(signature),
        created_at=float(created_at),  # type: ignore[arg-type]
        actor=str(actor),
    )
