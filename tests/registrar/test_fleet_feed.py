"""The console's live updates (`GET /api/v1/admin/stream`) through a real platform: a device that
comes online is named in the next event, many changes are coalesced into few events, the number
of streams is bounded, and an open stream does not hold up the platform's stop."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from iotbiz.names import DeviceName
from iotbiz.platform import Platform
from iotbiz.registrar.fleet_feed import MAX_CHANGED, _Follower
from iotbiz.settings import Settings
from tests.mqtt_device import PahoDevice
from tests.registrar.admin_helpers import ADMIN, AUTH, TOKEN, assert_error
from tests.test_dispatch import enroll

STREAM = f"{ADMIN}/stream"


async def start(make_settings: Callable[..., Settings], **console: Any) -> Platform:
    settings = make_settings(
        admin={"token": TOKEN},
        http={"host": "127.0.0.1"},
        console={"stream_interval_s": 0.2, **console},
    )
    platform = Platform(settings)
    await platform.start()
    await platform.store.add_customer("abc123", 100, actor="test")
    return platform


@pytest.fixture
async def platform(make_settings: Callable[..., Settings]) -> AsyncIterator[Platform]:
    running = await start(make_settings)
    try:
        yield running
    finally:
        await running.stop()


async def events(response: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """The `devices` events of a stream, parsed; comment lines are skipped."""
    name = None
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            assert name == "devices"
            yield json.loads(line.removeprefix("data: "))


async def next_event(stream: AsyncIterator[dict[str, Any]], timeout_s: float = 5.0) -> Any:
    async with asyncio.timeout(timeout_s):
        return await anext(stream)


async def test_a_device_that_comes_online_is_in_the_next_event(platform: Platform) -> None:
    name = DeviceName("abc123", "dev-live")
    password = await enroll(platform, name)
    url = f"http://127.0.0.1:{platform.http_port}"
    async with (
        aiohttp.ClientSession(url) as http,
        http.get(STREAM, headers=AUTH) as response,
    ):
        assert response.status == 200
        assert response.content_type == "text/event-stream"
        stream = events(response)
        first = await next_event(stream)
        assert first == {"changed": [], "more": True, "online": 0, "total": 1}

        device = PahoDevice(platform.mqtt_port, str(name), password)
        assert await device.connect() == 0
        try:
            while True:  # presence may write the connect and the status in two flushes
                event = await next_event(stream)
                if event["online"] == 1:
                    break
            assert event["more"] is False
            assert str(name) in event["changed"]
        finally:
            device.close()


async def test_many_changes_make_few_events(platform: Platform) -> None:
    names = [DeviceName("abc123", f"dev-{i}") for i in range(20)]
    passwords = [await enroll(platform, name) for name in names]
    url = f"http://127.0.0.1:{platform.http_port}"
    devices = [
        PahoDevice(platform.mqtt_port, str(n), p) for n, p in zip(names, passwords, strict=True)
    ]
    async with (
        aiohttp.ClientSession(url) as http,
        http.get(STREAM, headers=AUTH) as response,
    ):
        stream = events(response)
        await next_event(stream)
        started = time.monotonic()
        try:
            for device in devices:
                assert await device.connect() == 0
            seen: set[str] = set()
            count = 0
            while len(seen) < len(names):
                event = await next_event(stream)
                seen.update(event["changed"])
                count += 1
            elapsed = time.monotonic() - started
            # one event per stream_interval_s (0.2 s) at most, plus the one that starts a wait
            assert count <= elapsed / 0.2 + 2, (count, elapsed)
            assert seen == {str(n) for n in names}
        finally:
            for device in devices:
                device.close()


def test_a_follower_names_at_most_max_changed_then_says_more() -> None:
    follower = _Follower()
    follower.take()  # the first event (more: true)
    follower.note([DeviceName("c", f"d{i}") for i in range(MAX_CHANGED)])
    changed, more = follower.take()
    assert len(changed) == MAX_CHANGED
    assert more is False
    follower.note([DeviceName("c", f"d{i}") for i in range(MAX_CHANGED + 1)])
    assert follower.take() == ([], True)
    assert follower.take() == ([], False)


async def test_streams_are_bounded_and_need_the_token(
    make_settings: Callable[..., Settings],
) -> None:
    platform = await start(make_settings, max_streams=1)
    try:
        url = f"http://127.0.0.1:{platform.http_port}"
        async with aiohttp.ClientSession(url) as http:
            await assert_error(await http.get(STREAM), 401)
            await assert_error(await http.get(STREAM, params={"x": "1"}, headers=AUTH), 400)
            async with http.get(STREAM, headers=AUTH) as first:
                assert first.status == 200
                await next_event(events(first))
                await assert_error(
                    await http.get(STREAM, headers=AUTH),
                    503,
                    "too many live streams open (at most 1)",
                )
            # closed by the reader: the place is free again
            for _ in range(50):
                async with http.get(STREAM, headers=AUTH) as again:
                    if again.status == 200:
                        break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the stream's place was not freed")
    finally:
        await platform.stop()


async def test_an_open_stream_does_not_hold_up_the_stop(
    make_settings: Callable[..., Settings],
) -> None:
    platform = await start(make_settings, stream_interval_s=30)
    url = f"http://127.0.0.1:{platform.http_port}"
    async with (
        aiohttp.ClientSession(url) as http,
        http.get(STREAM, headers=AUTH) as response,
    ):
        await next_event(events(response))
        started = time.monotonic()
        assert await platform.stop() == []
        assert time.monotonic() - started < 3
