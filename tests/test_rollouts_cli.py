"""`iotbiz rollout` as an operator runs it: real CLI processes against a real platform
(in-process, ports 0) with paho clients answering as devices; with `--token`."""

from __future__ import annotations

import asyncio
import json
import sys

from iotbiz.platform import Platform
from tests.registrar.admin_helpers import TOKEN
from tests.test_dispatch import device
from tests.test_rollouts import answer, names, platform

__all__ = ["platform"]  # the fixture, used by name


async def rollout_cli(platform: Platform, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "iotbiz",
        "rollout",
        *args,
        "--url",
        f"http://127.0.0.1:{platform.http_port}",
        "--token",
        TOKEN,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_start_wait_list_status_and_abort(platform: Platform) -> None:
    online = [await device(platform, name) for name in names(2)]
    await device(platform, names(3)[2], connect=False)
    try:
        cli = asyncio.create_task(
            rollout_cli(
                platform, "start", "web", "2.0", "--devices", "abc123/dev-1,abc123/dev-0",
                "--batch", "1", "--wait",
            )
        )  # fmt: skip
        for dev in online:  # batch 0 is dev-0 (by name), then dev-1
            await answer(dev, "committed")
        code, out, err = await cli
        assert code == 0, (out, err)
        first_line, summary = out.splitlines()[:2]
        rollout_id = first_line.split()[1].rstrip(":")
        assert first_line.startswith(f"rollout {rollout_id}: running, batch 1/2;")
        assert summary == (
            f"rollout {rollout_id}: web 2.0: completed, batch 2/2; 2 devices: 2 committed,"
            " 0 failed, 0 updating, 0 waiting, 0 skipped"
        )

        code, out, err = await rollout_cli(platform, "list")
        assert code == 0, err
        assert out.startswith(f"{rollout_id}  web 2.0  completed")

        code, out, err = await rollout_cli(platform, "status", rollout_id, "--json")
        assert code == 0, err
        shown = json.loads(out)
        assert [d["name"] for d in shown["devices"]] == ["abc123/dev-0", "abc123/dev-1"]

        code, out, err = await rollout_cli(
            platform, "start", "web", "2.0", "--devices", "abc123/dev-2", "--max-failures", "1"
        )
        assert code == 0, err
        second = out.split()[1].rstrip(":")
        code, out, err = await rollout_cli(platform, "abort", second)
        assert code == 0, err
        assert out.startswith(f"rollout {second}: aborted,")
        code, out, err = await rollout_cli(platform, "abort", second)
        assert code == 1
        assert err == (
            f"iotbiz: POST /api/v1/admin/rollouts/{second}/abort: 409 rollout {second} is"
            " already aborted\n"
        )
        code, out, err = await rollout_cli(platform, "status", second)
        assert code == 1  # ended, not completed
        assert "aborted" in out

        code, out, err = await rollout_cli(platform, "start", "web", "2.0")
        assert (code, err) == (1, "iotbiz: give --devices or --customer (one of them)\n")
        code, out, err = await rollout_cli(platform, "start", "web")
        assert code == 2
        code, out, err = await rollout_cli(platform, "start", "web", "9", "--customer", "abc123")
        assert code == 1
        assert err == (
            "iotbiz: POST /api/v1/admin/rollouts: 400 no release web 9 (add it with iotbiz"
            " release add)\n"
        )
    finally:
        for dev in online:
            dev.close()
