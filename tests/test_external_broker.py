"""External-broker mode without a broker: its start-up errors, /healthz while the broker cannot
be reached, /metrics without an embedded broker, and `principal_of` across two platform
processes' registrars on one store. The end-to-end runs on RabbitMQ are in
tests/test_e2e_backends.py."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from iotbiz.broker.authority import Authority, Refusal
from iotbiz.broker.management import ManagementKick
from iotbiz.errors import ConfigError
from iotbiz.names import DeviceName, parse_device_name
from iotbiz.passwords import PasswordHasher
from iotbiz.platform import SERVICE_USERNAME, Platform
from iotbiz.registrar import create_app
from iotbiz.settings import Settings
from iotbiz.store import Store
from tests.broker.conftest import wait_for
from tests.services.rabbitmq import free_port

TOKEN = "external-test-token"
RABBIT = "/api/v1/broker-auth/rabbitmq"
DEVICE = "abc123/aa:bb:cc:dd:ee:01"
MISSING_PASSWORD = (
    "broker.service_password: required with broker.mode = external (the same in every platform"
    " process; e.g. IOTBIZ_BROKER_SERVICE_PASSWORD)"
)


def external(make_settings: Callable[..., Settings], url: str, **broker: str) -> Settings:
    return make_settings(
        http={"host": "127.0.0.1"},
        admin={"token": TOKEN},
        broker={"mode": "external", "url": url, **broker},
    )


async def test_external_mode_needs_the_service_password(
    make_settings: Callable[..., Settings],
) -> None:
    platform = Platform(external(make_settings, "mqtt://127.0.0.1:1883"))
    with pytest.raises(ConfigError) as raised:
        await platform.start()
    assert str(raised.value) == MISSING_PASSWORD
    assert platform.broker is None


def test_external_mode_without_the_password_is_a_one_line_exit(tmp_path: Path) -> None:
    run = subprocess.run(
        [
            *(sys.executable, "-m", "iotbiz.broker", "--db", str(tmp_path / "x.db")),
            *("--broker", "external", "--broker-url", "mqtt://127.0.0.1:1883", "--http-port", "0"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
    )
    assert (run.returncode, run.stdout) == (1, "")
    assert run.stderr == f"python -m iotbiz.broker: {MISSING_PASSWORD}\n"


@pytest_asyncio.fixture
async def unreachable(
    make_settings: Callable[..., Settings],
) -> AsyncIterator[tuple[Platform, str]]:
    """A platform in external mode whose broker does not listen (a port nobody holds)."""
    url = f"mqtt://127.0.0.1:{free_port()}"
    platform = Platform(external(make_settings, url, service_password="pw"))
    await platform.start()
    try:
        yield platform, url
    finally:
        await platform.stop()


async def test_an_unreachable_broker_is_retried_and_healthz_says_so(
    unreachable: tuple[Platform, str], caplog: pytest.LogCaptureFixture
) -> None:
    platform, url = unreachable
    caplog.set_level(logging.WARNING, logger="iotbiz.registrar.service_client")
    assert platform.broker is None
    assert platform.mqtt_port == int(url.rsplit(":", 1)[1])
    async with aiohttp.ClientSession(f"http://127.0.0.1:{platform.http_port}") as http:
        async with http.get("/healthz") as response:
            assert response.status == 503
            assert await response.json() == {
                "error": f"not connected to the external MQTT broker {url}"
            }

        def retries() -> int:
            return sum("service client disconnected" in r.getMessage() for r in caplog.records)

        async def retried_twice() -> bool:
            return retries() >= 2

        await wait_for(retried_twice, timeout=15.0)  # backoff 0.2 s, doubling
        # /metrics without an embedded broker: the Authority's counters, no connection gauge
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with http.get("/metrics", headers=headers) as response:
            assert response.status == 200
            text = await response.text()
    assert "iotbiz_mqtt_refused_logins_total 0.0" in text
    assert "iotbiz_mqtt_connections" not in text
    assert not platform.failed.is_set()


# -- principal_of across processes -----------------------------------------------------------


@pytest_asyncio.fixture
async def two_registrars(
    make_settings: Callable[..., Settings], db_path: Path
) -> AsyncIterator[tuple[Store, list[Authority], list[str]]]:
    """Two registrars, each with its own Authority following the store's changes, on one
    store: two platform processes behind one load balancer, as far as the callbacks go."""
    store = await Store.open(db_path)
    hasher = PasswordHasher(4, threads=1, max_queued=16)
    settings = make_settings(http={"host": "127.0.0.1"}, admin={"token": TOKEN})
    authorities = [
        Authority(store, hasher, service_username=SERVICE_USERNAME, service_password="pw")
        for _ in range(2)
    ]
    runners, urls, followers = [], [], []
    try:
        for authority in authorities:

            async def kick(username: str, *, drop_retained: bool) -> None:
                pass

            followers.append(asyncio.create_task(authority.follow_changes(kick, poll_s=0.05)))
            runner = web.AppRunner(create_app(settings, store, hasher=hasher, authority=authority))
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            runners.append(runner)
            urls.append(f"http://127.0.0.1:{runner.addresses[0][1]}")
        yield store, authorities, urls
    finally:
        for task in followers:
            task.cancel()
        for runner in runners:
            await runner.cleanup()
        hasher.close()
        await store.close()


async def test_a_login_on_one_process_is_known_to_the_other(
    two_registrars: tuple[Store, list[Authority], list[str]],
) -> None:
    store, _, (first, second) = two_registrars
    name = parse_device_name(DEVICE)
    assert name is not None
    await store.add_customer("abc123", 10, actor="test")
    async with aiohttp.ClientSession() as http:

        async def ask(url: str, path: str, form: dict[str, str]) -> tuple[int, str]:
            async with http.post(f"{url}{RABBIT}/{path}", data=form) as response:
                return response.status, await response.text()

        async with http.post(
            f"{first}/api/v1/register", json={"customer_id": "abc123", "mac_address": DEVICE[7:]}
        ) as response:
            password = (await response.json())["password"]
        topic = {
            "username": DEVICE,
            "vhost": "/",
            "resource": "topic",
            "name": "amq.topic",
            "permission": "write",
            "routing_key": "devices.abc123.aa:bb:cc:dd:ee:01.status",
        }
        vhost = {"username": DEVICE, "vhost": "/"}
        # pending: no login anywhere, and neither process knows the name
        assert await ask(first, "user", {"username": DEVICE, "password": password}) == (
            200,
            "deny",
        )
        assert await ask(second, "topic", topic) == (200, "deny")
        async with http.post(
            f"{first}/api/v1/activate",
            json={"customer_id": "abc123", "mac_address": DEVICE[7:], "password": password},
        ) as response:
            assert response.status == 200
        # the broker sent the login to the first process, the later checks to the second
        assert await ask(first, "user", {"username": DEVICE, "password": password}) == (
            200,
            "allow",
        )
        assert await ask(second, "vhost", vhost) == (200, "allow")
        assert await ask(second, "topic", topic) == (200, "allow")
        assert await ask(second, "topic", {**topic, "routing_key": "devices.x.y.status"}) == (
            200,
            "deny",
        )
        assert await ask(second, "topic", {**topic, "permission": "read"}) == (200, "deny")
        await store.revoke_device(name, actor="test")

        async def denied_on_both() -> bool:
            answers = [await ask(url, "topic", topic) for url in (first, second)]
            answers += [await ask(url, "vhost", vhost) for url in (first, second)]
            return answers == [(200, "deny")] * 4

        await wait_for(denied_on_both)


async def test_an_account_is_known_without_a_login_here(
    two_registrars: tuple[Store, list[Authority], list[str]],
) -> None:
    store, (authority, _), (_, second) = two_registrars
    await store.add_account("ops", await authority.hasher.hash("x"), superuser=False, actor="t")
    await store.add_account("root", await authority.hasher.hash("y"), superuser=True, actor="t")
    async with aiohttp.ClientSession() as http:

        async def topic(user: str, routing_key: str, permission: str) -> str:
            form = {
                "username": user,
                "vhost": "/",
                "resource": "topic",
                "name": "amq.topic",
                "permission": permission,
                "routing_key": routing_key,
            }
            async with http.post(f"{second}{RABBIT}/topic", data=form) as response:
                return await response.text()

        assert await topic("ops", "devices.#", "read") == "allow"
        assert await topic("ops", "devices.abc123.x.status", "write") == "deny"
        assert await topic("root", "anything.at.all", "write") == "allow"
        assert await topic(SERVICE_USERNAME, "devices.abc123.x.cmd", "write") == "allow"
        assert await topic("nobody", "devices.#", "read") == "deny"
        await store.remove_account("ops", actor="t")

        async def forgotten() -> bool:
            return await topic("ops", "devices.#", "read") == "deny"

        await wait_for(forgotten)


# -- the management API's failures ------------------------------------------------------------


async def test_a_failing_management_api_is_logged_once_and_never_raises(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A stand-in for RabbitMQ's management API (outside the project; the real one in
    tests/test_e2e_backends.py): 500 twice, then a list with one connection, which is closed."""
    calls: list[str] = []
    status = {"code": 500}

    async def listed(request: web.Request) -> web.Response:
        calls.append(f"GET {request.match_info['user']}")
        if status["code"] != 200:
            return web.Response(status=status["code"])
        return web.json_response([{"name": "127.0.0.1:5 -> 127.0.0.1:1883", "user": DEVICE}])

    async def close(request: web.Request) -> web.Response:
        assert request.headers["Authorization"] == "Basic YWRtaW46cHc="  # admin:pw
        calls.append(f"DELETE {request.match_info['user']} {request.headers['X-Reason']}")
        return web.Response(status=204)

    app = web.Application()
    app.router.add_get("/api/connections/username/{user}", listed)
    app.router.add_delete("/api/connections/username/{user}", close)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    caplog.set_level(logging.DEBUG, logger="iotbiz.broker.management")
    try:
        kick = ManagementKick(url, "admin", "pw")
        await kick(DEVICE, drop_retained=True)
        await kick(DEVICE, drop_retained=True)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        assert (
            warnings[0]
            .getMessage()
            .startswith(f"cannot disconnect {DEVICE} through the broker's management API {url} (")
        )
        status["code"] = 200
        await kick(DEVICE, drop_retained=True)
        assert kick.closed_connections == 1
        assert kick.failures == 2
        assert calls == [
            f"GET {DEVICE}",
            f"GET {DEVICE}",
            f"GET {DEVICE}",
            f"DELETE {DEVICE} IoTBiz: credentials revoked",
        ]
    finally:
        await runner.cleanup()
    # nothing listens there any more: still no exception
    unreachable = ManagementKick(url, "admin", "pw", timeout_s=2.0)
    await unreachable(DEVICE, drop_retained=False)
    assert unreachable.failures == 1


