"""Run the real platform as a child process (`python -m iotbiz.broker`) and find its ports."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LISTENING = re.compile(r"registrar listening on (https?)://[^:]+:(\d+)")
MQTT_LISTENING = re.compile(r"MQTT (?:broker|over TLS) listening on mqtts?://[^:]+:(\d+)")
START_TIMEOUT_S = 20.0


class PlatformProcess:
    def __init__(self, proc: subprocess.Popen[str], log_path: Path) -> None:
        self.proc = proc
        self.log_path = log_path
        self.http_port = 0
        self.mqtt_port = 0
        self.scheme = "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.http_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_started(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            match = LISTENING.search(self.log())
            if match:
                self.scheme, self.http_port = match.group(1), int(match.group(2))
                mqtt = MQTT_LISTENING.search(self.log())
                self.mqtt_port = int(mqtt.group(1)) if mqtt else 0
                return
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"platform exited early ({self.proc.returncode}):\n{self.log()}"
                )
            time.sleep(0.05)
        raise AssertionError(f"platform did not start within {START_TIMEOUT_S} s:\n{self.log()}")

    def stop(self, signum: int = signal.SIGTERM, timeout_s: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        return self.proc.wait(timeout=timeout_s)


@contextmanager
def platform_process(tmp_path: Path, *args: str, wait: bool = True) -> Iterator[PlatformProcess]:
    """Start `python -m iotbiz.broker ARGS` with its log in tmp_path; kill it on the way out."""
    log_path = tmp_path / f"platform-{time.monotonic_ns()}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("IOTBIZ_CONFIG", None)
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "iotbiz.broker", "--http-port", "0", "--mqtt-port", "0", *args],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=tmp_path,
        )
    platform = PlatformProcess(proc, log_path)
    try:
        if wait:
            platform.wait_started()
        yield platform
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m iotbiz ARGS` as the operator would."""
    return subprocess.run(
        [sys.executable, "-m", "iotbiz", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        check=False,
    )


def post_json(url: str, body: dict[str, Any]) -> tuple[int, Any]:
    """POST JSON with the standard library (blocking: for a platform in a child process)."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback
            data = response.read()
            return response.status, json.loads(data) if data else None
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def enroll_device(base_url: str, customer_id: str, device_id: str) -> str:
    """Register and activate a device over HTTP; return its password."""
    body = {"customer_id": customer_id, "mac_address": device_id}
    status, answer = post_json(base_url + "/api/v1/register", body)
    assert status == 201, answer
    password = str(answer["password"])
    status, answer = post_json(base_url + "/api/v1/activate", {**body, "password": password})
    assert status == 200, answer
    return password
