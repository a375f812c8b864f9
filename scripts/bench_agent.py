"""Agent footprint: RSS and CPU of the agent process with three apps at a 10 s interval.

Starts a platform (python -m iotbiz.broker) and an agent (python -m iotbiz.agent) with three
small apps on loopback, lets the agent enroll and settle, then samples the agent process alone
(not its apps) with psutil for DURATION seconds.

    python scripts/bench_agent.py [--duration 60] [--interval 10] [--settle 15]

scripts/bench.py runs `measure` too, as part of the full benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

APP = "import time\nwhile True:\n    print('tick', flush=True)\n    time.sleep(1)\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--interval", type=float, default=10.0)
    parser.add_argument("--settle", type=float, default=15.0)
    args = parser.parse_args()
    print(json.dumps(measure(args.duration, args.interval, args.settle), indent=2))


def measure(duration: float, interval: float, settle: float) -> dict[str, object]:
    """Sample the agent (three apps, telemetry every `interval` s) for `duration` s."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        db = folder / "bench.db"
        cli = [sys.executable, "-m", "iotbiz"]
        subprocess.run(
            [*cli, "customer", "add", "bench", "--limit", "5", "--db", str(db)],
            check=True,
            capture_output=True,
        )
        http_port, mqtt_port = free_port(), free_port()
        apps = "".join(
            f'\n[[apps]]\nname = "app{i}"\ncommand = [{json.dumps(sys.executable)}, "-c", '
            f"{json.dumps(APP)}]\n"
            for i in range(3)
        )
        config = folder / "agent.toml"
        config.write_text(
            f'customer_id = "bench"\ndevice_id = "bench-agent"\n'
            f'registrar_url = "http://127.0.0.1:{http_port}"\n'
            f'broker_url = "mqtt://127.0.0.1:{mqtt_port}"\n'
            f'state_dir = "{folder / "state"}"\ntelemetry_interval_s = {interval}\n{apps}'
        )
        with (folder / "platform.log").open("wb") as platform_log:
            platform = subprocess.Popen(
                [
                    *(sys.executable, "-m", "iotbiz.broker", "--db", str(db)),
                    *("--http-port", str(http_port), "--mqtt-port", str(mqtt_port)),
                ],
                stdout=platform_log,
                stderr=subprocess.STDOUT,
            )
        time.sleep(3)
        with (folder / "agent.log").open("wb") as agent_log:
            agent = subprocess.Popen(
                [sys.executable, "-m", "iotbiz.agent", "--config", str(config)],
                stdout=agent_log,
                stderr=subprocess.STDOUT,
            )
        try:
            process = psutil.Process(agent.pid)
            time.sleep(settle)
            cpu_start = process.cpu_times()
            wall_start = time.monotonic()
            rss_samples = []
            while time.monotonic() - wall_start < duration:
                rss_samples.append(process.memory_info().rss)
                time.sleep(1)
            cpu_end = process.cpu_times()
            wall = time.monotonic() - wall_start
            cpu_s = (cpu_end.user + cpu_end.system) - (cpu_start.user + cpu_start.system)
            children = len(process.children())
            log = (folder / "agent.log").read_text()
        finally:
            agent.terminate()
            agent.wait(timeout=30)
            platform.terminate()
            platform.wait(timeout=30)
    result = {
        "apps": children,
        "telemetry_interval_s": interval,
        "seconds": round(wall, 1),
        "rss_mb_max": round(max(rss_samples) / 2**20, 1),
        "rss_mb_mean": round(sum(rss_samples) / len(rss_samples) / 2**20, 1),
        "cpu_percent_of_one_core": round(100 * cpu_s / wall, 2),
        "connected": "connected to mqtt://" in log,
        "cores": os.cpu_count(),
    }
    return result


if __name__ == "__main__":
    main()
