"""The dispatcher in a real platform (in-process, ports 0) with paho-mqtt clients as devices:
delivery to online and offline devices, replies of the right device only, expiry, waiters,
argument checks, and a store that fails (a full disk) while commands are on their way."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from iotbiz.errors import NotFoundError, StoreError
from iotbiz.models import CommandState
from iotbiz.names import DeviceName
from iotbiz.platform import Platform
from iotbiz.settings import Settings
from tests.mqtt_device import PahoDevice
from tests.test_store_failures import SmallDisk, small_disk, wait_until

__all__ = ["small_disk"]  # the fixture, used by name

A = DeviceName("abc123", "dev-a")
B = DeviceName("abc123", "dev-b")
FAST = {"poll_s": 0.1}


async def enroll(platform: Platform, name: DeviceName) -> str:
    body: dict[str, Any] = {"customer_id": name.customer_id, "mac_address": name.device_id}
    async with aiohttp.ClientSession(f"http://127.0.0.1:{platform.http_port}") as session:
        async with session.post("/api/v1/register", json=body) as response:
            assert response.status == 201, await response.text()
            body["password"] = (await response.json())["password"]
        async with session.post("/api/v1/activate", json=body) as response:
            assert response.status == 200, await response.text()
    return str(body["password"])


class Device:
    """A paho client that behaves like the agent on the wire: subscribes to its `cmd`, then
    says `online` (live), and answers commands when told to."""

    def __init__(self, platform: Platform, name: DeviceName, password: str) -> None:
        self.name = name
        self.prefix = f"devices/{name}/"
        self.client = PahoDevice(platform.mqtt_port, str(name), password)

    async def connect(self) -> None:
        assert await self.client.connect() == 0
        assert await self.client.subscribe(self.prefix + "cmd") == [1]
        await self.client.publish(
            self.prefix + "status", json.dumps({"state": "online"}), retain=True
        )

    async def next_command(self, timeout: float = 10.0) -> dict[str, Any]:
        message = await self.client.next_message(timeout=timeout)
        assert message is not None, f"{self.name}: no command within {timeout} s"
        assert message.topic == self.prefix + "cmd"
        return dict(json.loads(message.payload))

    async def reply(self, body: dict[str, Any]) -> None:
        await self.client.publish(self.prefix + "reply", json.dumps(body))

    def close(self) -> None:
        self.client.close()


@pytest_asyncio.fixture(params=["sqlite", "postgresql"])
async def platform(
    request: pytest.FixtureRequest, make_settings: Callable[..., Settings]
) -> AsyncIterator[Platform]:
    """The platform on each store backend (the embedded broker both times)."""
    backend: dict[str, dict[str, Any]] = {}
    if request.param == "postgresql":
        url = await request.getfixturevalue("postgres_server").create_database()
        backend = {"store": {"url": url}, "admin": {"token": "dispatch-test-token"}}
    running = Platform(make_settings(http={"host": "127.0.0.1"}, commands=FAST, **backend))
    await running.start()
    await running.store.add_customer("abc123", 10, actor="test")
    try:
        yield running
    finally:
        assert await running.stop() == []
    assert not running.failed.is_set()


async def device(platform: Platform, name: DeviceName, *, connect: bool = True) -> Device:
    result = Device(platform, name, await enroll(platform, name))
    if connect:
        await result.connect()
        await wait_until(lambda: _online(platform, name))
    return result


async def _online(platform: Platform, name: DeviceName) -> bool:
    found = await platform.store.get_device(name)
    return found is not None and found.online


async def test_a_ping_to_an_online_device_is_done_with_the_replys_result(
    platform: Platform,
) -> None:
    a = await device(platform, A)
    try:
        batch_id, [command] = await platform.dispatcher.send([A], "ping", actor="op")
        assert (command.state, command.batch_id) == (CommandState.QUEUED, batch_id)
        received = await a.next_command()
        assert received == {
            "id": command.command_id,
            "action": "ping",
            "args": {},
            "expires_at": command.expires_at,
        }
        sent = await platform.store.get_command(command.command_id)
        assert sent is not None
        await wait_until(lambda: _state(platform, command.command_id, CommandState.SENT))
        await a.reply({"id": command.command_id, "ok": True, "result": {"pong": True}})
        done = await platform.dispatcher.wait(command.command_id, timeout_s=10)
        assert (done.state, done.result, done.error) == (CommandState.DONE, {"pong": True}, None)
        assert done.sent_at is not None
        assert done.done_at is not None
        # a failure reply makes a command failed, with the device's error
        _, [second] = await platform.dispatcher.send([A], "app.logs", {"name": 5}, actor="op")
        assert (await a.next_command())["id"] == second.command_id
        await a.reply(
            {"id": second.command_id, "ok": False, "error": "args.name must be the name of an app"}
        )
        failed = await platform.dispatcher.wait(second.command_id, timeout_s=10)
        assert (failed.state, failed.error) == (
            CommandState.FAILED,
            "args.name must be the name of an app",
        )
    finally:
        a.close()


async def _state(platform: Platform, command_id: str, state: CommandState) -> bool:
    command = await platform.store.get_command(command_id)
    return command is not None and command.state is state


async def test_a_command_to_an_offline_device_waits_and_goes_out_when_it_connects(
    platform: Platform,
) -> None:
    a = await device(platform, A, connect=False)
    try:
        _, [command] = await platform.dispatcher.send([A], "status", actor="op")
        waited = await platform.dispatcher.wait(command.command_id, timeout_s=0.5)
        assert waited.state is CommandState.QUEUED  # nobody to send it to
        await a.connect()
        received = await a.next_command()
        assert received["id"] == command.command_id
        await a.reply({"id": command.command_id, "ok": True, "result": {"apps": []}})
        done = await platform.dispatcher.wait(command.command_id, timeout_s=10)
        assert done.state is CommandState.DONE
    finally:
        a.close()


async def test_a_reply_from_another_device_does_not_finish_the_command(platform: Platform) -> None:
    a, b = await device(platform, A), await device(platform, B)
    try:
        _, [command] = await platform.dispatcher.send([A], "ping", actor="op")
        assert (await a.next_command())["id"] == command.command_id
        await b.reply({"id": command.command_id, "ok": True, "result": "forged"})
        await wait_until(lambda: platform.dispatcher.ignored_replies == 1)
        still = await platform.store.get_command(command.command_id)
        assert still is not None
        assert still.state is CommandState.SENT
        await a.reply({"id": command.command_id, "ok": True, "result": "real"})
        done = await platform.dispatcher.wait(command.command_id, timeout_s=10)
        assert (done.state, done.result) == (CommandState.DONE, "real")
        # malformed replies are counted, never fatal
        await a.reply({"no": "id"})
        await a.client.publish(a.prefix + "reply", b"not json")
        await wait_until(lambda: platform.dispatcher.malformed_replies == 2)
    finally:
        a.close()
        b.close()


async def test_an_unanswered_command_expires_and_a_late_reply_changes_nothing(
    platform: Platform,
) -> None:
    a = await device(platform, A)
    try:
        _, [command] = await platform.dispatcher.send([A], "ping", expires_in_s=1, actor="op")
        assert (await a.next_command())["id"] == command.command_id
        expired = await platform.dispatcher.wait(
            command.command_id, timeout_s=10
        )  # woken by expiry
        assert expired.state is CommandState.EXPIRED
        await a.reply({"id": command.command_id, "ok": True, "result": {"pong": True}})
        await wait_until(lambda: platform.dispatcher.ignored_replies == 1)
        assert await _state(platform, command.command_id, CommandState.EXPIRED)
    finally:
        a.close()


async def test_sending_checks_its_arguments(platform: Platform) -> None:
    await device(platform, A, connect=False)
    send = platform.dispatcher.send
    with pytest.raises(NotFoundError, match="abc123/ghost"):
        await send([A, DeviceName("abc123", "ghost")], "ping", actor="op")
    for kwargs, message in [
        ({"names": []}, "no devices"),
        ({"action": ""}, "action"),
        ({"action": "x" * 65}, "action"),
        ({"args": [1]}, "JSON object"),
        ({"args": {"x": float("nan")}}, "plain JSON"),
        ({"args": {"x": "y" * 20000}}, "more than 16384"),
        ({"expires_in_s": 0}, "expires_in_s"),
        ({"expires_in_s": 8 * 86400}, "expires_in_s"),
    ]:
        call: dict[str, Any] = {"names": [A], "action": "ping", **kwargs}
        with pytest.raises(ValueError, match=message):
            await send(
                call.pop("names"),
                call.pop("action"),
                call.get("args"),
                expires_in_s=call.get("expires_in_s"),
                actor="op",
            )
    assert await platform.store.list_commands() == []
    with pytest.raises(NotFoundError):
        await platform.dispatcher.wait("c-unknown", timeout_s=1)


async def test_a_full_disk_delays_commands_but_never_stops_the_dispatcher(
    make_settings: Callable[..., Settings], small_disk: SmallDisk
) -> None:
    settings = make_settings(
        http={"host": "127.0.0.1"}, store={"path": small_disk.folder / "iotbiz.db"}, commands=FAST
    )
    platform = Platform(settings)
    await platform.start()
    a: Device | None = None
    try:
        await platform.store.add_customer("abc123", 10, actor="test")
        a = await device(platform, A, connect=False)
        _, [command] = await platform.dispatcher.send([A], "ping", actor="op")
        small_disk.fill()
        with pytest.raises(StoreError):
            await platform.dispatcher.send([A], "ping", actor="op")  # the caller hears of it
        await a.connect()  # presence cannot record it; the command goes out all the same
        assert (await a.next_command())["id"] == command.command_id
        await a.reply({"id": command.command_id, "ok": True, "result": {"pong": True}})
        await wait_until(
            lambda: platform.dispatcher.store_failures >= 2
        )  # sent, reply: not written
        assert not platform.failed.is_set()
        small_disk.make_room()
        done = await platform.dispatcher.wait(command.command_id, timeout_s=30)
        assert (done.state, done.result) == (CommandState.DONE, {"pong": True})
        assert not platform.failed.is_set()
    finally:
        if a is not None:
            a.close()
        problems = await platform.stop()
    assert problems == []


async def test_a_send_to_more_devices_than_a_batch_goes_out_in_batches_at_once(
    make_settings: Callable[..., Settings],
) -> None:
    """batch_size 2, five online devices: every command is published within seconds (the
    scan goes on while batches are full, it does not wait for the next periodic scan)."""
    settings = make_settings(http={"host": "127.0.0.1"}, commands={"poll_s": 0.1, "batch_size": 2})
    platform = Platform(settings)
    await platform.start()
    devices: list[Device] = []
    try:
        await platform.store.add_customer("abc123", 10, actor="test")
        names = [DeviceName("abc123", f"dev-{i}") for i in range(5)]
        devices = [await device(platform, name) for name in names]
        _, commands = await platform.dispatcher.send(names, "ping", actor="op")
        for one, command in zip(devices, commands, strict=True):
            assert (await one.next_command(timeout=5))["id"] == command.command_id
            await one.reply({"id": command.command_id, "ok": True, "result": {"pong": True}})
        for command in commands:
            done = await platform.dispatcher.wait(command.command_id, timeout_s=10)
            assert done.state is CommandState.DONE
    finally:
        for one in devices:
            one.close()
        problems = await platform.stop()
    assert problems == []


async def test_a_command_sent_as_the_device_comes_online_goes_out_at_once(
    platform: Platform,
) -> None:
    """The send comes before presence has written the device online (it writes every 0.2 s):
    the dispatcher looks again a second later instead of at its next periodic scan (10 s)."""
    a = await device(platform, A, connect=False)
    try:
        await a.connect()  # and no waiting for the store to say so
        _, [command] = await platform.dispatcher.send([A], "ping", actor="op")
        assert (await a.next_command(timeout=5))["id"] == command.command_id
    finally:
        a.close()
