"""Apps run as their `user`: its uid, its primary group, its supplementary groups (initgroups),
HOME, USER and LOGNAME from its passwd entry. An agent that is not root cannot switch users and
says so; an unknown user is a settings error."""

from __future__ import annotations

import grp
import os
import pwd
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from iotbiz.agent.supervisor import AppState, Supervisor
from iotbiz.errors import ConfigError
from iotbiz.settings import HealthSettings, load_agent_settings
from tests.agent.test_supervisor import Events, app, gone, in_state, until

# Fixtures, shared with test_supervisor.py (imported under their own names, as pytest finds them):
from tests.agent.test_supervisor import events as events
from tests.agent.test_supervisor import log_dir as log_dir
from tests.agent.test_supervisor import make_supervisor as make_supervisor
from tests.agent.test_supervisor import start_driver as start_driver

pytestmark = pytest.mark.timeout(30)

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="switching an app to another user needs an agent running as root"
)

# Not a Python program: the test's interpreter may sit where other users cannot read it.
REPORT = (
    "/bin/sh",
    "-c",
    'echo "uid $(id -u) gid $(id -g) groups $(id -G)"; echo "env $HOME $USER $LOGNAME $EXTRA"; '
    "exec sleep 600",
)


def proc_ids(pid: int) -> dict[str, list[int]]:
    """The Uid, Gid and Groups lines of /proc/PID/status."""
    ids: dict[str, list[int]] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            ids[key] = [int(field) for field in value.split()]
    return ids


