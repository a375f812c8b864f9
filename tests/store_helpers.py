"""Store fixtures shared by the store tests: active devices without the HTTP dance."""

from __future__ import annotations

from iotbiz.names import DeviceName
from iotbiz.store.interface import DeviceStore

HASH = b"$2b$06$hash"


async def active_devices(store: DeviceStore, customer_id: str, count: int) -> list[DeviceName]:
    if await store.get_customer(customer_id) is None:
        await store.add_customer(customer_id, count + 100, actor="test")
    names = [DeviceName(customer_id, f"dev-{i:05d}") for i in range(count)]
    for name in names:
        await store.register_device(name, HASH, ttl_s=60, actor="test")
        assert await store.activate_device(name, HASH, actor="test")
    return names
