#!/usr/bin/env python3
"""A nightly-size fuzz run of the platform's MQTT side: `--examples` hostile raw MQTT
connections (hypothesis, the strategies of tests/mqtt_fuzz.py) against a real platform on
loopback while an honest device stays connected; prints how many cases ran, how fast, and what
the broker answered.

    .venv/bin/python scripts/fuzz_mqtt.py --examples 100000 [--workers 4] [--chunk 2500]

A progress line every `--chunk` cases of a worker (cases done, rate, elapsed) tells a long run
from a stuck one.

Any answer outside the rule (an undocumented packet, a hang, an ACL crossed, an unexpected
warning, error or traceback in the log, the honest device dropped) stops the run with
hypothesis's smallest failing case. Exit code 0 when every case held.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from iotbiz.settings import load_settings
from tests.broker.test_mqtt_fuzz import MQTT_SETTINGS, run_fuzz
from tests.registrar.test_admin_openapi import PlatformThread


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=100_000)
    parser.add_argument(
        "--workers", type=int, default=4, help="client processes (cases mostly wait on timeouts)"
    )
    parser.add_argument(
        "--chunk", type=int, default=2500, help="cases per hypothesis run of a worker"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        settings = load_settings(
            None,
            environ={},
            overrides={
                "store": {"path": Path(folder) / "iotbiz.db"},
                "registrar": {"rate_per_ip": 0.0},
                "http": {"host": "127.0.0.1", "port": 0},
                "mqtt": {"port": 0, "mqtts_port": 0, **MQTT_SETTINGS},
            },
        )
        started = time.monotonic()
        done = 0
        lock = threading.Lock()

        def progress(count: int) -> None:
            nonlocal done
            with lock:
                done += count
                elapsed = time.monotonic() - started
                print(
                    f"{done}/{args.examples} cases, {done / elapsed:.1f}/s, {elapsed:.0f} s",
                    flush=True,
                )

        with PlatformThread(settings) as live:
            outcomes, known = run_fuzz(
                live, args.examples, args.workers, chunk=args.chunk, progress=progress
            )
        elapsed = time.monotonic() - started
    total = sum(outcomes.values())
    print(f"{total} cases in {elapsed:.0f} s ({total / elapsed:.1f}/s); every one held the rule")
    print("answers:")
    for outcome, count in sorted(outcomes.items()):
        print(f"  {outcome}: {count}")
    print("log lines of known defects (tolerated, reported):")
    for defect, count in sorted(known.items()):
        print(f"  {defect}: {count}")
    print("the honest device connected throughout was still served at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