def proc_env(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(entry.decode().split("=", 1) for entry in raw if b"=" in entry)


def user_with_supplementary_groups() -> pwd.struct_passwd | None:
    for group in grp.getgrall():
        for member in group.gr_mem:
            try:
                entry = pwd.getpwnam(member)
            except KeyError:
                continue
            if entry.pw_uid != 0 and group.gr_gid != entry.pw_gid:
                return entry
    return None


@needs_root
@pytest.mark.parametrize("spec", ["nobody", "uid"])
async def test_an_app_runs_as_its_user(
    make_supervisor: Callable[..., Supervisor], spec: str
) -> None:
    nobody = pwd.getpwnam("nobody")
    user = str(nobody.pw_uid) if spec == "uid" else "nobody"
    supervisor = make_supervisor(app("low", REPORT, user=user, env={"EXTRA": "x"}))
    await supervisor.start_all()
    await until(in_state(supervisor, "low", AppState.RUNNING), "RUNNING")
    await until(lambda: len(supervisor.tail("low", 2)) == 2, "its report")
    pid = supervisor.status("low").pid
    assert pid is not None

    groups = sorted(os.getgrouplist(nobody.pw_name, nobody.pw_gid))
    ids = proc_ids(pid)
    assert ids["Uid"] == [nobody.pw_uid] * 4  # real, effective, saved, filesystem
    assert ids["Gid"] == [nobody.pw_gid] * 4
    assert sorted(ids["Groups"]) == groups  # not the agent's (root's) groups
    env = proc_env(pid)
    assert (env["HOME"], env["USER"], env["LOGNAME"], env["EXTRA"]) == (
        nobody.pw_dir,
        "nobody",
        "nobody",
        "x",
    )
    assert supervisor.tail("low", 2) == [
        f"uid {nobody.pw_uid} gid {nobody.pw_gid} groups {' '.join(map(str, groups))}",
        f"env {nobody.pw_dir} nobody nobody x",
    ]
    stopped = await supervisor.stop("low")  # the agent (root) can still signal its group
    assert stopped.exit_code is not None
    assert gone(pid)


@needs_root
async def test_supplementary_groups_come_from_the_group_database(
    make_supervisor: Callable[..., Supervisor],
) -> None:
    entry = user_with_supplementary_groups()
    if entry is None:
        pytest.skip("no user on this machine has supplementary groups")
    supervisor = make_supervisor(app("member", REPORT, user=entry.pw_name))
    await supervisor.start_all()
    await until(in_state(supervisor, "member", AppState.RUNNING), "RUNNING")
    pid = supervisor.status("member").pid
    assert pid is not None
    expected = sorted(os.getgrouplist(entry.pw_name, entry.pw_gid))
    assert len(expected) > 1
    assert sorted(proc_ids(pid)["Groups"]) == expected
    assert proc_ids(pid)["Uid"][0] == entry.pw_uid


@needs_root
async def test_the_health_command_runs_as_the_apps_user(
    make_supervisor: Callable[..., Supervisor], events: Events
) -> None:
    # Healthy only when NOT run as nobody: the unhealthy event shows it ran as the app's user.
    nobody = pwd.getpwnam("nobody")
    probe = ("/bin/sh", "-c", f'test "$(id -u)" != {nobody.pw_uid}')
    health = HealthSettings(command=probe, interval_s=0.1, timeout_s=2.0, failures=1, grace_s=0)
    supervisor = make_supervisor(app("low", ("/bin/sleep", "600"), user="nobody", health=health))
    await supervisor.start_all()
    await until(lambda: bool(events.named("app.unhealthy")), "app.unhealthy")
    assert events.named("app.unhealthy")[0]["reason"] == (
        "1 failed health checks, last: command exit 1"
    )


@needs_root
@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux only")
async def test_an_app_switched_to_its_user_still_dies_with_a_killed_agent(
    start_driver: Callable[..., Any],
) -> None:
    # Changing a process's uid clears its parent-death signal: it must be set after the switch.
    driver = await start_driver("--user", "nobody", "/bin/sleep", "600")
    assert await driver.line() == "subreaper True"
    app_pid = int((await driver.line()).split()[1])
    assert proc_ids(app_pid)["Uid"][0] == pwd.getpwnam("nobody").pw_uid

    driver.proc.send_signal(signal.SIGKILL)
    await driver.proc.wait()

    await until(lambda: gone(app_pid), "the app to die with its agent", timeout_s=5)


async def test_an_agent_that_is_not_root_cannot_switch_users(
    make_supervisor: Callable[..., Supervisor],
    events: Events,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The agent's effective uid is the operating system's; here it pretends to be an ordinary
    # user's, as an agent started without root would see (the tests may run as root).
    agent_uid = 4321 if os.geteuid() == 0 else os.geteuid()
    monkeypatch.setattr(os, "geteuid", lambda: agent_uid)
    supervisor = make_supervisor(app("low", ("/bin/sleep", "600"), user="nobody"))
    await supervisor.start_all()
    await until(in_state(supervisor, "low", AppState.FATAL), "FATAL")

    uid = pwd.getpwnam("nobody").pw_uid
    reason = (
        f"cannot start: cannot run as user 'nobody' (uid {uid}): "
        f"the agent runs as uid {agent_uid}, not root"
    )
    assert supervisor.status("low").reason == reason
    assert events.states("low") == [("STOPPED", "STARTING"), ("STARTING", "FATAL")]


async def test_a_user_that_disappeared_is_a_failed_start(
    make_supervisor: Callable[..., Supervisor],
) -> None:
    # Settings reject an unknown user; one deleted after the agent started fails its starts.
    supervisor = make_supervisor(app("ghost", ("/bin/true",), user="no-such-user", start_retries=0))
    await supervisor.start_all()
    await until(in_state(supervisor, "ghost", AppState.FATAL), "FATAL")
    assert supervisor.status("ghost").reason == (
        "gave up after 1 failed start, last: cannot start: no such user 'no-such-user'"
    )


@pytest.mark.parametrize("user", ["no-such-user", "99999999"])
def test_an_unknown_user_is_a_settings_error(tmp_path: Path, user: str) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        f'customer_id = "abc123"\n[[apps]]\nname = "a"\ncommand = ["x"]\nuser = "{user}"\n'
    )
    with pytest.raises(ConfigError, match="^" + re.escape(f"apps[0].user: no such user {user!r}")):
        load_agent_settings(config, environ={})


def test_a_known_user_is_accepted(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        'customer_id = "abc123"\n[[apps]]\nname = "a"\ncommand = ["x"]\nuser = "nobody"\n'
    )
    assert load_agent_settings(config, environ={}).apps[0].user == "nobody"
