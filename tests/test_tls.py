"""TLS with a throwaway CA made by `iotbiz tls init` in the test: the registrar over HTTPS, the
start-up checks of the key and certificate, a reload on SIGHUP, and the agent's side (it
verifies the platform's certificate and refuses plain text to other hosts)."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509

from iotbiz.errors import ConfigError
from iotbiz.names import DeviceName
from iotbiz.platform import Platform
from iotbiz.settings import Settings, load_agent_settings
from iotbiz.tls import client_context
from tests.mqtt_device import PahoDevice
from tests.processes import platform_process, run_cli
from tests.test_dispatch_agent import agent_process, until

NAME = DeviceName("abc123", "tls-dev")


def tls_init(folder: Path, host: str = "localhost", *ips: str) -> subprocess.CompletedProcess[str]:
    args = ["tls", "init", "--dir", str(folder), "--host", host]
    for ip in ips:
        args += ["--ip", ip]
    return run_cli(*args)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pki")
    done = tls_init(folder, "localhost", "127.0.0.1")
    assert done.returncode == 0, done.stderr
    return folder


def serial_of(port: int, pki: Path) -> int:
    context = trusting(pki)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_tls_init_makes_a_ca_and_a_server_certificate(tmp_path: Path) -> None:
    done = tls_init(tmp_path / "pki", "iot.example.com", "192.0.2.7")
    assert done.returncode == 0, done.stderr
    assert 'cert_file = "' in done.stdout
    assert 'ca_file = "' in done.stdout
    assert 'broker_url = "mqtts://iot.example.com:8883"' in done.stdout
    folder = tmp_path / "pki"
    for key in ("ca.key", "server.key"):
        assert stat.S_IMODE((folder / key).stat().st_mode) == 0o600
    # the server certificate chains to the CA and names the host and the address
    context = ssl.create_default_context(cafile=str(folder / "ca.crt"))
    context.load_cert_chain(folder / "server.crt", folder / "server.key")  # key matches cert
    cert = x509.load_pem_x509_certificate((folder / "server.crt").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["iot.example.com"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["192.0.2.7"]
    # again: the same CA (devices keep trusting it), a new server certificate
    ca_before, server_before = (
        (folder / "ca.crt").read_bytes(),
        (folder / "server.crt").read_bytes(),
    )
    again = tls_init(folder, "iot.example.com")
    assert again.returncode == 0, again.stderr
    assert "kept the private CA" in again.stdout
    assert (folder / "ca.crt").read_bytes() == ca_before
    assert (folder / "server.crt").read_bytes() != server_before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--host", "x", "--ip", "not-an-ip"], "--ip 'not-an-ip': not an IP address"),
        (["--host", "a b"], "--host 'a b': a host name"),
    ],
)
def test_tls_init_refuses_bad_input_in_one_line(
    tmp_path: Path, args: list[str], message: str
) -> None:
    done = run_cli("tls", "init", "--dir", str(tmp_path / "pki"), *args)
    assert done.returncode == 1
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


async def test_the_registrar_serves_https_and_only_https(
    make_settings: Callable[..., Settings], pki: Path
) -> None:
    settings = make_settings(
        http={"host": "127.0.0.1"},
        tls={"cert_file": str(pki / "server.crt"), "key_file": str(pki / "server.key")},
    )
    platform = Platform(settings)
    await platform.start()
    try:
        port = platform.http_port
        trusted = ssl.create_default_context(cafile=str(pki / "ca.crt"))

        def get(url: str, context: ssl.SSLContext | None) -> int:
            with urllib.request.urlopen(url, timeout=5, context=context) as response:  # noqa: S310
                return int(response.status)

        assert await asyncio.to_thread(get, f"https://localhost:{port}/healthz", trusted) == 200
        # the system's trust store does not know the private CA: refused
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            await asyncio.to_thread(get, f"https://localhost:{port}/healthz", None)
        # plain HTTP to the TLS port gets no HTTP answer
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            await asyncio.to_thread(get, f"http://127.0.0.1:{port}/healthz", None)
        # TLS 1.1 is refused
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.load_verify_locations(pki / "ca.crt")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the point of this check
            old.maximum_version = ssl.TLSVersion.TLSv1_1
        with pytest.raises((urllib.error.URLError, ssl.SSLError)):
            await asyncio.to_thread(get, f"https://localhost:{port}/healthz", old)
    finally:
        assert await platform.stop() == []


def test_a_key_readable_by_others_stops_the_start_in_one_line(tmp_path: Path, pki: Path) -> None:
    key = tmp_path / "server.key"
    key.write_bytes((pki / "server.key").read_bytes())
    key.chmod(0o644)
    with platform_process(
        tmp_path, "--tls-cert", str(pki / "server.crt"), "--tls-key", str(key), wait=False
    ) as platform:
        assert platform.proc.wait(timeout=20) == 1
        log = platform.log()
    assert f"tls.key_file: {key} has mode 0644: others may read it; chmod 600 {key}" in log
    assert "Traceback" not in log


def test_half_a_tls_setting_or_a_missing_file_is_a_start_up_error(
    tmp_path: Path, pki: Path
) -> None:
    with platform_process(tmp_path, "--tls-cert", str(pki / "server.crt"), wait=False) as p:
        assert p.proc.wait(timeout=20) == 1
        assert "tls.cert_file and tls.key_file: set both (TLS on) or neither" in p.log()
    missing = tmp_path / "nope.crt"
    with platform_process(
        tmp_path, "--tls-cert", str(missing), "--tls-key", str(pki / "server.key"), wait=False
    ) as p:
        assert p.proc.wait(timeout=20) == 1
        assert f"tls: {missing}: no such file" in p.log()
        assert "Traceback" not in p.log()


def test_sighup_reloads_the_certificate_and_keeps_connected_devices(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    assert tls_init(pki, "localhost", "127.0.0.1").returncode == 0
    tls = ("--tls-cert", str(pki / "server.crt"), "--tls-key", str(pki / "server.key"))
    with platform_process(tmp_path, *tls) as platform:
        assert platform.scheme == "https"
        assert (
            run_cli("customer", "add", NAME.customer_id, "--limit", "5", cwd=tmp_path).returncode
            == 0
        )
        password = enroll_sync(platform.http_port, pki, NAME)
        device = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=str(NAME), protocol=mqtt.MQTTv311
        )
        device.username_pw_set(str(NAME), password)
        device.tls_set_context(trusting(pki))
        device.connect("127.0.0.1", platform.mqtt_port)
        device.loop_start()
        try:
            deadline = time.monotonic() + 10
            while not device.is_connected():
                assert time.monotonic() < deadline, "no MQTT/TLS connection"
                time.sleep(0.05)
            before = (serial_of(platform.http_port, pki), serial_of(platform.mqtt_port, pki))
            assert before[0] == before[1]  # one certificate for both doors
            assert tls_init(pki, "localhost", "127.0.0.1").returncode == 0  # a renewal
            platform.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while "TLS certificate reloaded" not in platform.log():
                assert time.monotonic() < deadline, platform.log()
                time.sleep(0.05)
            after = (serial_of(platform.http_port, pki), serial_of(platform.mqtt_port, pki))
            assert after[0] == after[1] != before[0]
            # the device connected before the reload is still connected and still heard
            assert device.is_connected()
            info = device.publish(f"devices/{NAME}/telemetry", b'{"cpu_percent": 2}', qos=1)
            info.wait_for_publish(10)
            assert info.is_published()
        finally:
            device.loop_stop()
            device.disconnect()
        assert platform.stop() == 0


def enroll_sync(port: int, pki: Path, name: DeviceName) -> str:
    def post(path: str, body: dict[str, str]) -> dict[str, str]:
        request = urllib.request.Request(
            f"https://127.0.0.1:{port}{path}", data=json.dumps(body).encode(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=10, context=trusting(pki)) as answer:  # noqa: S310
            data = answer.read()
            return dict(json.loads(data)) if data else {}

    body = {"customer_id": name.customer_id, "mac_address": name.device_id}
    password = post("/api/v1/register", body)["password"]
    post("/api/v1/activate", {**body, "password": password})
    return password


# -- the agent -------------------------------------------------------------------------------


def agent_toml(tmp_path: Path, registrar: str, broker: str, *extra: str) -> Path:
    config = tmp_path / "agent.toml"
    config.write_text(
        f'customer_id = "{NAME.customer_id}"\ndevice_id = "{NAME.device_id}"\n'
        f'registrar_url = "{registrar}"\nbroker_url = "{broker}"\n'
        f'state_dir = "{tmp_path / "agent-state"}"\n' + "".join(f"{line}\n" for line in extra)
    )
    return config


@pytest.mark.parametrize(
    ("registrar", "broker", "refused"),
    [
        ("http://10.1.2.3:8080", "mqtts://10.1.2.3:8883", "registrar_url http://10.1.2.3:8080"),
        ("https://iot.example.com", "mqtt://iot.example.com:1883", "broker_url mqtt://"),
    ],
)
def test_the_agent_refuses_plain_text_to_another_host(
    tmp_path: Path, registrar: str, broker: str, refused: str
) -> None:
    config = agent_toml(tmp_path, registrar, broker)
    done = subprocess.run(
        [sys.executable, "-m", "iotbiz.agent", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode != 0
    assert refused in done.stderr
    assert "allow_insecure = true" in done.stderr
    assert "Traceback" not in done.stderr
    allowed = agent_toml(tmp_path, registrar, broker, "allow_insecure = true")
    load_agent_settings(allowed)  # no error


def test_plain_text_to_loopback_needs_no_permission(tmp_path: Path) -> None:
    for host in ("127.0.0.1", "localhost", "[::1]", "127.3.4.5"):
        load_agent_settings(agent_toml(tmp_path, f"http://{host}:8080", f"mqtt://{host}:1883"))
    with pytest.raises(ConfigError, match=r"ca_file: .*nope\.pem: no such file"):
        client_context(str(tmp_path / "nope.pem"))


# -- MQTT over TLS ---------------------------------------------------------------------------


def tls_settings(make_settings: Callable[..., Settings], pki: Path, **mqtt: object) -> Settings:
    return make_settings(
        http={"host": "127.0.0.1"},
        mqtt={"host": "127.0.0.1", **mqtt},
        tls={"cert_file": str(pki / "server.crt"), "key_file": str(pki / "server.key")},
    )


def trusting(pki: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki / "ca.crt"))


async def enroll_over_https(platform: Platform, pki: Path, name: DeviceName) -> str:
    return await asyncio.to_thread(enroll_sync, platform.http_port, pki, name)


async def test_with_tls_mqtt_is_tls_only_and_verified(
    make_settings: Callable[..., Settings], pki: Path
) -> None:
    platform = Platform(tls_settings(make_settings, pki))
    await platform.start()
    try:
        assert platform.broker is not None
        assert platform.broker.plain is False
        port = platform.broker.tls_port
        assert port is not None
        assert platform.mqtt_port == port
        await platform.store.add_customer(NAME.customer_id, 10, actor="test")
        password = await enroll_over_https(platform, pki, NAME)

        device = PahoDevice(port, str(NAME), password)
        device.client.tls_set_context(trusting(pki))
        try:
            assert await device.connect() == 0
            await device.publish(f"devices/{NAME}/telemetry", b'{"cpu_percent": 1}')

            async def online() -> bool:
                found = await platform.store.get_device(NAME)
                return found is not None and found.online

            await until(online, 10, "the device online over MQTT/TLS")
        finally:
            device.close()

        # plain MQTT to the TLS port: the handshake fails, no CONNACK, the connection closes
        plain = PahoDevice(port, str(NAME), password)
        with pytest.raises(AssertionError, match="no CONNACK"):
            await plain.connect()
        plain.close()
    finally:
        assert await platform.stop() == []


async def test_allow_plain_adds_the_plain_listener(
    make_settings: Callable[..., Settings], pki: Path
) -> None:
    platform = Platform(tls_settings(make_settings, pki, allow_plain=True))
    await platform.start()
    try:
        assert platform.broker is not None
        assert platform.broker.plain is True
        assert platform.broker.tls_port not in (None, platform.mqtt_port)
        await platform.store.add_customer(NAME.customer_id, 10, actor="test")
        password = await enroll_over_https(platform, pki, NAME)
        device = PahoDevice(platform.mqtt_port, str(NAME), password)
        try:
            assert await device.connect() == 0
        finally:
            device.close()
    finally:
        assert await platform.stop() == []


async def test_an_agent_over_https_and_mqtts_refusing_a_platform_it_does_not_trust(
    make_settings: Callable[..., Settings], pki: Path, tmp_path: Path
) -> None:
    platform = Platform(tls_settings(make_settings, pki))
    await platform.start()
    try:
        await platform.store.add_customer(NAME.customer_id, 10, actor="test")
        other = tmp_path / "other-ca"
        assert tls_init(other, "localhost").returncode == 0
        # a CA that did not sign the platform's certificate: the agent never registers
        wrong = tmp_path / "wrong"
        wrong.mkdir()
        config = agent_toml(
            wrong,
            f"https://localhost:{platform.http_port}",
            f"mqtts://localhost:{platform.mqtt_port}",
            f'ca_file = "{other / "ca.crt"}"',
        )
        with agent_process(wrong, config):
            log = wrong / "agent.log"
            await until(
                lambda: "CERTIFICATE_VERIFY_FAILED" in log.read_text(), 20, "a verify failure"
            )
        assert await platform.store.get_device(NAME) is None

        right = tmp_path / "right"
        right.mkdir()
        config = agent_toml(
            right,
            f"https://localhost:{platform.http_port}",
            f"mqtts://localhost:{platform.mqtt_port}",
            f'ca_file = "{pki / "ca.crt"}"',
            "telemetry_interval_s = 1",
        )
        with agent_process(right, config):

            async def reporting() -> bool:
                found = await platform.store.get_device(NAME)
                return found is not None and found.online and found.telemetry is not None

            await until(reporting, 30, "the agent enrolled over HTTPS, online over MQTT/TLS")
    finally:
        assert await platform.stop() == []
