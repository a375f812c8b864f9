"""The agent end to end: a real platform process, a real agent process, real child apps.

One app runs, one crashes on start, one ignores SIGTERM. The device enrolls and comes online,
telemetry reaches the store, the crashing app is restarted with growing delays, commands are
answered once, the platform is killed and restarted and the agent comes back by itself and
sends the telemetry it queued meanwhile, and an agent killed with SIGKILL leaves no app behind.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

from tests.mqtt_device import PahoDevice
from tests.processes import platform_process, run_cli

DEVICE = "abc123/e2e-1"
PREFIX = f"devices/{DEVICE}/"
RUNNER = "import signal, sys, time\nsignal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n" + (
    "while True:\n    print('tick', flush=True)\n    time.sleep(0.2)\n"
)
CRASHER = "import sys\nprint('boom', flush=True)\nsys.exit(3)\n"
STUBBORN = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n" + (
    "print('ignoring SIGTERM', flush=True)\ntime.sleep(3600)\n"
)


def agent_config(tmp_path: Path, http_port: int, mqtt_port: int) -> Path:
    python = json.dumps(sys.executable)
    apps = ""
    for name, program, extra in (
        ("runner", RUNNER, 'restart = "always"'),
        ("crasher", CRASHER, 'restart = "on-failure"\nbackoff_s = 0.2\nbackoff_max_s = 5.0'),
        ("stubborn", STUBBORN, 'restart = "always"\nstop_timeout_s = 1.0'),
    ):
        apps += (
            f'\n[[apps]]\nname = "{name}"\ncommand = [{python}, "-c", {json.dumps(program)}]\n'
            f"{extra}\n"
        )
    config = tmp_path / "agent.toml"
    config.write_text(
        f'customer_id = "abc123"\ndevice_id = "e2e-1"\n'
        f'registrar_url = "http://127.0.0.1:{http_port}"\n'
        f'broker_url = "mqtt://127.0.0.1:{mqtt_port}"\n'
        f'state_dir = "{tmp_path / "agent-state"}"\n'
        f'telemetry_interval_s = 1\nkeepalive_s = 5\nlog_level = "DEBUG"\n{apps}'
    )
    return config


@contextmanager
def agent_process(tmp_path: Path, config: Path) -> Iterator[subprocess.Popen[bytes]]:
    log = (tmp_path / "agent.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "iotbiz.agent", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def device_json(db: Path) -> dict[str, Any] | None:
    result = run_cli("device", "show", DEVICE, "--json", "--db", str(db))
    return json.loads(result.stdout) if result.returncode == 0 else None


async def until(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await asyncio.to_thread(check)
        if value:
            return value
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


async def next_on(client: PahoDevice, suffix: str, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = await client.next_message(timeout=max(0.1, deadline - time.monotonic()))
        if message is not None and message.topic == PREFIX + suffix:
            return dict(json.loads(message.payload))
    raise AssertionError(f"no {suffix} message within {timeout} s")


async def command(ops: PahoDevice, body: dict[str, Any]) -> dict[str, Any]:
    await ops.publish(PREFIX + "cmd", json.dumps(body))
    return await next_on(ops, "reply")


async def operator(db: Path, port: int) -> PahoDevice:
    password = json.loads(run_cli("account", "add", "ops", "--db", str(db), "--json").stdout)[
        "password"
    ]
    ops = PahoDevice(port, "ops", password, client_id="ops")
    assert await ops.connect() == 0
    assert await ops.subscribe(PREFIX + "#") == [1]
    return ops


async def test_agent_end_to_end(tmp_path: Path) -> None:
    db = tmp_path / "platform.db"
    assert run_cli("customer", "add", "abc123", "--limit", "5", "--db", str(db)).returncode == 0

    with platform_process(tmp_path, "--db", str(db)) as platform:  # ports 0, read back
        http_port, mqtt_port = platform.http_port, platform.mqtt_port
        # the restarted platform binds the ports that this one really had
        ports = ("--db", str(db), "--http-port", str(http_port), "--mqtt-port", str(mqtt_port))
        config = agent_config(tmp_path, http_port, mqtt_port)
        ops = await operator(db, mqtt_port)
        with agent_process(tmp_path, config) as agent:
            # enrolled, active, online; telemetry with three apps reaches the store
            def online_with_apps() -> dict[str, Any] | None:
                device = device_json(db)
                if device and device["state"] == "active" and device["online"]:
                    telemetry = device["telemetry"] or {}
                    apps = {a["name"]: a for a in telemetry.get("apps", [])}
                    if set(apps) == {"runner", "crasher", "stubborn"} and (
                        apps["runner"]["state"] == "RUNNING"
                    ):
                        return device
                return None

            device = await until(online_with_apps, 30, "the device online, its apps running")
            assert device["telemetry"]["system"]["memory"]["total"] > 0

            # the crashing app is restarted with growing delays (events on `events`)
            starts: list[float] = []
            deadline = time.monotonic() + 30
            while len(starts) < 4 and time.monotonic() < deadline:
                event = await next_on(ops, "events", timeout=30)
                if event.get("app") == "crasher" and event.get("to") == "STARTING":
                    starts.append(event["ts"])
            gaps = [b - a for a, b in itertools.pairwise(starts)]
            assert len(gaps) == 3, starts
            assert gaps[2] > gaps[0]

            # commands: answered once per id, errors as replies
            reply = await command(ops, {"id": "c1", "action": "ping"})
            assert (reply["id"], reply["ok"], reply["result"]["pong"]) == ("c1", True, True)
            again = await command(ops, {"id": "c1", "action": "ping"})
            assert again == reply
            reply = await command(ops, {"id": "c2", "action": "reboot-the-moon"})
            assert reply == {"id": "c2", "ok": False, "error": "unknown action 'reboot-the-moon'"}
            reply = await command(
                ops, {"id": "c3", "action": "app.logs", "args": {"name": "runner", "lines": 2}}
            )
            assert reply["result"]["lines"] == ["tick", "tick"]
            reply = await command(ops, {"id": "c4", "action": "app.logs", "args": {"name": 5}})
            assert reply == {
                "id": "c4",
                "ok": False,
                "error": "args.name must be the name of an app",
            }
            ops.close()

            # the platform dies; the agent queues telemetry; the platform comes back
            platform.proc.kill()
            platform.proc.wait(timeout=10)
            killed_at = time.time()
            outbox = tmp_path / "agent-state" / "outbox.jsonl"

            await until(
                lambda: queued_since(outbox, killed_at) >= 2, 20, "telemetry queued meanwhile"
            )
            restarted_at = time.time()
            with platform_process(tmp_path, *ports) as restarted:
                # the queued telemetry leaves the outbox once the new broker acknowledged it
                await until(
                    lambda: queued_since(outbox, killed_at) == 0, 40, "the queue sent at last"
                )
                await until(
                    lambda: (
                        (device_json(db) or {}).get("online")
                        and (device_json(db) or {})["telemetry"]["ts"] > restarted_at
                    ),
                    20,
                    "online again, with fresh telemetry",
                )

                # SIGKILL the agent: no app survives it
                last = (device_json(db) or {})["telemetry"]
                pids = [a["pid"] for a in last["apps"] if a["pid"]]
                assert len(pids) >= 2
                agent.kill()
                agent.wait(timeout=10)
                await until(
                    lambda: not any(psutil.pid_exists(pid) and _alive(pid) for pid in pids),
                    10,
                    "the apps to die with the agent",
                )
                assert restarted.stop() == 0
    assert "Traceback" not in (tmp_path / "agent.log").read_text()


def queued_since(outbox: Path, since: float) -> int:
    """How many telemetry messages from after `since` wait in the agent's outbox file."""
    count = 0
    for line in outbox.read_bytes().splitlines() if outbox.exists() else []:
        try:
            record = json.loads(line)
            message = json.loads(record["payload"])
        except (ValueError, KeyError):
            continue  # a line being written
        if record["topic"] == PREFIX + "telemetry" and message.get("ts", 0) > since:
            count += 1
    return count


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def test_sigterm_stops_apps_and_says_offline(tmp_path: Path) -> None:
    db = tmp_path / "platform.db"
    assert run_cli("customer", "add", "abc123", "--limit", "5", "--db", str(db)).returncode == 0
    with (
        platform_process(tmp_path, "--db", str(db)) as platform,
        agent_process(
            tmp_path, agent_config(tmp_path, platform.http_port, platform.mqtt_port)
        ) as agent,
    ):
        mqtt_port = platform.mqtt_port
        device = await until(
            lambda: (d := device_json(db)) and d["online"] and d["telemetry"] and d, 30, "online"
        )
        ops = await operator(db, mqtt_port)
        pids = [a["pid"] for a in device["telemetry"]["apps"] if a["pid"]]
        started = time.monotonic()
        agent.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(agent.wait, 20) == 0
        assert time.monotonic() - started < 10  # the stubborn app is killed after 1 s
        assert not any(_alive(pid) for pid in pids)
        status = await next_on(ops, "status", timeout=10)
        while status["state"] != "offline":
            status = await next_on(ops, "status", timeout=10)
        await until(lambda: not (device_json(db) or {"online": True})["online"], 10, "offline")
        ops.close()
    log = (tmp_path / "agent.log").read_text()
    assert "Traceback" not in log
    assert os.path.exists(tmp_path / "agent-state" / "logs" / "runner.log")
