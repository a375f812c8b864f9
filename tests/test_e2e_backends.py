"""One end-to-end test run on every setup (store x broker), through the public surface only:
the device API, the admin API and a real paho device.

A setup is one line in SETUPS: its name, the settings of its store and those of its broker
(functions of the test's request, which may start a service fixture, sync or async).

  - sqlite-embedded: the platform with its embedded amqtt broker;
  - sqlite-rabbitmq: the platform (in the test's loop) with `--broker external` on a private
    RabbitMQ 3.10 node (tests/services/rabbitmq.py), whose HTTP auth backend is this
    platform's registrar and whose management API disconnects revoked devices;
  - postgresql-embedded, postgresql-rabbitmq: the same on a fresh database of a private
    PostgreSQL server (tests/services/postgres.py).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import secrets
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
import pytest_asyncio

from iotbiz.platform import Platform
from iotbiz.settings import Settings
from iotbiz.tls_init import Issued, init_tls
from tests.broker.conftest import wait_for
from tests.mqtt_device import PahoDevice
from tests.processes import platform_process
from tests.services.postgres import PostgresServer
from tests.services.rabbitmq import RabbitNode, free_port, rabbitmq_node
from tests.test_dispatch_agent import agent_process

TOKEN = "e2e-admin-token"
CUSTOMER = "e2e"
DEVICE_ID = "aa:bb:cc:00:00:01"
NAME = f"{CUSTOMER}/{DEVICE_ID}"
START_TIMEOUT_S = 20.0  # the service client's first login goes through the broker's callbacks
WAIT_S = 15.0  # generous: the machine is shared


@dataclass(frozen=True, slots=True)
class Setup:
    name: str
    platform: Platform
    mqtt_port: int  # where devices connect

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.platform.http_port}"


Sections = dict[str, dict[str, Any]]  # settings sections, as make_settings takes them
SettingsPart = Callable[[pytest.FixtureRequest], Sections | Awaitable[Sections]]


@asynccontextmanager
async def running(name: str, settings: Settings) -> AsyncIterator[Setup]:
    """Start the platform, wait until /healthz says it is whole, stop it on the way out."""
    platform = Platform(settings)
    await platform.start()
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{platform.http_port}") as http:

            async def healthy() -> bool:
                async with http.get("/healthz") as response:
                    return response.status == 200

            await wait_for(healthy, timeout=START_TIMEOUT_S)
            async with http.get("/healthz") as response:
                health = await response.json()
        external = settings.broker.mode == "external"
        assert platform.broker is None if external else platform.broker is not None
        assert (health["status"], health["broker"]) == (
            "ok",
            "connected" if external else "listening",
        )
        yield Setup(name, platform, platform.mqtt_port)
    finally:
        await platform.stop()


def sqlite_store(request: pytest.FixtureRequest) -> Sections:
    return {}  # make_settings's own: a SQLite file in tmp_path


async def postgresql_store(request: pytest.FixtureRequest) -> Sections:
    """A fresh database on the session's private PostgreSQL server."""
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return {"store": {"url": await server.create_database()}}


def embedded_broker(request: pytest.FixtureRequest) -> Sections:
    return {}  # the default: the embedded broker on a free port


def rabbitmq_broker(request: pytest.FixtureRequest) -> Sections:
    """`--broker external` on this module's RabbitMQ node, with its management API."""
    rabbit: RabbitNode = request.getfixturevalue("rabbit")
    return {
        "http": {"port": rabbit.auth_port},  # where the node's auth backend asks
        "broker": {
            "mode": "external",
            "url": f"mqtt://127.0.0.1:{rabbit.mqtt_port}",
            "service_password": secrets.token_urlsafe(16),
            "management_url": rabbit.management_url,
            "management_user": rabbit.management_user,
            "management_password": rabbit.management_password,
        },
    }


SETUPS: dict[str, tuple[SettingsPart, SettingsPart]] = {
    "sqlite-embedded": (sqlite_store, embedded_broker),
    "sqlite-rabbitmq": (sqlite_store, rabbitmq_broker),
    "postgresql-embedded": (postgresql_store, embedded_broker),
    "postgresql-rabbitmq": (postgresql_store, rabbitmq_broker),
}


