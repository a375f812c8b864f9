"""Customers, devices and their presence: the store's operations on the fleet."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from typing import Any

from iotbiz.errors import ConflictError, NotFoundError, RegistrationRefused
from iotbiz.models import Customer, Device, DeviceState, PresenceUpdate
from iotbiz.names import DeviceName
from iotbiz.store.commands import close_open_commands
from iotbiz.store.core import Row, StoreCore, audit, json_or_none, json_or_null, scalar
from iotbiz.store.history import Event, Sample, event_rows, insert_history, sample_rows

DEVICE_COLUMNS = (
    "customer_id, device_id, state, password_hash, pending_expires_at, created_at, activated_at,"
    " revoked_at, online, last_seen_at, last_status, last_telemetry,"
    " (SELECT json_group_object(t.key, t.value) FROM device_tags t"
    " WHERE t.customer_id = devices.customer_id AND t.device_id = devices.device_id) AS tags"
)

_PRESENCE = """
    UPDATE devices SET
        {online}
        last_seen_at = max(coalesce(last_seen_at, 0), :seen_at),
        last_status = coalesce(:status, last_status),
        last_telemetry = coalesce(:telemetry, last_telemetry)
    WHERE customer_id = :customer_id AND device_id = :device_id AND state = 'active'
"""
# Devices that count against a customer's limit: active ones and unexpired pending ones.
_COUNTED = "(state = 'active' OR (state = 'pending' AND pending_expires_at > :now))"


class DeviceOperations(StoreCore):
    # -- customers ------------------------------------------------------------------------------

    async def add_customer(self, customer_id: str, device_limit: int, *, actor: str) -> Customer:
        now = self._clock()

        def add(conn: sqlite3.Connection) -> None:
            try:
                conn.execute(
                    "INSERT INTO customers (customer_id, device_limit, created_at)"
                    " VALUES (?, ?, ?)",
                    (customer_id, device_limit, now),
                )
            except sqlite3.IntegrityError as exc:
                raise ConflictError(f"customer {customer_id} exists already") from exc
            audit(conn, now, actor, "customer.add", customer_id, {"limit": device_limit})

        await self._write(add)
        return Customer(customer_id, device_limit, now)

    async def set_device_limit(self, customer_id: str, device_limit: int, *, actor: str) -> None:
        now = self._clock()

        def update(conn: sqlite3.Connection) -> None:
            cursor = conn.execute(
                "UPDATE customers SET device_limit = ? WHERE customer_id = ?",
                (device_limit, customer_id),
            )
            if cursor.rowcount == 0:
                raise NotFoundError(f"no customer {customer_id}")
            audit(conn, now, actor, "customer.set_limit", customer_id, {"limit": device_limit})

        await self._write(update)

    async def get_customer(self, customer_id: str) -> Customer | None:
        customers = await self._customers("WHERE c.customer_id = :cid", {"cid": customer_id})
        return customers[0] if customers else None

    async def list_customers(self) -> list[Customer]:
        return await self._customers("", {})

    async def _customers(self, where: str, params: dict[str, Any]) -> list[Customer]:
        sql = f"""
            SELECT c.customer_id, c.device_limit, c.created_at,
                (SELECT count(*) FROM devices d WHERE d.customer_id = c.customer_id
                    AND d.state = 'active') AS active,
                (SELECT count(*) FROM devices d WHERE d.customer_id = c.customer_id
                    AND d.state = 'pending' AND d.pending_expires_at > :now) AS pending
            FROM customers c {where} ORDER BY c.customer_id
        """  # noqa: S608 - `where` is one of this module's constants
        values = {**params, "now": self._clock()}
        rows = await self._call(lambda conn: conn.execute(sql, values).fetchall())
        return [row_to_customer(row) for row in rows]

    # -- devices --------------------------------------------------------------------------------

    async def get_device(self, name: DeviceName) -> Device | None:
        return await self._call(lambda conn: _device(conn, name))

    async def list_devices(self, customer_id: str | None = None) -> list[Device]:
        sql = f"SELECT {DEVICE_COLUMNS} FROM devices"  # noqa: S608 - constant column list
        params: tuple[str, ...] = ()
        if customer_id is not None:
            sql += " WHERE customer_id = ?"
            params = (customer_id,)
        sql += " ORDER BY customer_id, device_id"
        rows = await self._call(lambda conn: conn.execute(sql, params).fetchall())
        return [row_to_device(row) for row in rows]

    async def check_registration(self, name: DeviceName) -> None:
        """Raise RegistrationRefused if registering `name` now would be refused (a cheap pre-check
        that spares bcrypt work on hopeless requests; `register_device` checks again)."""
        now = self._clock()
        await self._call(lambda conn: _refuse_registration(conn, name, now))

    async def register_device(
        self, name: DeviceName, password_hash: bytes, *, ttl_s: float, actor: str
    ) -> Device:
        """Create or renew the pending registration of `name` with a new password hash.

        The limit check and the write are one transaction, so concurrent registrations can never
        exceed a customer's limit. Raises RegistrationRefused with the reason.
        """
        now = self._clock()

        def register(conn: sqlite3.Connection) -> Device | None:
            renewing = _refuse_registration(conn, name, now)
            conn.execute(
                """
                INSERT INTO devices (customer_id, device_id, state, password_hash,
                                     pending_expires_at, created_at)
                VALUES (?, ?, 'pending', ?, ?, ?)
                ON CONFLICT (customer_id, device_id) DO UPDATE SET
                    password_hash = excluded.password_hash,
                    pending_expires_at = excluded.pending_expires_at
                """,
                (*name, password_hash.decode("ascii"), now + ttl_s, now),
            )
            action = "device.register_again" if renewing else "device.register"
            audit(conn, now, actor, action, str(name), {})
            return _device(conn, name)

        device = await self._write(register)
        assert device is not None  # noqa: S101 - written in this transaction
        return device

    async def activate_device(self, name: DeviceName, password_hash: bytes, *, actor: str) -> bool:
        """Make a pending registration active if it still has `password_hash` and has not expired.

        Returns False when the registration changed meanwhile (a newer password, expiry, revoke).
        """
        now = self._clock()

        def activate(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                """
                UPDATE devices SET state = 'active', activated_at = ?, pending_expires_at = NULL
                WHERE customer_id = ? AND device_id = ? AND state = 'pending'
                    AND password_hash = ? AND pending_expires_at > ?
                """,
                (now, *name, password_hash.decode("ascii"), now),
            )
            if cursor.rowcount == 0:
                return False
            audit(conn, now, actor, "device.activate", str(name), {})
            return True

        return await self._write(activate)

    async def revoke_device(self, name: DeviceName, *, actor: str) -> Device:
        """Revoke a device: its credentials stop working and it can never register again."""
        now = self._clock()

        def revoke(conn: sqlite3.Connection) -> Device | None:
            cursor = conn.execute(
                """
                UPDATE devices SET state = 'revoked', revoked_at = ?, password_hash = NULL,
                    pending_expires_at = NULL, online = 0
                WHERE customer_id = ? AND device_id = ? AND state != 'revoked'
                """,
                (now, *name),
            )
            if cursor.rowcount == 0:
                device = _device(conn, name)
                if device is None:
                    raise NotFoundError(f"no device {name}")
                return device  # revoked already: nothing changes, nothing to audit
            close_open_commands(conn, name, now, "device revoked")
            audit(conn, now, actor, "device.revoke", str(name), {})
            return _device(conn, name)

        device = await self._write(revoke)
        assert device is not None  # noqa: S101 - updated in this transaction
        return device

    async def reset_device(self, name: DeviceName, *, actor: str) -> Device:
        """Forget a device so that its id may register again (e.g. after a hardware swap).

        Returns the device as it was; its credentials stop working at once.
        """
        now = self._clock()

        def reset(conn: sqlite3.Connection) -> Device:
            device = _device(conn, name)
            if device is None:
                raise NotFoundError(f"no device {name}")
            # its tags, samples and events go with it (ON DELETE CASCADE); commands stay, failed
            close_open_commands(conn, name, now, "device reset")
            conn.execute("DELETE FROM devices WHERE customer_id = ? AND device_id = ?", tuple(name))
            audit(conn, now, actor, "device.reset", str(name), {"state": device.state.value})
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
        transaction (not audited: not a change made by anyone, and far too frequent)."""
        rows = [
            {
                "online": None if update.online is None else int(update.online),
                "seen_at": update.seen_at,
                "status": json_or_null(update.status),
                "telemetry": json_or_null(update.telemetry),
                "customer_id": update.name.customer_id,
                "device_id": update.name.device_id,
            }
            for update in updates
        ]
        # `online` (in the index devices_by_presence) is only written where it is known
        changes_online = [row for row in rows if row["online"] is not None]
        keeps_online = [row for row in rows if row["online"] is None]
        sample_list, event_list = sample_rows(samples), event_rows(events)

        def record(conn: sqlite3.Connection) -> None:
            if changes_online:
                conn.executemany(_PRESENCE.format(online="online = :online,"), changes_online)
            if keeps_online:
                conn.executemany(_PRESENCE.format(online=""), keeps_online)
            insert_history(conn, sample_list, event_list)

        await self._write(record)

    async def mark_all_offline(self) -> None:
        """At platform start: nothing is connected yet, whatever a killed process left behind."""
        await self._write(lambda conn: conn.execute("UPDATE devices SET online = 0 WHERE online"))

    async def mark_silent_offline(self, seen_before: float) -> list[DeviceName]:
        """Mark offline the online devices last seen before `seen_before`; their names."""

        def mark(conn: sqlite3.Connection) -> list[DeviceName]:
            rows = conn.execute(
                "UPDATE devices SET online = 0 WHERE online AND coalesce(last_seen_at, 0) < ?"
                " RETURNING customer_id, device_id",
                (seen_before,),
            ).fetchall()
            return sorted(DeviceName(row[0], row[1]) for row in rows)

        return await self._write(mark)


