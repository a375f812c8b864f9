"""System telemetry with psutil; `collect_system` blocks briefly, so call it in a thread."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import psutil


def collect_system(disk_path: Path) -> dict[str, Any]:
    """cpu %, load, memory, disk, network counters, temperature (when a sensor exists), uptime."""
    memory = psutil.virtual_memory()
    disk = psutil.disk_usage(str(disk_path))
    net = psutil.net_io_counters()
    metrics: dict[str, Any] = {
        "cpu_percent": psutil.cpu_percent(interval=None),  # since the previous call
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
