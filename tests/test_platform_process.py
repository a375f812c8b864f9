"""`python -m iotbiz.broker` as a real process: start, serve, shut down, refuse bad starts."""

from __future__ import annotations

import json
import signal
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.processes import platform_process, post_json, run_cli


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serves_and_stops_cleanly(tmp_path: Path, signum: int) -> None:
    db = tmp_path / "platform.db"
    assert run_cli("customer", "add", "abc123", "--limit", "5", "--db", str(db)).returncode == 0
    with platform_process(tmp_path, "--db", str(db)) as platform:
        status, body = post_json(
            platform.url + "/api/v1/register", {"customer_id": "abc123", "mac_address": "dev-1"}
        )
        assert status == 201
        status, _ = post_json(
            platform.url + "/api/v1/activate",
            {"customer_id": "abc123", "mac_address": "dev-1", "password": body["password"]},
        )
        assert status == 200
        assert platform.stop(signum) == 0
        assert "Traceback" not in platform.log()
        assert "stopped" in platform.log()


def test_a_port_in_use_is_a_one_line_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with platform_process(tmp_path, "--http-port", str(port), wait=False) as platform:
            assert platform.proc.wait(timeout=30) == 1
            log = platform.log()
    assert log.strip().splitlines()[-1] == (
        f"python -m iotbiz.broker: HTTP port {port} on 127.0.0.1 is in use;"
        " choose another with --http-port"
    )
    assert "Traceback" not in log


def test_a_bad_setting_stops_the_start_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[http]\nprot = 8080\n")
    with platform_process(tmp_path, "--config", str(config), wait=False) as platform:
        assert platform.proc.wait(timeout=30) == 1
        log = platform.log()
    assert "unknown setting http.prot" in log
    assert "Traceback" not in log


def test_cli_and_running_platform_share_the_store(tmp_path: Path) -> None:
    """Operators use the CLI while devices register against the running platform."""
    db = tmp_path / "shared.db"
    assert run_cli("customer", "add", "abc123", "--limit", "40", "--db", str(db)).returncode == 0
    with platform_process(tmp_path, "--db", str(db)) as platform:

        def enroll(i: int) -> int:
            status, _ = post_json(
                platform.url + "/api/v1/register",
                {"customer_id": "abc123", "mac_address": f"dev-{i}"},
            )
            return status

        with ThreadPoolExecutor(4) as pool:
            registering = pool.map(enroll, range(30))
            for limit in (45, 50):
                result = run_cli("customer", "set-limit", "abc123", str(limit), "--db", str(db))
                assert result.returncode == 0, result.stderr
            listed = run_cli("device", "list", "--json", "--db", str(db))
            assert listed.returncode == 0, listed.stderr
            assert all(status == 201 for status in registering)
        devices = json.loads(run_cli("device", "list", "--json", "--db", str(db)).stdout)
        assert len(devices) == 30
        assert platform.stop() == 0
