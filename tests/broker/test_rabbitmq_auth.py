"""RabbitMQ's (and EMQX's) HTTP auth asks the platform, which answers from the embedded rules.

Direct HTTP calls of each callback (good and bad inputs, exact bodies), then a real paho device on
a real private RabbitMQ node (tests/services/rabbitmq.py) whose auth backend is this platform.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from iotbiz.names import parse_device_name
from iotbiz.platform import SERVICE_USERNAME, Platform
from iotbiz.settings import Settings
from tests.broker.conftest import Enroll, wait_for
from tests.mqtt_device import PahoDevice
from tests.services.rabbitmq import RabbitNode, rabbitmq_node

RABBIT = "/api/v1/broker-auth/rabbitmq"
DEVICE = "abc123/aa:bb:cc:dd:ee:01"
OTHER = "abc123/aa:bb:cc:dd:ee:02"


@pytest.fixture(scope="module")
def rabbit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    with rabbitmq_node(tmp_path_factory.mktemp("rabbitmq")) as node:
        yield node


@pytest_asyncio.fixture
async def platform(
    make_settings: Callable[..., Settings], rabbit: RabbitNode
) -> AsyncIterator[Platform]:
    """The platform with its registrar on the port the node's auth backend asks."""
    running = Platform(make_settings(http={"host": "127.0.0.1", "port": rabbit.auth_port}))
    await running.start()
    await running.store.add_customer("abc123", 10, actor="test")
    try:
        yield running
    finally:
        await running.stop()


@pytest_asyncio.fixture
async def ask(platform: Platform) -> AsyncIterator[Callable[..., Any]]:
    """POST a form to a callback; (status, text)."""
    async with aiohttp.ClientSession(f"http://127.0.0.1:{platform.http_port}") as session:

        async def run(path: str, form: dict[str, str], **kwargs: Any) -> tuple[int, str]:
            async with session.post(f"{RABBIT}/{path}", data=form, **kwargs) as response:
                return response.status, await response.text()

        yield run


def topic_form(user: str, routing_key: str, permission: str) -> dict[str, str]:
    return {
        "username": user,
        "vhost": "/",
        "resource": "topic",
        "name": "amq.topic",
        "permission": permission,
        "routing_key": routing_key,
    }


def queue_form(user: str, queue: str, permission: str = "configure") -> dict[str, str]:
    return {
        "username": user,
        "vhost": "/",
        "resource": "queue",
        "name": queue,
        "permission": permission,
        "client_id": user,
    }


async def test_user_callback(ask: Callable[..., Any], enroll: Enroll) -> None:
    password = await enroll("aa:bb:cc:dd:ee:01")
    good = {"username": DEVICE, "password": password, "vhost": "/", "client_id": DEVICE}
    assert await ask("user", good) == (200, "allow")
    assert await ask("user", {**good, "password": "wrong"}) == (200, "deny")
    assert await ask("user", {**good, "client_id": OTHER}) == (200, "deny")
    assert await ask("user", {**good, "username": OTHER, "client_id": OTHER}) == (200, "deny")


async def test_later_checks_need_an_active_device(
    ask: Callable[..., Any], enroll: Enroll, platform: Platform
) -> None:
    """The checks after a login carry no password: they answer for names verified here or,
    since the login may have reached another platform process, active in the store."""
    vhost = {"username": DEVICE, "vhost": "/", "ip": "127.0.0.1"}
    status = topic_form(DEVICE, "devices.abc123.aa:bb:cc:dd:ee:01.status", "write")
    assert await ask("vhost", vhost) == (200, "deny")  # no such device yet
    assert await ask("topic", status) == (200, "deny")
    password = await enroll("aa:bb:cc:dd:ee:01")
    assert await ask("vhost", vhost) == (200, "allow")  # active, logged in elsewhere
    assert await ask("topic", status) == (200, "allow")
    assert await ask("vhost", {**vhost, "username": OTHER}) == (200, "deny")
    assert await ask("user", {"username": DEVICE, "password": password}) == (200, "allow")
    assert await ask("vhost", vhost) == (200, "allow")
    name = parse_device_name(DEVICE)
    assert name is not None
    await platform.store.revoke_device(name, actor="test")

    # the change feed makes the authority forget the name: every later check is denied
    async def denied() -> bool:
        return await ask("vhost", vhost) == (200, "deny")

    await wait_for(denied)


async def test_resource_callback(ask: Callable[..., Any], enroll: Enroll) -> None:
    password = await enroll("aa:bb:cc:dd:ee:01")
    assert await ask("user", {"username": DEVICE, "password": password}) == (200, "allow")
    exchange = {"username": DEVICE, "vhost": "/", "resource": "exchange", "name": "amq.topic"}
    assert await ask("resource", {**exchange, "permission": "write"}) == (200, "allow")
    assert await ask("resource", {**exchange, "permission": "read"}) == (200, "allow")
    assert await ask("resource", {**exchange, "permission": "configure"}) == (200, "deny")
    assert await ask("resource", {**exchange, "name": "amq.direct", "permission": "write"}) == (
        200,
        "deny",
    )
    for permission in ("configure", "read", "write"):
        form = queue_form(DEVICE, f"mqtt-subscription-{DEVICE}qos1", permission)
        assert await ask("resource", form) == (200, "allow")
    assert await ask("resource", queue_form(DEVICE, f"mqtt-subscription-{DEVICE}qos0")) == (
        200,
        "allow",
    )
    assert await ask("resource", queue_form(DEVICE, f"mqtt-subscription-{OTHER}qos1")) == (
        200,
        "deny",
    )
    assert await ask("resource", queue_form(DEVICE, "some-queue")) == (200, "deny")
    assert await ask("resource", {**exchange, "resource": "topic", "permission": "write"}) == (
        200,
        "deny",
    )


