"""The one-process platform over MQTT: enroll-then-connect, refusals, ACL, revocation, presence.

paho-mqtt is the device; the broker, registrar and SQLite store are the real ones, in-process.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from iotbiz.broker.authority import Authority
from iotbiz.names import DeviceName
from iotbiz.platform import Platform
from tests.broker.conftest import Enroll, wait_for
from tests.mqtt_device import PahoDevice, raw_connect
from tests.mqtt_wire import connect_packet
from tests.processes import enroll_device, platform_process, run_cli

DEV = "abc123/dev-1"
NAME = DeviceName("abc123", "dev-1")
PREFIX = "devices/abc123/dev-1/"
REFUSED = 135  # CONNACK 5 "not authorised", as paho 2 reports it (MQTT 5 numbering)


def authority(platform: Platform) -> Authority:
    assert platform.authority is not None
    return platform.authority


async def operator(platform: Platform, *, superuser: bool = False) -> PahoDevice:
    """An operator account created the way an operator does it: with the CLI."""
    name = "root" if superuser else "ops"
    args = ["account", "add", name, "--db", str(platform.store.path), "--json"]
    result = await asyncio.to_thread(run_cli, *args, *(["--superuser"] if superuser else []))
    assert result.returncode == 0, result.stderr
    password = json.loads(result.stdout)["password"]
    client = PahoDevice(platform.mqtt_port, name, password)
    assert await client.connect() == 0
    return client


async def connected_device(
    platform: Platform, enroll: Enroll, device_id: str = "dev-1"
) -> PahoDevice:
    password = await enroll(device_id)
    device = PahoDevice(platform.mqtt_port, f"abc123/{device_id}", password)
    assert await device.connect() == 0
    return device


async def test_enroll_then_connect_and_presence(platform: Platform, enroll: Enroll) -> None:
    device = await connected_device(platform, enroll)

    async def online() -> bool:
        found = await platform.store.get_device(NAME)
        return found is not None and found.online

    await wait_for(online)
    status = {"state": "online", "agent_version": "test", "ts": 1}
    await device.publish(PREFIX + "status", json.dumps(status), qos=1, retain=True)
    telemetry = {"cpu_percent": 3.5, "apps": [{"name": "web", "state": "RUNNING"}]}
    await device.publish(PREFIX + "telemetry", json.dumps(telemetry), qos=1)

    async def recorded() -> bool:
        found = await platform.store.get_device(NAME)
        return found is not None and found.telemetry == telemetry and found.last_status == status

    await wait_for(recorded)
    found = await platform.store.get_device(NAME)
    assert found is not None
    assert found.last_seen_at is not None
    assert time.time() - found.last_seen_at < 10

    device.close()  # a clean disconnect, with no offline status: the broker event tells

    async def offline() -> bool:
        found = await platform.store.get_device(NAME)
        return found is not None and not found.online

    await wait_for(offline)


async def test_refusals(platform: Platform, enroll: Enroll) -> None:
    port = platform.mqtt_port
    password = await enroll("dev-1")
    cases = [
        PahoDevice(port, DEV, "wrong-password"),
        PahoDevice(port, "abc123/nobody", password),
        PahoDevice(port, DEV, password, client_id="someone-else"),
        PahoDevice(port, DEV, password, client_id="abc123/dev-2"),
        PahoDevice(port, None, None, client_id="anonymous"),
        PahoDevice(port, "iotbiz-platform", "guess"),
    ]
    for client in cases:
        assert await client.connect() == REFUSED
        client.close()
    # a pending device (registered, not activated) is refused too
    async with aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{platform.http_port}/api/v1/register"
        async with http.post(url, json={"customer_id": "abc123", "mac_address": "dev-9"}) as r:
            pending_password = (await r.json())["password"]
    pending = PahoDevice(port, "abc123/dev-9", pending_password)
    assert await pending.connect() == REFUSED
    pending.close()
    # and the right credentials still work after all of that
    device = PahoDevice(port, DEV, password)
    assert await device.connect() == 0
    device.close()


async def test_device_acl(platform: Platform, enroll: Enroll) -> None:
    device = await connected_device(platform, enroll)
    other = await connected_device(platform, enroll, "dev-2")
    service = await operator(platform)
    assert await service.subscribe("devices/#") == [1]

    # subscriptions: only its own cmd
    assert await device.subscribe(PREFIX + "cmd") == [1]
    for topic in (
        "#",
        "devices/#",
        "devices/+/+/cmd",
        "devices/abc123/dev-2/cmd",
        PREFIX + "telemetry",
        PREFIX + "#",
        "$SYS/#",
    ):
        assert await device.subscribe(topic) == [0x80], topic

    # publishes: only its own status, telemetry, events, reply; the rest is dropped and counted
    denied_before = authority(platform).denied_publishes
    for suffix in ("status", "telemetry", "events", "reply"):
        await device.publish(PREFIX + suffix, b'{"ok": true}')
        message = await service.next_message()
        assert message is not None
        assert message.topic == PREFIX + suffix
    for topic in ("devices/abc123/dev-2/telemetry", PREFIX + "cmd", "other/topic", "devices"):
        await device.publish(topic, b"{}")
    await device.publish(PREFIX + "events", b"marker")  # handled after the four before it
    message = await service.next_message()
    assert message is not None
    assert (message.topic, message.payload) == (PREFIX + "events", b"marker")
    assert authority(platform).denied_publishes == denied_before + 4

    # the service role commands any device; only that device receives it
    assert await other.subscribe("devices/abc123/dev-2/cmd") == [1]
    await service.publish(PREFIX + "cmd", b'{"id": "1", "action": "ping"}')
    message = await device.next_message()
    assert message is not None
    assert message.payload == b'{"id": "1", "action": "ping"}'
    await service.publish("devices/abc123/dev-2/cmd", b"marker")
    message = await other.next_message()
    assert message is not None
    assert message.payload == b"marker"  # dev-1's command did not come first
    # ... but may not publish device topics or subscribe outside devices/
    await service.publish(PREFIX + "telemetry", b"{}")
    assert await service.subscribe("#") == [0x80]
    for client in (device, other, service):
        client.close()


async def test_superuser_may_use_any_topic_and_client_id(platform: Platform) -> None:
    root = await operator(platform, superuser=True)
    assert await root.subscribe("#") == [1]
    await root.publish("anything/at/all", b"x")
    message = await root.next_message()
    assert message is not None
    assert message.topic == "anything/at/all"
    root.close()


async def test_retained_status_reaches_only_the_service(platform: Platform, enroll: Enroll) -> None:
    device = await connected_device(platform, enroll)
    await device.publish(PREFIX + "status", b'{"state": "online"}', retain=True)
    other = await connected_device(platform, enroll, "dev-2")
    assert await other.subscribe("devices/abc123/dev-2/cmd") == [1]
    service = await operator(platform)
    await service.publish("devices/abc123/dev-2/cmd", b"marker")
    message = await other.next_message()
    assert message is not None
    assert (message.payload, message.retain) == (b"marker", False)  # no retained status first
    assert await service.subscribe("devices/+/+/status") == [1]
    message = await service.next_message()
    assert message is not None
    assert message.retain
    for client in (device, other, service):
        client.close()


@pytest.mark.parametrize("action", ["revoke", "reset"])
async def test_cli_revocation_disconnects_within_a_second(
    platform: Platform, enroll: Enroll, action: str
) -> None:
    password = await enroll("dev-1")
    device = PahoDevice(platform.mqtt_port, DEV, password)
    assert await device.connect() == 0
    result = await asyncio.to_thread(
        run_cli, "device", action, DEV, "--db", str(platform.store.path)
    )
    assert result.returncode == 0, result.stderr
    started = time.monotonic()
    assert await device.wait_disconnected(timeout=5)
    assert time.monotonic() - started < 1.0
    again = PahoDevice(platform.mqtt_port, DEV, password)
    assert await again.connect() == REFUSED  # the credential cache forgot it
    again.close()
    device.close()


async def test_reconnects_do_not_pay_bcrypt(platform: Platform, enroll: Enroll) -> None:
    password = await enroll("dev-1")
    hasher = authority(platform)._hasher
    device = PahoDevice(platform.mqtt_port, DEV, password)
    assert await device.connect() == 0
    device.close()
    operations = hasher.operations
    for _ in range(3):
        device = PahoDevice(platform.mqtt_port, DEV, password)
        assert await device.connect() == 0
        device.close()
    assert hasher.operations == operations
    wrong = PahoDevice(platform.mqtt_port, DEV, "not-the-password")
    assert await wrong.connect() == REFUSED  # a cached name still checks the password
    wrong.close()


async def test_removed_account_is_disconnected(platform: Platform) -> None:
    ops = await operator(platform)
    result = await asyncio.to_thread(
        run_cli, "account", "remove", "ops", "--db", str(platform.store.path)
    )
    assert result.returncode == 0, result.stderr
    assert await ops.wait_disconnected(timeout=2)
    ops.close()


async def test_silent_device_turns_offline_and_its_will_fires(
    platform: Platform, enroll: Enroll
) -> None:
    password = await enroll("dev-1")
    service = await operator(platform)
    assert await service.subscribe(PREFIX + "status") == [1]
    will = (PREFIX + "status", b'{"state": "offline"}')
    sock, connack = await raw_connect(
        platform.mqtt_port, connect_packet(DEV, DEV, password, keepalive=1, will=will)
    )
    try:
        assert connack == b"\x20\x02\x00\x00"

        async def online() -> bool:
            found = await platform.store.get_device(NAME)
            return found is not None and found.online

        await wait_for(online)
        started = time.monotonic()
        message = await service.next_message(timeout=5)  # the socket says nothing from now on
        assert message is not None
        assert message.payload == b'{"state": "offline"}'
        assert time.monotonic() - started < 1.5 + 0.5

        async def offline() -> bool:
            found = await platform.store.get_device(NAME)
            return (
                found is not None and not found.online and found.last_status == {"state": "offline"}
            )

        await wait_for(offline)
    finally:
        sock.close()
        service.close()


async def test_a_will_outside_the_acl_is_dropped(platform: Platform, enroll: Enroll) -> None:
    password = await enroll("dev-1")
    root = await operator(platform, superuser=True)
    assert await root.subscribe("#") == [1]
    will = ("devices/abc123/dev-2/status", b'{"state": "offline"}')
    sock, connack = await raw_connect(
        platform.mqtt_port, connect_packet(DEV, DEV, password, keepalive=1, will=will)
    )
    assert connack == b"\x20\x02\x00\x00"
    sock.close()  # an abnormal disconnect: the will would fire, but it is not the device's topic
    assert platform.broker is not None
    broker = platform.broker.broker

    async def gone() -> bool:
        return not broker.is_connected(DEV)  # its will was handled before this

    await wait_for(gone)
    await root.publish("marker/topic", b"marker")
    message = await root.next_message()
    assert message is not None
    assert message.topic == "marker/topic"
    root.close()


def test_sigterm_disconnects_devices_and_exits_0(tmp_path: Path) -> None:
    db = tmp_path / "p.db"
    assert run_cli("customer", "add", "abc123", "--limit", "5", "--db", str(db)).returncode == 0
    with platform_process(tmp_path, "--db", str(db)) as running:
        password = enroll_device(running.url, "abc123", "dev-1")
        device = PahoDevice(running.mqtt_port, DEV, password)
        assert asyncio.run(device.connect()) == 0
        assert running.stop() == 0
        assert device.disconnected.wait(5)
        device.close()
        assert "Traceback" not in running.log()


@pytest.mark.parametrize("log_level", ["INFO", "WARNING"])
def test_mqtt_port_in_use_is_one_line_without_traceback(tmp_path: Path, log_level: str) -> None:
    """DESIGN.md: a port already in use is a one-line error naming the port and the flag."""
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    port = held.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "IOTBIZ_CONFIG"}
    db = tmp_path / "p.db"
    migrated = run_cli("customer", "add", "abc123", "--limit", "1", "--db", str(db))
    assert migrated.returncode == 0  # no schema migration lines in the output below
    try:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "iotbiz.broker",
                "--mqtt-port",
                str(port),
                "--http-port",
                "0",
                "--db",
                str(db),
                "--log-level",
                log_level,
            ],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
            cwd=tmp_path,
            check=False,
        )
    finally:
        held.close()
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if " INFO " not in line]
    assert len(errors) == 1, output
    assert str(port) in errors[0]
    assert "--mqtt-port" in errors[0]
    if log_level == "WARNING":  # no INFO lines either: stderr is that one line, stdout empty
        assert result.stderr.splitlines() == errors
        assert result.stdout == ""
