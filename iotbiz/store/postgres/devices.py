"""Customers, devices and their presence on PostgreSQL (all of `iotbiz.store.devices`).

The device limit is race-free across processes: a registration locks its customer's row
(SELECT ... FOR UPDATE) before counting, so concurrent registrations of one customer, from any
number of processes, count and insert one after the other.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type hints

from iotbiz.errors import ConflictError, NotFoundError, RegistrationRefused
from iotbiz.models import Customer, Device, PresenceUpdate
from iotbiz.names import DeviceName
from iotbiz.store.core import json_or_null
from iotbiz.store.devices import refuse_device, refuse_over_limit, row_to_customer, row_to_device
from iotbiz.store.history import Event, Sample
from iotbiz.store.postgres.core import PostgresCore, audit
from iotbiz.store.postgres.history import insert_history

DEVICE_COLUMNS = (
    "customer_id, device_id, state, password_hash, pending_expires_at, created_at, activated_at,"
    " revoked_at, online, last_seen_at, last_status, last_telemetry,"
    " (SELECT json_object_agg(t.key, t.value)::text FROM device_tags t"
    " WHERE t.customer_id = devices.customer_id AND t.device_id = devices.device_id) AS tags"
)
_CUSTOMERS = """
    SELECT c.customer_id, c.device_limit, c.created_at,
        (SELECT count(*) FROM devices d WHERE d.customer_id = c.customer_id
            AND d.state = 'active') AS active,
        (SELECT count(*) FROM devices d WHERE d.customer_id = c.customer_id
            AND d.state = 'pending' AND d.pending_expires_at > $1) AS pending
    FROM customers c
"""
_LIMIT = "SELECT device_limit FROM customers WHERE customer_id = $1"
_LIMIT_LOCKED = _LIMIT + " FOR UPDATE"
# one statement for the whole batch, one row per device (merged in `record_presence`)
_PRESENCE = """
    UPDATE devices d SET
        online = coalesce(u.online, d.online),
        last_seen_at = greatest(coalesce(d.last_seen_at, 0), u.seen_at),
        last_status = coalesce(u.status, d.last_status),
        last_telemetry = coalesce(u.telemetry, d.last_telemetry)
    FROM unnest($1::text[], $2::text[], $3::integer[], $4::float8[], $5::text[], $6::text[])
        AS u (customer_id, device_id, online, seen_at, status, telemetry)
    WHERE d.customer_id = u.customer_id AND d.device_id = u.device_id AND d.state = 'active'
