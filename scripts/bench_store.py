"""Store benchmark: the fleet list at 10,000 devices, and what telemetry history costs on disk.

1. `find_devices`: 10,000 active devices (20 customers, realistic ~1.4 KB telemetry each, two
   tags each, half online); p50/p99 of one 100-device page for several filters, the total
   included, and the time to page through the whole fleet.
2. Bytes per row of telemetry samples and device events: 100,000 rows (MAC device ids) written
   through the store in presence-sized batches; the file growth after a WAL checkpoint divided
   by the rows.

    python scripts/bench_store.py [--devices 10000] [--rows 100000] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from iotbiz.models import DeviceState, PresenceUpdate, TelemetrySample
from iotbiz.names import DeviceName
from iotbiz.store import Store

CUSTOMERS = 20
SITES = [f"site-{i}" for i in range(10)]


def telemetry(rng: random.Random) -> dict[str, Any]:
    return {
        "ts": time.time(),
        "agent_version": "0.9.0",
        "system": {
            "cpu_percent": round(rng.uniform(0, 100), 1),
            "load": [rng.uniform(0, 4) for _ in range(3)],
            "memory": {"total": 4 << 30, "available": rng.randint(0, 4 << 30), "percent": 41.2},
            "disk": {
                "path": "/var/lib/iotbiz-agent",
                "total": 32 << 30,
                "free": 20 << 30,
                "percent": 37.5,
            },
            "net": {
                "bytes_sent": rng.randint(0, 1 << 40),
                "bytes_recv": rng.randint(0, 1 << 40),
                "packets_sent": 1234567,
                "packets_recv": 7654321,
                "errin": 0,
                "errout": 0,
            },
            "uptime_s": 123456,
            "temperature_c": 48.3,
        },
        "apps": [
            {
                "name": name,
                "state": "RUNNING",
                "pid": rng.randint(100, 60000),
                "restarts": 0,
                "exit_code": None,
                "started_at": time.time(),
                "cpu_percent": 1.5,
                "rss_bytes": 31457280,
                "version": "1.4.2",
                "reason": None,
            }
            for name in ("web", "sensor", "uplink")
        ],
        "outbox": {"queued": 0, "dropped": 0},
        "replies": {"queued": 0, "dropped": 0},
        "online": True,
    }


def mac(i: int) -> str:
    return ":".join(
        f"{b:02x}" for b in (0x44, 0x8A, 0x5B, (i >> 16) & 255, (i >> 8) & 255, i & 255)
    )


async def fill_fleet(store: Store, devices: int, rng: random.Random) -> list[DeviceName]:
    names = [DeviceName(f"customer-{i % CUSTOMERS:02d}", mac(i)) for i in range(devices)]
    now = store.now()

    def insert(conn: sqlite3.Connection) -> None:
        conn.executemany(
            "INSERT INTO customers (customer_id, device_limit, created_at) VALUES (?, ?, ?)",
            [(f"customer-{c:02d}", devices, now) for c in range(CUSTOMERS)],
        )
        conn.executemany(
            "INSERT INTO devices (customer_id, device_id, state, password_hash, created_at,"
            " activated_at, online, last_seen_at, last_telemetry)"
            " VALUES (?, ?, 'active', ?, ?, ?, ?, ?, ?)",
            [
                (*n, "$2b$06$" + "x" * 53, now, now, i % 2, now, json.dumps(telemetry(rng)))
                for i, n in enumerate(names)
            ],
        )
        conn.executemany(
            "INSERT INTO device_tags VALUES (?, ?, ?, ?)",
            [(*n, "site", SITES[i % len(SITES)]) for i, n in enumerate(names)]
            + [(*n, "rack", f"r{i % 7}") for i, n in enumerate(names)],
        )

    await store._write(insert)
    return names


async def time_queries(store: Store, rounds: int) -> dict[str, dict[str, float]]:
    filters: dict[str, dict[str, Any]] = {
        "no filter": {},
        "customer": {"customer_id": "customer-07"},
        "online": {"online": True},
        "customer+online": {"customer_id": "customer-07", "online": True},
        "tag site": {"tags": {"site": "site-3"}},
        "customer+tag+online": {
            "customer_id": "customer-03",
            "tags": {"site": "site-3"},
            "online": True,
        },
        "two tags": {"tags": {"site": "site-3", "rack": "r2"}},
        "state": {"state": DeviceState.ACTIVE},
        "q substring": {"query": "5b:00:1"},
    }
    report: dict[str, dict[str, float]] = {}
    for label, kwargs in filters.items():
        times, total = [], 0
        for _ in range(rounds):
            start = time.perf_counter()
            page, total = await store.find_devices(limit=100, **kwargs)
            times.append((time.perf_counter() - start) * 1000)
        times.sort()
        report[label] = {
            "p50_ms": round(statistics.median(times), 2),
            "p99_ms": round(times[min(len(times) - 1, int(len(times) * 0.99))], 2),
            "total": total,
            "page": len(page),
        }
    start = time.perf_counter()
    after, pages = None, 0
    while True:
        page, _ = await store.find_devices(limit=100, after=after, online=True)
        if not page:
            break
        pages += 1
        after = DeviceName(page[-1].customer_id, page[-1].device_id)
    report["page through all online"] = {"pages": pages, "s": round(time.perf_counter() - start, 3)}
    return report


def file_bytes(path: Path) -> int:
    with sqlite3.connect(path) as raw:
        raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return path.stat().st_size


async def history_bytes(
    store: Store, names: list[DeviceName], rows: int, rng: random.Random
) -> dict[str, Any]:
    batch = 2000  # about what presence flushes for 10,000 devices in one 0.2 s flush at peak
    before = file_bytes(store.path)
    start = time.perf_counter()
    now = store.now()
    for first in range(0, rows, batch):
        samples = []
        for i in range(first, min(rows, first + batch)):
            name = names[i % len(names)]
            at = round(now + 60 * (i // len(names)), 3)
            samples.append(
                (
                    name,
                    TelemetrySample(
                        at,
                        round(rng.uniform(0, 100), 1),
                        41.2,
                        37.5,
                        round(rng.uniform(0, 4), 2),
                        48.3,
                        float(rng.randint(0, 1 << 40)),
                        float(rng.randint(0, 1 << 40)),
                    ),
                )
            )
        await store.record_presence([PresenceUpdate(n, now) for n, _ in samples], samples=samples)
    sample_s = time.perf_counter() - start
    after_samples = file_bytes(store.path)
    event = {
        "event": "app",
        "app": "web",
        "from": "RUNNING",
        "to": "BACKOFF",
        "ts": now,
        "exit_code": 1,
        "reason": "exited",
    }
    for first in range(0, rows, batch):
        events = [
            (names[i % len(names)], now + i * 0.001, {**event, "ts": now + i})
            for i in range(first, min(rows, first + batch))
        ]
        await store.record_events(events)
    after_events = file_bytes(store.path)
    sample_row = (after_samples - before) / rows
    event_row = (after_events - after_samples) / rows
    return {
        "sample_bytes_per_row": round(sample_row, 1),
        "event_bytes_per_row": round(event_row, 1),
        "sample_rows_per_s_written": round(rows / sample_s),
        "samples_per_day_10k_at_60s": 10_000 * 1440,
        "sample_mb_per_day_10k_at_60s": round(10_000 * 1440 * sample_row / 1e6, 1),
        "samples_per_day_10k_at_10s": 10_000 * 8640,
        "sample_mb_per_day_10k_at_10s": round(10_000 * 8640 * sample_row / 1e6, 1),
    }


async def wal_writes(store: Store, names: list[DeviceName], rng: random.Random) -> dict[str, Any]:
    """Steady state on the history just written: what one presence flush of samples writes to
    the WAL (each frame a page), at 10,000 devices sampled once a minute (167 samples/s, 5
    flushes/s: 33 samples per flush, each for a different device)."""
    page_size = int(await store._call(lambda conn: conn.execute("PRAGMA page_size").fetchone()[0]))
    await store._call(lambda conn: conn.execute("PRAGMA wal_autocheckpoint = 0"))
    await store._call(lambda conn: conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone())
    flushes, per_flush = 200, 33
    at = store.now() + 86400
    for flush in range(flushes):
        batch = [
            (
                names[rng.randrange(len(names))],
                TelemetrySample(at + flush * 0.2 + i * 1e-4, 1.0, 2.0, 3.0, 0.5, 40.0, 1e9, 1e9),
            )
            for i in range(per_flush)
        ]
        await store.record_presence([], samples=batch)
    wal = Path(f"{store.path}-wal")
    size = (await asyncio.to_thread(wal.stat)).st_size
    frames = (size - 32) // (page_size + 24)  # autocheckpoint off: it only grew
    await store._call(lambda conn: conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone())
    await store._call(lambda conn: conn.execute("PRAGMA wal_autocheckpoint = 1000"))
    wal_per_flush = frames * (page_size + 24) / flushes
    per_day = wal_per_flush * 5 * 86400
    return {
        "pages_per_flush_of_33_samples": round(frames / flushes, 1),
        "wal_kb_per_flush": round(wal_per_flush / 1024, 1),
        "wal_gb_per_day": round(per_day / 1e9, 1),
        "with_checkpoint_gb_per_day": round(2 * per_day / 1e9, 1),
    }


async def wal_writes_held(store: Store, names: list[DeviceName], minutes: int) -> dict[str, Any]:
    """The same samples held `minutes` (presence's history.write_interval_s) and written in one
    transaction, device by device."""
    page_size = int(await store._call(lambda conn: conn.execute("PRAGMA page_size").fetchone()[0]))
    await store._call(lambda conn: conn.execute("PRAGMA wal_autocheckpoint = 0"))
    await store._call(lambda conn: conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone())
    at = store.now() + 2 * 86400
    rows = [
        (name, TelemetrySample(at + 60 * minute, 1.0, 2.0, 3.0, 0.5, 40.0, 1e9, 1e9))
        for name in sorted(names)
        for minute in range(minutes)
    ]
    start = time.perf_counter()
    await store.record_presence([], samples=rows)
    took_s = time.perf_counter() - start
    wal = Path(f"{store.path}-wal")
    frames = ((await asyncio.to_thread(wal.stat)).st_size - 32) // (page_size + 24)
    await store._call(lambda conn: conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone())
    await store._call(lambda conn: conn.execute("PRAGMA wal_autocheckpoint = 1000"))
    per_day = frames * (page_size + 24) * (1440 / minutes)
    return {
        "samples": len(rows),
        "pages": frames,
        "transaction_s": round(took_s, 2),
        "wal_gb_per_day": round(per_day / 1e9, 1),
        "with_checkpoint_gb_per_day": round(2 * per_day / 1e9, 1),
    }


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rng = random.Random(9)
    with tempfile.TemporaryDirectory() as folder:
        store = await Store.open(Path(folder) / "bench.db")
        try:
            names = await fill_fleet(store, args.devices, rng)
            report: dict[str, Any] = {
                "devices": args.devices,
                "fleet_db_mb": round(file_bytes(store.path) / 1e6, 1),
            }
            report["find_devices"] = await time_queries(store, args.rounds)
            report["history"] = await history_bytes(store, names, args.rows, rng)
            report["sample_wal_writes"] = await wal_writes(store, names, rng)
            report["sample_wal_writes_held_10_min"] = await wal_writes_held(store, names, 10)
        finally:
            await store.close()
    print(json.dumps(report, indent=None if args.json else 2))


if __name__ == "__main__":
    asyncio.run(main())
