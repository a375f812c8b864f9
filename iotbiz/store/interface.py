"""The store's interface, as a Protocol both backends satisfy (checked by mypy below).

It grows with the PostgreSQL store: so far the connection's and the customers' and devices'
operations (see iotbiz/store/postgres/devices.py for what is still missing there).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from iotbiz.models import Customer, Device
from iotbiz.names import DeviceName


class DeviceStore(Protocol):
    def now(self) -> float: ...
    async def close(self) -> None: ...
    async def schema_version(self) -> int: ...
    async def ping(self) -> None: ...
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


if TYPE_CHECKING:
    from iotbiz.store import Store
    from iotbiz.store.postgres import PostgresStore

    def _both_satisfy(sqlite: Store, postgres: PostgresStore) -> tuple[DeviceStore, DeviceStore]:
        return sqlite, postgres
