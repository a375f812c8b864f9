"""System telemetry with psutil; `collect_system` blocks briefly, so call it in a thread."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import psutil

MIN_CPU_WINDOW_S = 0.2  # psutil's cpu_percent measures since its previous call: not less than this
_cpu_since: float | None = None


def _cpu_percent() -> float:
    """System CPU % since the previous call; the first call measures over MIN_CPU_WINDOW_S
    (psutil's very first answer is a meaningless 0.0, which became a dip in the charts)."""
    global _cpu_since
    now = time.monotonic()
    if _cpu_since is None or now - _cpu_since < MIN_CPU_WINDOW_S:
        if _cpu_since is None:
            psutil.cpu_percent(interval=None)
        time.sleep(MIN_CPU_WINDOW_S)
    _cpu_since = time.monotonic()
    return float(psutil.cpu_percent(interval=None))


def collect_system(disk_path: Path) -> dict[str, Any]:
    """cpu %, load, memory, disk, network counters, temperature (when a sensor exists), uptime.
    Blocks up to MIN_CPU_WINDOW_S (the first call): run it in a thread."""
    memory = psutil.virtual_memory()
    disk = psutil.disk_usage(str(disk_path))
    net = psutil.net_io_counters()
    metrics: dict[str, Any] = {
        "cpu_percent": _cpu_percent(),
        "load": list(os.getloadavg()),
        "memory": {"total": memory.total, "available": memory.available, "percent": memory.percent},
        "disk": {
            "path": str(disk_path),
            "total": disk.total,
            "free": disk.free,
            "percent": disk.percent,
        },
        "net": {
            "bytes_sent": net.bytes_sent,
            "bytes_recv": net.bytes_recv,
            "packets_sent": net.packets_sent,
            "packets_recv": net.packets_recv,
            "errin": net.errin,
            "errout": net.errout,
        },
        "uptime_s": round(time.time() - psutil.boot_time()),
        "temperature_c": _temperature(),
    }
    return metrics


def _temperature() -> float | None:
    """The hottest sensor's reading, or None where the board has no sensor."""
    sensors = getattr(psutil, "sensors_temperatures", None)
    if sensors is None:
        return None
    try:
        readings = [entry.current for entries in sensors().values() for entry in entries]
    except (OSError, RuntimeError):
        return None
    return max(readings) if readings else None
