"""A staged rollout to whole agents (in this process) against a real platform (ports 0): the
agents download the signed release from the platform and update; a good release completes batch
after batch, a crashing one rolls back on the first device and stops the rollout before the
second is touched."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from iotbiz.names import DeviceName
from iotbiz.platform import Platform
from iotbiz.settings import AgentSettings, load_agent_settings
from tests.agent.test_updates import (
    CRASHES,
    agent_running,
    app_settings,
    release_artifact,
    running_in,
    until,
)
from tests.agent.test_updates_platform import api, keys, platform, upload
from tests.registrar.admin_helpers import ADMIN
from tests.test_store_failures import wait_until

__all__ = ["api", "keys", "platform"]  # fixtures, used by name

pytestmark = pytest.mark.timeout(120)
DEVICES = ("upd-1", "upd-2")


def agent_settings(
    tmp_path: Path, platform: Platform, public_key: Path, device_id: str
) -> AgentSettings:
    settings = load_agent_settings(
        None,
        environ={},
        overrides={
            "customer_id": "abc123",
            "device_id": device_id,
            "state_dir": tmp_path / device_id,
            "registrar_url": f"http://127.0.0.1:{platform.http_port}",
            "broker_url": f"mqtt://127.0.0.1:{platform.mqtt_port}",
            "keepalive_s": 5,
            "update_trial_s": 1.0,
            "release_public_key": str(public_key),
        },
    )
    return dataclasses.replace(settings, apps=(app_settings(health=True),))


async def rollout_to_end(api: aiohttp.ClientSession, body: dict[str, Any]) -> dict[str, Any]:
    async with api.post(f"{ADMIN}/rollouts", json=body) as response:
        assert response.status == 201, await response.text()
        rollout_id = (await response.json())["id"]
    shown: dict[str, Any] = {}

    async def ended() -> bool:
        async with api.get(f"{ADMIN}/rollouts/{rollout_id}") as response:
            shown.update(await response.json())
        return shown["state"] != "running" and not shown["updating"]

    await wait_until(ended, 60.0)
    return shown


async def test_a_rollout_to_agents_completes_then_a_bad_one_stops(
    tmp_path: Path,
    platform: Platform,
    api: aiohttp.ClientSession,
    keys: tuple[Path, Path],
) -> None:
    await upload(api, "1.0", release_artifact("1.0"))
    await upload(api, "2.0", release_artifact("2.0", CRASHES))
    states = {d: tmp_path / d for d in DEVICES}
    async with contextlib.AsyncExitStack() as stack:
        agents = {
            d: await stack.enter_async_context(
                agent_running(agent_settings(tmp_path, platform, keys[1], d))
            )
            for d in DEVICES
        }
        for d in DEVICES:
            await wait_until(functools.partial(_online, platform, d), 30.0)
        devices = [f"abc123/{d}" for d in DEVICES]
        good = await rollout_to_end(
            api, {"app": "web", "version": "1.0", "devices": devices, "batch_size": 1}
        )
        assert good["state"] == "completed", good
        assert [d["result"] for d in good["devices"]] == ["committed", "committed"]
        for d in DEVICES:
            assert running_in(agents[d], states[d], "1.0")
        bad = await rollout_to_end(
            api, {"app": "web", "version": "2.0", "devices": devices, "batch_size": 1}
        )
        assert bad["state"] == "stopped", bad
        assert bad["reason"] == "1 failure, more than --max-failures 0"
        results = [(d["result"], d["reason"]) for d in bad["devices"]]
        assert results == [
            ("failed", "rolled_back: crashed on start: exit 3"),
            ("skipped", "rollout stopped"),
        ]
        assert bad["devices"][1]["command_id"] is None
        await until(lambda: running_in(agents["upd-1"], states["upd-1"], "1.0"), "rolled back")


async def _online(platform: Platform, device_id: str) -> bool:
    found = await platform.store.get_device(DeviceName("abc123", device_id))
    return found is not None and found.online
