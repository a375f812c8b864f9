"""The agent runs with only its own dependencies (psutil, aiomqtt/paho-mqtt): a device does not
install the platform. Checked two ways: the package metadata, and a real agent process in which
importing any of the platform's dependencies fails."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from importlib.metadata import requires
from pathlib import Path

from packaging.requirements import Requirement

PLATFORM_ONLY = ("aiohttp", "aiosqlite", "amqtt", "bcrypt", "uvloop")
AGENT_NEEDS = {"aiomqtt", "psutil"}

# Runs the agent's entry point with the platform's packages made unimportable.
BLOCKER = textwrap.dedent(
    """
    import importlib.abc, runpy, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {blocked!r}:
                raise ModuleNotFoundError(f"blocked: {{name}} is a platform dependency")
            return None

    sys.meta_path.insert(0, Block())
    sys.argv = ["iotbiz.agent", *sys.argv[1:]]
    runpy.run_module("iotbiz.agent", run_name="__main__")
    """
).format(blocked=set(PLATFORM_ONLY))


def test_base_install_requires_only_what_the_agent_needs() -> None:
    base = {
        Requirement(line).name
        for line in requires("iotbiz") or []
        if Requirement(line).marker is None or "extra" not in str(Requirement(line).marker)
    }
    assert base == AGENT_NEEDS
    platform = {
        Requirement(line).name
        for line in requires("iotbiz") or []
        if Requirement(line).marker is not None
        and Requirement(line).marker.evaluate({"extra": "platform"})  # type: ignore[union-attr]
    }
    assert set(PLATFORM_ONLY) <= platform


def test_agent_starts_without_the_platform_packages(tmp_path: Path) -> None:
    """A real agent process, its platform unreachable, with aiohttp, amqtt, bcrypt... blocked:
    it loads its settings, starts its app and keeps retrying enrollment (it must not crash on an
    import). Stopped with SIGTERM, it exits 0."""
    marker = tmp_path / "app-ran"
    app = tmp_path / "app.py"
    app.write_text(f"import pathlib, time\npathlib.Path({str(marker)!r}).touch()\ntime.sleep(60)\n")
    config = tmp_path / "agent.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            customer_id = "abc123"
            device_id = "alone-1"
            registrar_url = "http://127.0.0.1:9"
            broker_url = "mqtt://127.0.0.1:9"
            state_dir = "{tmp_path / "state"}"

            [[apps]]
            name = "touch"
            command = ["{sys.executable}", "{app}"]
            """
        )
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", BLOCKER, "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = 20.0
        started = time.monotonic()
        while not marker.exists() and proc.poll() is None:
            assert time.monotonic() - started < deadline, "the app did not start"
            time.sleep(0.05)
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        proc.terminate()
        output, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 0, output
    assert "blocked:" not in output, output
    assert "Traceback" not in output, output
