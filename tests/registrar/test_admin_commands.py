"""Commands end to end: the admin API over a real platform (broker, dispatcher, store), a real
MQTT device (paho) that receives the command on its `cmd` topic and answers on `reply`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from iotbiz.names import DeviceName
from iotbiz.platform import Platform
from iotbiz.registrar import create_app
from iotbiz.settings import Settings
from iotbiz.store import Store
from tests.mqtt_device import PahoDevice
from tests.registrar.admin_helpers import (
    ADMIN,
    AUTH,
    TOKEN,
    Client,
    assert_error,
    enroll,
    platform,
)
from tests.store_helpers import active_devices

Session = aiohttp.ClientSession
__all__ = ["platform"]  # the fixture, used by name


@pytest_asyncio.fixture
async def api(platform: Platform) -> AsyncIterator[Session]:
    async with aiohttp.ClientSession(
        f"http://127.0.0.1:{platform.http_port}", headers=AUTH
    ) as session:
        yield session


async def online_device(platform: Platform, api: Session, device_id: str) -> PahoDevice:
    password = await enroll(api, device_id)
    device = PahoDevice(platform.mqtt_port, f"abc123/{device_id}", password)
    assert await device.connect() == 0
    assert await device.subscribe(f"devices/abc123/{device_id}/cmd") == [1]
    # as the agent does once it listens for commands
    await device.publish(f"devices/abc123/{device_id}/status", json.dumps({"state": "online"}))
    # online in the store too (presence writes in batches), where the dispatcher looks for the
    # devices that a new command can go to at once
    for _ in range(500):
        _, shown = await call(api, "GET", f"/devices/abc123/{device_id}")
        if shown["online"]:
            return device
        await asyncio.sleep(0.01)
    raise AssertionError(f"{device_id} not online in the store")


async def command_counters(api: Session) -> dict[str, float]:
    async with api.get("/metrics") as response:
        text = await response.text()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("iotbiz_commands_")
    }


async def call(api: Session, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
    async with api.request(method, f"{ADMIN}{path}", **kwargs) as response:
        return response.status, await response.json()


async def test_a_command_reaches_the_device_and_its_reply_finishes_it(
    platform: Platform, api: Session
) -> None:
    device = await online_device(platform, api, "dev-1")
    try:
        body = {"device": "abc123/dev-1", "action": "app.restart", "args": {"app": "web"}}
        status, sent = await call(api, "POST", "/commands", json=body)
        assert status == 201, sent
        [command] = sent["commands"]
        assert command["state"] == "queued"
        assert command["device"] == "abc123/dev-1"
        assert command["batch_id"] == sent["batch_id"]
        assert command["actor"].startswith("admin:")

        message = await device.next_message()
        assert message is not None
        assert message.topic == "devices/abc123/dev-1/cmd"
        delivered = json.loads(message.payload)
        assert (delivered["id"], delivered["action"]) == (command["id"], "app.restart")
        assert delivered["args"] == {"app": "web"}

        reply = {"id": command["id"], "ok": True, "result": {"restarted": "web"}}
        await device.publish("devices/abc123/dev-1/reply", json.dumps(reply))
        status, done = await call(api, "GET", f"/commands/{command['id']}", params={"wait": "10"})
        assert status == 200
        assert done["state"] == "done"
        assert done["result"] == {"restarted": "web"}
        assert done["sent_at"] is not None
        assert done["done_at"] is not None

        # a reply for a command that is not this device's open one is ignored, and counted
        stray = {"id": "c-0123456789abcdef", "ok": True}
        await device.publish("devices/abc123/dev-1/reply", json.dumps(stray))
        for _ in range(200):
            counters = await command_counters(api)
            if counters["iotbiz_commands_ignored_replies_total"] == 1:
                break
            await asyncio.sleep(0.02)
        assert counters["iotbiz_commands_ignored_replies_total"] == 1
        assert counters["iotbiz_commands_finished_total"] == 1
        assert counters["iotbiz_commands_published_total"] >= 1
    finally:
        device.close()
    status, audit = await call(api, "GET", "/audit", params={"subject": "abc123/dev-1"})
    sends = [e for e in audit["entries"] if e["action"] == "command.send"]
    assert len(sends) == 1
    assert sends[0]["actor"].startswith("admin:")
    assert sends[0]["detail"]["id"] == command["id"]


async def test_a_failed_reply_and_waiting_that_times_out(platform: Platform, api: Session) -> None:
    device = await online_device(platform, api, "dev-1")
    try:
        body = {"device": "abc123/dev-1", "action": "teleport"}
        _, sent = await call(api, "POST", "/commands", json=body)
        command_id = sent["commands"][0]["id"]
        assert await device.next_message() is not None
        # nothing answered yet: wait returns the command as it is when the time is up
        status, open_command = await call(
            api, "GET", f"/commands/{command_id}", params={"wait": "0.3"}
        )
        assert status == 200
        assert open_command["state"] in ("queued", "sent")
        reply = {"id": command_id, "ok": False, "error": "unknown action teleport"}
        await device.publish("devices/abc123/dev-1/reply", json.dumps(reply))
        _, failed = await call(api, "GET", f"/commands/{command_id}", params={"wait": "10"})
        assert failed["state"] == "failed"
        assert failed["error"] == "unknown action teleport"
    finally:
        device.close()


async def test_an_offline_device_gets_its_command_when_it_connects(
    platform: Platform, api: Session
) -> None:
    password = await enroll(api, "dev-2")
    body = {"device": "abc123/dev-2", "action": "ping", "expires_in_s": 600}
    _, sent = await call(api, "POST", "/commands", json=body)
    command = sent["commands"][0]
    _, shown = await call(api, "GET", f"/commands/{command['id']}")
    assert shown["state"] == "queued"
    device = PahoDevice(platform.mqtt_port, "abc123/dev-2", password)
    try:
        assert await device.connect() == 0
        assert await device.subscribe("devices/abc123/dev-2/cmd") == [1]
        await device.publish("devices/abc123/dev-2/status", json.dumps({"state": "online"}))
        message = await device.next_message()
        assert message is not None
        assert json.loads(message.payload)["id"] == command["id"]
    finally:
        device.close()


async def test_sending_to_a_customer_by_tags_and_listing(platform: Platform, api: Session) -> None:
    names = await active_devices(platform.store, "zeta", 12)
    for name in names[:5]:
        await platform.store.set_tags(name, {"site": "berlin"}, actor="test")
    body = {"customer_id": "zeta", "tags": {"site": "berlin"}, "action": "status"}
    status, sent = await call(api, "POST", "/commands", json=body)
    assert status == 201
    assert [c["device"] for c in sent["commands"]] == [str(n) for n in names[:5]]
    status, sent_all = await call(
        api, "POST", "/commands", json={"devices": [str(n) for n in names], "action": "ping"}
    )
    assert status == 201
    assert len(sent_all["commands"]) == 12

    # list: newest first, paged by cursor, filters
    seen: list[str] = []
    cursor = None
    for _ in range(20):
        params = {"limit": "5", **({"cursor": cursor} if cursor else {})}
        status, page = await call(api, "GET", "/commands", params=params)
        assert status == 200
        seen += [c["id"] for c in page["commands"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    created = [c["id"] for c in sent["commands"] + sent_all["commands"]]
    assert sorted(seen) == sorted(created)
    assert len(seen) == len(set(seen)) == 17
    _, batch = await call(api, "GET", "/commands", params={"batch": sent["batch_id"]})
    assert {c["id"] for c in batch["commands"]} == {c["id"] for c in sent["commands"]}
    _, one = await call(api, "GET", "/commands", params={"device": str(names[0])})
    assert len(one["commands"]) == 2
    _, queued = await call(api, "GET", "/commands", params={"state": "done"})
    assert queued == {"commands": [], "next_cursor": None}


BAD_SENDS = [
    ({"device": "abc123/dev-1"}, "action"),
    ({"device": "abc123/dev-1", "action": ""}, "action"),
    ({"device": "abc123/dev-1", "action": "a b"}, "action"),
    ({"device": "abc123/dev-1", "action": 5}, "action"),
    ({"device": "abc123/dev-1", "action": "ping", "args": [1]}, "args"),
    ({"device": "abc123/dev-1", "action": "ping", "expires_in_s": 0}, "expires_in_s"),
    ({"device": "abc123/dev-1", "action": "ping", "expires_in_s": 8 * 86400}, "expires_in_s"),
    ({"device": "abc123/dev-1", "action": "ping", "expires_in_s": "1"}, "expires_in_s"),
    ({"action": "ping"}, "exactly one"),
    ({"device": "abc123/dev-1", "devices": ["abc123/dev-1"], "action": "ping"}, "exactly one"),
    ({"device": "abc123/dev-1", "tags": {"a": "b"}, "action": "ping"}, "tags"),
    ({"device": "nodevice", "action": "ping"}, "device"),
    ({"devices": [], "action": "ping"}, "devices"),
    ({"devices": "abc123/dev-1", "action": "ping"}, "devices"),
    ({"devices": ["abc123/dev-1", 7], "action": "ping"}, "devices"),
    ({"device": "abc123/unknown", "action": "ping"}, "abc123/unknown"),
    ({"devices": ["abc123/dev-1", "abc123/x1", "abc123/x2"], "action": "ping"}, "abc123/x2"),
    ({"customer_id": "abc123", "tags": {"site": "nowhere"}, "action": "ping"}, "no active"),
    ({"customer_id": "abc123", "tags": {"site": None}, "action": "ping"}, "tags"),
    ({"customer_id": "a/b", "action": "ping"}, "customer_id"),
    ({"device": "abc123/dev-1", "action": "ping", "x": 1}, "unknown"),
    ({"device": "abc123/dev-1", "action": "ping", "args": {"x": "y" * 20000}}, "args"),
]


@pytest.mark.parametrize(("body", "word"), BAD_SENDS)
async def test_bad_sends_are_400_and_queue_nothing(
    platform: Platform, api: Session, body: dict[str, Any], word: str
) -> None:
    await active_devices(platform.store, "abc123", 0)
    await platform.store.register_device(
        DeviceName("abc123", "dev-1"), b"$2b$06$hash", ttl_s=60, actor="test"
    )
    await platform.store.activate_device(DeviceName("abc123", "dev-1"), b"$2b$06$hash", actor="t")
    status, error = await call(api, "POST", "/commands", json=body)
    assert status == 400, error
    assert list(error) == ["error"]
    assert word in error["error"]
    assert await platform.store.list_commands() == []


async def test_unknown_customer_and_command(platform: Platform, api: Session) -> None:
    status, error = await call(api, "POST", "/commands", json={"customer_id": "x", "action": "p"})
    assert (status, error) == (404, {"error": "no customer x"})
    status, error = await call(api, "GET", "/commands/c-0000000000000000")
    assert (status, error) == (404, {"error": "no command c-0000000000000000"})
    status, error = await call(api, "GET", "/commands/c-0000000000000000", params={"wait": "1"})
    assert (status, error) == (404, {"error": "no command c-0000000000000000"})
    for bad in ("c-1", "x", "C-0000000000000000"):
        status, error = await call(api, "GET", f"/commands/{bad}")
        assert status == 400
        assert "command_id" in error["error"]
    for params, word in [
        ({"wait": "61"}, "wait"),
        ({"wait": "-1"}, "wait"),
        ({"wait": "soon"}, "wait"),
        ({"wait": "nan"}, "wait"),
    ]:
        status, error = await call(api, "GET", "/commands/c-0000000000000000", params=params)
        assert status == 400
        assert word in error["error"]
    for params, word in [
        ({"state": "lost"}, "state"),
        ({"device": "x"}, "device"),
        ({"batch": "b-1"}, "batch"),
        ({"cursor": "ZDphL2I"}, "cursor"),  # a device cursor
        ({"limit": "0"}, "limit"),
    ]:
        status, error = await call(api, "GET", "/commands", params=params)
        assert status == 400, params
        assert word in error["error"]


async def test_without_a_dispatcher_sending_is_503(
    aiohttp_client: Callable[..., Any], make_settings: Callable[..., Settings], store: Store
) -> None:
    """The registrar on its own (no platform): the commands it has can be read, not sent."""
    await active_devices(store, "abc123", 1)
    client: Client = await aiohttp_client(
        create_app(make_settings(admin={"token": TOKEN}), store), headers=AUTH
    )
    body = {"device": "abc123/dev-00000", "action": "ping"}
    await assert_error(await client.post(f"{ADMIN}/commands", json=body), 503)
    response = await client.get(f"{ADMIN}/commands")
    assert response.status == 200

    # waiting looks at the store: a command finished by another process (here: the store)
    name = DeviceName("abc123", "dev-00000")
    [command] = await store.create_commands(
        [name], "ping", {}, expires_at=store.now() + 60, actor="test", batch_id="b-1"
    )
    path = f"{ADMIN}/commands/{command.command_id}"
    response = await client.get(path, params={"wait": "0.2"})
    assert (await response.json())["state"] == "queued"

    async def finish() -> None:
        await asyncio.sleep(0.3)
        await store.finish_command(name, command.command_id, ok=True, result=1, error=None)

    finisher = asyncio.create_task(finish())
    response = await client.get(path, params={"wait": "10"})
    await finisher
    body = await response.json()
    assert (body["state"], body["result"]) == ("done", 1)