def _device(conn: sqlite3.Connection, name: DeviceName) -> Device | None:
    row = conn.execute(
        f"SELECT {DEVICE_COLUMNS} FROM devices WHERE customer_id = ? AND device_id = ?",  # noqa: S608
        tuple(name),
    ).fetchone()
    return None if row is None else row_to_device(row)


def row_to_customer(row: Row) -> Customer:
    return Customer(
        row["customer_id"], row["device_limit"], row["created_at"], row["active"], row["pending"]
    )


def row_to_device(row: Row) -> Device:
    return Device(
        customer_id=row["customer_id"],
        device_id=row["device_id"],
        state=DeviceState(row["state"]),
        password_hash=None if row["password_hash"] is None else row["password_hash"].encode(),
        pending_expires_at=row["pending_expires_at"],
        created_at=row["created_at"],
        activated_at=row["activated_at"],
        revoked_at=row["revoked_at"],
        online=bool(row["online"]),
        last_seen_at=row["last_seen_at"],
        last_status=json_or_none(row["last_status"]),
        telemetry=json_or_none(row["last_telemetry"]),
        tags=json.loads(row["tags"]) if row["tags"] else {},
    )


def _refuse_registration(conn: sqlite3.Connection, name: DeviceName, now: float) -> bool:
    """Raise RegistrationRefused if `name` may not register now; return True if it renews a
    pending registration (which already holds one of the customer's slots)."""
    customer = conn.execute(
        "SELECT device_limit FROM customers WHERE customer_id = ?", (name.customer_id,)
    ).fetchone()
    if customer is None:
        raise RegistrationRefused("unknown customer")
    if refuse_device(_device(conn, name), now):
        return True
    used = scalar(
        conn,
        f"SELECT count(*) FROM devices WHERE customer_id = :cid AND {_COUNTED}",  # noqa: S608
        {"cid": name.customer_id, "now": now},
    )
    refuse_over_limit(used, customer[0])
    return False


def refuse_device(device: Device | None, now: float) -> bool:
    """The registration rules on the device row (shared by both backends): raise
    RegistrationRefused for an active or revoked device; True if it renews an unexpired pending
    registration (a lost response: it keeps its slot), False if the limit must be checked."""
    if device is not None and device.state is DeviceState.ACTIVE:
        raise RegistrationRefused("device already activated")
    if device is not None and device.state is DeviceState.REVOKED:
        raise RegistrationRefused("device revoked")
    return device is not None and not device.is_expired(now)


def refuse_over_limit(used: int, device_limit: int) -> None:
    if used >= device_limit:
        raise RegistrationRefused("device limit reached")
