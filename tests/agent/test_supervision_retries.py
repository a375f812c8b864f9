"""Start retries, as supervisord's `startretries`: an app that keeps failing to start (exits
before `start_s`) goes BACKOFF -> FATAL after `start_retries` retries and stays FATAL until an
operator starts it; an app that got past `start_s` keeps being restarted by its policy."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from iotbiz.agent.supervisor import AppState, Supervisor
from iotbiz.errors import ConfigError
from iotbiz.settings import AppSettings, load_agent_settings
from tests.agent.test_supervisor import Events, app, in_state, program, until

# Fixtures, shared with test_supervisor.py (imported under their own names, as pytest finds them):
from tests.agent.test_supervisor import events as events
from tests.agent.test_supervisor import log_dir as log_dir
from tests.agent.test_supervisor import make_supervisor as make_supervisor

pytestmark = pytest.mark.timeout(30)

FAILED_START = [("STARTING", "BACKOFF"), ("BACKOFF", "STARTING")]
# The crashing programs exit at once; start_s = 1 s leaves a loaded machine room to start Python.


async def test_a_crash_loop_gives_up_after_start_retries(
    make_supervisor: Callable[..., Supervisor],
    events: Events,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="iotbiz.agent.supervisor")
    supervisor = make_supervisor(
        app("bad", program("crashes"), start_retries=2, start_s=1.0),
        # The witness crashes the same way on the same backoff but retries for ever: its
        # restarts show that time passes in which "bad" would have been restarted.
        app("witness", program("crashes"), start_retries=-1, start_s=1.0),
    )
    await supervisor.start_all()
    await until(in_state(supervisor, "bad", AppState.FATAL), "FATAL", timeout_s=10)

    reason = "gave up after 3 failed starts, last: exit 1"
    assert events.states("bad") == [
        ("STOPPED", "STARTING"),
        *FAILED_START,  # retry 1
        *FAILED_START,  # retry 2
        ("STARTING", "BACKOFF"),
        ("BACKOFF", "FATAL"),
    ]
    fatal = [e for e in events.named("app.state") if e["app"] == "bad" and e["to"] == "FATAL"]
    assert [(e["from"], e["reason"], e["exit_code"]) for e in fatal] == [("BACKOFF", reason, 1)]
    assert f"bad: BACKOFF -> FATAL ({reason})" in caplog.messages
    status = supervisor.status("bad")
    assert (status.state, status.restarts, status.exit_code, status.pid) == (
        AppState.FATAL,
        2,
        1,
        None,
    )
    assert status.reason == reason
    assert status.to_json()["state"] == "FATAL"
    assert status.to_json()["reason"] == reason

    # Nothing restarts it: the witness, on the same backoff (capped at 0.8 s), restarts three
    # more times meanwhile.
    witness = supervisor.status("witness").restarts
    await until(lambda: supervisor.status("witness").restarts >= witness + 3, "the witness")
    assert events.states("bad")[-1] == ("BACKOFF", "FATAL")
    assert supervisor.status("bad").state is AppState.FATAL


async def test_an_operator_start_gives_a_fatal_app_its_retries_again(
    make_supervisor: Callable[..., Supervisor], events: Events
) -> None:
    supervisor = make_supervisor(app("bad", program("crashes"), start_retries=1, start_s=1.0))
    await supervisor.start_all()
    await until(in_state(supervisor, "bad", AppState.FATAL), "FATAL")
    assert len(events.states("bad")) == 1 + 2 + 2

    started = await supervisor.start("bad")

    assert started.state is AppState.STARTING
    assert started.reason == "start requested"
    await until(lambda: len(events.states("bad")) == 10, "FATAL again")
    assert events.states("bad")[5:] == [
        ("FATAL", "STARTING"),
        *FAILED_START,
        ("STARTING", "BACKOFF"),
        ("BACKOFF", "FATAL"),
    ]
    assert supervisor.status("bad").state is AppState.FATAL


async def test_start_retries_zero_gives_up_after_the_first_failed_start(
    make_supervisor: Callable[..., Supervisor], events: Events, tmp_path: Path
) -> None:
    supervisor = make_supervisor(
        app("bad", program("crashes", "7"), start_retries=0, start_s=1.0),
        app("missing", (str(tmp_path / "no-such-program"),), start_retries=0),
    )
    await supervisor.start_all()
    await until(in_state(supervisor, "bad", AppState.FATAL), "FATAL")
    await until(in_state(supervisor, "missing", AppState.FATAL), "FATAL")

    expected = [("STOPPED", "STARTING"), ("STARTING", "BACKOFF"), ("BACKOFF", "FATAL")]
    assert events.states("bad") == expected
    assert supervisor.status("bad").reason == "gave up after 1 failed start, last: exit 7"
    # A program that cannot be spawned is a failed start too.
    assert events.states("missing") == expected
    reason = supervisor.status("missing").reason
    assert reason is not None
    assert re.fullmatch(r"gave up after 1 failed start, last: cannot start: \[Errno 2\].*", reason)


async def test_an_app_that_started_is_restarted_whatever_start_retries_says(
    make_supervisor: Callable[..., Supervisor], events: Events
) -> None:
    # It runs 0.3 s (past start_s) before each crash: never a failed start, never FATAL.
    supervisor = make_supervisor(
        app("late", program("crashes", "1", "0.3"), start_s=0.1, start_retries=0)
    )
    await supervisor.start_all()
    await until(lambda: supervisor.status("late").restarts >= 3, "3 restarts", timeout_s=10)

    states = events.states("late")
    assert states[:5] == [
        ("STOPPED", "STARTING"),
        ("STARTING", "RUNNING"),
        ("RUNNING", "BACKOFF"),
        ("BACKOFF", "STARTING"),
        ("STARTING", "RUNNING"),
    ]
    assert ("BACKOFF", "FATAL") not in states


async def test_a_successful_start_resets_the_count_of_failed_starts(
    make_supervisor: Callable[..., Supervisor], events: Events, tmp_path: Path
) -> None:
    # Two failed starts, one good start (then a crash), two failed starts...: with
    # start_retries = 2 it would be FATAL at the 4th run if the good start did not reset the count.
    command = program("flaky", str(tmp_path / "runs"), "0.3")
    supervisor = make_supervisor(
        app("flaky", command, start_s=0.15, start_retries=2, backoff_max_s=0.4)
    )
    await supervisor.start_all()
    await until(lambda: supervisor.status("flaky").restarts >= 7, "7 restarts", timeout_s=15)

    assert ("BACKOFF", "FATAL") not in events.states("flaky")
    assert events.states("flaky").count(("STARTING", "RUNNING")) >= 2
    assert int((tmp_path / "runs").read_text()) >= 7  # the 8th may not have begun yet


def test_start_retries_is_a_setting_with_a_floor(tmp_path: Path) -> None:
    assert AppSettings().start_retries == 3  # supervisord's default
    config = tmp_path / "agent.toml"
    base = 'customer_id = "abc123"\n[[apps]]\nname = "a"\ncommand = ["x"]\n'
    config.write_text(base + "start_retries = -1\n")
    assert load_agent_settings(config, environ={}).apps[0].start_retries == -1
    config.write_text(base + "start_retries = -2\n")
    with pytest.raises(ConfigError, match=r"^apps\[0\]\.start_retries: must be at least -1"):
        load_agent_settings(config, environ={})