def platform_settings(make_settings: Callable[..., Settings], *parts: Sections) -> Settings:
    """The test's settings: loopback HTTP, a known admin token, then each part on top."""
    merged: Sections = {"http": {"host": "127.0.0.1"}, "admin": {"token": TOKEN}}
    for part in parts:
        for section, values in part.items():
            merged.setdefault(section, {}).update(values)
    return make_settings(**merged)


@dataclass(frozen=True, slots=True)
class BrokerTLS:
    """A private CA and a certificate for 127.0.0.1, for the node's MQTT-over-TLS listener."""

    issued: Issued
    port: int

    def rabbitmq_config(self) -> list[str]:
        return [
            f"mqtt.listeners.ssl.default = 127.0.0.1:{self.port}",
            f"ssl_options.cacertfile = {self.issued.ca_cert}",
            f"ssl_options.certfile = {self.issued.server_cert}",
            f"ssl_options.keyfile = {self.issued.server_key}",
            "ssl_options.verify = verify_none",
            "ssl_options.fail_if_no_peer_cert = false",
        ]


@pytest.fixture(scope="module")
def broker_tls(tmp_path_factory: pytest.TempPathFactory) -> BrokerTLS:
    issued = init_tls(tmp_path_factory.mktemp("broker-tls"), "localhost", ["127.0.0.1"])
    return BrokerTLS(issued, free_port())


@pytest.fixture(scope="module")
def rabbit(tmp_path_factory: pytest.TempPathFactory, broker_tls: BrokerTLS) -> Iterator[RabbitNode]:
    """One private RabbitMQ node for this module's RabbitMQ setups (started on first use),
    with a plain MQTT listener and one over TLS."""
    folder = tmp_path_factory.mktemp("rabbitmq")
    with rabbitmq_node(folder, extra_config=broker_tls.rabbitmq_config()) as node:
        yield node


@pytest_asyncio.fixture(params=list(SETUPS))
async def setup(
    request: pytest.FixtureRequest, make_settings: Callable[..., Settings]
) -> AsyncIterator[Setup]:
    parts = []
    for part in SETUPS[request.param]:
        made = part(request)
        parts.append(await made if inspect.isawaitable(made) else made)
    settings = platform_settings(make_settings, *parts)
    async with running(request.param, settings) as started:
        yield started


class Admin:
    """The admin API with the token."""

    def __init__(self, http: aiohttp.ClientSession) -> None:
        self._http = http
        self._headers = {"Authorization": f"Bearer {TOKEN}"}

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with self._http.request(
            method, f"/api/v1/admin{path}", json=body, headers=self._headers
        ) as response:
            return response.status, await response.json()


async def post(http: aiohttp.ClientSession, path: str, body: dict[str, str]) -> tuple[int, Any]:
    async with http.post(path, json=body) as response:
        text = await response.text()
        return response.status, json.loads(text) if text else None