async def test_topic_callback(ask: Callable[..., Any], enroll: Enroll, platform: Platform) -> None:
    password = await enroll("aa:bb:cc:dd:ee:01")
    assert await ask("user", {"username": DEVICE, "password": password}) == (200, "allow")
    own = "devices.abc123.aa:bb:cc:dd:ee:01"
    other = "devices.abc123.aa:bb:cc:dd:ee:02"
    for subtopic in ("status", "telemetry", "events", "reply"):
        assert await ask("topic", topic_form(DEVICE, f"{own}.{subtopic}", "write")) == (
            200,
            "allow",
        )
    assert await ask("topic", topic_form(DEVICE, f"{own}.cmd", "write")) == (200, "deny")
    assert await ask("topic", topic_form(DEVICE, f"{other}.status", "write")) == (200, "deny")
    assert await ask("topic", topic_form(DEVICE, f"{own}.cmd", "read")) == (200, "allow")
    assert await ask("topic", topic_form(DEVICE, f"{other}.cmd", "read")) == (200, "deny")
    assert await ask("topic", topic_form(DEVICE, "devices.*.*.status", "read")) == (200, "deny")
    assert await ask("topic", topic_form(DEVICE, "", "write")) == (200, "deny")
    assert await ask("topic", {**topic_form(DEVICE, f"{own}.status", "write"), "name": "x"}) == (
        200,
        "deny",
    )
    # the service account: every device's topics to read, any device's cmd to write
    service = SERVICE_USERNAME
    assert await ask("topic", topic_form(service, "devices.#", "read")) == (200, "allow")
    assert await ask("topic", topic_form(service, "devices.*.*.status", "read")) == (200, "allow")
    assert await ask("topic", topic_form(service, f"{other}.cmd", "write")) == (200, "allow")
    assert await ask("topic", topic_form(service, f"{other}.status", "write")) == (200, "deny")
    assert await ask("topic", topic_form(service, "#", "read")) == (200, "deny")


async def test_bad_bodies(ask: Callable[..., Any]) -> None:
    assert await ask("user", {"username": DEVICE}) == (
        400,
        '{"error": "missing field(s): password"}',
    )
    status, text = await ask("topic", {"username": DEVICE, "name": "amq.topic"})
    assert (status, text) == (400, '{"error": "missing field(s): permission, routing_key"}')
    status, text = await ask("user", None, json={"username": DEVICE, "password": "x"})
    assert (status, text) == (400, '{"error": "expected a form-encoded body"}')


