"""Devices on a 3-node RabbitMQ cluster whose HTTP auth backend is the platform (issue 12).

One cluster for the module (tests/services/rabbitmq.py: rabbitmq_cluster, about 30 s to
start); each test has its own platform in external-broker mode (its service client on node 1,
its registrar on the cluster's auth port, a fresh SQLite store), its own devices enrolled over
HTTP and real paho clients (client id = username) spread over the nodes. What the platform
sees is checked through the admin API; the MQTT-level checks use an observer, a superuser
operator account subscribed to devices/#.

The node-stop tests come last: they stop node 3, move its devices to the other nodes (what a
TCP load balancer in front of the cluster does in production: here the test's reconnect logic
picks another node's port), check that they carry on, and start node 3 again. The last one
has that balancer (tests/services/balancer.py) in front of the nodes, for the platform and
the devices alike, and stops the node that the platform's own service client was sent to.
Their devices keep persistent sessions as the agent does (clean_session false), which needs
`mqtt.durable_queue_type = quorum` (the harness sets it): with RabbitMQ's default, a classic
queue on the node the device first used, a device from the stopped node got no SUBACK on
another node for 90 s, until its old node came back.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import paho.mqtt.client as mqtt
import pytest
import pytest_asyncio

from iotbiz.platform import SERVICE_USERNAME, Platform
from iotbiz.settings import Settings
from tests.mqtt_device import PahoDevice
from tests.services.balancer import Balancer
from tests.services.rabbitmq import RabbitCluster, RabbitNode, free_port, rabbitmq_cluster

# the module's cluster starts inside its first test's time
pytestmark = pytest.mark.timeout(420)
CUSTOMER = "abc123"
OBSERVER_PASSWORD = "observer-password"
TOKEN = "cluster-test-token"
SERVICE_PASSWORD = "cluster-service-password"
MOVE_TIMEOUT_S = 90.0  # bound on a device's move to another node after its node stopped


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitCluster]:
    with rabbitmq_cluster(tmp_path_factory.mktemp("rabbitmq-cluster"), nodes=3) as running:
        print(f"\ncluster of 3 nodes ready in {running.start_s:.1f} s")
        yield running


@pytest_asyncio.fixture
async def platform(
    make_settings: Callable[..., Settings], cluster: RabbitCluster
) -> AsyncIterator[Platform]:
    """The platform in external mode on node 1, its registrar on the port every node's auth
    backend asks; revoked devices are closed through node 1's management API."""
    url = f"mqtt://127.0.0.1:{cluster.node(1).mqtt_port}"
    async with platform_on(make_settings, cluster, url, cluster.node(1)) as running:
        yield running


@asynccontextmanager
async def platform_on(
    make_settings: Callable[..., Settings], cluster: RabbitCluster, url: str, node: RabbitNode
) -> AsyncIterator[Platform]:
    """A started platform whose service client uses the broker at `url` and `node`'s
    management API; customer CUSTOMER and the superuser account `observer` exist."""
    settings = make_settings(
        http={"host": "127.0.0.1", "port": cluster.auth_port},
        admin={"token": TOKEN},
        broker={
            "mode": "external",
            "url": url,
            "service_password": SERVICE_PASSWORD,
            "management_url": node.management_url,
            "management_user": node.management_user,
            "management_password": node.management_password,
        },
    )
    running = Platform(settings)
    await running.start()
    try:
        await healthy(running)
        await running.store.add_customer(CUSTOMER, 20, actor="test")
        assert running.authority is not None
        password_hash = await running.authority.hasher.hash(OBSERVER_PASSWORD)
        await running.store.add_account("observer", password_hash, superuser=True, actor="test")
        yield running
    finally:
        await running.stop()


