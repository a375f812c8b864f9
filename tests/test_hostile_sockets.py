"""The platform started with the open-file limit systemd gives (1024, soft and hard), 3,000
hostile sockets open from 127.0.0.2 (half-sent HTTP requests, MQTT sockets that never send
CONNECT), and still a new device from 127.0.0.1 enrolls and then connects, within 2 s each."""

from __future__ import annotations

import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.mqtt_wire import connect_packet
from tests.processes import PlatformProcess, post_json, run_cli

HOSTILE = 3000


def limited_to_1024() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))


def start_platform(tmp_path: Path) -> PlatformProcess:
    log_path = tmp_path / "platform.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "iotbiz.broker", "--http-port", "0", "--mqtt-port", "0"],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            preexec_fn=limited_to_1024,  # setrlimit only, before exec
        )
    platform = PlatformProcess(proc, log_path)
    platform.wait_started()
    return platform


def hostile_sockets(port_http: int, port_mqtt: int, count: int) -> list[socket.socket]:
    """Half of them half-send an HTTP request, the other half connect to MQTT and say nothing;
    all from 127.0.0.2. Sockets the platform refuses at once are kept open on our side too."""
    sockets = []
    for index in range(count):
        sock = socket.socket()
        sock.bind(("127.0.0.2", 0))
        sock.settimeout(5)
        try:
            if index % 2:
                sock.connect(("127.0.0.1", port_http))
                sock.sendall(b"POST /api/v1/register HTTP/1.1\r\nHost: x\r\n")
            else:
                sock.connect(("127.0.0.1", port_mqtt))
        except OSError:
            pass  # refused or reset: the platform defends itself
        sockets.append(sock)
    return sockets


def connects(port: int, name: str, password: str) -> float:
    """CONNECT on a plain socket (not paho: with the attacker's 3,000 sockets in this process,
    paho's socket gets a descriptor above 1024, which its select() cannot watch); the seconds
    until CONNACK 0."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(connect_packet(name, username=name, password=password, keepalive=30))
        connack = b""
        while len(connack) < 4:
            chunk = sock.recv(4 - len(connack))
            assert chunk, f"closed before a CONNACK: {connack!r}"
            connack += chunk
    assert connack == b"\x20\x02\x00\x00", connack
    return time.monotonic() - started


@pytest.mark.timeout(120)
def test_a_device_enrolls_and_connects_through_3000_hostile_sockets(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < HOSTILE + 200:  # the attacker's sockets live in this process
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    assert run_cli("customer", "add", "abc123", "--limit", "5", cwd=tmp_path).returncode == 0
    platform = start_platform(tmp_path)
    sockets: list[socket.socket] = []
    try:
        sockets = hostile_sockets(platform.http_port, platform.mqtt_port, HOSTILE)
        body = {"customer_id": "abc123", "mac_address": "44:8a:5b:00:00:01"}
        started = time.monotonic()
        status, answer = post_json(platform.url + "/api/v1/register", body)
        register_s = time.monotonic() - started
        assert status == 201, answer
        started = time.monotonic()
        status, _ = post_json(
            platform.url + "/api/v1/activate", {**body, "password": answer["password"]}
        )
        activate_s = time.monotonic() - started
        assert status == 200
        connect_s = connects(platform.mqtt_port, "abc123/44:8a:5b:00:00:01", answer["password"])
        assert register_s < 2, register_s
        assert activate_s < 2, activate_s
        assert connect_s < 2, connect_s
        assert platform.proc.poll() is None
    finally:
        for sock in sockets:
            sock.close()
        platform.stop()


def test_the_caps_fit_the_file_limit() -> None:
    from iotbiz.file_limits import fit_to_file_limit
    from iotbiz.settings import Settings

    small = fit_to_file_limit(Settings(), limit=1024)
    assert small.http.max_connections + small.mqtt.max_connections <= 1024 - 128
    assert small.mqtt.max_pending_per_address <= small.mqtt.max_connections // 8
    assert small.http.max_connections_per_address <= small.http.max_connections
    roomy = fit_to_file_limit(Settings(), limit=65536)
    assert roomy.http == Settings().http  # the unit's LimitNOFILE: the settings stand
    assert roomy.mqtt == Settings().mqtt