async def test_a_device_enrolls_reports_obeys_and_is_revoked(setup: Setup) -> None:
    status_topic, cmd_topic = f"devices/{NAME}/status", f"devices/{NAME}/cmd"
    async with aiohttp.ClientSession(setup.url) as http:
        admin = Admin(http)
        created = await admin.call(
            "POST", "/customers", {"customer_id": CUSTOMER, "device_limit": 5}
        )
        assert created[0] == 201, created
        # enroll over HTTP: register, then activate
        enrollment = {"customer_id": CUSTOMER, "mac_address": DEVICE_ID}
        status, body = await post(http, "/api/v1/register", enrollment)
        assert status == 201, body
        password = body["password"]
        assert await post(http, "/api/v1/activate", {**enrollment, "password": password}) == (
            200,
            None,
        )
        offline = json.dumps({"state": "offline", "agent_version": "e2e", "ts": 0}).encode()
        device = PahoDevice(setup.mqtt_port, NAME, password, will=(status_topic, offline, 1, True))
        try:
            assert await device.connect() == 0
            assert await device.subscribe(cmd_topic) == [1]
            online = {"state": "online", "agent_version": "e2e", "ts": time.time()}
            await device.publish(status_topic, json.dumps(online), qos=1, retain=True)
            telemetry = {
                "ts": time.time(),
                "system": {"cpu_percent": 12.5, "memory_percent": 40.0},
                "apps": [
                    {"name": "web", "state": "RUNNING", "pid": 42, "restarts": 0, "version": "1"}
                ],
            }
            await device.publish(f"devices/{NAME}/telemetry", json.dumps(telemetry), qos=1)

            # the admin API sees it online, with its telemetry
            async def reported() -> bool:
                code, shown = await admin.call("GET", f"/devices/{NAME}")
                assert code == 200, shown
                return bool(shown["online"]) and shown["telemetry"] == telemetry

            await wait_for(reported, timeout=WAIT_S)
            _, shown = await admin.call("GET", f"/devices/{NAME}")
            assert (shown["state"], shown["name"]) == ("active", NAME)

            # a command through the admin API, answered on reply
            code, sent = await admin.call("POST", "/commands", {"device": NAME, "action": "ping"})
            assert code == 201, sent
            [command] = sent["commands"]
            message = await device.next_message(timeout=WAIT_S)
            assert message is not None, "no command arrived"
            assert message.topic == cmd_topic
            delivered = json.loads(message.payload)
            assert (delivered["id"], delivered["action"]) == (command["id"], "ping")
            reply = {"id": command["id"], "ok": True, "result": {"pong": True}}
            await device.publish(f"devices/{NAME}/reply", json.dumps(reply), qos=1)
            code, done = await admin.call("GET", f"/commands/{command['id']}?wait=10")
            assert code == 200, done
            assert (done["state"], done["result"], done["error"]) == ("done", {"pong": True}, None)

            # an activated device cannot be registered again (taken over)
            assert await post(http, "/api/v1/register", enrollment) == (
                403,
                {"error": "device already activated"},
            )

            # revoke: the device is disconnected, and a new CONNECT is refused
            code, revoked = await admin.call("POST", f"/devices/{NAME}/revoke")
            assert (code, revoked["state"], revoked["online"]) == (200, "revoked", False)
            assert await device.wait_disconnected(timeout=WAIT_S), "still connected"
        finally:
            device.close()
        again = PahoDevice(setup.mqtt_port, NAME, password)
        try:
            assert await again.connect() in (134, 135)  # CONNACK 4 or 5, as paho reports them
        finally:
            again.close()
        assert await post(http, "/api/v1/register", enrollment) == (
            403,
            {"error": "device revoked"},
        )
        _, shown = await admin.call("GET", f"/devices/{NAME}")
        assert (shown["state"], shown["online"]) == ("revoked", False)


async def enroll(http: aiohttp.ClientSession, device_id: str) -> str:
    """Register and activate a device of CUSTOMER over HTTP; its password."""
    body = {"customer_id": CUSTOMER, "mac_address": device_id}
    status, answer = await post(http, "/api/v1/register", body)
    assert status == 201, answer
    assert await post(http, "/api/v1/activate", {**body, "password": answer["password"]}) == (
        200,
        None,
    )
    return str(answer["password"])


def status_payload(state: str) -> str:
    return json.dumps({"state": state, "agent_version": "e2e", "ts": time.time()})


async def test_a_command_queued_for_an_offline_device_goes_when_it_says_online(
    setup: Setup,
) -> None:
    async with aiohttp.ClientSession(setup.url) as http:
        admin = Admin(http)
        code, _ = await admin.call(
            "POST", "/customers", {"customer_id": CUSTOMER, "device_limit": 5}
        )
        assert code == 201
        password = await enroll(http, DEVICE_ID)
        code, sent = await admin.call("POST", "/commands", {"device": NAME, "action": "status"})
        assert code == 201, sent
        [command] = sent["commands"]
        assert command["state"] == "queued"
        device = PahoDevice(setup.mqtt_port, NAME, password)
        try:
            assert await device.connect() == 0
            assert await device.subscribe(f"devices/{NAME}/cmd") == [1]
            await device.publish(f"devices/{NAME}/status", status_payload("online"), retain=True)
            message = await device.next_message(timeout=WAIT_S)
            assert message is not None, "the queued command never came"
            assert json.loads(message.payload)["id"] == command["id"]
        finally:
            device.close()


