#!/usr/bin/env python3
"""A nightly-size fuzz run of the platform's HTTP side: `--examples` hostile raw requests
(hypothesis, the strategies of tests/fuzz_http.py) against a real platform on loopback while a
device stays connected over MQTT; prints how many cases ran and what the platform answered.

    .venv/bin/python scripts/fuzz.py --examples 100000

Any answer outside the rule (a 500, an error that is not `{"error": ...}`, a hang) stops the run
with hypothesis's smallest failing case. Exit code 0 when every case held.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from iotbiz.settings import load_settings
from tests.registrar.admin_helpers import TOKEN
from tests.registrar.test_admin_openapi import PlatformThread
from tests.registrar.test_http_fuzz import run_fuzz


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        settings = load_settings(
            None,
            environ={},
            overrides={
                "store": {"path": Path(folder) / "iotbiz.db"},
                "admin": {"token": TOKEN},
                "registrar": {"rate_per_ip": 0.0},
                "http": {
                    "host": "127.0.0.1",
                    "port": 0,
                    "header_timeout_s": 0.5,
                    "body_timeout_s": 0.5,
                },
                "mqtt": {"host": "127.0.0.1", "port": 0, "mqtts_port": 0},
            },
        )
        started = time.monotonic()
        with PlatformThread(settings) as live:
            statuses = run_fuzz(live, args.examples)
        elapsed = time.monotonic() - started
    total = sum(statuses.values())
    print(f"{total} cases in {elapsed:.0f} s ({total / elapsed:.0f}/s); every one held the rule")
    print(
        "answers: "
        + ", ".join(f"{status or 'closed'}: {count}" for status, count in sorted(statuses.items()))
    )
    print("the device connected over MQTT throughout was still served at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
