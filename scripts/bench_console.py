"""Console benchmark: the first render of the fleet page at 10,000 devices, in chromium.

Fills a store in a temporary folder with DEVICES active devices (`bench_store.fill_fleet`: 20
customers, ~1.4 KB of telemetry with three apps and two tags each), starts the real platform as a
child process (`bench_admin.start_platform`: HTTP and MQTT on port 0), logs in once through the
console's login, and then RUNS times opens a fresh tab at `/#/fleet` and measures:

- `rows_ms`: from the start of the navigation to the first page of rows in the DOM (the page's
  own `performance.mark("iotbiz-fleet-rows")`, made when it inserted them);
- `visible_ms`: from `page.goto` in this script to the first row visible to Playwright (what a
  person waits, with the test driver's overhead);
- where the time went (the page's resource timing): `request_start_ms`, navigation to the start
  of the first `GET /api/v1/admin/devices` (HTML, modules, the session check), and `request_ms`,
  that request's own duration, and `render_ms`, from its last byte to the rows in the DOM (JSON
  parsing and building 100 rows);
- the JS heap the tab uses then (Chrome's `Performance.getMetrics`, `JSHeapUsedSize`).

The load average is printed with the figures: on a machine busy with other work, every figure
grows with it.

The first run is a warm-up (nothing cached yet) and reported on its own. Chromium is Debian's
(`scripts/browser-setup`), headless.

    python scripts/bench_console.py [--devices 10000] [--runs 15] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from playwright.sync_api import sync_playwright

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_admin import TOKEN, start_platform
from bench_store import fill_fleet

from iotbiz.store import Store
from tests.console.conftest import CHROMIUM, CHROMIUM_ARGS  # the tests' own launch


async def prepare(db: Path, devices: int) -> None:
    store = await Store.open(db)
    try:
        await fill_fleet(store, devices, random.Random(7))
    finally:
        await store.close()


def measure(url: str, runs: int) -> dict[str, Any]:
    rows_ms: list[float] = []
    visible_ms: list[float] = []
    request_start_ms: list[float] = []
    request_ms: list[float] = []
    render_ms: list[float] = []
    heap_mb: list[float] = []
    shown = total = 0
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        context = browser.new_context(base_url=url, viewport={"width": 1440, "height": 900})
        answer = context.request.post("/api/v1/console/login", data={"token": TOKEN})
        assert answer.status == 200, answer.text()
        for _ in range(runs + 1):
            page = context.new_page()
            cdp = context.new_cdp_session(page)
            cdp.send("Performance.enable")
            start = time.perf_counter()
            page.goto("/#/fleet")
            page.get_by_test_id("device-row").first.wait_for(state="visible", timeout=30_000)
            visible_ms.append((time.perf_counter() - start) * 1000)
            mark = page.evaluate("performance.getEntriesByName('iotbiz-fleet-rows')[0].startTime")
            rows_ms.append(float(mark))
            start_ms, duration_ms = page.evaluate(
                """() => {
                    const [r] = performance.getEntriesByType("resource")
                        .filter((e) => e.name.includes("/api/v1/admin/devices"));
                    return [r.startTime, r.responseEnd - r.startTime];
                }"""
            )
            request_start_ms.append(float(start_ms))
            request_ms.append(float(duration_ms))
            render_ms.append(float(mark) - float(start_ms) - float(duration_ms))
            metrics = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
            heap_mb.append(metrics["JSHeapUsedSize"] / 2**20)
            shown = page.get_by_test_id("device-row").count()
            total = int(page.get_by_test_id("fleet-matching").inner_text().replace(",", ""))
            cdp.detach()
            page.close()
        browser.close()

    def summary(values: list[float]) -> dict[str, float]:
        rest = values[1:]
        return {
            "first": round(values[0], 1),
            "p50": round(statistics.median(rest), 1),
            "max": round(max(rest), 1),
        }

    return {
        "rows_ms": summary(rows_ms),
        "visible_ms": summary(visible_ms),
        "request_start_ms": summary(request_start_ms),
        "request_ms": summary(request_ms),
        "render_ms": summary(render_ms),
        "heap_mb": summary(heap_mb),
        "rows_shown": shown,
        "total": total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not Path(CHROMIUM).exists():
        raise SystemExit(f"{CHROMIUM} is missing: run scripts/browser-setup")
    with tempfile.TemporaryDirectory() as folder:
        db = Path(folder) / "iotbiz.db"
        asyncio.run(prepare(db, args.devices))
        loop = asyncio.new_event_loop()
        child, port = loop.run_until_complete(start_platform(db))
        try:
            report = measure(f"http://127.0.0.1:{port}", args.runs)
        finally:
            child.terminate()
            loop.run_until_complete(asyncio.wait_for(child.wait(), 30))
            loop.close()
    report = {
        "devices": args.devices,
        "runs": args.runs,
        **report,
        "load_average": [round(n, 2) for n in os.getloadavg()],
        "cpus": os.cpu_count(),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"fleet page at {args.devices} devices ({report['rows_shown']} rows of"
        f" {report['total']}), {args.runs} runs after one warm-up, headless chromium"
    )
    for key, label in (
        ("rows_ms", "navigation -> rows in the DOM"),
        ("visible_ms", "goto -> first row visible"),
        ("request_start_ms", "  navigation -> devices request"),
        ("request_ms", "  devices request"),
        ("render_ms", "  response -> rows in the DOM"),
    ):
        row = report[key]
        print(
            f"  {label:32} p50 {row['p50']:7.1f} ms  max {row['max']:7.1f} ms"
            f"  (first run {row['first']:.1f} ms)"
        )
    heap = report["heap_mb"]
    print(
        f"  JS heap used                     p50 {heap['p50']:7.1f} MB  max {heap['max']:7.1f} MB"
    )
    print(f"  load average at the end {report['load_average']} on {report['cpus']} CPUs")


if __name__ == "__main__":
    main()
