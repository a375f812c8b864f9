"""Several platform processes (real child processes) on one PostgreSQL store: the device limit
holds across them, and behind one RabbitMQ broker exactly one dispatches; when it is killed
(SIGKILL) another takes over and a command queued meanwhile is answered, once.

The broker's HTTP auth backend reaches the processes through a TCP balancer on its auth port
(tests/services/balancer.py, what nginx does in production), round robin, so each process
answers callbacks for logins another one verified.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import signal
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from iotbiz.store.postgres import PostgresStore
from tests.mqtt_device import PahoDevice
from tests.processes import PlatformProcess, platform_process
from tests.services.balancer import Balancer
from tests.services.postgres import PostgresServer
from tests.services.rabbitmq import RabbitNode, rabbitmq_node

pytestmark = pytest.mark.timeout(180)

TOKEN = "scale-out-admin-token"
CUSTOMER = "fleet"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}
WAIT_S = 30.0  # generous: two platforms, PostgreSQL and RabbitMQ share two cores
LEADS = re.compile(r"leader: FOLLOWER -> LEADER")


@pytest_asyncio.fixture
async def database(postgres_server: PostgresServer) -> AsyncIterator[str]:
    url = await postgres_server.create_database()
    store = await PostgresStore.open(url)  # migrated once, before the processes start
    await store.add_customer(CUSTOMER, 10, actor="test")
    await store.close()
    yield url
    await postgres_server.drop_database(url)


def write_config(folder: Path, url: str, broker: dict[str, str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        "[store]", f'url = "{url}"', f'path = "{folder / "unused.db"}"',
        "[admin]", f'token = "{TOKEN}"',
        "[http]", 'host = "127.0.0.1"',
    ]  # fmt: skip
    if broker:
        lines.append("[broker]")
        lines += [f'{key} = "{value}"' for key, value in broker.items()]
    config = folder / "platform.toml"
    config.write_text("\n".join(lines) + "\n")
    return config


async def until(condition: Any, *, timeout: float, what: str) -> float:
    """Poll the (async) condition; the seconds it took."""
    started = time.monotonic()
    while not await condition():
        assert time.monotonic() - started < timeout, f"{what}: not within {timeout} s"
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def test_the_device_limit_holds_across_two_processes(tmp_path: Path, database: str) -> None:
    """50 concurrent registrations, 25 through each process, against a limit of 10."""
    with ExitStack() as stack:
        platforms = [
            stack.enter_context(
                platform_process(
                    tmp_path / name, "--config", str(write_config(tmp_path / name, database))
                )
            )
            for name in ("a", "b")
        ]

        async def register(platform: PlatformProcess, index: int) -> tuple[int, Any]:
            body = {"customer_id": CUSTOMER, "mac_address": f"dev-{index:02d}"}
            async with http.post(f"{platform.url}/api/v1/register", json=body) as response:
                return response.status, await response.json()

        async with aiohttp.ClientSession() as http:
            answers = await asyncio.gather(*(register(platforms[i % 2], i) for i in range(50)))
        created = [answer for answer in answers if answer[0] == 201]
        refused = [answer for answer in answers if answer[0] != 201]
        assert len(created) == 10, answers
        assert refused == [(403, {"error": "device limit reached"})] * 40
        assert {i % 2 for i, answer in enumerate(answers) if answer[0] == 201} == {0, 1}, (
            "one process took every registration: the race was not across processes"
        )
    store = await PostgresStore.open(database)
    try:
        customer = await store.get_customer(CUSTOMER)
        assert customer is not None
        assert (customer.pending_devices, customer.active_devices) == (10, 0)
    finally:
        await store.close()


@pytest.fixture(scope="module")
def rabbit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    with rabbitmq_node(tmp_path_factory.mktemp("rabbitmq")) as node:
        yield node


async def test_the_dispatcher_dies_and_the_other_process_takes_over(
    tmp_path: Path, database: str, rabbit: RabbitNode
) -> None:
    broker = {
        "mode": "external",
        "url": f"mqtt://127.0.0.1:{rabbit.mqtt_port}",
        "service_password": secrets.token_urlsafe(16),
        "management_url": rabbit.management_url,
        "management_user": rabbit.management_user,
        "management_password": rabbit.management_password,
    }
    balancer = Balancer(rabbit.auth_port)
    await balancer.start()
    stack = ExitStack()
    device: PahoDevice | None = None
    answering: asyncio.Task[None] | None = None
    try:
        first = stack.enter_context(
            platform_process(
                tmp_path / "a", "--config", str(write_config(tmp_path / "a", database, broker))
            )
        )
        balancer.backends.append(first.http_port)
        await until(_logged(first, LEADS), timeout=WAIT_S, what="the first process leads")
        second = stack.enter_context(
            platform_process(
                tmp_path / "b", "--config", str(write_config(tmp_path / "b", database, broker))
            )
        )
        balancer.backends.append(second.http_port)

        async with aiohttp.ClientSession() as http:
            for platform in (first, second):  # both whole: HTTP, store, their service clients
                await until(_healthy(http, platform), timeout=WAIT_S, what="healthz 200")
            assert not LEADS.search(second.log()), "two leaders"

            # enroll through the follower, connect to the broker
            name = f"{CUSTOMER}/aa:bb:cc:00:00:07"
            enrollment = {"customer_id": CUSTOMER, "mac_address": "aa:bb:cc:00:00:07"}
            async with http.post(f"{second.url}/api/v1/register", json=enrollment) as response:
                assert response.status == 201, await response.text()
                password = (await response.json())["password"]
            activation = {**enrollment, "password": password}
            async with http.post(f"{second.url}/api/v1/activate", json=activation) as response:
                assert response.status == 200, await response.text()
            device, received, answering = await _obedient_device(rabbit.mqtt_port, name, password)

            # a command through the follower, dispatched by the leader, answered
            done = await _command(http, second, name, wait_s=20)
            assert (done["state"], done["result"]) == ("done", {"pong": 1}), done

            # kill the leader; queue a command through the survivor at once
            first.stop(signal.SIGKILL)
            killed_at = time.monotonic()
            queued = await _command(http, second, name, wait_s=0)
            assert queued["state"] in ("queued", "sent"), queued
            await until(_logged(second, LEADS), timeout=WAIT_S, what="the survivor leads")
            took_over_s = time.monotonic() - killed_at
            try:
                final = await _wait_final(http, second, queued["id"])
            except AssertionError:
                print(second.log())
                raise
            answered_s = time.monotonic() - killed_at
            assert (final["state"], final["result"]) == ("done", {"pong": 2}), final
            assert received.count(queued["id"]) == 1, received  # sent once, run once
            print(f"takeover {took_over_s:.1f} s, queued command answered {answered_s:.1f} s"
                  " after the leader was killed")  # fmt: skip
    finally:
        if answering is not None:
            answering.cancel()
            await asyncio.gather(answering, return_exceptions=True)
        if device is not None:
            device.close()
        stack.close()
        await balancer.stop()


def _logged(platform: PlatformProcess, pattern: re.Pattern[str]) -> Any:
    async def found() -> bool:
        return bool(pattern.search(platform.log()))

    return found


def _healthy(http: aiohttp.ClientSession, platform: PlatformProcess) -> Any:
    async def healthy() -> bool:
        async with http.get(f"{platform.url}/healthz") as response:
            return response.status == 200

    return healthy


async def _obedient_device(
    port: int, name: str, password: str
) -> tuple[PahoDevice, list[str], asyncio.Task[None]]:
    """A paho device that says online (retained, with its will), sends telemetry every second
    and answers each `ping` with the number of pings it has seen; the ids it received, in
    order. (A new leader knows a device on an external broker online from what it sends.)"""
    status = f"devices/{name}/status"
    offline = json.dumps({"state": "offline", "agent_version": "t", "ts": 0}).encode()
    device = PahoDevice(port, name, password, will=(status, offline, 1, True))
    received: list[str] = []
    assert await device.connect() == 0
    assert await device.subscribe(f"devices/{name}/cmd") == [1]
    online = {"state": "online", "agent_version": "t", "ts": time.time()}
    await device.publish(status, json.dumps(online), qos=1, retain=True)

    async def answer() -> None:
        while True:
            message = await device.next_message(timeout=1)
            if message is None:  # telemetry every second, as an agent sends it (less often)
                await device.publish(f"devices/{name}/telemetry", '{"apps": []}', qos=1)
                continue
            command = json.loads(message.payload)
            received.append(command["id"])
            reply = {"id": command["id"], "ok": True, "result": {"pong": len(received)}}
            await device.publish(f"devices/{name}/reply", json.dumps(reply), qos=1)

    return device, received, asyncio.create_task(answer())


async def _command(
    http: aiohttp.ClientSession, platform: PlatformProcess, name: str, *, wait_s: float
) -> dict[str, Any]:
    body = {"device": name, "action": "ping"}
    async with http.post(
        f"{platform.url}/api/v1/admin/commands", json=body, headers=HEADERS
    ) as response:
        assert response.status == 201, await response.text()
        [command] = (await response.json())["commands"]
    if not wait_s:
        return dict(command)
    return await _wait_final(http, platform, command["id"])


async def _wait_final(
    http: aiohttp.ClientSession, platform: PlatformProcess, command_id: str
) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        async with http.get(
            f"{platform.url}/api/v1/admin/commands/{command_id}?wait=5", headers=HEADERS
        ) as response:
            assert response.status == 200, await response.text()
            command: dict[str, Any] = await response.json()
        if command["state"] not in ("queued", "sent"):
            return command
    raise AssertionError(f"command {command_id} not final within {WAIT_S} s")
