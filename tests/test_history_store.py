"""Telemetry samples and device events in the store: writing, reading, retention; on both
backends. On PostgreSQL, presence and history from one process and a reset from another
(separate connection pools on one database) wait for one another instead of failing."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from iotbiz.models import PresenceUpdate, TelemetrySample
from iotbiz.names import DeviceName
from iotbiz.store.interface import PlatformStore
from iotbiz.store.postgres import PostgresStore
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


@pytest.fixture
def store(any_store: PlatformStore) -> PlatformStore:
    """Every test here runs on both backends (SQLite, PostgreSQL)."""
    return any_store


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
    store: PlatformStore, clock: FakeClock
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


async def test_events_newest_first_with_paging_and_filters(
    store: PlatformStore, clock: FakeClock
) -> None:
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


async def test_presence_samples_and_events_in_one_batch(
    store: PlatformStore, clock: FakeClock
) -> None:
    [a] = await active_devices(store, "abc123", 1)
    await store.record_presence(
        [PresenceUpdate(a, clock.now, online=True)],
        samples=[(a, TelemetrySample(clock.now, cpu_percent=1.0))],
        events=[(a, clock.now, {"event": "app"})],
    )
    assert len(await store.telemetry_samples(a)) == 1
    assert len(await store.list_events(name=a)) == 1


async def test_a_batch_naming_a_device_several_times_ends_as_applied_in_order(
    store: PlatformStore, clock: FakeClock
) -> None:
    """The updates that set `online` first, then the others, each in the batch's order (as
    SQLite applies them; PostgreSQL merges them into one row per device)."""
    [a, b] = await active_devices(store, "abc123", 2)
    await store.record_presence(
        [
            PresenceUpdate(a, 5.0, online=True, status={"state": "online", "n": 1}),
            PresenceUpdate(a, 7.0, telemetry={"n": 1}),
            PresenceUpdate(b, 3.0, telemetry={"n": 2}),
            PresenceUpdate(a, 6.0, online=False, status={"state": "offline", "n": 2}),
            PresenceUpdate(a, 4.0, telemetry={"n": 3}),
            PresenceUpdate(b, 2.0, online=True),
        ],
        events=[(a, float(i), {"i": i}) for i in range(50)],
    )
    first, second = await store.get_device(a), await store.get_device(b)
    assert first is not None
    assert second is not None
    assert (first.online, first.last_seen_at, first.last_status, first.telemetry) == (
        False,
        7.0,
        {"state": "offline", "n": 2},
        {"n": 3},
    )
    assert (second.online, second.last_seen_at, second.telemetry) == (True, 3.0, {"n": 2})
    # events get their ids in the batch's order
    assert [e.body["i"] for e in await store.list_events(name=a)] == list(range(49, -1, -1))
    await store.record_presence([PresenceUpdate(a, 1.0, online=True)])  # older: kept 7.0
    first = await store.get_device(a)
    assert first is not None
    assert (first.online, first.last_seen_at, first.telemetry) == (True, 7.0, {"n": 3})


async def test_retention_by_age_and_per_device_cap_in_bounded_batches(
    store: PlatformStore, clock: FakeClock
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


async def test_old_events_are_pruned_in_batches(store: PlatformStore, clock: FakeClock) -> None:
    [a] = await active_devices(store, "abc123", 1)
    await store.record_events([(a, float(i), {"i": i}) for i in range(25)])
    await store.record_events([(a, clock.now, {"new": True})])
    assert await store.prune_old_events(before=clock.now - 10, limit=10) == 10
    assert await store.prune_old_events(before=clock.now - 10, limit=10) == 10
    assert await store.prune_old_events(before=clock.now - 10, limit=10) == 5
    assert [e.body for e in await store.list_events()] == [{"new": True}]


async def test_reset_takes_the_history_along(store: PlatformStore, clock: FakeClock) -> None:
    [a] = await active_devices(store, "abc123", 1)
    await store.record_samples([(a, TelemetrySample(clock.now))])
    await store.record_events([(a, clock.now, {})])
    await store.reset_device(a, actor="op")
    assert await store.telemetry_samples(a) == []
    assert await store.list_events() == []


# -- PostgreSQL only: processes sharing the database ---------------------------------------------


async def wait_for_a_lock_wait(conn: asyncpg.Connection, timeout_s: float = 20.0) -> None:
    """Until another session of this database waits for a row lock (bounded)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        waiting = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid != pg_backend_pid() AND wait_event_type = 'Lock'"
        )
        if waiting:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"nobody waited for a lock within {timeout_s} s")


@pytest.mark.parametrize("what", ["samples", "presence"])
async def test_history_of_a_device_reset_meanwhile_by_another_process_is_dropped(
    postgres_url: str, clock: FakeClock, what: str
) -> None:
    """Another process resets the device (its DELETE not yet committed) while this one
    writes its history: the write waits for the reset, then writes nothing for it, and the
    rest of the batch is written. (Without the lock it would fail the whole batch on the
    foreign key once the reset commits.)"""
    store = await PostgresStore.open(postgres_url, clock=clock)
    other = await asyncpg.connect(postgres_url, timeout=10)
    try:
        [a, b] = await active_devices(store, "abc123", 2)
        sample = TelemetrySample(clock.now, cpu_percent=1.0, net_rx_bytes=1e30)
        resetting = other.transaction()
        await resetting.start()
        await other.execute("DELETE FROM devices WHERE customer_id = $1 AND device_id = $2", *a)
        if what == "samples":
            writing = asyncio.create_task(store.record_samples([(a, sample), (b, sample)]))
        else:
            writing = asyncio.create_task(
                store.record_presence(
                    [PresenceUpdate(b, clock.now, online=True)],
                    samples=[(a, sample), (b, sample)],
                    events=[(a, clock.now, {"n": 1}), (b, clock.now, {"n": 2})],
                )
            )
        await wait_for_a_lock_wait(other)
        await resetting.commit()
        await asyncio.wait_for(writing, 20)
        assert await store.telemetry_samples(a) == []
        # a counter beyond 64 bits is not kept (None) rather than failing the batch
        assert await store.telemetry_samples(b) == [
            TelemetrySample(clock.now, cpu_percent=1.0, net_rx_bytes=None)
        ]
        if what == "presence":
            assert [e.body for e in await store.list_events()] == [{"n": 2}]
            device = await store.get_device(b)
            assert device is not None
            assert device.online
    finally:
        await other.close()
        await store.close()
