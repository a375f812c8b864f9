"""The whole platform in the test's process: real broker, real registrar, real SQLite file."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest_asyncio

from iotbiz.platform import Platform
from iotbiz.settings import Settings

Enroll = Callable[[str], Awaitable[str]]


@pytest_asyncio.fixture
async def platform(make_settings: Callable[..., Settings]) -> AsyncIterator[Platform]:
    """A started platform on free ports; customer `abc123` may have 10 devices."""
    running = Platform(make_settings(http={"host": "127.0.0.1"}, log={"level": "DEBUG"}))
    await running.start()
    await running.store.add_customer("abc123", 10, actor="test")
    try:
        yield running
    finally:
        await running.stop()


@pytest_asyncio.fixture
async def enroll(platform: Platform) -> AsyncIterator[Enroll]:
    """Register and activate a device of `abc123` over HTTP; return its password."""
    async with aiohttp.ClientSession(f"http://127.0.0.1:{platform.http_port}") as session:

        async def run(device_id: str) -> str:
            body: dict[str, Any] = {"customer_id": "abc123", "mac_address": device_id}
            async with session.post("/api/v1/register", json=body) as response:
                assert response.status == 201, await response.text()
                body["password"] = (await response.json())["password"]
            async with session.post("/api/v1/activate", json=body) as response:
                assert response.status == 200, await response.text()
            return str(body["password"])

        yield run


async def wait_for(predicate: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> float:
    """Poll `predicate` until true; return the seconds it took (fails after `timeout`)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not await predicate():
        if loop.time() - start > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.02)
    return loop.time() - start
