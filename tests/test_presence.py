"""Presence: batching, merging, and what the service client makes of device messages."""

from __future__ import annotations

import asyncio
from collections.abc import Collection

from iotbiz.models import DeviceState
from iotbiz.names import DeviceName
from iotbiz.presence import PresenceRecorder
from iotbiz.registrar.service_client import ServiceClient, ServiceLink
from iotbiz.store import Store
from iotbiz.store.interface import PlatformStore
from tests.conftest import FakeClock

NAME = DeviceName("abc123", "dev-1")


async def active_device(store: Store) -> None:
    await store.add_customer("abc123", 5, actor="test")
    await store.register_device(NAME, b"$2b$06$x", ttl_s=60, actor="test")
    assert await store.activate_device(NAME, b"$2b$06$x", actor="test")


async def test_updates_merge_and_flush_in_one_batch(store: Store, clock: FakeClock) -> None:
    await active_device(store)
    presence = PresenceRecorder(store, clock=clock)
    presence.connected(NAME)
    clock.advance(1)
    presence.telemetry_payload(NAME, b'{"cpu": 1}')
    presence.status(NAME, {"state": "online"}, live=True)
    clock.advance(1)
    presence.telemetry_payload(NAME, b'{"cpu": 2}')
    await presence.flush()
    device = await store.get_device(NAME)
    assert device is not None
    assert (device.online, device.telemetry, device.last_status) == (
        True,
        {"cpu": 2},
        {"state": "online"},
    )
    assert device.last_seen_at == clock.now


async def test_a_retained_status_does_not_say_online(store: Store, clock: FakeClock) -> None:
    """A retained `online` replayed on subscribe may be stale (a clean disconnect leaves it)."""
    await active_device(store)
    presence = PresenceRecorder(store, clock=clock)
    presence.status(NAME, {"state": "online"}, live=False)
    await presence.flush()
    device = await store.get_device(NAME)
    assert device is not None
    assert not device.online
    assert device.last_status == {"state": "online"}
    presence.status(NAME, {"state": "offline"}, live=True)
    presence.connected(NAME)  # the later event wins within a batch
    await presence.flush()
    device = await store.get_device(NAME)
    assert device is not None
    assert device.online


async def test_only_active_devices_are_updated(store: Store, clock: FakeClock) -> None:
    await active_device(store)
    await store.revoke_device(NAME, actor="test")
    presence = PresenceRecorder(store, clock=clock)
    presence.connected(NAME)
    await presence.flush()
    device = await store.get_device(NAME)
    assert device is not None
    assert device.state is DeviceState.REVOKED
    assert not device.online


async def test_service_client_ignores_what_is_not_a_device_message(
    store: Store, clock: FakeClock
) -> None:
    await active_device(store)
    presence = PresenceRecorder(store, clock=clock)
    client = ServiceClient(ServiceLink("127.0.0.1", 1, "svc", "pw"), presence)
    for topic, payload in [
        ("devices/abc123/dev-1/telemetry", b"not json"),
        ("devices/abc123/dev-1/telemetry", b"[1, 2]"),
        ("devices/abc123/dev-1/status", b"\xff"),
        ("devices/abc123/dev-1/status", b"[" * 5000),
    ]:
        client.handle(topic, payload, retained=False)
    await presence.flush()  # telemetry is parsed here: only the latest of a device
    assert presence.malformed_messages == 3
    for topic in ("devices/abc123", "devices/a b/dev/telemetry", "other/abc123/dev-1/status"):
        client.handle(topic, b"{}", retained=False)
    await presence.flush()
    device = await store.get_device(NAME)
    assert device is not None
    assert (device.telemetry, device.last_status, device.last_seen_at) == (None, None, None)

    client.handle("devices/abc123/dev-1/telemetry", b'{"cpu": 5}', retained=False)
    client.handle("devices/abc123/dev-1/events", b"anything", retained=False)
    await presence.flush()
    device = await store.get_device(NAME)
    assert device is not None
    assert device.telemetry == {"cpu": 5}


async def test_only_the_latest_telemetry_is_parsed_and_kept(store: Store, clock: FakeClock) -> None:
    """Raw telemetry waits for the flush; a malformed latest message is counted, not stored."""
    await active_device(store)
    presence = PresenceRecorder(store, clock=clock)
    presence.telemetry_payload(NAME, b'{"cpu": 1}')
    clock.advance(1)
    presence.telemetry_payload(NAME, b'{"cpu": 2}')
    await presence.flush()
    device = await store.get_device(NAME)
    assert device is not None
    assert (device.telemetry, device.last_seen_at) == ({"cpu": 2}, clock.now)
    assert presence.malformed_messages == 0

    clock.advance(1)
    presence.telemetry_payload(NAME, b"not json")
    await presence.flush()
    device = await store.get_device(NAME)
    assert device is not None
    assert (device.telemetry, device.last_seen_at) == ({"cpu": 2}, clock.now - 1)  # ignored
    assert presence.malformed_messages == 1


