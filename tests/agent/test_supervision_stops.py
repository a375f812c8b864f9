"""An operator's stop outlives the agent: `app.stop` is written to the state folder and an app
stopped that way stays STOPPED ("stopped by operator") when the agent starts again, until an
operator starts or restarts it."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from iotbiz.agent.supervisor import AppState, Supervisor
from tests.agent.test_supervisor import Events, app, gone, in_state, program, until

# Fixtures, shared with test_supervisor.py (imported under their own names, as pytest finds them):
from tests.agent.test_supervisor import events as events
from tests.agent.test_supervisor import log_dir as log_dir
from tests.agent.test_supervisor import make_supervisor as make_supervisor
from tests.agent.test_supervisor import start_driver as start_driver

pytestmark = pytest.mark.timeout(30)

APPS = (app("web", program("runs")), app("other", program("runs")))


@pytest.fixture
def state_file(tmp_path: Path) -> Path:
    folder = tmp_path / "state"
    folder.mkdir(mode=0o700)
    return folder / "supervisor.json"


def starts(events: Events, name: str) -> int:
    return sum(1 for _, to in events.states(name) if to == "STARTING")


async def test_an_operator_stop_survives_a_supervisor_restart(
    make_supervisor: Callable[..., Supervisor], events: Events, state_file: Path
) -> None:
    first = make_supervisor(*APPS, state_file=state_file)
    await first.start_all()
    await until(in_state(first, "web", AppState.RUNNING), "RUNNING")

    stopped = await first.stop("web")

    assert (stopped.state, stopped.reason) == (AppState.STOPPED, "stopped by operator")
    assert events.states("web")[-1] == ("STOPPING", "STOPPED")
    assert json.loads(state_file.read_text()) == {"stopped": ["web"]}
    assert sorted(path.name for path in state_file.parent.iterdir()) == ["supervisor.json"]
    assert state_file.stat().st_mode & 0o777 == 0o600
    await first.stop_all()  # the agent going down: not an operator's stop
    assert first.status("other").reason == "agent stopping"
    assert json.loads(state_file.read_text()) == {"stopped": ["web"]}

    second_events = Events()
    second = make_supervisor(*APPS, state_file=state_file, on_event=second_events)
    await second.start_all()
    # start_all has started (or left alone) every app before it returns.
    assert starts(second_events, "other") == 1
    assert starts(second_events, "web") == 0
    status = second.status("web")
    assert (status.state, status.pid, status.reason) == (
        AppState.STOPPED,
        None,
        "stopped by operator",
    )
    assert status.to_json()["reason"] == "stopped by operator"

    started = await second.start("web")  # the operator's start forgets the stop

    assert started.state is AppState.STARTING
    assert json.loads(state_file.read_text()) == {"stopped": []}
    await second.stop_all()
    third = make_supervisor(*APPS, state_file=state_file, on_event=Events())
    await third.start_all()
    assert third.status("web").state is AppState.STARTING


async def test_an_operator_restart_forgets_the_stop(
    make_supervisor: Callable[..., Supervisor], state_file: Path
) -> None:
    first = make_supervisor(*APPS, state_file=state_file)
    await first.start_all()
    await first.stop("web")
    assert json.loads(state_file.read_text()) == {"stopped": ["web"]}
    await first.stop("other")
    assert json.loads(state_file.read_text()) == {"stopped": ["other", "web"]}

    restarted = await first.restart("web")

    assert restarted.state is AppState.STARTING
    assert json.loads(state_file.read_text()) == {"stopped": ["other"]}


async def test_a_stop_of_an_app_that_is_not_running_is_remembered(
    make_supervisor: Callable[..., Supervisor], events: Events, state_file: Path
) -> None:
    supervisor = make_supervisor(
        app("done", program("crashes", "3"), restart="never"), state_file=state_file
    )
    await supervisor.start_all()
    await until(in_state(supervisor, "done", AppState.EXITED), "EXITED")

    stopped = await supervisor.stop("done")

    assert (stopped.state, stopped.reason) == (AppState.STOPPED, "stopped by operator")
    assert events.states("done")[-1] == ("EXITED", "STOPPED")
    assert json.loads(state_file.read_text()) == {"stopped": ["done"]}


@pytest.mark.parametrize("content", ["not json", '{"stopped": "web"}', '["web"]'])
async def test_an_unreadable_state_file_starts_everything(
    make_supervisor: Callable[..., Supervisor],
    state_file: Path,
    caplog: pytest.LogCaptureFixture,
    content: str,
) -> None:
    caplog.set_level(logging.WARNING, logger="iotbiz.agent.supervisor")
    state_file.write_text(content)
    supervisor = make_supervisor(*APPS, state_file=state_file)
    await supervisor.start_all()
    assert [status.state for status in supervisor.statuses()] == [AppState.STARTING] * 2
    assert f"ignoring {state_file}: not a list of stopped apps" in caplog.messages


async def test_an_unwritable_state_file_does_not_stop_the_stop(
    make_supervisor: Callable[..., Supervisor],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    state_file = tmp_path / "no-such-folder" / "supervisor.json"
    supervisor = make_supervisor(*APPS, state_file=state_file)
    await supervisor.start_all()
    stopped = await supervisor.stop("web")
    assert stopped.state is AppState.STOPPED
    assert any(message.startswith("cannot remember") for message in caplog.messages)


async def test_a_stop_outlives_a_killed_agent_process(
    start_driver: Callable[..., Any], tmp_path: Path
) -> None:
    state_file = tmp_path / "supervisor.json"
    command = ("--state", str(state_file), *program("runs"))
    driver = await start_driver(*command)
    assert await driver.line() == "subreaper True"
    app_pid = int((await driver.line()).split()[1])
    assert await driver.send("stop") == "app STOPPED stopped by operator"
    assert gone(app_pid)
    driver.proc.send_signal(signal.SIGKILL)  # no clean shutdown: the stop must be on disk
    await driver.proc.wait()

    again = await start_driver(*command)
    assert await again.line() == "subreaper True"
    assert await again.line() == "app STOPPED stopped by operator"
    assert await again.send("start") == "app STARTING start requested"


async def test_the_agent_process_passes_its_state_folder(tmp_path: Path) -> None:
    # The real agent (python -m iotbiz.agent), with no platform to reach: it starts its apps
    # first, and leaves alone the one its state folder says an operator stopped.
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    (state_dir / "supervisor.json").write_text('{"stopped": ["held"]}')
    runs = json.dumps([*program("runs")])
    config = tmp_path / "agent.toml"
    config.write_text(
        'customer_id = "abc123"\ndevice_id = "stops-1"\n'
        'registrar_url = "http://127.0.0.1:9"\nbroker_url = "mqtt://127.0.0.1:9"\n'
        f'state_dir = "{state_dir}"\n'
        f'[[apps]]\nname = "held"\ncommand = {runs}\nstart_s = 0.2\n'
        f'[[apps]]\nname = "other"\ncommand = {runs}\nstart_s = 0.2\n'
    )
    agent = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "iotbiz.agent",
        "--config",
        str(config),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        cwd=tmp_path,
    )
    assert agent.stderr is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(20):
            while not any("other: STARTING -> RUNNING" in line for line in lines):
                line = (await agent.stderr.readline()).decode()
                assert line, f"the agent exited: {lines}"
                lines.append(line)
        assert any(line.endswith("held: left STOPPED (stopped by operator)\n") for line in lines)
        assert not any("held: STOPPED -> STARTING" in line for line in lines)
        agent.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            await agent.communicate()
        assert agent.returncode == 0
    finally:
        if agent.returncode is None:
            agent.kill()
            await agent.wait()