async def healthy(platform: Platform, timeout: float = 30.0) -> None:
    """Wait for /healthz 200: in external mode, the service client is connected and subscribed
    to the devices' topics. (A device's retained status on node 3 does not reach a service
    client subscribing on node 1 later: retained messages stay on their node.)"""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(f"http://127.0.0.1:{platform.http_port}") as session:
        while True:
            async with session.get("/healthz") as response:
                if response.status == 200:
                    return
                body = await response.text()
            if time.monotonic() > deadline:
                raise AssertionError(f"/healthz after {timeout} s: {response.status} {body}")
            await asyncio.sleep(0.05)


@pytest_asyncio.fixture
async def admin(platform: Platform) -> AsyncIterator[Admin]:
    async with aiohttp.ClientSession(
        f"http://127.0.0.1:{platform.http_port}/api/v1/admin/",
        headers={"Authorization": f"Bearer {TOKEN}"},
    ) as session:
        yield Admin(session)


class Admin:
    """The admin API as an operator uses it."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    async def device(self, name: str) -> dict[str, Any]:
        async with self.session.get(f"devices/{name}") as response:
            assert response.status == 200, await response.text()
            body: dict[str, Any] = await response.json()
            return body

    async def wait_device(
        self, name: str, check: Callable[[dict[str, Any]], bool], timeout: float = 15.0
    ) -> dict[str, Any]:
        """Poll the device until `check` holds for it; the device then."""
        deadline = time.monotonic() + timeout
        while True:
            device = await self.device(name)
            if check(device):
                return device
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} after {timeout} s: {device}")
            await asyncio.sleep(0.1)

    async def command(self, name: str, action: str) -> str:
        """Send a command; its id."""
        body = {"device": name, "action": action, "expires_in_s": 120}
        async with self.session.post("commands", json=body) as response:
            assert response.status == 201, await response.text()
            return str((await response.json())["commands"][0]["id"])

    async def wait_sent(self, command_id: str, timeout: float = 15.0) -> None:
        """Poll the command until the platform has published it."""
        deadline = time.monotonic() + timeout
        while True:
            async with self.session.get(f"commands/{command_id}") as response:
                state = (await response.json())["state"]
            if state == "sent":
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"command {command_id} still {state} after {timeout} s")
            await asyncio.sleep(0.05)

    async def wait_command(self, command_id: str) -> dict[str, Any]:
        async with self.session.get(f"commands/{command_id}", params={"wait": "20"}) as response:
            assert response.status == 200, await response.text()
            body: dict[str, Any] = await response.json()
            return body


async def enroll(platform: Platform, device_id: str) -> str:
    """Register and activate a device of CUSTOMER over HTTP; its password."""
    async with aiohttp.ClientSession(f"http://127.0.0.1:{platform.http_port}") as session:
        body: dict[str, Any] = {"customer_id": CUSTOMER, "mac_address": device_id}
        async with session.post("/api/v1/register", json=body) as response:
            assert response.status == 201, await response.text()
            body["password"] = (await response.json())["password"]
        async with session.post("/api/v1/activate", json=body) as response:
            assert response.status == 200, await response.text()
    return str(body["password"])


class Device:
    """An enrolled device's credentials and its current paho connection to one node."""

    def __init__(self, device_id: str, password: str, **options: Any) -> None:
        self.name = f"{CUSTOMER}/{device_id}"
        self.password = password
        self.options = options
        self.client: PahoDevice | None = None
        self.node = 0

    @property
    def paho(self) -> PahoDevice:
        assert self.client is not None, f"{self.name} is not connected"
        return self.client

    def topic(self, suffix: str) -> str:
        return f"devices/{self.name}/{suffix}"

    async def connect(self, cluster: RabbitCluster, number: int, *, subscribe: bool = True) -> int:
        """Connect to node `number` and subscribe to its cmd; the CONNACK code."""
        return await self.connect_to(cluster.node(number).mqtt_port, number, subscribe=subscribe)

    async def connect_to(self, port: int, number: int, *, subscribe: bool = True) -> int:
        """Connect to `port` (node `number`, or a balancer) and subscribe to its cmd; the
        CONNACK code."""
        self.close()
        self.client = PahoDevice(port, self.name, self.password, **self.options)
        self.node = number
        code = await self.client.connect()
        if code == 0 and subscribe:
            assert await self.client.subscribe(self.topic("cmd")) == [1]
        return code

    async def say_online(self) -> None:
        """What the agent does first on every connection: a retained `online` status."""
        status = {"state": "online", "agent_version": "test", "ts": time.time()}
        await self.paho.publish(self.topic("status"), json.dumps(status), retain=True)

    async def answer_command(self) -> str:
        """Take the next command and answer it ok, with the node it came through; its id."""
        command = payload(await next_on(self.paho, self.topic("cmd")))
        answer = {"id": command["id"], "ok": True, "result": {"node": self.node}}
        await self.paho.publish(self.topic("reply"), json.dumps(answer))
        return str(command["id"])

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


