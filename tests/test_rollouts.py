"""Staged rollouts in a real platform (in-process, ports 0), through the admin API, with
paho-mqtt clients as devices answering their `update` commands as the agent does: batches in
order, a stop on too many failures (queued commands cancelled), abort, bad inputs, and a restart
on the same store in the middle of a rollout."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from iotbiz.names import DeviceName
from iotbiz.platform import Platform
from iotbiz.settings import Settings
from tests.registrar.admin_helpers import ADMIN, AUTH, TOKEN, assert_error, ok_json
from tests.test_dispatch import Device, device, enroll
from tests.test_store_failures import wait_until

SHA = "ab" * 32
FAST = {"rollouts": {"poll_s": 0.1}, "commands": {"poll_s": 0.1}}


def settings_for(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(admin={"token": TOKEN}, http={"host": "127.0.0.1"}, **FAST)


@pytest_asyncio.fixture(params=["sqlite", "postgresql"])
async def platform(
    request: pytest.FixtureRequest, make_settings: Callable[..., Settings]
) -> AsyncIterator[Platform]:
    """The platform on each store backend (the embedded broker both times)."""
    settings = settings_for(make_settings)
    if request.param == "postgresql":
        url = await request.getfixturevalue("postgres_server").create_database()
        settings = dataclasses.replace(settings, store=dataclasses.replace(settings.store, url=url))
    running = Platform(settings)
    await running.start()
    await running.store.add_customer("abc123", 20, actor="test")
    await running.store.add_release("web", "2.0", sha256=SHA, size=10, signature=None, actor="t")
    try:
        yield running
    finally:
        assert await running.stop() == []
    assert not running.failed.is_set()


@pytest_asyncio.fixture
async def api(platform: Platform) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(
        f"http://127.0.0.1:{platform.http_port}", headers=AUTH
    ) as session:
        yield session


def names(count: int) -> list[DeviceName]:
    return [DeviceName("abc123", f"dev-{i}") for i in range(count)]


async def rollout(api: aiohttp.ClientSession, rollout_id: str) -> dict[str, Any]:
    async with api.get(f"{ADMIN}/rollouts/{rollout_id}") as response:
        return dict(await ok_json(response))


async def start(api: aiohttp.ClientSession, body: dict[str, Any]) -> dict[str, Any]:
    async with api.post(f"{ADMIN}/rollouts", json=body) as response:
        return dict(await ok_json(response, 201))


async def answer(dev: Device, outcome: str, reason: str = "") -> str:
    """Take the device's next command (an update) and answer it with `outcome`."""
    command = await dev.next_command()
    assert command["action"] == "update"
    assert (command["args"]["app"], command["args"]["version"]) == ("web", "2.0")
    result = {"outcome": outcome, "reason": reason}
    await dev.reply({"id": command["id"], "ok": True, "result": result})
    return str(command["id"])


async def ended(api: aiohttp.ClientSession, rollout_id: str) -> dict[str, Any]:
    found: dict[str, Any] = {}

    async def done() -> bool:
        found.update(await rollout(api, rollout_id))
        return found["state"] != "running"

    await wait_until(done, 20.0)
    return found


