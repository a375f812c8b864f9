"""An agent killed during an update recovers to a running, committed release.

Real agent processes (`python -m iotbiz.agent`), a real platform (in this process, ports 0), the
release server of test_updates.py. The first agent installs 1.0, then is sent 2.0 and SIGKILLs
itself right after writing journal state X (the documented test hook TEST_IOTBIZ_KILL_AFTER,
as a power cut would); a second agent on the same state folder must finish or roll back the
update, run the app from a complete release, and answer the update command. Plus a power cut
from outside in the middle of the download: the next agent resumes it with Range.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest
import pytest_asyncio

from iotbiz.platform import Platform
from tests.agent import test_updates
from tests.agent.test_shutdown_cycles import AgentProcess
from tests.agent.test_updates import (
    AGENT,
    APP,
    CRASHES,
    GOOD,
    Operator,
    ReleaseServer,
    journal,
    release_artifact,
    release_folders,
)

# the fixtures of test_updates.py, used here too
platform = test_updates.platform
state_dir = test_updates.state_dir
server = test_updates.server
operator = test_updates.operator

pytestmark = pytest.mark.timeout(120)


def write_config(path: Path, server: ReleaseServer, platform: Platform, state_dir: Path) -> Path:
    python = json.dumps(sys.executable)
    path.write_text(
        f'customer_id = "{AGENT.customer_id}"\ndevice_id = "{AGENT.device_id}"\n'
        f'registrar_url = "{server.url}"\n'
        f'broker_url = "mqtt://127.0.0.1:{platform.mqtt_port}"\n'
        f'state_dir = "{state_dir}"\ntelemetry_interval_s = 1\nkeepalive_s = 5\n'
        f'log_level = "DEBUG"\nupdate_trial_s = 1.0\n'
        f'\n[[apps]]\nname = "{APP}"\ncommand = [{python}, "app.py"]\nrelease = true\n'
        f"start_s = 0.3\nstop_timeout_s = 2.0\nbackoff_s = 0.2\nbackoff_max_s = 0.5\n"
    )
    return path


@pytest_asyncio.fixture
async def config(
    tmp_path: Path, server: ReleaseServer, platform: Platform, state_dir: Path
) -> AsyncIterator[Path]:
    yield write_config(tmp_path / "agent.toml", server, platform, state_dir)


async def running_release(operator: Operator, state_dir: Path) -> str | None:
    """The release the app RUNS in (its process's working folder), per a `status` command."""
    reply = await operator.ask("status", {})
    [app] = [app for app in reply["result"]["apps"] if app["name"] == APP]
    if app["state"] != "RUNNING" or app["pid"] is None:
        return None
    try:
        cwd = Path(psutil.Process(app["pid"]).cwd())
    except psutil.Error:
        return None
    releases = (state_dir / "apps" / APP / "releases").resolve()
    return cwd.name if cwd.parent == releases else None


async def until_running(operator: Operator, state_dir: Path, version: str) -> None:
    deadline = time.monotonic() + 30
    while await running_release(operator, state_dir) != version:
        if time.monotonic() > deadline:
            raise AssertionError(f"the app is not running release {version}")
        await asyncio.sleep(0.2)


async def install_first(
    tmp_path: Path, config: Path, server: ReleaseServer, operator: Operator, env: dict[str, str]
) -> AgentProcess:
    first = AgentProcess(config, tmp_path / "agent-1.log", env)
    await first.wait_logged("connected to mqtt://")
    reply = await operator.ask("update", server.add("1.0", release_artifact("1.0")))
    assert reply["result"]["outcome"] == "committed", (reply, first.log())
    return first


# (journal state the first agent dies in, 2.0 crashes on start, what the second agent ends with)
CASES = [
    ("downloading", False, "committed"),
    ("verified", False, "committed"),
    ("staged", False, "committed"),
    ("switching", False, "committed"),
    ("trial", False, "rolled_back"),
    ("committed", False, "committed"),
    ("rolling_back", True, "rolled_back"),
    ("rolled_back", True, "rolled_back"),
]


@pytest.mark.parametrize(("state", "crashes", "outcome"), CASES)
async def test_killed_in_each_journal_state_the_agent_recovers(
    tmp_path: Path,
    config: Path,
    server: ReleaseServer,
    operator: Operator,
    state_dir: Path,
    state: str,
    crashes: bool,
    outcome: str,
) -> None:
    first = await install_first(
        tmp_path, config, server, operator, {"TEST_IOTBIZ_KILL_AFTER": f"{state}@2.0"}
    )
    try:
        artifact = release_artifact("2.0", CRASHES if crashes else GOOD)
        command_id = await operator.send("update", server.add("2.0", artifact))
        assert await first.exit_code(30) == -signal.SIGKILL, first.log()
        assert f"test hook: SIGKILL after writing {state}" in first.log()
        assert journal(state_dir)["state"] == state
    finally:
        first.kill()
    second = AgentProcess(config, tmp_path / "agent-2.log")
    try:
        reply = await operator.reply(command_id)
        assert reply["ok"] is True, second.log()
        assert reply["result"]["outcome"] == outcome, (reply, second.log())
        assert reply["result"]["previous"] == "1.0"
        expected = "2.0" if outcome == "committed" else "1.0"
        await until_running(operator, state_dir, expected)
        final = journal(state_dir)
        assert final["state"] == outcome
        assert os.readlink(state_dir / "apps" / APP / "current") == f"releases/{expected}"
        if outcome == "committed":
            assert release_folders(state_dir) == ["1.0", "2.0"]
            assert final["bad"] == []
        else:
            assert release_folders(state_dir) == ["1.0"]  # no half-made or bad release left
            assert final["bad"] == ["2.0"]
        if state == "trial":
            assert final["reason"] == "agent restarted during the trial"
        if crashes:
            assert final["reason"] == "crashed on start: exit 3"
    finally:
        second.kill()


async def test_a_power_cut_in_the_middle_of_the_download_resumes_it(
    tmp_path: Path,
    config: Path,
    server: ReleaseServer,
    operator: Operator,
    state_dir: Path,
) -> None:
    first = await install_first(tmp_path, config, server, operator, {})
    data = release_artifact("2.0")
    half = len(data) // 2
    server.stall_at = half
    try:
        command_id = await operator.send("update", server.add("2.0", data))
        await asyncio.wait_for(server.stalled.wait(), 30)
        part = state_dir / "downloads" / f"{APP}-2.0.part"
        await first.wait_for(
            lambda: part.exists() and part.stat().st_size == half, "half the download on disk"
        )
        first.kill()  # SIGKILL, from outside
    finally:
        first.kill()
    second = AgentProcess(config, tmp_path / "agent-2.log")
    try:
        reply = await operator.reply(command_id)
        assert reply["result"]["outcome"] == "committed", (reply, second.log())
        downloads = [r for r in server.requests if r.authorization and r.status in (200, 206)]
        cut, resumed = downloads[-2:]
        assert (cut.range, cut.sent) == (None, half)
        assert (resumed.range, resumed.status) == (f"bytes={half}-", 206)
        assert resumed.sent == len(data) - half  # only the missing half was sent again
        await until_running(operator, state_dir, "2.0")
    finally:
        second.kill()
