"""A platform process killed (SIGKILL) in the middle of a rollout: the next process on the same
store resumes it where it was, and no device gets a second update command for it. Real
processes (the platform, the CLI) and paho clients answering as devices."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from iotbiz.names import DeviceName
from iotbiz.store import Store
from tests.agent.test_updates import release_artifact
from tests.processes import enroll_device, platform_process, run_cli
from tests.test_dispatch import Device
from tests.test_rollouts import answer
from tests.test_store_failures import wait_until

pytestmark = pytest.mark.timeout(120)
NAMES = [DeviceName("abc123", f"dev-{i}") for i in range(3)]


def rollout_json(url: str, db: Path, rollout_id: str) -> dict[str, object]:
    shown = run_cli("rollout", "status", rollout_id, "--json", "--url", url, "--db", str(db))
    assert shown.returncode in (0, 1), shown.stderr
    return dict(json.loads(shown.stdout))


async def test_a_killed_platform_resumes_the_rollout_without_a_second_update(
    tmp_path: Path,
) -> None:
    db = tmp_path / "iotbiz.db"
    artifact = tmp_path / "web-2.0.tar.gz"
    artifact.write_bytes(release_artifact("2.0"))
    assert run_cli("customer", "add", "abc123", "--limit", "10", "--db", str(db)).returncode == 0
    added = run_cli(
        "release", "add", "--app", "web", "--version", "2.0", str(artifact), "--db", str(db)
    )
    assert added.returncode == 0, added.stderr
    with platform_process(tmp_path, "--db", str(db)) as first:
        passwords = {name: enroll_device(first.url, *name) for name in NAMES}
        started = run_cli(
            "rollout", "start", "web", "2.0", "--customer", "abc123", "--batch", "2",
            "--url", first.url, "--db", str(db),
        )  # fmt: skip
        assert started.returncode == 0, started.stderr
        rollout_id = started.stdout.split()[1].rstrip(":")
        await wait_until(lambda: rollout_json(first.url, db, rollout_id)["updating"] == 2, 20)
        assert first.stop(signal.SIGKILL) == -signal.SIGKILL
    with platform_process(tmp_path, "--db", str(db)) as second:
        devices = [Device(second, name, passwords[name]) for name in NAMES]  # type: ignore[arg-type]
        try:
            for device in devices:
                await device.connect()
            for device in devices:
                await answer(device, "committed")
            await wait_until(
                lambda: rollout_json(second.url, db, rollout_id)["state"] != "running", 30
            )
        finally:
            for device in devices:
                device.close()
        shown = rollout_json(second.url, db, rollout_id)
        assert (shown["state"], shown["committed"]) == ("completed", 3), shown
    store = await Store.open(db)
    try:
        for name in NAMES:
            assert len(await store.list_commands(name=name, limit=10)) == 1, name
    finally:
        await store.close()
