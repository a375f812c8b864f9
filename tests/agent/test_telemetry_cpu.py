"""The agent's CPU figure is measured over a real interval from the first report on: psutil's
first answer (0.0, nothing to compare with) used to become a dip to 0 % in the charts."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from iotbiz.agent import telemetry


def test_the_first_cpu_reading_is_measured_not_psutils_zero(tmp_path: Path) -> None:
    stop = threading.Event()

    def burn() -> None:
        while not stop.is_set():
            sum(range(1000))

    worker = threading.Thread(target=burn)
    worker.start()
    try:
        telemetry._cpu_since = None  # as at the agent's start
        first = telemetry.collect_system(tmp_path)["cpu_percent"]
        started = time.monotonic()
        second = telemetry.collect_system(tmp_path)["cpu_percent"]  # right after: waits too
        assert time.monotonic() - started >= telemetry.MIN_CPU_WINDOW_S * 0.9
    finally:
        stop.set()
        worker.join()
    assert first > 0.0
    assert second > 0.0
