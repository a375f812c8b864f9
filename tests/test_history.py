"""Telemetry history and events through presence: one sample per device per interval, events
recorded with the batch, bounds while the store fails; retention; and the real thing: a real
agent's telemetry and app events reaching the store of a real platform."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

from iotbiz.models import TelemetrySample
from iotbiz.platform import Platform
from iotbiz.presence import PresenceRecorder
from iotbiz.retention import Retention
from iotbiz.settings import HistorySettings, Settings
from iotbiz.store import Store
from tests.conftest import FakeClock
from tests.store_helpers import active_devices
from tests.test_dispatch_agent import NAME, agent_process, running_platform, until
from tests.test_store_failures import SmallDisk, small_disk

__all__ = ["small_disk"]  # the fixture, used by name


def telemetry(cpu: float) -> bytes:
    return json.dumps({"system": {"cpu_percent": cpu, "load": [1.0, 0, 0]}}).encode()


async def test_one_sample_per_device_per_interval(store: Store, clock: FakeClock) -> None:
    [a, b] = await active_devices(store, "abc123", 2)
    clock.now = 1_000_050.0  # 30 s into a 60 s interval (1_000_020 to 1_000_080)
    presence = PresenceRecorder(
        store, clock=clock, history=HistorySettings(sample_interval_s=60, write_interval_s=0)
    )
    for cpu in (1.0, 2.0, 3.0):  # every 10 s, within the interval
        presence.telemetry_payload(a, telemetry(cpu))
        presence.telemetry_payload(b, telemetry(cpu * 10))
        await presence.flush()
        clock.advance(10)
    # 1_000_080: a new interval; the first telemetry flushed in it is sampled
    presence.telemetry_payload(a, telemetry(4.0))
    await presence.flush()
    presence.telemetry_payload(a, telemetry(5.0))
    await presence.flush()
    assert [(s.at, s.cpu_percent) for s in await store.telemetry_samples(a)] == [
        (1_000_050.0, 1.0),
        (1_000_080.0, 4.0),
    ]
    assert [s.cpu_percent for s in await store.telemetry_samples(b)] == [10.0]
    device = await store.get_device(a)
    assert device is not None
    assert device.telemetry == json.loads(telemetry(5.0))  # the latest, as before


async def test_samples_are_held_and_written_together(store: Store, clock: FakeClock) -> None:
    """Written every write_interval_s (one transaction, device by device), and all of them by
    the final flush at shutdown."""
    names = await active_devices(store, "abc123", 3)
    history = HistorySettings(sample_interval_s=10, write_interval_s=60)
    presence = PresenceRecorder(store, clock=clock, history=history)
    for _ in range(6):  # 50 s: 6 samples of each device, held
        for name in names:
            presence.telemetry_payload(name, telemetry(1.0))
        assert await presence.flush()
        clock.advance(10)
    assert presence.pending_history == 18
    assert await store.telemetry_samples(names[0]) == []
    device = await store.get_device(names[0])
    assert device is not None
    assert device.telemetry is not None  # presence itself is not held
    clock.advance(10)  # 60 s after the first sample: due
    assert await presence.flush()
    assert presence.pending_history == 0
    assert [len(await store.telemetry_samples(name)) for name in names] == [6, 6, 6]
    for name in names:
        presence.telemetry_payload(name, telemetry(2.0))
    assert await presence.flush()
    assert presence.pending_history == 3
    assert await presence.flush(final=True)
    assert [len(await store.telemetry_samples(name)) for name in names] == [7, 7, 7]


async def test_events_are_recorded_with_the_batch_and_bounded(
    store: Store, clock: FakeClock
) -> None:
    [a] = await active_devices(store, "abc123", 1)
    history = HistorySettings(max_event_bytes=256, max_pending_events=3)
    presence = PresenceRecorder(store, clock=clock, history=history)
    presence.message(a, "events", b'{"event": "app", "to": "RUNNING"}', retained=False)
    presence.message(a, "events", b'{"padding": "' + b"x" * 300 + b'"}', retained=False)
    presence.message(a, "events", b"[1, 2]", retained=False)
    await presence.flush()
    [event] = await store.list_events(name=a)
    assert (event.body, event.at) == ({"event": "app", "to": "RUNNING"}, clock.now)
    assert (presence.dropped_events, presence.malformed_messages) == (1, 1)
    for i in range(5):
        presence.message(a, "events", json.dumps({"i": i}).encode(), retained=False)
    assert presence.pending_history == 3  # the oldest two dropped
    await presence.flush()
    assert [e.body for e in await store.list_events(name=a)][:3] == [{"i": 4}, {"i": 3}, {"i": 2}]
    assert presence.dropped_events == 3


async def test_history_waits_within_bounds_while_the_disk_is_full(
    small_disk: SmallDisk, clock: FakeClock
) -> None:
    store = await Store.open(small_disk.folder / "iotbiz.db", clock=clock)
    try:
        [a] = await active_devices(store, "abc123", 1)
        history = HistorySettings(
            sample_interval_s=1, write_interval_s=0, max_pending_events=10, max_pending_samples=10
        )
        presence = PresenceRecorder(store, clock=clock, history=history)
        small_disk.fill()
        for i in range(30):
            presence.telemetry_payload(a, telemetry(float(i)))
            presence.message(a, "events", json.dumps({"i": i}).encode(), retained=False)
            assert not await presence.flush()
            clock.advance(1)
        assert presence.pending_history == 10 + 10  # the first ten samples, the last ten events
        assert presence.dropped_samples == 20
        assert presence.dropped_events == 20
        small_disk.make_room()
        assert await presence.flush()
        assert [s.cpu_percent for s in await store.telemetry_samples(a)] == [
            float(i) for i in range(10)
        ]
        assert [e.body["i"] for e in await store.list_events(name=a)] == list(range(29, 19, -1))
    finally:
        await store.close()


async def test_retention_pass_prunes_samples_events_and_commands(
    store: Store, clock: FakeClock
) -> None:
    [a] = await active_devices(store, "abc123", 1)
    await store.record_samples(
        [(a, TelemetrySample(clock.now - 7200)), (a, TelemetrySample(clock.now))]
    )
    await store.record_events([(a, clock.now - 7200, {"old": 1}), (a, clock.now, {"new": 1})])
    await store.create_commands([a], "ping", {}, expires_at=clock.now + 1, actor="op", batch_id="b")
    clock.advance(2)
    await store.expire_commands()
    clock.advance(3600)
    retention = Retention(
        store,
        HistorySettings(
            samples_keep_s=7000, events_keep_s=7000, commands_keep_s=600, prune_batch=1
        ),
    )
    assert await retention.prune_once() == 3
    assert [s.at for s in await store.telemetry_samples(a)] == [clock.now - 3602]
    assert [e.body for e in await store.list_events()] == [{"new": 1}]
    assert await store.list_commands() == []


async def test_a_real_agent_fills_the_history(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(
        http={"host": "127.0.0.1"}, history={"sample_interval_s": 1, "write_interval_s": 0}
    )
    async with running_platform(settings) as platform:
        await platform.store.add_customer(NAME.customer_id, 5, actor="test")
        config = _agent_config(tmp_path, platform)
        with agent_process(tmp_path, config):
            samples = await until(
                lambda: _at_least(platform, 3), 30, "three telemetry samples in the store"
            )
            events = await until(
                lambda: platform.store.list_events(name=NAME), 30, "the app's events"
            )
    assert all(s.cpu_percent is not None and s.memory_percent is not None for s in samples)
    assert len({int(s.at) for s in samples}) == len(samples)  # one per second at most
    assert any(e.body.get("app") == "app" for e in events)


async def _at_least(platform: Platform, count: int) -> list[TelemetrySample] | None:
    samples = await platform.store.telemetry_samples(NAME)
    return samples if len(samples) >= count else None


def _agent_config(tmp_path: Path, platform: Platform) -> Path:
    command = [sys.executable, "-c", "import time\nwhile True: time.sleep(1)"]
    config = tmp_path / "agent.toml"
    config.write_text(
        f'customer_id = "{NAME.customer_id}"\ndevice_id = "{NAME.device_id}"\n'
        f'registrar_url = "http://127.0.0.1:{platform.http_port}"\n'
        f'broker_url = "mqtt://127.0.0.1:{platform.mqtt_port}"\n'
        f'state_dir = "{tmp_path / "agent-state"}"\ntelemetry_interval_s = 1\n'
        f'\n[[apps]]\nname = "app"\ncommand = {json.dumps(command)}\n'
    )
    return config