async def devices_on(
    platform: Platform, cluster: RabbitCluster, placement: dict[str, int], **options: Any
) -> dict[str, Device]:
    """Enroll each device id and connect it to its node number."""
    devices = {}
    for device_id, number in placement.items():
        device = Device(device_id, await enroll(platform, device_id), **options)
        devices[device_id] = device
        assert await device.connect(cluster, number) == 0, device.name
    return devices


async def observer_on(cluster: RabbitCluster, number: int, client_id: str) -> PahoDevice:
    """The superuser operator account connected to node `number`, subscribed to devices/#."""
    observer = PahoDevice(
        cluster.node(number).mqtt_port, "observer", OBSERVER_PASSWORD, client_id=client_id
    )
    assert await observer.connect() == 0
    assert await observer.subscribe("devices/#") == [1]
    return observer


async def next_on(client: PahoDevice, topic: str, timeout: float = 15.0) -> mqtt.MQTTMessage:
    """The next message `client` receives on `topic` (others are passed over)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        message = await client.next_message(timeout=left)
        if message is not None and message.topic == topic:
            return message
    raise AssertionError(f"no message on {topic} within {timeout} s")


def showing(telemetry: dict[str, Any]) -> Callable[[dict[str, Any]], bool]:
    """A check of a device from the admin API: its last telemetry is this."""
    return lambda device: bool(device["telemetry"] == telemetry)


def payload(message: mqtt.MQTTMessage) -> Any:
    return json.loads(message.payload)


def close_all(clients: Sequence[PahoDevice | Device]) -> None:
    for client in clients:
        client.close()


async def test_the_cluster_is_one_cluster_of_three(cluster: RabbitCluster) -> None:
    names = {f"rabbit-{n}@localhost" for n in (1, 2, 3)}
    for number in (1, 2, 3):
        assert await asyncio.to_thread(cluster.running_members, number) == names
    assert len({node.mqtt_port for node in cluster.nodes}) == 3
    assert {node.auth_port for node in cluster.nodes} == {cluster.auth_port}


async def test_the_platform_on_node_1_follows_and_commands_devices_on_every_node(
    cluster: RabbitCluster, platform: Platform, admin: Admin
) -> None:
    devices = await devices_on(
        platform, cluster, {"aa:bb:cc:00:01:01": 1, "aa:bb:cc:00:01:02": 2, "aa:bb:cc:00:01:03": 3}
    )
    try:
        for device in devices.values():
            await device.say_online()
        three = devices["aa:bb:cc:00:01:03"]
        telemetry = {"cpu_percent": 12.5, "memory_percent": 40.0, "apps": []}
        await three.paho.publish(three.topic("telemetry"), json.dumps(telemetry))
        seen = await admin.wait_device(three.name, showing(telemetry))
        assert seen["online"] is True
        assert seen["status"]["state"] == "online"
        # a command from the platform (node 1) to each node's device, answered through it
        for device in devices.values():
            await admin.wait_device(device.name, lambda d: d["online"] is True)
            command_id = await admin.command(device.name, "ping")
            assert await device.answer_command() == command_id
            done = await admin.wait_command(command_id)
            assert (done["state"], done["result"]) == ("done", {"node": device.node})
    finally:
        close_all(list(devices.values()))


async def test_a_device_may_not_use_another_devices_topics_across_nodes(
    cluster: RabbitCluster, platform: Platform
) -> None:
    devices = await devices_on(platform, cluster, {"aa:bb:cc:00:02:01": 1, "aa:bb:cc:00:02:02": 2})
    one, two = devices.values()
    observer = await observer_on(cluster, 3, "observer-3")
    try:
        # RabbitMQ 3.10 closes the connection of a denied publish (MQTT 3.1.1 has no PUBACK
        # refusal); the spoofed message reaches nobody: the observer's next message on that
        # topic is the one that device 2 publishes afterwards
        one.paho.client.publish(two.topic("status"), '{"state": "spoofed"}', qos=1)
        assert await one.paho.wait_disconnected()
        await two.paho.publish(two.topic("status"), '{"state": "online"}')
        assert payload(await next_on(observer, two.topic("status"))) == {"state": "online"}
        # nor subscribe to device 2's commands from node 1
        assert await one.connect(cluster, 1) == 0
        one.paho.client.subscribe(two.topic("cmd"), 1)
        assert await one.paho.wait_disconnected()
        # a device's own client id only, whichever node it asks
        thief = PahoDevice(cluster.node(2).mqtt_port, one.name, one.password, client_id=two.name)
        try:
            assert await thief.connect() in (134, 135)  # CONNACK 4 or 5
        finally:
            thief.close()
        assert platform.authority is not None
        assert platform.authority.denied_publishes == 1
    finally:
        close_all([observer, *devices.values()])


async def test_retained_messages_stay_on_their_node_and_qos_2_is_1(
    cluster: RabbitCluster, platform: Platform
) -> None:
    """Facts of RabbitMQ 3.10 that the platform must live with: the MQTT plugin keeps retained
    messages in a store per node (not replicated), and grants QoS 1 for a QoS 2 subscription."""
    devices = await devices_on(platform, cluster, {"aa:bb:cc:00:03:03": 3})
    (three,) = devices.values()
    topic = three.topic("status")
    await three.paho.publish(topic, '{"state": "online", "n": 1}', retain=True)
    same_node = PahoDevice(cluster.node(3).mqtt_port, "observer", OBSERVER_PASSWORD, client_id="o3")
    other_node = PahoDevice(
        cluster.node(1).mqtt_port, "observer", OBSERVER_PASSWORD, client_id="o1"
    )
    try:
        assert await same_node.connect() == 0
        assert await same_node.subscribe(topic, qos=2) == [1]  # QoS 2 -> 1
        retained = await next_on(same_node, topic)
        assert (retained.retain, payload(retained)) == (True, {"state": "online", "n": 1})
        assert await other_node.connect() == 0
        assert await other_node.subscribe(topic, qos=1) == [1]
        # a retained message comes right after the SUBACK, before any later publish: the
        # first message on node 1 is the live one, so node 1 had nothing retained
        await three.paho.publish(topic, '{"state": "online", "n": 2}')
        live = await next_on(other_node, topic)
        assert (live.retain, payload(live)) == (False, {"state": "online", "n": 2})
    finally:
        close_all([same_node, other_node, *devices.values()])


async def test_a_device_revoked_on_node_3_is_closed_through_node_1s_management_api(
    cluster: RabbitCluster, platform: Platform, admin: Admin
) -> None:
    """The platform knows one management URL (node 1's); the management API lists and closes
    connections of the whole cluster."""
    devices = await devices_on(platform, cluster, {"aa:bb:cc:00:06:03": 3})
    (three,) = devices.values()
    try:
        await three.say_online()
        await admin.wait_device(three.name, lambda d: d["online"] is True)
        async with admin.session.post(f"devices/{three.name}/revoke") as response:
            assert response.status == 200, await response.text()
            assert (await response.json())["state"] == "revoked"
        assert await three.paho.wait_disconnected(15.0)
        for number in (3, 1):
            assert await three.connect(cluster, number) in (134, 135)  # CONNACK 4 or 5
    finally:
        close_all(list(devices.values()))


# -- a node stops: its devices move to the others (last: they stop and start node 3) ----------


async def move(device: Device, cluster: RabbitCluster, to: Sequence[int], since: float) -> float:
    """The test's reconnect logic, a load balancer's part in production: once the device has
    lost its connection, connect it to the nodes `to` in turn until one accepts it; the
    seconds from `since` until it was connected and subscribed again."""
    assert await device.paho.wait_disconnected(MOVE_TIMEOUT_S), f"{device.name} kept its link"
    deadline = since + MOVE_TIMEOUT_S
    attempt, last = 0, "no attempt"
    while time.monotonic() < deadline:
        number = to[attempt % len(to)]
        attempt += 1
        try:
            code = await device.connect(cluster, number)
        except (OSError, AssertionError) as exc:  # refused, or no CONNACK in time
            code, last = -1, f"{type(exc).__name__}: {exc}"
        if code == 0:
            return time.monotonic() - since
        last = last if code == -1 else f"CONNACK {code} from node {number}"
        await asyncio.sleep(0.2)
    raise AssertionError(f"{device.name} not back within {MOVE_TIMEOUT_S} s: {last}")


@pytest.mark.parametrize("crash", [False, True], ids=["stopped", "crashed"])
async def test_node_3_stops_and_its_devices_carry_on_through_the_others(
    cluster: RabbitCluster, platform: Platform, admin: Admin, crash: bool
) -> None:
    """Devices with persistent sessions, as the agent's (clean_session false): on node 3 one
    connected, one away with a command waiting in its session; a third on node 2 stays."""
    base = "aa:bb:cc:00:05" if crash else "aa:bb:cc:00:04"
    placement = {f"{base}:31": 3, f"{base}:32": 3, f"{base}:21": 2}
    devices = await devices_on(platform, cluster, placement, clean_session=False)
    connected, away, stays = devices.values()
    try:
        for device in devices.values():
            await device.say_online()
            await admin.wait_device(device.name, lambda d: d["online"] is True)
        # away: gone without a will, so the platform sends its command at once; the command
        # waits in the session's queue (a quorum queue, on every node) for the device
        away.close()
        waiting = await admin.command(away.name, "ping")
        await admin.wait_sent(waiting)
        since = time.monotonic()
        stopping = asyncio.create_task(asyncio.to_thread(cluster.stop_node, 3, crash=crash))
        back_s = await move(connected, cluster, [1], since)
        await stopping
        stop_s = time.monotonic() - since
        assert await away.connect(cluster, 2, subscribe=False) == 0  # its old session
        assert await away.answer_command() == waiting
        assert (await admin.wait_command(waiting))["state"] == "done"
        # they carry on: telemetry reaches the platform, a command reaches them on a new node
        for device in (connected, away):
            await device.say_online()
            telemetry = {"cpu_percent": 50.0 + device.node, "apps": []}
            await device.paho.publish(device.topic("telemetry"), json.dumps(telemetry))
            await admin.wait_device(device.name, showing(telemetry))
        for device in (connected, away, stays):
            command_id = await admin.command(device.name, "ping")
            assert await device.answer_command() == command_id
            done = await admin.wait_command(command_id)
            assert (done["state"], done["result"]) == ("done", {"node": device.node})
        print(
            f"\nnode 3 {'killed' if crash else 'stopped'} (its process gone after"
            f" {stop_s:.2f} s): a device back on node 1 after {back_s:.2f} s; all three"
            f" answering commands after {time.monotonic() - since:.2f} s"
        )
    finally:
        close_all(list(devices.values()))
        if not cluster.is_running(3):
            rejoin_s = await asyncio.to_thread(cluster.start_node, 3)
            print(f"node 3 back in the cluster after {rejoin_s:.1f} s")


async def test_behind_a_balancer_the_platforms_node_stops_and_all_reconnect_to_one_address(
    cluster: RabbitCluster, make_settings: Callable[..., Settings]
) -> None:
    """The production layout: the platform and the devices know one address, a TCP load
    balancer in front of the three nodes (tests/services/balancer.py). The node that the
    platform's service client was sent to stops; the service client reconnects by itself (its
    own backoff), the devices on that node by the test's loop, to the same address."""
    balancer = Balancer(free_port())
    balancer.backends = [node.mqtt_port for node in cluster.nodes]
    await balancer.start()
    port = balancer.port
    url = f"mqtt://127.0.0.1:{port}"
    devices: list[Device] = []
    stopped = 0
    try:
        async with platform_on(make_settings, cluster, url, cluster.node(1)) as platform:
            # the service client's node (where its one connection is, by the management API)
            stopped = await wait_connected(cluster, SERVICE_USERNAME)
            print(f"\nthe platform's service client is on node {stopped}")
            admin_url = f"http://127.0.0.1:{platform.http_port}/api/v1/admin/"
            headers = {"Authorization": f"Bearer {TOKEN}"}
            async with aiohttp.ClientSession(admin_url, headers=headers) as session:
                admin = Admin(session)
                for device_id in ("aa:bb:cc:00:09:01", "aa:bb:cc:00:09:02", "aa:bb:cc:00:09:03"):
                    password = await enroll(platform, device_id)
                    device = Device(device_id, password, clean_session=False)
                    devices.append(device)
                    assert await device.connect_to(port, 0) == 0
                    device.node = await wait_connected(cluster, device.name)
                    await device.say_online()
                    await admin.wait_device(device.name, lambda d: d["online"] is True)
                assert sorted(d.node for d in devices) == [1, 2, 3]  # in turn
                moving = next(d for d in devices if d.node == stopped)
                next_node = stopped % 3 + 1  # one that keeps running, for the management API
                since = time.monotonic()
                stopping = asyncio.create_task(asyncio.to_thread(cluster.stop_node, stopped))
                assert await moving.paho.wait_disconnected(MOVE_TIMEOUT_S)
                while time.monotonic() - since < MOVE_TIMEOUT_S:
                    if await moving.connect_to(port, 0) == 0:
                        break
                    await asyncio.sleep(0.2)
                device_s = time.monotonic() - since
                moving.node = await wait_connected(cluster, moving.name, via=next_node)
                assert moving.node != stopped
                await healthy(platform, MOVE_TIMEOUT_S)
                platform_s = time.monotonic() - since
                await stopping
                for device in devices:
                    command_id = await admin.command(device.name, "ping")
                    assert await device.answer_command() == command_id
                    done = await admin.wait_command(command_id)
                    assert (done["state"], done["result"]) == ("done", {"node": device.node})
                print(
                    f"\nnode {stopped} (the platform's) stopped behind the balancer: its device"
                    f" back after {device_s:.2f} s, the platform's service client after"
                    f" {platform_s:.2f} s; all answering commands after"
                    f" {time.monotonic() - since:.2f} s"
                )
    finally:
        close_all(devices)
        await balancer.stop()
        if stopped and not cluster.is_running(stopped):
            rejoin_s = await asyncio.to_thread(cluster.start_node, stopped)
            print(f"node {stopped} back in the cluster after {rejoin_s:.1f} s")


async def wait_connected(
    cluster: RabbitCluster, user: str, via: int = 1, timeout: float = 30.0
) -> int:
    """The node number of `user`'s one connection, once node `via`'s management API lists it
    (the nodes' connection lists reach it every few seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        listed = await asyncio.to_thread(cluster.connections, via)
        found = [n for u, n in listed if u == user]
        if len(found) == 1:
            return found[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"{user}: connections on nodes {found} after {timeout} s")
        await asyncio.sleep(0.5)
