"""Updates through the real platform side, end to end: a platform (in this process, ports 0)
with a release signing key, releases uploaded through the admin API, `update` commands sent
through the admin API (the platform fills in url, sha256, size and signature and offers the
release), and a whole Agent with the public key downloading from the platform's own route with
its MQTT credentials. A signed good release commits, a crashing one rolls back, and the command's
state in the store carries the agent's outcome."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from iotbiz.platform import Platform
from iotbiz.releases import keygen
from iotbiz.settings import Settings, load_agent_settings
from tests.agent.test_updates import (
    AGENT,
    APP,
    CRASHES,
    agent_running,
    app_settings,
    release_artifact,
    release_folders,
    running_in,
    until,
)
from tests.registrar.admin_helpers import ADMIN, AUTH, TOKEN

pytestmark = pytest.mark.timeout(90)


@pytest_asyncio.fixture
async def keys(tmp_path: Path) -> tuple[Path, Path]:
    return keygen(tmp_path / "keys")


@pytest_asyncio.fixture
async def platform(
    make_settings: Callable[..., Settings], keys: tuple[Path, Path]
) -> AsyncIterator[Platform]:
    running = Platform(
        make_settings(
            admin={"token": TOKEN},
            http={"host": "127.0.0.1"},
            releases={"signing_key_file": str(keys[0])},
        )
    )
    await running.start()
    await running.store.add_customer("abc123", 10, actor="test")
    try:
        yield running
    finally:
        await running.stop()


@pytest_asyncio.fixture
async def api(platform: Platform) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(
        f"http://127.0.0.1:{platform.http_port}", headers=AUTH
    ) as session:
        yield session


async def upload(api: aiohttp.ClientSession, version: str, data: bytes) -> dict[str, Any]:
    async with api.post(
        f"{ADMIN}/releases", params={"app": APP, "version": version}, data=data
    ) as response:
        assert response.status == 201, await response.text()
        body: dict[str, Any] = await response.json()
        return body


async def update(api: aiohttp.ClientSession, version: str) -> dict[str, Any]:
    """Send `update` through the admin API and wait for the command to be final."""
    body = {"device": str(AGENT), "action": "update", "args": {"app": APP, "version": version}}
    async with api.post(f"{ADMIN}/commands", json=body) as response:
        assert response.status == 201, await response.text()
        [command] = (await response.json())["commands"]
    assert command["args"]["signature"]  # signed by the platform
    for _ in range(3):
        async with api.get(f"{ADMIN}/commands/{command['id']}", params={"wait": "30"}) as r:
            assert r.status == 200, await r.text()
            shown: dict[str, Any] = await r.json()
        if shown["state"] not in ("queued", "sent"):
            return shown
    raise AssertionError(f"command not final: {shown}")


async def test_signed_releases_from_the_platform_commit_or_roll_back(
    tmp_path: Path, platform: Platform, api: aiohttp.ClientSession, keys: tuple[Path, Path]
) -> None:
    state_dir = tmp_path / "agent"
    settings = load_agent_settings(
        None,
        environ={},
        overrides={
            "customer_id": AGENT.customer_id,
            "device_id": AGENT.device_id,
            "state_dir": state_dir,
            "registrar_url": f"http://127.0.0.1:{platform.http_port}",
            "broker_url": f"mqtt://127.0.0.1:{platform.mqtt_port}",
            "keepalive_s": 5,
            "update_trial_s": 1.0,
            "release_public_key": str(keys[1]),
        },
    )
    settings = dataclasses.replace(settings, apps=(app_settings(health=True),))
    await upload(api, "1.0", release_artifact("1.0"))
    await upload(api, "2.0", release_artifact("2.0", CRASHES))
    async with agent_running(settings) as agent:
        first = await update(api, "1.0")
        assert first["state"] == "done", first
        assert first["result"]["outcome"] == "committed", first
        await until(lambda: running_in(agent, state_dir, "1.0"), "1.0 running")
        second = await update(api, "2.0")
        assert second["result"]["outcome"] == "rolled_back", second
        assert second["result"]["reason"] == "crashed on start: exit 3"
        await until(lambda: running_in(agent, state_dir, "1.0"), "1.0 running again")
        assert release_folders(state_dir) == ["1.0"]