"""
# Devices that count against a customer's limit: active ones and unexpired pending ones.
_COUNTED = "(state = 'active' OR (state = 'pending' AND pending_expires_at > $2))"


class PostgresDeviceOperations(PostgresCore):
    # -- customers ------------------------------------------------------------------------------

    async def add_customer(self, customer_id: str, device_limit: int, *, actor: str) -> Customer:
        now = self._clock()

        async def add(conn: asyncpg.Connection) -> None:
            try:
                await conn.execute(
                    "INSERT INTO customers (customer_id, device_limit, created_at)"
                    " VALUES ($1, $2, $3)",
                    customer_id,
                    device_limit,
                    now,
                )
            except asyncpg.UniqueViolationError as exc:
                raise ConflictError(f"customer {customer_id} exists already") from exc
            await audit(conn, now, actor, "customer.add", customer_id, {"limit": device_limit})

        await self._write(add)
        return Customer(customer_id, device_limit, now)

    async def set_device_limit(self, customer_id: str, device_limit: int, *, actor: str) -> None:
        now = self._clock()

        async def update(conn: asyncpg.Connection) -> None:
            status = await conn.execute(
                "UPDATE customers SET device_limit = $1 WHERE customer_id = $2",
                device_limit,
                customer_id,
            )
            if status == "UPDATE 0":
                raise NotFoundError(f"no customer {customer_id}")
            await audit(
                conn, now, actor, "customer.set_limit", customer_id, {"limit": device_limit}
            )

        await self._write(update)

    async def get_customer(self, customer_id: str) -> Customer | None:
        sql = _CUSTOMERS + " WHERE c.customer_id = $2"
        now = self._clock()
        rows = await self._read(lambda conn: conn.fetch(sql, now, customer_id))
        return row_to_customer(rows[0]) if rows else None

    async def list_customers(self) -> list[Customer]:
        sql = _CUSTOMERS + " ORDER BY c.customer_id"
        now = self._clock()
        rows = await self._read(lambda conn: conn.fetch(sql, now))
        return [row_to_customer(row) for row in rows]

    # -- devices --------------------------------------------------------------------------------

    async def get_device(self, name: DeviceName) -> Device | None:
        return await self._read(lambda conn: _device(conn, name))

    async def list_devices(self, customer_id: str | None = None) -> list[Device]:
        sql = f"SELECT {DEVICE_COLUMNS} FROM devices"  # noqa: S608 - constant column list
        args: tuple[str, ...] = ()
        if customer_id is not None:
            sql += " WHERE customer_id = $1"
            args = (customer_id,)
        sql += " ORDER BY customer_id, device_id"
        rows = await self._read(lambda conn: conn.fetch(sql, *args))
        return [row_to_device(row) for row in rows]

    async def check_registration(self, name: DeviceName) -> None:
        """Raise RegistrationRefused if registering `name` now would be refused (a cheap
        pre-check; `register_device` checks again, with the customer's row locked)."""
        now = self._clock()
        await self._read(lambda conn: _refuse_registration(conn, name, now, lock=False))

    async def register_device(
        self, name: DeviceName, password_hash: bytes, *, ttl_s: float, actor: str
    ) -> Device:
        """Create or renew the pending registration of `name` with a new password hash; the
        customer's row is locked from the count to the COMMIT. Raises RegistrationRefused."""
        now = self._clock()

        async def register(conn: asyncpg.Connection) -> Device | None:
            renewing = await _refuse_registration(conn, name, now, lock=True)
            await conn.execute(
                """
                INSERT INTO devices (customer_id, device_id, state, password_hash,
                                     pending_expires_at, created_at)
                VALUES ($1, $2, 'pending', $3, $4, $5)
                ON CONFLICT (customer_id, device_id) DO UPDATE SET
                    password_hash = excluded.password_hash,
                    pending_expires_at = excluded.pending_expires_at
                """,
                name.customer_id,
                name.device_id,
                password_hash.decode("ascii"),
                now + ttl_s,
                now,
            )
            action = "device.register_again" if renewing else "device.register"
            await audit(conn, now, actor, action, str(name), {})
            return await _device(conn, name)

        device = await self._write(register)
        assert device is not None  # noqa: S101 - written in this transaction
        return device

    async def activate_device(self, name: DeviceName, password_hash: bytes, *, actor: str) -> bool:
        """Make a pending registration active if it still has `password_hash` and has not
        expired; False when it changed meanwhile (a newer password, expiry, revoke)."""
        now = self._clock()

        async def activate(conn: asyncpg.Connection) -> bool:
            status = await conn.execute(
                """
                UPDATE devices SET state = 'active', activated_at = $1, pending_expires_at = NULL
                WHERE customer_id = $2 AND device_id = $3 AND state = 'pending'
                    AND password_hash = $4 AND pending_expires_at > $1
                """,
                now,
                name.customer_id,
                name.device_id,
                password_hash.decode("ascii"),
            )
            if status == "UPDATE 0":
                return False
            await audit(conn, now, actor, "device.activate", str(name), {})
            return True

        return await self._write(activate)

    async def revoke_device(self, name: DeviceName, *, actor: str) -> Device:
        """Revoke a device: its credentials stop working and it can never register again."""
        now = self._clock()

        async def revoke(conn: asyncpg.Connection) -> Device | None:
            status = await conn.execute(
                """
                UPDATE devices SET state = 'revoked', revoked_at = $1, password_hash = NULL,
                    pending_expires_at = NULL, online = 0
                WHERE customer_id = $2 AND device_id = $3 AND state != 'revoked'
                """,
                now,
                name.customer_id,
                name.device_id,
            )
            if status == "UPDATE 0":
                device = await _device(conn, name)
                if device is None:
                    raise NotFoundError(f"no device {name}")
                return device  # revoked already: nothing changes, nothing to audit
            await close_open_commands(conn, name, now, "device revoked")
            await audit(conn, now, actor, "device.revoke", str(name), {})
            return await _device(conn, name)

        device = await self._write(revoke)
        assert device is not None  # noqa: S101 - updated in this transaction
        return device

    async def reset_device(self, name: DeviceName, *, actor: str) -> Device:
        """Forget a device so that its id may register again; returns it as it was."""
        now = self._clock()

        async def reset(conn: asyncpg.Connection) -> Device:
            # The device's row first: a batch or create_commands of another process holding it
            # (FOR SHARE) commits before, and its commands are failed below with the others
            # (each statement of this transaction sees what was committed before it began).
            await conn.execute(
                "SELECT 1 FROM devices WHERE customer_id = $1 AND device_id = $2 FOR UPDATE",
                name.customer_id,
                name.device_id,
            )
            device = await _device(conn, name)
            if device is None:
                raise NotFoundError(f"no device {name}")
            # its tags, samples and events go with it (ON DELETE CASCADE); commands stay, failed
            await close_open_commands(conn, name, now, "device reset")
            await conn.execute(
                "DELETE FROM devices WHERE customer_id = $1 AND device_id = $2",
                name.customer_id,
                name.device_id,
            )
            await audit(conn, now, actor, "device.reset", str(name), {"state": device.state.value})
            return device

        return await self._write(reset)

    # -- presence -------------------------------------------------------------------------------

    async def record_presence(
        self,
        updates: Iterable[PresenceUpdate],
        *,
        samples: Iterable[Sample] = (),
        events: Iterable[Event] = (),
    ) -> None:
        """Write a batch of presence updates, telemetry samples and device events in one
        transaction (not audited), with SQLite's result: there, the updates that set `online`
        are applied first, then the others, each in the batch's order; here they are merged
        in that order into one row per device (the last `online`, status and telemetry given,
        the latest `seen_at`) and written by one statement. The devices' rows are locked first,
        in name order, so that two processes recording presence of the same devices wait for
        one another instead of deadlocking."""
        merged: dict[DeviceName, list[Any]] = {}
        ordered = sorted(updates, key=lambda update: update.online is None)  # stable
        for update in ordered:
            online = None if update.online is None else int(update.online)
            status, telemetry = json_or_null(update.status), json_or_null(update.telemetry)
            row = merged.get(update.name)
            if row is None:
                merged[update.name] = [online, update.seen_at, status, telemetry]
                continue
            row[1] = max(row[1], update.seen_at)
            for index, value in ((0, online), (2, status), (3, telemetry)):
                if value is not None:
                    row[index] = value
        names = sorted(merged)
        columns = [
            [name.customer_id for name in names],
            [name.device_id for name in names],
            *([merged[name][index] for name in names] for index in range(4)),
        ]
        sample_list, event_list = list(samples), list(events)

        async def record(conn: asyncpg.Connection) -> None:
            if names:
                await conn.execute(
                    "SELECT 1 FROM devices WHERE (customer_id, device_id) IN"
                    " (SELECT * FROM unnest($1::text[], $2::text[])) AND state = 'active'"
                    " ORDER BY customer_id, device_id FOR NO KEY UPDATE",
                    columns[0],
                    columns[1],
                )
                await conn.execute(_PRESENCE, *columns)
            await insert_history(conn, sample_list, event_list)

        await self._write(record)

    async def mark_all_offline(self) -> None:
        """At platform start: nothing is connected yet, whatever a killed process left behind."""
        await self._write(
            lambda conn: conn.execute("UPDATE devices SET online = 0 WHERE online = 1")
        )

    async def mark_silent_offline(self, seen_before: float) -> list[DeviceName]:
        """Mark offline the online devices last seen before `seen_before`; their names."""

        async def mark(conn: asyncpg.Connection) -> list[DeviceName]:
            rows = await conn.fetch(
                "UPDATE devices SET online = 0 WHERE online = 1"
                " AND coalesce(last_seen_at, 0) < $1 RETURNING customer_id, device_id",
                seen_before,
            )
            return sorted(DeviceName(row[0], row[1]) for row in rows)

        return await self._write(mark)


async def close_open_commands(
    conn: asyncpg.Connection, name: DeviceName, now: float, error: str
) -> None:
    """Fail the open commands of a device that was revoked or reset (in the caller's
    transaction): nothing will ever answer them."""
    await conn.execute(
        "UPDATE commands SET state = 'failed', done_at = $1, error = $2"
        " WHERE customer_id = $3 AND device_id = $4 AND state IN ('queued', 'sent')",
        now,
        error,
        name.customer_id,
        name.device_id,
    )


async def _device(conn: asyncpg.Connection, name: DeviceName) -> Device | None:
    row = await conn.fetchrow(
        f"SELECT {DEVICE_COLUMNS} FROM devices WHERE customer_id = $1 AND device_id = $2",  # noqa: S608
        name.customer_id,
        name.device_id,
    )
    return None if row is None else row_to_device(row)


async def _refuse_registration(
    conn: asyncpg.Connection, name: DeviceName, now: float, *, lock: bool
) -> bool:
    """Raise RegistrationRefused if `name` may not register now; True if it renews a pending
    registration. With `lock`, the customer's row stays locked until the transaction ends."""
    device_limit = await conn.fetchval(
        _LIMIT_LOCKED if lock else _LIMIT,
        name.customer_id,
    )
    if device_limit is None:
        raise RegistrationRefused("unknown customer")
    if refuse_device(await _device(conn, name), now):
        return True
    used = await conn.fetchval(
        f"SELECT count(*) FROM devices WHERE customer_id = $1 AND {_COUNTED}",  # noqa: S608
        name.customer_id,
        now,
    )
    refuse_over_limit(int(used), int(device_limit))
    return False
