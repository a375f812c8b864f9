"""The running platform on a disk that fills up: it keeps running, devices still connect, and
their presence is recorded once the disk has room again."""

from __future__ import annotations

from collections.abc import Callable

from iotbiz.names import DeviceName
from iotbiz.platform import Platform
from iotbiz.settings import Settings
from tests.mqtt_device import PahoDevice
from tests.test_dispatch import enroll
from tests.test_store_failures import SmallDisk, small_disk, wait_until

__all__ = ["small_disk"]  # the fixture, used by name

NAME = DeviceName("abc123", "dev-1")


async def test_a_full_disk_does_not_stop_the_platform(
    make_settings: Callable[..., Settings], small_disk: SmallDisk
) -> None:
    settings = make_settings(
        http={"host": "127.0.0.1"}, store={"path": small_disk.folder / "iotbiz.db"}
    )
    platform = Platform(settings)
    await platform.start()
    device: PahoDevice | None = None
    try:
        store = platform.store
        await store.add_customer(NAME.customer_id, 5, actor="test")
        password = await enroll(platform, NAME)
        small_disk.fill()

        device = PahoDevice(platform.mqtt_port, str(NAME), password)
        assert await device.connect() == 0  # authentication only reads the store
        presence = platform._presence
        assert presence is not None
        await wait_until(lambda: presence.failed_flushes >= 2)  # "online" could not be written
        assert not platform.failed.is_set()

        small_disk.make_room()

        async def online() -> bool:
            recorded = await store.get_device(NAME)
            return recorded is not None and recorded.online

        await wait_until(online, timeout_s=30)  # retried after at most RETRY_CAP_S
        assert not platform.failed.is_set()
    finally:
        if device is not None:
            device.close()
        problems = await platform.stop()
    assert problems == []
