"""The store's interface, as Protocols both backends satisfy (checked by mypy below).

It grows with the PostgreSQL store: `DeviceStore` (the connection's, the customers', the
devices', the fleet's, the accounts', the audit log's and the releases' operations),
`CommandOperations` (the commands'), `HistoryOperations` (presence, telemetry history and device
events) and `RolloutOperations` (the staged rollouts'): every operation of the SQLite store.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from iotbiz.models import (
    Account,
    AuditEntry,
    Command,
    CommandReply,
    CommandState,
    Customer,
    Device,
    DeviceEvent,
    DeviceState,
    PresenceUpdate,
    TelemetrySample,
)
from iotbiz.names import DeviceName
from iotbiz.store.history import Event, Sample
from iotbiz.store.leader import LeaderLock
from iotbiz.store.releases import Release
from iotbiz.store.rollouts import Rollout, RolloutDevice


class DeviceStore(Protocol):
    def now(self) -> float: ...
    async def close(self) -> None: ...
    async def schema_version(self) -> int: ...
    async def ping(self) -> None: ...
    def leader_lock(self) -> LeaderLock: ...
    async def add_customer(
        self, customer_id: str, device_limit: int, *, actor: str
    ) -> Customer: ...
    async def set_device_limit(
        self, customer_id: str, device_limit: int, *, actor: str
    ) -> None: ...
    async def get_customer(self, customer_id: str) -> Customer | None: ...
    async def list_customers(self) -> list[Customer]: ...
    async def get_device(self, name: DeviceName) -> Device | None: ...
    async def list_devices(self, customer_id: str | None = None) -> list[Device]: ...
    async def check_registration(self, name: DeviceName) -> None: ...
    async def register_device(
        self, name: DeviceName, password_hash: bytes, *, ttl_s: float, actor: str
    ) -> Device: ...
    async def activate_device(
        self, name: DeviceName, password_hash: bytes, *, actor: str
    ) -> bool: ...
    async def revoke_device(self, name: DeviceName, *, actor: str) -> Device: ...
    async def reset_device(self, name: DeviceName, *, actor: str) -> Device: ...
    async def mark_all_offline(self) -> None: ...
    async def mark_silent_offline(self, seen_before: float) -> list[DeviceName]: ...
    async def add_account(
        self, name: str, password_hash: bytes, *, superuser: bool, actor: str
    ) -> Account: ...
    async def get_account(self, name: str) -> Account | None: ...
    async def list_accounts(self) -> list[Account]: ...
    async def remove_account(self, name: str, *, actor: str) -> None: ...
    async def audit_refusals(self, entries: list[tuple[str, str, str, dict[str, Any]]]) -> None: ...
    async def latest_change(self) -> int: ...
    async def changes_since(self, entry_id: int, *, limit: int = 1000) -> list[AuditEntry]: ...
    async def audit_entries(
        self, *, subject: str | None = None, limit: int = 100, before: int | None = None
    ) -> list[AuditEntry]: ...
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
    ) -> tuple[list[Device], int]: ...
    async def device_names(
        self,
        *,
        customer_id: str,
        tags: Mapping[str, str] | None = None,
        state: DeviceState = DeviceState.ACTIVE,
        limit: int = 10_000,
    ) -> list[DeviceName]: ...
    async def get_tags(self, name: DeviceName) -> dict[str, str]: ...
    async def set_tags(
        self, name: DeviceName, changes: Mapping[str, str | None], *, actor: str
    ) -> dict[str, str]: ...
    async def add_release(
        self,
        app: str,
        version: str,
        *,
        sha256: str,
        size: int,
        signature: str | None,
        actor: str,
    ) -> Release: ...
    async def get_release(self, app: str, version: str) -> Release | None: ...
    async def list_releases(self, *, app: str | None = None) -> list[Release]: ...
    async def remove_release(self, app: str, version: str, *, actor: str) -> Release: ...
    async def offer_release(
        self, names: Sequence[DeviceName], app: str, version: str
    ) -> list[DeviceName]: ...
    async def withdraw_offers(
        self, names: Sequence[DeviceName], app: str, version: str
    ) -> None: ...
    async def offered_release(
        self, name: DeviceName, app: str, version: str
    ) -> tuple[bool, Release | None]: ...
    async def release_offers(self, app: str, version: str) -> list[DeviceName]: ...


class RolloutOperations(Protocol):
    """Staged rollouts (iotbiz.store.rollouts has their life cycle)."""

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
    ) -> Rollout: ...
    async def get_rollout(self, rollout_id: str) -> Rollout | None: ...
    async def list_rollouts(
        self, *, limit: int = 100, before: str | None = None
    ) -> list[Rollout]: ...
    async def rollout_devices(self, rollout_id: str) -> list[RolloutDevice]: ...
    async def rollouts_to_follow(self, *, limit: int) -> list[str]: ...
    async def batch_names(self, rollout_id: str, batch: int) -> list[DeviceName]: ...
    async def start_rollout_batch(
        self, rollout_id: str, batch: int, args: dict[str, Any], *, expires_at: float
    ) -> list[Command]: ...
    async def settle_rollout(self, rollout_id: str) -> int | None: ...
    async def end_rollout(
        self, rollout_id: str, state: str, reason: str | None, actor: str
    ) -> Rollout: ...


class CommandOperations(Protocol):
    async def create_commands(
        self,
        names: Sequence[DeviceName],
        action: str,
        args: dict[str, Any],
        *,
        expires_at: float,
        actor: str,
        batch_id: str,
    ) -> list[Command]: ...
    async def get_command(self, command_id: str) -> Command | None: ...
    async def list_commands(
        self,
        *,
        name: DeviceName | None = None,
        state: CommandState | None = None,
        batch_id: str | None = None,
        limit: int = 100,
        before: str | None = None,
    ) -> list[Command]: ...
    async def count_commands(self) -> dict[CommandState, int]: ...
    async def due_commands(self, names: Sequence[DeviceName]) -> list[Command]: ...
    async def dispatchable_commands(self, *, resend_before: float, limit: int) -> list[Command]: ...
    async def mark_sent(self, command_ids: Iterable[str], at: float) -> None: ...
    async def finish_commands(self, replies: Sequence[CommandReply]) -> list[Command | None]: ...
    async def finish_command(
        self, name: DeviceName, command_id: str, *, ok: bool, result: Any, error: str | None
    ) -> Command | None: ...
    async def expire_commands(self, *, limit: int = 1000) -> list[Command]: ...
    async def prune_commands(self, *, before: float, limit: int = 1000) -> int: ...


class HistoryOperations(Protocol):
    async def record_presence(
        self,
        updates: Iterable[PresenceUpdate],
        *,
        samples: Iterable[Sample] = (),
        events: Iterable[Event] = (),
    ) -> None: ...
    async def record_samples(self, samples: Iterable[Sample]) -> None: ...
    async def record_events(self, events: Iterable[Event]) -> None: ...
    async def telemetry_samples(
        self,
        name: DeviceName,
        *,
        since: float | None = None,
        until: float | None = None,
        limit: int = 1000,
    ) -> list[TelemetrySample]: ...
    async def list_events(
        self,
        *,
        name: DeviceName | None = None,
        customer_id: str | None = None,
        limit: int = 100,
        before: int | None = None,
    ) -> list[DeviceEvent]: ...
    async def prune_history(
        self,
        *,
        samples_keep_s: float,
        events_keep_s: float,
        events_per_device: int,
        batch: int = 500,
    ) -> int: ...
    async def prune_devices_batch(
        self,
        *,
        samples_before: float,
        events_per_device: int,
        after: DeviceName | None,
        devices: int,
    ) -> tuple[int, DeviceName | None]: ...
    async def prune_old_events(self, *, before: float, limit: int) -> int: ...


class PlatformStore(DeviceStore, CommandOperations, HistoryOperations, RolloutOperations, Protocol):
    """Everything the platform uses of its store: what `iotbiz.store.opening.open_store`
    returns, whichever backend the settings name."""


if TYPE_CHECKING:
    from iotbiz.store import Store
    from iotbiz.store.postgres import PostgresStore

    def _both_satisfy(sqlite: Store, postgres: PostgresStore) -> tuple[DeviceStore, DeviceStore]:
        return sqlite, postgres

    def _both_have_rollouts(
        sqlite: Store, postgres: PostgresStore
    ) -> tuple[RolloutOperations, RolloutOperations]:
        return sqlite, postgres

    def _both_have_commands(
        sqlite: Store, postgres: PostgresStore
    ) -> tuple[CommandOperations, CommandOperations]:
        return sqlite, postgres

    def _both_serve_the_platform(
        sqlite: Store, postgres: PostgresStore
    ) -> tuple[PlatformStore, PlatformStore]:
        return sqlite, postgres

    def _both_have_history(
        sqlite: Store, postgres: PostgresStore
    ) -> tuple[HistoryOperations, HistoryOperations]:
        return sqlite, postgres
