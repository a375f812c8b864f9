"""Data that crosses modules: customers, devices and audit entries, as frozen dataclasses."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from iotbiz.names import DeviceName


class DeviceState(enum.StrEnum):
    PENDING = "pending"
    ACTIVE = "active"
    REVOKED = "revoked"


def iso_time(ts: float | None) -> str | None:
    """Seconds since the epoch as an ISO 8601 UTC string (None stays None)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


@dataclass(frozen=True, slots=True)
class Customer:
    customer_id: str
    device_limit: int
    created_at: float
    active_devices: int = 0
    pending_devices: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "customer_id": self.customer_id,
            "device_limit": self.device_limit,
            "active_devices": self.active_devices,
            "pending_devices": self.pending_devices,
            "created_at": iso_time(self.created_at),
        }


@dataclass(frozen=True, slots=True)
class Device:
    customer_id: str
    device_id: str
    state: DeviceState
    created_at: float
    pending_expires_at: float | None = None
    activated_at: float | None = None
    revoked_at: float | None = None
    online: bool = False
    last_seen_at: float | None = None
    last_status: dict[str, Any] | None = None
    telemetry: dict[str, Any] | None = None
    password_hash: bytes | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return str(DeviceName(self.customer_id, self.device_id))

    def is_expired(self, now: float) -> bool:
        """A pending registration past its time to live."""
        return (
            self.state is DeviceState.PENDING
            and self.pending_expires_at is not None
            and self.pending_expires_at <= now
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "customer_id": self.customer_id,
            "device_id": self.device_id,
            "state": self.state.value,
            "online": self.online,
            "created_at": iso_time(self.created_at),
            "pending_expires_at": iso_time(self.pending_expires_at),
            "activated_at": iso_time(self.activated_at),
            "revoked_at": iso_time(self.revoked_at),
            "last_seen_at": iso_time(self.last_seen_at),
            "status": self.last_status,
            "telemetry": self.telemetry,
        }


@dataclass(frozen=True, slots=True)
class AuditEntry:
    entry_id: int
    at: float
    actor: str
    action: str
    subject: str
    detail: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.entry_id,
            "at": iso_time(self.at),
            "actor": self.actor,
            "action": self.action,
            "subject": self.subject,
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class Account:
    """An operator's MQTT account: superusers may use any client id and topic; the others get the
    service role (all devices' topics, commands to any device)."""

    name: str
    superuser: bool
    created_at: float
    password_hash: bytes = field(default=b"", repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "superuser": self.superuser,
            "created_at": iso_time(self.created_at),
        }


@dataclass(frozen=True, slots=True)
class PresenceUpdate:
    """What the platform learnt about a device from the broker or its messages. None: unchanged."""

    name: DeviceName
    seen_at: float
    online: bool | None = None
    status: dict[str, Any] | None = None
    telemetry: dict[str, Any] | None = None
