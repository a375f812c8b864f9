"""Devices on a 3-node RabbitMQ cluster whose HTTP auth backend is the platform (issue 12).

One cluster for the module (tests/services/rabbitmq.py: rabbitmq_cluster, about 30 s to
start); each test has its own platform (its registrar on the cluster's auth port, a fresh
SQLite store), its own devices enrolled over HTTP and real paho clients (client id = username)
spread over the nodes. The observer is a superuser operator account subscribed to devices/#.

The node-stop tests come last: they stop node 3, move its devices to the other nodes (what a
TCP load balancer in front of the cluster does in production: here the test's reconnect logic
picks another node's port), check that they carry on, and start node 3 again.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import aiohttp
import paho.mqtt.client as mqtt
import pytest
import pytest_asyncio

from iotbiz.platform import Platform
from iotbiz.settings import Settings
from tests.mqtt_device import PahoDevice
from tests.services.rabbitmq import RabbitCluster, rabbitmq_cluster

# the module's cluster starts inside its first test's time
pytestmark = pytest.mark.timeout(420)
CUSTOMER = "abc123"
OBSERVER_PASSWORD = "observer-password"
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
    """The platform with its registrar on the port every node's auth backend asks."""
    running = Platform(make_settings(http={"host": "127.0.0.1", "port": cluster.auth_port}))
    await running.start()
    await running.store.add_customer(CUSTOMER, 20, actor="test")
    assert running.authority is not None
    password_hash = await running.authority.hasher.hash(OBSERVER_PASSWORD)
    await running.store.add_account("observer", password_hash, superuser=True, actor="test")
    try:
        yield running
    finally:
        await running.stop()


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

    async def connect(self, cluster: RabbitCluster, number: int) -> int:
        """Connect to node `number` and subscribe to its cmd; the CONNACK code."""
        self.close()
        self.client = PahoDevice(
            cluster.node(number).mqtt_port, self.name, self.password, **self.options
        )
        self.node = number
        code = await self.client.connect()
        if code == 0:
            assert await self.client.subscribe(self.topic("cmd")) == [1]
        return code

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


async def test_telemetry_and_commands_cross_the_nodes(
    cluster: RabbitCluster, platform: Platform
) -> None:
    devices = await devices_on(
        platform, cluster, {"aa:bb:cc:00:01:01": 1, "aa:bb:cc:00:01:02": 2, "aa:bb:cc:00:01:03": 3}
    )
    one, two, three = devices.values()
    observer = await observer_on(cluster, 1, "observer-1")
    try:
        # a device on node 3 -> the observer on node 1
        status = {"state": "online", "agent_version": "test", "ts": 1}
        await three.paho.publish(three.topic("status"), json.dumps(status), retain=True)
        await three.paho.publish(three.topic("telemetry"), json.dumps({"cpu_percent": 12.5}))
        assert payload(await next_on(observer, three.topic("status"))) == status
        assert payload(await next_on(observer, three.topic("telemetry"))) == {"cpu_percent": 12.5}
        # a command from node 1 -> the device on node 2, its reply back to node 1
        command = {"id": "c-1", "action": "ping", "args": {}, "expires_at": 0}
        await observer.publish(two.topic("cmd"), json.dumps(command))
        assert payload(await next_on(two.paho, two.topic("cmd"))) == command
        await two.paho.publish(two.topic("reply"), json.dumps({"id": "c-1", "ok": True}))
        assert payload(await next_on(observer, two.topic("reply"))) == {"id": "c-1", "ok": True}
        # and node 1 -> node 3
        await one.paho.publish(one.topic("events"), '{"event": "hello"}')
        observer_3 = await observer_on(cluster, 3, "observer-3")
        try:
            await one.paho.publish(one.topic("events"), '{"event": "again"}')
            assert payload(await next_on(observer_3, one.topic("events"))) == {"event": "again"}
        finally:
            observer_3.close()
    finally:
        close_all([observer, *devices.values()])


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
