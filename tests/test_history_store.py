"""Telemetry samples and device events in the store: writing, reading, retention."""

from __future__ import annotations

from iotbiz.models import PresenceUpdate, TelemetrySample
from iotbiz.names import DeviceName
from iotbiz.store import Store
from tests.conftest import FakeClock
from tests.store_helpers import active_devices

TELEMETRY = {
    "system": {
        "cpu_percent": 12.5,
        "load": [0.5, 0.4, 0.3],
        "memory": {"total": 1, "percent": 40.0},
        "disk": {"percent": 70.1},
        "net": {"bytes_recv": 1234, "bytes_sent": 99},
        "temperature_c": None,
    }
}


def test_sample_from_telemetry() -> None:
    sample = TelemetrySample.from_telemetry(5.0, TELEMETRY)
    assert sample == TelemetrySample(5.0, 12.5, 40.0, 70.1, 0.5, None, 1234.0, 99.0)
    assert TelemetrySample.from_telemetry(5.0, {"system": "x"}) is None
    odd = TelemetrySample.from_telemetry(
        1.0,
        {
            "system": {
                "cpu_percent": "high",
                "load": [],
                "memory": 3,
                "disk": {"percent": True},
                "temperature_c": float("nan"),
            }
        },
    )
    assert odd == TelemetrySample(1.0)


async def test_samples_written_read_in_range_only_for_active_devices(
    store: Store, clock: FakeClock
) -> None:
    [a, b] = await active_devices(store, "abc123", 2)
    await store.revoke_device(b, actor="op")
    samples = [(a, TelemetrySample(100.0 + i, cpu_percent=float(i))) for i in range(5)]
    await store.record_samples(
        [
            *samples,
            (b, TelemetrySample(100.0)),
            (DeviceName("abc123", "ghost"), TelemetrySample(1.0)),
        ]
    )
    got = await store.telemetry_samples(a)
    assert [s.cpu_percent for s in got] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert [s.at for s in await store.telemetry_samples(a, since=101, until=103)] == [101.0, 102.0]
    assert len(await store.telemetry_samples(a, limit=2)) == 2
    assert await store.telemetry_samples(b) == []
    await store.record_samples(samples[:1])  # the same instant again: ignored, not an error
    assert len(await store.telemetry_samples(a)) == 5


async def test_events_newest_first_with_paging_and_filters(store: Store, clock: FakeClock) -> None:
    [a, b] = await active_devices(store, "abc123", 2)
    [c] = await active_devices(store, "other", 1)
    await store.record_events(
        [(a, 1.0, {"n": 1}), (b, 2.0, {"n": 2}), (c, 3.0, {"n": 3}), (a, 4.0, {"n": 4})]
    )
    everything = await store.list_events()
    assert [e.body["n"] for e in everything] == [4, 3, 2, 1]
    assert [e.body["n"] for e in await store.list_events(name=a)] == [4, 1]
    assert [e.body["n"] for e in await store.list_events(customer_id="abc123")] == [4, 2, 1]
    page = await store.list_events(limit=2)
    assert [e.body["n"] for e in await store.list_events(before=page[-1].event_id)] == [2, 1]
    assert everything[0].to_json()["device"] == "abc123/dev-00000"


async def test_presence_samples_and_events_in_one_batch(store: Store, clock: FakeClock) -> None:
    [a] = await active_devices(store, "abc123", 1)
    await store.record_presence(
        [PresenceUpdate(a, clock.now, online=True)],
        samples=[(a, TelemetrySample(clock.now, cpu_percent=1.0))],
        events=[(a, clock.now, {"event": "app"})],
    )
    assert len(await store.telemetry_samples(a)) == 1
    assert len(await store.list_events(name=a)) == 1


async def test_retention_by_age_and_per_device_cap_in_bounded_batches(
    store: Store, clock: FakeClock
) -> None:
    names = await active_devices(store, "abc123", 5)
    start = clock.now
    await store.record_samples(
        [(n, TelemetrySample(start - age)) for n in names for age in (10, 100, 1000)]
    )
    await store.record_events([(n, start - 1000, {"old": True}) for n in names])
    await store.record_events([(n, start - 1, {"i": i}) for i in range(6) for n in names])
    deleted = await store.prune_history(
        samples_keep_s=500, events_keep_s=500, events_per_device=4, batch=2
    )
    # per device: the 1000 s old sample, the old event and 2 of the 6 new events (cap 4)
    assert deleted == 5 * (1 + 1 + 2)
    for name in names:
        assert [s.at for s in await store.telemetry_samples(name)] == [start - 100, start - 10]
        assert [e.body for e in await store.list_events(name=name)] == [
            {"i": i} for i in (5, 4, 3, 2)
        ]
    assert (
        await store.prune_history(samples_keep_s=500, events_keep_s=500, events_per_device=4) == 0
    )


async def test_old_events_are_pruned_in_batches(store: Store, clock: FakeClock) -> None:
    [a] = await active_devices(store, "abc123", 1)
    await store.record_events([(a, float(i), {"i": i}) for i in range(25)])
    await store.record_events([(a, clock.now, {"new": True})])
    assert await store.prune_old_events(before=clock.now - 10, limit=10) == 10
    assert await store.prune_old_events(before=clock.now - 10, limit=10) == 10
    assert await store.prune_old_events(before=clock.now - 10, limit=10) == 5
    assert [e.body for e in await store.list_events()] == [{"new": True}]


async def test_reset_takes_the_history_along(store: Store, clock: FakeClock) -> None:
    [a] = await active_devices(store, "abc123", 1)
    await store.record_samples([(a, TelemetrySample(clock.now))])
    await store.record_events([(a, clock.now, {})])
    await store.reset_device(a, actor="op")
    assert await store.telemetry_samples(a) == []
    assert await store.list_events() == []