async def test_a_restarted_platform_sees_the_devices_still_on_rabbitmq(
    request: pytest.FixtureRequest, make_settings: Callable[..., Settings]
) -> None:
    """The external broker outlives a platform restart, and so do the devices' connections.
    RabbitMQ 3.10 sends retained messages to no wildcard subscription (measured), so the
    platform learns who is online from what they send next: a device's telemetry turns it
    online again (and its queued command goes); one that said offline and left stays offline."""
    settings = platform_settings(make_settings, rabbitmq_broker(request))
    other_id = "aa:bb:cc:00:00:02"
    names = [NAME, f"{CUSTOMER}/{other_id}"]
    devices: list[PahoDevice] = []
    try:
        async with (
            running("sqlite-rabbitmq", settings) as first,
            aiohttp.ClientSession(first.url) as http,
        ):
            admin = Admin(http)
            limit = {"customer_id": CUSTOMER, "device_limit": 5}
            assert (await admin.call("POST", "/customers", limit))[0] == 201
            passwords = [await enroll(http, DEVICE_ID), await enroll(http, other_id)]
            for name, password in zip(names, passwords, strict=True):
                topic = f"devices/{name}/status"
                will = (topic, status_payload("offline").encode(), 1, True)
                device = PahoDevice(first.mqtt_port, name, password, will=will)
                devices.append(device)
                assert await device.connect() == 0
                assert await device.subscribe(f"devices/{name}/cmd") == [1]
                await device.publish(topic, status_payload("online"), retain=True)
            await devices[1].publish(
                f"devices/{names[1]}/status", status_payload("offline"), retain=True
            )
            devices[1].close()

            async def seen() -> bool:
                shown = [(await admin.call("GET", f"/devices/{name}"))[1] for name in names]
                return [d["online"] for d in shown] == [True, False]

            await wait_for(seen, timeout=WAIT_S)
        # stopped (every device marked offline); the first device stays connected to RabbitMQ
        async with (
            running("sqlite-rabbitmq", settings) as second,
            aiohttp.ClientSession(second.url) as http,
        ):
            admin = Admin(http)
            _, shown = await admin.call("GET", f"/devices/{NAME}")
            assert shown["online"] is False
            code, sent = await admin.call("POST", "/commands", {"device": NAME, "action": "ping"})
            assert (code, sent["commands"][0]["state"]) == (201, "queued")
            telemetry = {"ts": time.time(), "system": {"cpu_percent": 3.0}, "apps": []}
            await devices[0].publish(f"devices/{NAME}/telemetry", json.dumps(telemetry), qos=1)

            async def online_again() -> bool:
                return bool((await admin.call("GET", f"/devices/{NAME}"))[1]["online"])

            await wait_for(online_again, timeout=WAIT_S)
            message = await devices[0].next_message(timeout=WAIT_S)
            assert message is not None, "the queued command did not go"
            assert json.loads(message.payload)["id"] == sent["commands"][0]["id"]
            _, other = await admin.call("GET", f"/devices/{names[1]}")
            assert (other["online"], other["status"]["state"]) == (False, "offline")
    finally:
        for device in devices:
            device.close()