async def test_a_good_release_goes_to_five_devices_batch_after_batch(
    platform: Platform, api: aiohttp.ClientSession
) -> None:
    devices = [await device(platform, name) for name in names(5)]
    try:
        body = {"app": "web", "version": "2.0", "devices": [str(n) for n in names(5)]}
        started = await start(api, {**body, "batch_size": 2})
        assert (started["state"], started["total"], started["batches"]) == ("running", 5, 3)
        rollout_id = started["id"]
        assert rollout_id.startswith("r-")
        assert len(rollout_id) == 18
        for index, batch in enumerate([devices[0:2], devices[2:4], devices[4:5]]):
            for dev in batch:
                await answer(dev, "committed")
            # until this batch has all its results, later devices have no command yet
            shown = await rollout(api, rollout_id)
            later = [d for d in shown["devices"] if d["batch"] > index]
            assert all(d["command_id"] is None for d in later) or shown["batch"] > index
            assert all(d["batch"] == i // 2 for i, d in enumerate(shown["devices"]))
        final = await ended(api, rollout_id)
        assert (final["state"], final["committed"], final["failed"]) == ("completed", 5, 0)
        assert [d["result"] for d in final["devices"]] == ["committed"] * 5
        assert final["finished_at"] is not None
        entries = await platform.store.audit_entries(subject=rollout_id, limit=100)
        actions = [e.action for e in reversed(entries)]
        assert actions[0] == "rollout.start"
        assert actions.count("rollout.batch") == 3
        assert actions.count("rollout.device") == 5
        assert actions[-1] == "rollout.completed"
        batches = [e.detail for e in reversed(entries) if e.action == "rollout.batch"]
        assert [b["index"] for b in batches] == [0, 1, 2]
        assert batches[0]["devices"] == ["abc123/dev-0", "abc123/dev-1"]
        # a batch started only after every result of the one before it
        order = [(e.action, e.detail.get("index")) for e in reversed(entries)]
        assert order.index(("rollout.batch", 1)) > 2 + 1  # start, batch 0, two results
    finally:
        for dev in devices:
            dev.close()


async def test_more_failures_than_allowed_stop_it_and_cancel_queued_commands(
    platform: Platform, api: aiohttp.ClientSession
) -> None:
    online = await device(platform, names(1)[0])
    offline = await device(platform, names(2)[1], connect=False)
    for name in names(4)[2:]:
        await device(platform, name, connect=False)
    try:
        body = {"app": "web", "version": "2.0", "customer_id": "abc123", "batch_size": 2}
        started = await start(api, body)
        assert started["total"] == 4
        await answer(online, "rolled_back", "health check failed")
        final = await ended(api, started["id"])
        assert final["state"] == "stopped"
        assert final["reason"] == "1 failure, more than --max-failures 0"
        results = [(d["result"], d["reason"]) for d in final["devices"]]
        assert results == [
            ("failed", "rolled_back: health check failed"),
            ("skipped", "rollout stopped"),
            ("skipped", "rollout stopped"),
            ("skipped", "rollout stopped"),
        ]
        cancelled = await platform.store.get_command(final["devices"][1]["command_id"])
        assert cancelled is not None
        assert (cancelled.state.value, cancelled.error) == ("failed", "rollout stopped")
        assert final["devices"][2]["command_id"] is None  # batch 1 never started
        entries = await platform.store.audit_entries(subject=started["id"], limit=100)
        assert entries[0].action == "rollout.stopped"
    finally:
        online.close()
        offline.close()


async def test_abort_cancels_and_a_second_abort_is_a_conflict(
    platform: Platform, api: aiohttp.ClientSession
) -> None:
    for name in names(3):
        await device(platform, name, connect=False)
    body = {"app": "web", "version": "2.0", "devices": ["abc123/dev-2", "abc123/dev-0"]}
    started = await start(api, {**body, "devices": [*body["devices"], "abc123/dev-1"]})
    rollout_id = started["id"]
    await wait_until(lambda: _batch_started(api, rollout_id))
    async with api.post(f"{ADMIN}/rollouts/{rollout_id}/abort") as response:
        aborted = await ok_json(response)
    assert (aborted["state"], aborted["skipped"], aborted["total"]) == ("aborted", 3, 3)
    async with api.post(f"{ADMIN}/rollouts/{rollout_id}/abort") as response:
        await assert_error(response, 409, f"rollout {rollout_id} is already aborted")
    async with api.post(f"{ADMIN}/rollouts/r-0000000000000000/abort") as response:
        await assert_error(response, 404, "no rollout r-0000000000000000")
    shown = await rollout(api, rollout_id)
    assert [d["name"] for d in shown["devices"]] == [str(n) for n in names(3)]  # by name
    async with api.get(f"{ADMIN}/rollouts", params={"limit": "1"}) as response:
        page = await ok_json(response)
    assert [r["id"] for r in page["rollouts"]] == [rollout_id]
    assert page["next_cursor"] is not None
    async with api.get(f"{ADMIN}/rollouts", params={"cursor": page["next_cursor"]}) as response:
        assert (await ok_json(response))["rollouts"] == []
    entries = await platform.store.audit_entries(subject=rollout_id, limit=100)
    assert (entries[0].action, entries[0].actor) == ("rollout.abort", "admin:127.0.0.1")


async def _batch_started(api: aiohttp.ClientSession, rollout_id: str) -> bool:
    return (await rollout(api, rollout_id))["updating"] > 0


async def test_bad_rollouts_are_refused_with_the_reason(
    platform: Platform, api: aiohttp.ClientSession
) -> None:
    await device(platform, names(1)[0], connect=False)
    good = {"app": "web", "version": "2.0", "devices": ["abc123/dev-0"]}
    cases: list[tuple[dict[str, Any], str]] = [
        (
            {**good, "colour": 1},
            "unknown field 'colour' (known: app, batch_size, customer_id, devices, force,"
            " max_failures, tags, timeout_s, version)",
        ),
        ({**good, "version": "9"}, "no release web 9 (add it with iotbiz release add)"),
        ({**good, "devices": ["abc123/nope"]}, "not active devices (1): abc123/nope"),
        ({**good, "customer_id": "abc123"}, "give exactly one of devices, customer_id"),
        ({"app": "web", "version": "2.0"}, "give exactly one of devices, customer_id"),
        ({**good, "devices": []}, "devices must be a list of 1 to 100000 device names"),
        ({**good, "batch_size": 0}, "batch_size must be a whole number from 1 to 10000"),
        ({**good, "max_failures": -1}, "max_failures must be a whole number from 0 to 1000000000"),
        ({**good, "force": "yes"}, "force must be true or false"),
        ({**good, "timeout_s": 0}, "timeout_s must be a number from 1 to 604800"),
        ({**good, "app": 3}, "app and version are required strings"),
        (
            {**good, "tags": {"a": "b"}},
            "tags select among a customer's devices: give customer_id with them",
        ),
    ]
    got = []
    for body, error in cases:
        async with api.post(f"{ADMIN}/rollouts", json=body) as response:
            got.append((await assert_error(response, 400), error))
    for actual, expected in got:
        assert actual == expected
    async with api.get(f"{ADMIN}/rollouts/nope") as response:
        await assert_error(response, 400, "rollout_id is not valid: r- and 16 hex digits")
    async with api.get(f"{ADMIN}/rollouts") as response:
        assert (await ok_json(response))["rollouts"] == []  # nothing was created


async def test_a_restart_in_the_middle_resumes_without_a_second_update(
    make_settings: Callable[..., Settings],
) -> None:
    settings = settings_for(make_settings)
    first = Platform(settings)
    await first.start()
    try:
        await first.store.add_customer("abc123", 20, actor="test")
        await first.store.add_release("web", "2.0", sha256=SHA, size=10, signature=None, actor="t")
        passwords = {name: await enroll(first, name) for name in names(3)}
        async with aiohttp.ClientSession(
            f"http://127.0.0.1:{first.http_port}", headers=AUTH
        ) as api:
            body = {"app": "web", "version": "2.0", "customer_id": "abc123", "batch_size": 2}
            rollout_id = (await start(api, body))["id"]
            await wait_until(lambda: _batch_started(api, rollout_id))
    finally:
        assert await first.stop() == []
    second = Platform(settings)
    await second.start()
    connected: list[Device] = []
    try:
        for name, password in passwords.items():
            dev = Device(second, name, password)
            await dev.connect()
            connected.append(dev)
        async with aiohttp.ClientSession(
            f"http://127.0.0.1:{second.http_port}", headers=AUTH
        ) as api:
            for dev in connected:
                await answer(dev, "committed")
            final = await ended(api, rollout_id)
        assert (final["state"], final["committed"]) == ("completed", 3)
        for name in names(3):
            updates = await second.store.list_commands(name=name, limit=10)
            assert len(updates) == 1, updates
    finally:
        for dev in connected:
            dev.close()
        assert await second.stop() == []


async def test_a_device_that_never_answers_fails_as_expired_after_timeout_s(
    platform: Platform, api: aiohttp.ClientSession
) -> None:
    for name in names(2):
        await device(platform, name, connect=False)
    body = {"app": "web", "version": "2.0", "customer_id": "abc123", "batch_size": 1}
    started = await start(api, {**body, "timeout_s": 1, "max_failures": 1})
    final = await ended(api, started["id"])
    assert final["state"] == "stopped"
    assert final["reason"] == "2 failures, more than --max-failures 1"
    assert [(d["result"], d["reason"]) for d in final["devices"]] == [("failed", "expired")] * 2
