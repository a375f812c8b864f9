"""Data that crosses modules: customers, devices, commands, telemetry samples, events and audit
entries, as frozen dataclasses."""

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
    tags: dict[str, str] = field(default_factory=dict)

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
            "tags": dict(self.tags),
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


class CommandState(enum.StrEnum):
    """queued -> sent -> done | failed; queued or sent -> expired (no reply by `expires_at`).
    A final state never changes again."""

    QUEUED = "queued"
    SENT = "sent"
    DONE = "done"
    FAILED = "failed"
    EXPIRED = "expired"


FINAL = frozenset({CommandState.DONE, CommandState.FAILED, CommandState.EXPIRED})
OPEN = frozenset({CommandState.QUEUED, CommandState.SENT})


@dataclass(frozen=True, slots=True)
class Command:
    command_id: str
    customer_id: str
    device_id: str
    action: str
    args: dict[str, Any]
    state: CommandState
    created_at: float
    expires_at: float
    sent_at: float | None = None
    done_at: float | None = None
    result: Any = None
    error: str | None = None
    actor: str = ""
    batch_id: str = ""

    @property
    def name(self) -> str:
        return str(DeviceName(self.customer_id, self.device_id))

    @property
    def device(self) -> DeviceName:
        return DeviceName(self.customer_id, self.device_id)

    @property
    def final(self) -> bool:
        return self.state in FINAL

    def message(self) -> dict[str, Any]:
        """What the device gets on its `cmd` topic."""
        return {
            "id": self.command_id,
            "action": self.action,
            "args": self.args,
            "expires_at": self.expires_at,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.command_id,
            "device": self.name,
            "action": self.action,
            "args": self.args,
            "state": self.state.value,
            "created_at": iso_time(self.created_at),
            "sent_at": iso_time(self.sent_at),
            "done_at": iso_time(self.done_at),
            "expires_at": iso_time(self.expires_at),
            "result": self.result,
            "error": self.error,
            "actor": self.actor,
            "batch_id": self.batch_id,
        }


@dataclass(frozen=True, slots=True)
class CommandReply:
    """A device's answer on its `reply` topic, as the dispatcher hands it to the store."""

    name: DeviceName
    command_id: str
    ok: bool
    result: Any = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class TelemetrySample:
    """One point of a device's telemetry history (None: the device did not report it)."""

    at: float
    cpu_percent: float | None = None
    memory_percent: float | None = None
    disk_percent: float | None = None
    load_1: float | None = None
    temperature_c: float | None = None
    net_rx_bytes: float | None = None
    net_tx_bytes: float | None = None

    @classmethod
    def from_telemetry(cls, at: float, telemetry: dict[str, Any]) -> TelemetrySample | None:
        """The sample in an agent's telemetry message (its `system` object); None without one."""
        system = telemetry.get("system")
        if not isinstance(system, dict):
            return None
        load = system.get("load")
        return cls(
            at=at,
            cpu_percent=_number(system.get("cpu_percent")),
            memory_percent=_number(_get(system, "memory", "percent")),
            disk_percent=_number(_get(system, "disk", "percent")),
            load_1=_number(load[0]) if isinstance(load, list) and load else None,
            temperature_c=_number(system.get("temperature_c")),
            net_rx_bytes=_number(_get(system, "net", "bytes_recv")),
            net_tx_bytes=_number(_get(system, "net", "bytes_sent")),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "at": iso_time(self.at),
            "ts": self.at,
            "cpu_percent": self.cpu_percent,
            "memory_percent": self.memory_percent,
            "disk_percent": self.disk_percent,
            "load_1": self.load_1,
            "temperature_c": self.temperature_c,
            "net_rx_bytes": self.net_rx_bytes,
            "net_tx_bytes": self.net_tx_bytes,
        }


def _get(data: dict[str, Any], key: str, inner: str) -> Any:
    value = data.get(key)
    return value.get(inner) if isinstance(value, dict) else None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if number == number and abs(number) != float("inf") else None  # no NaN, inf


@dataclass(frozen=True, slots=True)
class DeviceEvent:
    """An event a device published on `events` (app state changes, update progress...); `at`
    is when the platform received it, the device's own time stays in `body`."""

    event_id: int
    customer_id: str
    device_id: str
    at: float
    body: dict[str, Any]

    @property
    def name(self) -> str:
        return str(DeviceName(self.customer_id, self.device_id))

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.event_id,
            "device": self.name,
            "at": iso_time(self.at),
            "body": self.body,
        }