async def test_hooks_hear_of_devices_coming_online_and_their_replies(
    store: Store, clock: FakeClock
) -> None:
    presence = PresenceRecorder(store, clock=clock)
    online: list[DeviceName] = []
    replies: list[tuple[DeviceName, bytes]] = []
    presence.on_online.append(online.append)
    presence.on_reply.append(lambda name, payload: replies.append((name, payload)))
    presence.connected(NAME)
    presence.message(NAME, "status", b'{"state": "online"}', retained=True)  # replayed: no
    presence.message(NAME, "status", b'{"state": "offline"}', retained=False)
    presence.message(NAME, "status", b'{"state": "online"}', retained=False)
    presence.disconnected(NAME)
    presence.message(NAME, "reply", b'{"id": "c-1", "ok": true}', retained=False)
    assert online == [NAME, NAME]
    assert replies == [(NAME, b'{"id": "c-1", "ok": true}')]


async def test_with_an_external_broker_messages_say_online(store: Store, clock: FakeClock) -> None:
    """No connect events: a retained status counts, and a live message from a device whose
    status this leader has not heard turns it online (once: the dispatcher hears of it once);
    after a status, only statuses count."""
    await active_device(store)
    presence = PresenceRecorder(store, clock=clock, external_broker=True)
    came_online: list[DeviceName] = []
    presence.on_online.append(came_online.append)

    async def online() -> bool:
        await presence.flush()
        device = await store.get_device(NAME)
        assert device is not None
        return bool(device.online)

    presence.message(NAME, "telemetry", b"{}", retained=True)  # a retained copy: not alive
    assert not await online()
    for _ in range(3):  # a device that stayed connected through a restart
        presence.message(NAME, "telemetry", b'{"cpu": 1}', retained=False)
    assert await online()
    assert came_online == [NAME]
    presence.message(NAME, "status", b'{"state": "offline"}', retained=False)  # goodbye
    presence.message(NAME, "telemetry", b'{"cpu": 2}', retained=False)  # sent after it
    assert not await online()
    presence.status(NAME, {"state": "online"}, live=False)  # retained, kept by the broker
    assert await online()
    assert came_online == [NAME, NAME]
    await store.mark_all_offline()  # a new leader starts over
    presence.forget_online()
    presence.message(NAME, "events", b'{"kind": "x"}', retained=False)
    assert await online()
    assert came_online == [NAME, NAME, NAME]
    # the embedded broker's presence: a message says nothing of the connection
    embedded = PresenceRecorder(store, clock=clock)
    await store.mark_all_offline()
    embedded.message(NAME, "telemetry", b'{"cpu": 2}', retained=False)
    embedded.status(NAME, {"state": "online"}, live=False)
    await embedded.flush()
    device = await store.get_device(NAME)
    assert device is not None
    assert not device.online


async def test_with_an_external_broker_a_silent_device_turns_offline(
    any_store: PlatformStore, clock: FakeClock
) -> None:
    """A broker node that dies sends no wills: a device that said online and then went silent
    for broker.presence_timeout_s is marked offline (on both backends), and its next message
    turns it online again."""
    store = any_store
    await active_device(store)
    quiet = DeviceName("abc123", "dev-2")
    await store.register_device(quiet, b"$2b$06$x", ttl_s=60, actor="test")
    assert await store.activate_device(quiet, b"$2b$06$x", actor="test")
    presence = PresenceRecorder(store, clock=clock, external_broker=True)
    for name in (NAME, quiet):
        presence.message(name, "status", b'{"state": "online"}', retained=False)
    await presence.flush()
    clock.advance(50)
    presence.message(NAME, "telemetry", b'{"cpu": 1}', retained=False)  # still talking
    await presence.flush()
    clock.advance(20)  # quiet: 70 s silent; NAME: 20 s
    recorded: list[list[DeviceName]] = []
    swept = asyncio.Event()

    def record(names: Collection[DeviceName]) -> None:
        recorded.append(list(names))
        swept.set()

    presence.on_recorded.append(record)
    sweeping = asyncio.create_task(presence.run_silence_timeout(60, every_s=0.05))
    try:
        await asyncio.wait_for(swept.wait(), 30)
    finally:
        sweeping.cancel()
        await asyncio.gather(sweeping, return_exceptions=True)
    assert recorded == [[quiet]]
    online = {name: (await store.get_device(name)).online for name in (NAME, quiet)}  # type: ignore[union-attr]
    assert online == {NAME: True, quiet: False}
    presence.message(quiet, "telemetry", b'{"cpu": 2}', retained=False)  # it was only quiet
    await presence.flush()
    device = await store.get_device(quiet)
    assert device is not None
    assert device.online
    assert await store.mark_silent_offline(clock.now - 60) == []