async def test_the_platform_reaches_rabbitmq_over_tls(
    request: pytest.FixtureRequest,
    make_settings: Callable[..., Settings],
    broker_tls: BrokerTLS,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`mqtts://` with `broker.ca_file`: the service client's TLS connection carries the
    commands; without the CA (the system's trust store does not know a private one) it is
    refused, and /healthz says so."""
    parts = rabbitmq_broker(request)
    parts["broker"]["url"] = f"mqtts://127.0.0.1:{broker_tls.port}"
    parts["broker"]["ca_file"] = str(broker_tls.issued.ca_cert)
    async with (
        running("sqlite-rabbitmq-tls", platform_settings(make_settings, parts)) as tls,
        aiohttp.ClientSession(tls.url) as http,
    ):
        admin = Admin(http)
        limit = {"customer_id": CUSTOMER, "device_limit": 5}
        assert (await admin.call("POST", "/customers", limit))[0] == 201
        password = await enroll(http, DEVICE_ID)
        assert tls.mqtt_port == broker_tls.port
        rabbit: RabbitNode = request.getfixturevalue("rabbit")
        device = PahoDevice(rabbit.mqtt_port, NAME, password)  # plain, on the same node
        try:
            assert await device.connect() == 0
            assert await device.subscribe(f"devices/{NAME}/cmd") == [1]
            await device.publish(f"devices/{NAME}/status", status_payload("online"), retain=True)
            code, sent = await admin.call("POST", "/commands", {"device": NAME, "action": "ping"})
            assert code == 201, sent
            message = await device.next_message(timeout=WAIT_S)
            assert message is not None, "no command over the TLS service connection"
            assert json.loads(message.payload)["id"] == sent["commands"][0]["id"]
        finally:
            device.close()
    del parts["broker"]["ca_file"]
    caplog.set_level(logging.WARNING, logger="iotbiz.registrar.service_client")
    untrusted = Platform(platform_settings(make_settings, parts))
    await untrusted.start()
    try:

        async def refused() -> bool:
            return any("CERTIFICATE_VERIFY_FAILED" in r.getMessage() for r in caplog.records)

        await wait_for(refused, timeout=WAIT_S)
        async with (
            aiohttp.ClientSession(f"http://127.0.0.1:{untrusted.http_port}") as http,
            http.get("/healthz") as response,
        ):
            assert response.status == 503
            assert await response.json() == {
                "error": f"not connected to the external MQTT broker mqtts://127.0.0.1:{broker_tls.port}"
            }
    finally:
        await untrusted.stop()


async def test_python_m_iotbiz_broker_external_runs_no_embedded_broker(
    rabbit: RabbitNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The public command line, as a real process: `python -m iotbiz.broker --broker external
    --broker-url ...` listens for HTTP only (no MQTT port of its own), logs in to RabbitMQ and
    says so on /healthz; SIGTERM stops it with exit 0."""
    monkeypatch.setenv("IOTBIZ_BROKER_SERVICE_PASSWORD", secrets.token_urlsafe(16))
    monkeypatch.setenv("IOTBIZ_ADMIN_TOKEN", TOKEN)
    args = ["--db", str(tmp_path / "iotbiz.db"), "--http-port", str(rabbit.auth_port)]
    args += ["--broker", "external", "--broker-url", f"mqtt://127.0.0.1:{rabbit.mqtt_port}"]
    with platform_process(tmp_path, *args) as process:
        assert process.http_port == rabbit.auth_port
        async with aiohttp.ClientSession(process.url) as http:

            async def connected() -> bool:
                async with http.get("/healthz") as response:
                    return response.status == 200 and (await response.json())["broker"] == (
                        "connected"
                    )

            await wait_for(connected, timeout=START_TIMEOUT_S)
        listening = {
            c.laddr.port
            for c in psutil.Process(process.proc.pid).net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN
        }
        assert listening == {rabbit.auth_port}, process.log()
        assert "MQTT broker listening" not in process.log()
        assert f"external MQTT broker at mqtt://127.0.0.1:{rabbit.mqtt_port}" in process.log()
        assert process.stop() == 0, process.log()


async def test_without_the_management_api_a_revoked_device_goes_after_a_pause(
    request: pytest.FixtureRequest, make_settings: Callable[..., Settings]
) -> None:
    """No broker.management_url: nothing closes the connection at the revoke. RabbitMQ 3.10
    keeps a connection's allowed topic checks while it is busy (measured: a device publishing
    every 0.5 s was not asked again for 15 s) and asks again after it was idle a moment (1 s
    was enough here): that publish is denied and the connection closed. An agent's telemetry
    every 10 s is such a pause. A new CONNECT is refused at once."""
    parts = rabbitmq_broker(request)
    for key in ("management_url", "management_user", "management_password"):
        del parts["broker"][key]
    async with (
        running("sqlite-rabbitmq", platform_settings(make_settings, parts)) as setup,
        aiohttp.ClientSession(setup.url) as http,
    ):
        admin = Admin(http)
        limit = {"customer_id": CUSTOMER, "device_limit": 5}
        assert (await admin.call("POST", "/customers", limit))[0] == 201
        password = await enroll(http, DEVICE_ID)
        device = PahoDevice(setup.mqtt_port, NAME, password)
        try:
            assert await device.connect() == 0
            await device.publish(f"devices/{NAME}/telemetry", "{}")
            assert (await admin.call("POST", f"/devices/{NAME}/revoke"))[0] == 200
            routing_key = f"devices.{NAME.replace('/', '.')}.telemetry"
            check = {"username": NAME, "vhost": "/", "resource": "topic", "name": "amq.topic"}
            check |= {"permission": "write", "routing_key": routing_key}

            async def denied() -> bool:  # the platform has forgotten the device
                async with http.post("/api/v1/broker-auth/rabbitmq/topic", data=check) as r:
                    return await r.text() == "deny"

            await wait_for(denied, timeout=WAIT_S)
            closed = False
            for pause_s in (1.0, 2.0, 4.0, 8.0):  # idle, as an agent between telemetry
                await asyncio.sleep(pause_s)
                device.client.publish(f"devices/{NAME}/telemetry", "{}", qos=1)
                if await device.wait_disconnected(timeout=2.0):
                    closed = True
                    break
            assert closed, "a revoked device kept publishing after idle pauses"
        finally:
            device.close()
        again = PahoDevice(setup.mqtt_port, NAME, password)
        try:
            assert await again.connect() in (134, 135)
        finally:
            again.close()


async def test_a_real_agent_on_rabbitmq(
    request: pytest.FixtureRequest, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """The agent itself (a child process) against `--broker external`: it enrolls, connects to
    RabbitMQ with a MAC-form device id (colons in the username), reports its apps, answers a
    command, and says offline when stopped."""
    settings = platform_settings(
        make_settings, rabbitmq_broker(request), {"commands": {"poll_s": 0.1}}
    )
    async with (
        running("sqlite-rabbitmq", settings) as setup,
        aiohttp.ClientSession(setup.url) as http,
    ):
        admin = Admin(http)
        limit = {"customer_id": CUSTOMER, "device_limit": 5}
        assert (await admin.call("POST", "/customers", limit))[0] == 201
        program = tmp_path / "app.py"
        program.write_text("import time\nwhile True:\n    time.sleep(0.2)\n")
        config = tmp_path / "agent.toml"
        config.write_text(
            f'customer_id = "{CUSTOMER}"\ndevice_id = "{DEVICE_ID.upper()}"\n'
            f'registrar_url = "{setup.url}"\nbroker_url = "mqtt://127.0.0.1:{setup.mqtt_port}"\n'
            f'state_dir = "{tmp_path / "agent-state"}"\ntelemetry_interval_s = 1\n'
            f'\n[[apps]]\nname = "app"\ncommand = {json.dumps([sys.executable, str(program)])}\n'
        )
        with agent_process(tmp_path, config) as agent:

            async def reporting() -> bool:
                code, shown = await admin.call("GET", f"/devices/{NAME}")
                telemetry = shown.get("telemetry") if code == 200 else None
                return bool(shown.get("online")) and bool(telemetry and telemetry.get("apps"))

            await wait_for(reporting, timeout=30.0)
            _, shown = await admin.call("GET", f"/devices/{NAME}")
            assert [app["name"] for app in shown["telemetry"]["apps"]] == ["app"]
            code, sent = await admin.call("POST", "/commands", {"device": NAME, "action": "ping"})
            assert code == 201, sent
            command_id = sent["commands"][0]["id"]
            code, done = await admin.call("GET", f"/commands/{command_id}?wait=20")
            assert (code, done["state"], done["result"]["pong"]) == (200, "done", True)
            agent.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(agent.wait, 30) == 0

            async def offline() -> bool:
                return (await admin.call("GET", f"/devices/{NAME}"))[1]["online"] is False

            await wait_for(offline, timeout=WAIT_S)
