"""MQTT 3.1.1 conformance: IoTBiz against plain amqtt 0.12.1 and mosquitto 2, in one run.

    python scripts/conformance.py [--json] [--brokers iotbiz,amqtt,mosquitto] [--scenarios a,b]

Runs the ten scenarios of tests/broker/conformance.py (our own implementation of the Eclipse
Paho 3.1.1 interoperability client test's scenarios) against each broker, each its own process
on a free loopback port:

  iotbiz     `python -m iotbiz.broker` on a new store in a temporary folder; the scenarios log
             in as a superuser account made with `iotbiz account add NAME --superuser`, and the
             subscribe-failure scenario as a device enrolled over HTTP (its ACL has no
             "nosubscribe").
  amqtt      plain amqtt 0.12.1 with anonymous auth only (as in scripts/bench.py): no ACL, so
             the subscribe-failure scenario fails there, which is a true result.
  mosquitto  if the `mosquitto` binary is on PATH: a password file (`mosquitto_passwd -U`) and
             an ACL file that allows the superuser every topic but denies "nosubscribe".

Prints a table (scenario x broker, pass/FAIL), the totals ("iotbiz 10/10, amqtt 5/10, ...")
and what each failing scenario saw; --json prints the same as JSON. Exit status 0 whatever
the results (a comparison, not a gate: the pytest suite is the gate for IoTBiz).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import MOSQUITTO_CONF, PLAIN_AMQTT
from fleet_sim import (
    HOST,
    ROOT,
    add_account,
    add_customer,
    enroll_device,
    free_port,
    port_open,
    spawn,
    start_platform,
)

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from tests.broker import conformance

BROKERS = ("iotbiz", "amqtt", "mosquitto")
SUPERUSER = "conformance"
CUSTOMER = "conformance"
DEVICE_ID = "restricted-1"


@dataclass(frozen=True, slots=True)
class Run:
    """The results of every scenario on one broker (or why it did not run)."""

    broker: str
    version: str
    results: tuple[conformance.Result, ...] = ()
    skipped: str | None = None

    @property
    def passed(self) -> int:
        return sum(result.passed for result in self.results)


def run_scenarios(target: conformance.Target, names: list[str]) -> tuple[conformance.Result, ...]:
    return tuple(asyncio.run(conformance.run_all(target, names)))


# -- the brokers -----------------------------------------------------------------------------------


def run_iotbiz(folder: Path, names: list[str]) -> Run:
    db = folder / "iotbiz.db"
    add_customer(db, CUSTOMER, 1)
    password = add_account(db, SUPERUSER, superuser=True)
    with start_platform(db, folder / "iotbiz.log") as platform:
        device = asyncio.run(enroll(platform.url))
        target = conformance.Target(
            HOST,
            platform.mqtt_port,
            conformance.superuser(SUPERUSER, password),
            conformance.Restricted(device.name, device.name, device.password),
        )
        results = run_scenarios(target, names)
    return Run("iotbiz", _iotbiz_version(), results)


async def enroll(url: str) -> Any:
    """One device of CUSTOMER, registered and activated over HTTP."""
    async with aiohttp.ClientSession(url, timeout=aiohttp.ClientTimeout(total=30)) as http:
        return await enroll_device(http, CUSTOMER, DEVICE_ID)


def run_amqtt(folder: Path, names: list[str]) -> Run:
    port = free_port()
    args = [sys.executable, "-c", PLAIN_AMQTT % port]
    with spawn(args, folder / "amqtt.log", lambda: port_open(port)):
        results = run_scenarios(conformance.Target(HOST, port, conformance.anonymous), names)
    return Run("amqtt", _amqtt_version(), results)


def run_mosquitto(folder: Path, names: list[str]) -> Run:
    if not (shutil.which("mosquitto") and shutil.which("mosquitto_passwd")):
        return Run("mosquitto", "", skipped="mosquitto binary not found on PATH")
    password = secrets.token_urlsafe(24)
    passwd = folder / "mosquitto.passwd"
    passwd.write_text(f"{SUPERUSER}:{password}\n")
    passwd.chmod(0o600)
    subprocess.run(["mosquitto_passwd", "-U", str(passwd)], check=True, timeout=60)
    # mosquitto puts `deny` lines first, whatever their place in the file.
    acl = [f"user {SUPERUSER}", f"topic deny {conformance.NOSUBSCRIBE}", "topic readwrite #", ""]
    (folder / "mosquitto.acl").write_text("\n".join(acl))
    port = free_port()
    conf = folder / "mosquitto.conf"
    conf.write_text(MOSQUITTO_CONF.format(port=port, folder=folder))
    with spawn(["mosquitto", "-c", str(conf)], folder / "mosquitto.log", lambda: port_open(port)):
        target = conformance.Target(HOST, port, conformance.superuser(SUPERUSER, password))
        results = run_scenarios(target, names)
    return Run("mosquitto", _mosquitto_version(), results)


RUNNERS: dict[str, Callable[[Path, list[str]], Run]] = {
    "iotbiz": run_iotbiz,
    "amqtt": run_amqtt,
    "mosquitto": run_mosquitto,
}


def _iotbiz_version() -> str:
    from iotbiz import __version__

    return f"iotbiz {__version__}"


def _amqtt_version() -> str:
    import amqtt

    return f"amqtt {amqtt.__version__}"


def _mosquitto_version() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        found = subprocess.run(
            ["mosquitto", "-h"], capture_output=True, text=True, timeout=10, check=False
        )
        for line in (found.stdout + found.stderr).splitlines():
            if line.startswith("mosquitto version"):
                return line.strip()
    return "mosquitto"


# -- output ----------------------------------------------------------------------------------------


def totals(runs: Sequence[Run]) -> str:
    return ", ".join(
        f"{run.broker} {run.passed}/{len(run.results)}" for run in runs if run.skipped is None
    )


def print_table(runs: Sequence[Run], names: list[str]) -> None:
    ran = [run for run in runs if run.skipped is None]
    width = max(len(name) for name in [*names, "scenario"])
    print(f"{'scenario':<{width}}  " + "  ".join(f"{run.broker:<9}" for run in ran))
    for index, name in enumerate(names):
        cells = ["pass" if run.results[index].passed else "FAIL" for run in ran]
        print(f"{name:<{width}}  " + "  ".join(f"{cell:<9}" for cell in cells))
    total_cells = [f"{run.passed}/{len(run.results)}" for run in ran]
    print(f"{'total':<{width}}  " + "  ".join(f"{cell:<9}" for cell in total_cells))
    print()
    print(totals(runs))
    for run in runs:
        print()
        if run.skipped is not None:
            print(f"{run.broker}: skipped ({run.skipped})")
            continue
        print(f"{run.broker} ({run.version}):")
        for result in run.results:
            verdict = "pass" if result.passed else "FAIL"
            print(f"  {verdict} {result.name} ({result.seconds:.1f}s): {result.detail}")


def report(runs: Sequence[Run]) -> dict[str, Any]:
    return {
        "totals": totals(runs),
        "brokers": {
            run.broker: {
                "version": run.version,
                "skipped": run.skipped,
                "passed": run.passed,
                "total": len(run.results),
                "results": [asdict(result) for result in run.results],
            }
            for run in runs
        },
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(
        "--brokers",
        default=",".join(BROKERS),
        help=f"comma-separated brokers to test (default: {','.join(BROKERS)})",
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(conformance.SCENARIOS),
        help="comma-separated scenarios to run (default: all ten)",
    )
    args = parser.parse_args(argv)
    args.brokers = [name for name in args.brokers.split(",") if name]
    args.scenarios = [name for name in args.scenarios.split(",") if name]
    for name in args.brokers:
        if name not in BROKERS:
            parser.error(f"unknown broker {name!r}; choose from {', '.join(BROKERS)}")
    for name in args.scenarios:
        if name not in conformance.SCENARIOS:
            parser.error(
                f"unknown scenario {name!r}; choose from {', '.join(conformance.SCENARIOS)}"
            )
    return args


@contextlib.contextmanager
def work_folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="conformance-") as tmp:
        yield Path(tmp)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    runs: list[Run] = []
    with work_folder() as folder:
        for broker in args.brokers:
            print(f"{broker} ...", file=sys.stderr, flush=True)
            runs.append(RUNNERS[broker](folder, args.scenarios))
    if args.json:
        print(json.dumps(report(runs), indent=2))
    else:
        print_table(runs, args.scenarios)


if __name__ == "__main__":
    main()