async def test_only_the_broker_is_answered(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(
        http={"host": "127.0.0.1"}, broker_auth={"allowed_addresses": "10.9.9.9"}
    )
    refused = '{"error": "broker callbacks answer only the broker\'s address"}'
    form = {"username": "x", "password": "y"}
    async with (
        started(settings) as url,
        aiohttp.ClientSession(url) as session,
        session.post(f"{RABBIT}/user", data=form) as r,
    ):
        assert (r.status, await r.text()) == (403, refused)
    settings = make_settings(http={"host": "127.0.0.1"}, broker_auth={"secret": "s3cret"})
    no_secret = '{"error": "broker callbacks need the broker\'s secret"}'
    async with started(settings) as url, aiohttp.ClientSession(url) as session:
        async with session.post(f"{RABBIT}/user", data=form) as r:
            assert (r.status, await r.text()) == (403, no_secret)
        async with session.post(f"{RABBIT}/user?secret=wrong", data=form) as r:
            assert (r.status, await r.text()) == (403, no_secret)
        async with session.post(f"{RABBIT}/user?secret=s3cret", data=form) as r:
            assert (r.status, await r.text()) == (200, "deny")
        headers = {"Authorization": "Bearer s3cret"}
        async with session.post(f"{RABBIT}/user", data=form, headers=headers) as r:
            assert (r.status, await r.text()) == (200, "deny")


@asynccontextmanager
async def started(settings: Settings) -> AsyncIterator[str]:
    """A platform with these settings; its registrar's URL."""
    running = Platform(settings)
    await running.start()
    try:
        yield f"http://127.0.0.1:{running.http_port}"
    finally:
        await running.stop()


# -- EMQX 5 (direct calls: no EMQX on the test machines) ------------------------------------


async def test_emqx_callbacks(platform: Platform, enroll: Enroll) -> None:
    password = await enroll("aa:bb:cc:dd:ee:01")
    emqx = "/api/v1/broker-auth/emqx"
    login = {"username": DEVICE, "password": password, "clientid": DEVICE}
    own, other = f"devices/{DEVICE}", f"devices/{OTHER}"
    async with aiohttp.ClientSession(f"http://127.0.0.1:{platform.http_port}") as session:

        async def ask(path: str, body: Any) -> tuple[int, Any]:
            async with session.post(f"{emqx}/{path}", json=body) as response:
                return response.status, await response.json()

        def authz(topic: str, action: str, clientid: str = DEVICE) -> dict[str, str]:
            return {"username": DEVICE, "clientid": clientid, "topic": topic, "action": action}

        deny, allow = {"result": "deny"}, {"result": "allow"}
        # not a device: denied; an active device's later checks are answered without a login
        # here (it may have logged in through another platform process)
        unknown = {**authz(f"{other}/status", "publish", OTHER), "username": OTHER}
        assert await ask("authz", unknown) == (200, deny)
        assert await ask("authn", {**login, "password": "wrong"}) == (
            200,
            {"result": "deny", "is_superuser": False},
        )
        assert await ask("authn", {**login, "clientid": OTHER}) == (
            200,
            {"result": "deny", "is_superuser": False},
        )
        assert await ask("authn", login) == (200, {"result": "allow", "is_superuser": False})
        assert await ask("authz", authz(f"{own}/status", "publish")) == (200, allow)
        assert await ask("authz", authz(f"{own}/cmd", "subscribe")) == (200, allow)
        assert await ask("authz", authz(f"{own}/cmd", "publish")) == (200, deny)
        assert await ask("authz", authz(f"{other}/status", "publish")) == (200, deny)
        assert await ask("authz", authz(f"{other}/cmd", "subscribe")) == (200, deny)
        assert await ask("authz", authz("devices/#", "subscribe")) == (200, deny)
        assert await ask("authz", authz(f"{own}/status", "publish", OTHER)) == (200, deny)
        assert await ask("authz", authz(f"{own}/status", "all")) == (200, deny)
        bad = {"error": "expected a JSON object of strings"}
        assert await ask("authn", ["x"]) == (400, bad)
        assert await ask("authn", {**login, "password": 1}) == (400, bad)
        missing = {"error": "missing field(s): clientid"}
        assert await ask("authn", {"username": DEVICE, "password": password}) == (400, missing)
        missing = {"error": "missing field(s): topic, action"}
        assert await ask("authz", {"username": DEVICE, "clientid": DEVICE}) == (400, missing)


# -- a real paho device on the real RabbitMQ -------------------------------------------------


async def test_a_device_on_rabbitmq_uses_its_own_topics_only(
    rabbit: RabbitNode, enroll: Enroll, platform: Platform
) -> None:
    password = await enroll("aa:bb:cc:dd:ee:01")
    other_password = await enroll("aa:bb:cc:dd:ee:02")
    port = rabbit.mqtt_port
    device, other = PahoDevice(port, DEVICE, password), PahoDevice(port, OTHER, other_password)
    service = PahoDevice(port, "ops", await operator(platform), client_id="ops1")
    try:
        for client in (device, other, service):
            assert await client.connect() == 0
        assert await device.subscribe(f"devices/{DEVICE}/cmd") == [1]
        assert await service.subscribe("devices/+/+/status") == [1]
        await other.publish(f"devices/{OTHER}/status", "online")  # its own topic
        message = await service.next_message()
        assert message is not None
        assert message.topic == f"devices/{OTHER}/status"
        await service.publish(f"devices/{DEVICE}/cmd", '{"id": "1"}')  # the service role
        message = await device.next_message()
        assert message is not None
        assert message.topic == f"devices/{DEVICE}/cmd"
        # another device's topic: RabbitMQ 3.10 closes the connection (no SUBACK 0x80)
        other.client.publish(f"devices/{DEVICE}/status", "spoofed", qos=1)
        assert await other.wait_disconnected()
        device.client.subscribe(f"devices/{OTHER}/cmd", 1)
        assert await device.wait_disconnected()
    finally:
        for client in (device, other, service):
            client.close()
    assert platform.authority is not None
    assert platform.authority.denied_publishes == 1


async def operator(platform: Platform) -> str:
    """An operator account (the service role) and its password."""
    assert platform.authority is not None
    password_hash = await platform.authority.hasher.hash("operator-password")
    await platform.store.add_account("ops", password_hash, superuser=False, actor="test")
    return "operator-password"


async def test_bad_passwords_are_refused_by_rabbitmq(
    rabbit: RabbitNode, enroll: Enroll, platform: Platform
) -> None:
    password = await enroll("aa:bb:cc:dd:ee:01")
    for user, secret in ((DEVICE, "wrong"), (OTHER, password), ("nobody", password)):
        device = PahoDevice(rabbit.mqtt_port, user, secret)
        try:
            # CONNACK 4 or 5, which paho reports as reason codes 134 or 135
            assert await device.connect() in (134, 135), user
        finally:
            device.close()
    assert platform.authority is not None
    assert platform.authority.refused_logins >= 3