async def test_a_broker_ca_file_that_cannot_be_read_stops_the_start(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    missing = tmp_path / "missing-ca.pem"
    settings = external(
        make_settings, "mqtts://127.0.0.1:8883", service_password="pw", ca_file=str(missing)
    )
    platform = Platform(settings)
    with pytest.raises(ConfigError) as raised:
        await platform.start()
    assert str(raised.value) == f"broker.ca_file: cannot load {missing}: No such file or directory"
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    settings = external(
        make_settings, "mqtts://127.0.0.1:8883", service_password="pw", ca_file=str(garbage)
    )
    with pytest.raises(ConfigError) as raised:
        await Platform(settings).start()
    assert str(raised.value).startswith(f"broker.ca_file: cannot load {garbage}: ")


async def test_a_slow_kick_does_not_hold_up_forgetting_the_next_names(db_path: Path) -> None:
    """Two devices revoked together while the first one's kick hangs (a management API that
    does not answer): both are forgotten at once, so neither passes another check."""
    store = await Store.open(db_path)
    hasher = PasswordHasher(4, threads=1, max_queued=16)
    authority = Authority(store, hasher, service_username=SERVICE_USERNAME, service_password="x")
    names = [parse_device_name(f"abc123/aa:bb:cc:dd:ee:0{i}") for i in (1, 2)]
    await store.add_customer("abc123", 10, actor="test")
    hanging = asyncio.Event()
    kicked: list[str] = []

    async def kick(username: str, *, drop_retained: bool) -> None:
        kicked.append(username)
        if username == str(names[0]):
            hanging.set()
            await asyncio.Event().wait()  # never answers

    follower = asyncio.create_task(authority.follow_changes(kick, poll_s=0.05))
    try:
        for name in names:
            assert name is not None
            password_hash = await hasher.hash("pw")
            await store.register_device(name, password_hash, ttl_s=60, actor="test")
            assert await store.activate_device(name, password_hash, actor="test")
            assert not isinstance(await authority.authenticate(str(name), "pw", str(name)), Refusal)
        warm_ups = iter(range(100))

        async def following() -> bool:  # the follower has its cursor: revokes reach it
            if not kicked:
                warm_up = DeviceName("abc123", f"warm-up-{next(warm_ups)}")
                await store.register_device(warm_up, b"x", ttl_s=60, actor="test")
                await store.revoke_device(warm_up, actor="test")
            return bool(kicked)

        await wait_for(following)
        for name in names:
            assert name is not None
            await store.revoke_device(name, actor="test")
        await asyncio.wait_for(hanging.wait(), timeout=5)

        async def both_forgotten() -> bool:
            return [await authority.principal_of(str(name)) for name in names] == [None, None]

        await wait_for(both_forgotten)
        real = [username for username in kicked if "warm-up" not in username]
        assert real == [str(names[0])]  # the first kick still hangs
    finally:
        follower.cancel()
        await asyncio.wait([follower])
        hasher.close()
        await store.close()
