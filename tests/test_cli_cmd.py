"""`iotbiz cmd` as an operator runs it: a real CLI process against a real platform (in-process,
ports 0, on each store backend) with paho clients answering as devices. The token comes from
the `admin.token` file the platform wrote beside its SQLite store (`--db`), or from the
`--config` file of a platform on PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from iotbiz.names import DeviceName
from iotbiz.platform import Platform
from tests.test_dispatch import A, B, Device, enroll, platform

__all__ = ["platform"]  # the fixture, used by name


def store_flags(platform: Platform) -> list[str]:
    """How the CLI finds the platform's token: its store file's folder (SQLite), or the
    --config file naming its PostgreSQL store and token."""
    settings = platform.settings
    if not settings.store.url:
        return ["--db", str(settings.store.path)]
    config = settings.store.path.parent / "platform.toml"
    config.write_text(
        f'[store]\nurl = "{settings.store.url}"\n[admin]\ntoken = "{settings.admin.token}"\n'
    )
    return ["--config", str(config)]


async def run_cli(platform: Platform, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "iotbiz",
        "cmd",
        *args,
        "--url",
        f"http://127.0.0.1:{platform.http_port}",
        *store_flags(platform),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def online(platform: Platform, name: DeviceName) -> Device:
    device = Device(platform, name, await enroll(platform, name))
    await device.connect()
    for _ in range(200):  # presence writes in batches: wait until the store says online
        stored = await platform.store.get_device(name)
        if stored is not None and stored.online:
            return device
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name} not online")


async def answer(device: Device, reply: dict[str, Any]) -> dict[str, Any]:
    command = await device.next_command()
    await device.reply({"id": command["id"], **reply})
    return command


async def test_cmd_prints_the_result_and_exits_0(platform: Platform) -> None:
    device = await online(platform, A)
    try:
        cli = asyncio.create_task(
            run_cli(platform, str(A), "app.logs", "--arg", "name=web", "--arg", "lines=5")
        )
        command = await answer(device, {"ok": True, "result": {"lines": ["a", "b"]}})
        code, out, err = await cli
    finally:
        device.close()
    assert command["action"] == "app.logs"
    assert command["args"] == {"name": "web", "lines": 5}  # lines=5 is a number
    assert code == 0, err
    assert json.loads(out) == {"lines": ["a", "b"]}


async def test_a_failed_command_exits_1_with_the_error(platform: Platform) -> None:
    device = await online(platform, A)
    try:
        cli = asyncio.create_task(run_cli(platform, str(A), "frobnicate"))
        await answer(device, {"ok": False, "error": "unknown action 'frobnicate'"})
        code, out, err = await cli
    finally:
        device.close()
    assert code == 1
    assert out == ""
    assert err.strip() == f"iotbiz: {A}: failed: unknown action 'frobnicate'"


async def test_no_answer_in_time_exits_3_and_the_command_stays_queued(platform: Platform) -> None:
    device = await online(platform, A)
    device.close()  # offline now: the command waits for it
    code, _, err = await run_cli(platform, str(A), "ping", "--wait", "1")
    assert code == 3
    assert "no answer within 1 s" in err
    assert (await platform.store.list_commands(name=A))[0].state.value in ("queued", "sent")


async def test_many_devices_get_a_table_and_the_worst_exit_code(platform: Platform) -> None:
    a, b = await online(platform, A), await online(platform, B)
    try:
        cli = asyncio.create_task(run_cli(platform, "--customer", "abc123", "ping", "--json"))
        await asyncio.gather(
            answer(a, {"ok": True, "result": {"pong": True}}),
            answer(b, {"ok": False, "error": "busy"}),
        )
        code, out, _ = await cli
    finally:
        a.close()
        b.close()
    assert code == 1
    results = {c["device"]: c["state"] for c in json.loads(out)}
    assert results == {str(A): "done", str(B): "failed"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ping"], "name at least one device"),
        ([str(A), "ping", "--arg", "novalue"], "--arg: expected KEY=VALUE"),
        (["nobody/none", "ping"], "400"),
        ([str(A), "ping", "--tag", "site=x"], "--tag only goes with --customer"),
    ],
)
async def test_bad_usage_is_one_line(platform: Platform, args: list[str], message: str) -> None:
    code, _, err = await run_cli(platform, *args)
    assert code == 1
    assert message in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


async def test_a_wrong_token_is_refused(platform: Platform) -> None:
    code, _, err = await run_cli(platform, str(A), "ping", "--token", "wrong")
    assert code == 1
    assert "401" in err


def test_names_stay_text_other_values_are_json() -> None:
    from iotbiz.cli_remote import parse_pairs

    args = ["version=1.10", "app=2", "name=007", "lines=50", "force=true", "label=web"]
    assert parse_pairs(args, "--arg", values_as_json=True) == {
        "version": "1.10",
        "app": "2",
        "name": "007",
        "lines": 50,
        "force": True,
        "label": "web",
    }


def test_on_postgresql_the_token_comes_from_the_config(tmp_path: Path) -> None:
    """A platform on a PostgreSQL store has no admin.token file: the CLI says where the token
    must come from (nothing is contacted: it stops before any request)."""
    config = tmp_path / "platform.toml"
    config.write_text('[store]\nurl = "postgresql://iotbiz@127.0.0.1:1/iotbiz"\n')
    (tmp_path / "admin.token").write_text("a-sqlite-platforms-token\n")  # not this platform's
    done = subprocess.run(
        [sys.executable, "-m", "iotbiz", "cmd", "abc123/dev-1", "ping", "--config", str(config),
         "--url", "http://127.0.0.1:9"],
        capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path,
        env={**os.environ, "IOTBIZ_ADMIN_TOKEN": ""},
    )  # fmt: skip
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == (
        "iotbiz: no admin token: give --token, set IOTBIZ_ADMIN_TOKEN, or set admin.token in the"
        " --config file (a platform on a PostgreSQL store has no admin.token file)\n"
    )
