"""Admin API benchmark: one 100-device page of `GET /api/v1/admin/devices` at 10,000 devices.

Fills a store in a temporary folder with DEVICES active devices (20 customers, ~1.4 KB of
telemetry and two tags each, half online: `bench_store.fill_fleet`), starts the real platform
as a child process (`python -m iotbiz.broker`, HTTP and MQTT on port 0, the port read back from
its log), and times REQUESTS sequential requests over loopback for several queries: the first
page, a page in the middle (through its cursor), filters, a tag and a search. Reports p50/p99 in
milliseconds of the whole request (server and client: what a caller waits), and the body size;
and /metrics, whose first scrape reads the fleet counts from the store and the next ones not.

    python scripts/bench_admin.py [--devices 10000] [--requests 300] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).parent))
from bench_store import fill_fleet

from iotbiz.store import Store

TOKEN = "bench-admin-token-0123456789abcdef"  # noqa: S105 - a test token
DRAINING: set[asyncio.Task[bytes]] = set()
PORT_LINE = re.compile(r"registrar listening on http://[^:]+:(\d+)")


async def start_platform(db: Path) -> tuple[asyncio.subprocess.Process, int]:
    environ = {**os.environ, "IOTBIZ_ADMIN_TOKEN": TOKEN}
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "iotbiz.broker", "--db", str(db), "--http-port", "0", "--mqtt-port", "0"),
        env=environ,
        stderr=asyncio.subprocess.PIPE,
    )
    assert child.stderr is not None
    async with asyncio.timeout(30):
        while line := (await child.stderr.readline()).decode(errors="replace"):
            if match := PORT_LINE.search(line):
                # keep reading its log, so that a full pipe never stops the platform
                DRAINING.add(asyncio.create_task(child.stderr.read()))
                return child, int(match.group(1))
    child.kill()
    raise SystemExit("the platform did not start")


async def time_query(
    session: aiohttp.ClientSession, params: dict[str, str], requests: int
) -> dict[str, Any]:
    times: list[float] = []
    size = total = 0
    for round_ in range(requests + 20):
        start = time.perf_counter()
        async with session.get("/api/v1/admin/devices", params=params) as response:
            body = await response.read()
            assert response.status == 200, body
        if round_ >= 20:  # warm-up left out
            times.append((time.perf_counter() - start) * 1000)
        size, total = len(body), json.loads(body)["total"]
    times.sort()
    return {
        "p50_ms": round(statistics.median(times), 2),
        "p99_ms": round(times[min(len(times) - 1, int(len(times) * 0.99))], 2),
        "total": total,
        "bytes": size,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        db = Path(folder) / "iotbiz.db"
        store = await Store.open(db)
        await fill_fleet(store, args.devices, random.Random(7))
        await store.close()
        child, port = await start_platform(db)
        try:
            headers = {"Authorization": f"Bearer {TOKEN}"}
            async with aiohttp.ClientSession(f"http://127.0.0.1:{port}", headers=headers) as s:
                metrics = await time_metrics(s, args.requests)
                middle = await middle_cursor(s, args.devices)
                # the platform marks every device offline at start: `online` counts are 0 here
                queries = {
                    "first page": {"limit": "100"},
                    "middle page (cursor)": {"limit": "100", "cursor": middle},
                    "customer": {"customer": "customer-07", "limit": "100"},
                    "state=active": {"state": "active", "limit": "100"},
                    "tag site": {"tag": "site=site-3", "limit": "100"},
                    "customer+tag": {"customer": "customer-03", "tag": "site=site-3"},
                    "q substring": {"q": "5b:00:1", "limit": "100"},
                }
                report = {
                    label: await time_query(s, params, args.requests)
                    for label, params in queries.items()
                }
        finally:
            child.terminate()
            await asyncio.wait_for(child.wait(), 30)
    report_all = {
        "devices": args.devices,
        "requests_per_query": args.requests,
        **report,
        "metrics": metrics,
    }
    if args.json:
        print(json.dumps(report_all, indent=2))
        return
    print(f"GET /api/v1/admin/devices at {args.devices} devices, {args.requests} requests each")
    for label, row in report.items():
        print(
            f"  {label:22} p50 {row['p50_ms']:7.2f} ms  p99 {row['p99_ms']:7.2f} ms"
            f"  total {row['total']:6}  {row['bytes'] / 1024:.0f} KiB"
        )
    print(
        f"GET /metrics: first scrape (reads the store) {metrics['first_ms']:.2f} ms;"
        f" then (cached) p50 {metrics['p50_ms']:.2f} ms p99 {metrics['p99_ms']:.2f} ms"
    )


async def time_metrics(session: aiohttp.ClientSession, requests: int) -> dict[str, float]:
    """The first scrape reads the fleet counts from the store; the next ones hit the cache."""
    times: list[float] = []
    for _ in range(requests):
        start = time.perf_counter()
        async with session.get("/metrics") as response:
            await response.read()
            assert response.status == 200
        times.append((time.perf_counter() - start) * 1000)
    first, rest = times[0], sorted(times[1:])
    return {
        "first_ms": round(first, 2),
        "p50_ms": round(statistics.median(rest), 2),
        "p99_ms": round(rest[min(len(rest) - 1, int(len(rest) * 0.99))], 2),
    }


async def middle_cursor(session: aiohttp.ClientSession, devices: int) -> str:
    """The cursor of the page in the middle of the fleet."""
    cursor = ""
    for _ in range(devices // 2000):
        params = {"limit": "1000", **({"cursor": cursor} if cursor else {})}
        async with session.get("/api/v1/admin/devices", params=params) as response:
            cursor = (await response.json())["next_cursor"]
    return cursor


if __name__ == "__main__":
    asyncio.run(main())
