"""Release upgrades: one real agent updated end to end, downloads by many devices, a rollout.

    python scripts/bench_upgrades.py                       # all three parts
    python scripts/bench_upgrades.py --rollout-devices 0 --json

Starts the real platform (`python -m iotbiz.broker`, HTTP and MQTT on port 0, the ports read back
from its log: scripts/soak.py's `Platform`) with a new store and a release signing key
(`iotbiz.releases.keygen`) in a temporary folder, and uploads two releases of app `web` through
the admin API: each a .tar.gz of `app.py` (prints its VERSION, runs until SIGTERM), `VERSION`
and `--size-mb` of random bytes (so that gzip does not shrink it).

1. update: a real agent process (`python -m iotbiz.agent --config agent.toml`, the platform's
   public key, `web` as a release app, `update_trial_s` = --trial-s) enrolls itself and connects;
   then `POST /api/v1/admin/commands {"device", "action": "update", "args": {"app", "version"}}`
   (what `iotbiz cmd DEVICE update --arg app=web --arg version=V` sends) and
   `GET /api/v1/admin/commands/{id}?wait=30` until the command is final: the time from before the
   POST to the answer saying `committed`. Done twice: the first release onto an empty device,
   then the second over it. The breakdown comes from the agent's log (its update state
   transitions, millisecond timestamps): delivery (POST to `(start) -> downloading`), download
   and verify (sha256 and the Ed25519 signature, `-> verified`), unpack (`-> staged`), switch
   (`-> switching -> trial`), trial (`-> committed`) and the reply back to the operator.
2. downloads: `--download-devices` (1, 10, 50) devices enrolled over the device API fetch the
   release at once from `GET /api/v1/releases/web/VERSION`, each with its own MQTT credentials
   (basic auth): MB/s in all (bytes over the wall time from the first request to the last byte)
   and per device. Then one download cut after half the bytes and resumed with `Range:
   bytes=N-`: the status, the Content-Range and whether the joined bytes equal the release.
3. rollout (skipped with --rollout-devices 0): that many simulated devices (scripts/fleet_sim.py's
   MQTT client, enrolled for real, connected with the agent's backoff) answer an `update` on their
   cmd topic with `{"ok": true, "result": {"outcome": "committed", ...}}` after
   `--sim-update-s`; `POST /api/v1/admin/rollouts {"app", "version", "customer_id",
   "batch_size"}`, then `GET /api/v1/admin/rollouts/{id}` every 0.2 s until it ends: total time
   and, per batch, from its first command reaching a device to its last reply (seen on the
   devices' side), and when the platform started the next batch.

The load average (`os.getloadavg`) is taken beside every figure: the machine may be shared.
Exit status 0 when every update committed, every download was whole and the rollout (if run)
ended `completed` with every device committed; 1 otherwise. Every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import io
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_commands import AgentLikeDevice, Fleet
from fleet_sim import (
    Credentials,
    MqttClient,
    MqttError,
    add_customer,
    device_ids,
    device_topic,
    disconnect_all,
    enroll_devices,
    open_mqtt,
    percentile,
    raise_open_files_limit,
)
from soak import Platform

from iotbiz.agent.link import BACKOFF_CAP_S, BACKOFF_START_S
from iotbiz.releases import keygen

CUSTOMER = "bench"
APP = "web"
AGENT_ID = "agent-1"
ADMIN = "/api/v1/admin"
PROGRAM = (
    "import pathlib, signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
    "print('version', pathlib.Path('VERSION').read_text(), flush=True)\n"
    "while True:\n    time.sleep(0.1)\n"
)
# "2026-12-02 14:20:00,123 INFO iotbiz.agent.updates: web: update 1.0: staged -> switching"
TRANSITION = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ iotbiz\.agent\.updates: "
    + APP
    + r": update (\S+): (\S+) -> (\w+)",
    re.MULTILINE,
)


def basic_auth(credentials: Credentials) -> dict[str, str]:
    token = base64.b64encode(f"{credentials.name}:{credentials.password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def artifact(version: str, size: int) -> bytes:
    """A .tar.gz release of `size` random bytes plus the program (does not compress)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        files = (("app.py", PROGRAM.encode()), ("VERSION", version.encode()))
        for name, data in (*files, ("data/random.bin", os.urandom(size))):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


# -- part 1: a real agent ------------------------------------------------------------------------


def agent_toml(platform: Platform, state_dir: Path, public_key: Path, trial_s: float) -> str:
    return (
        f'customer_id = "{CUSTOMER}"\n'
        f'device_id = "{AGENT_ID}"\n'
        f'state_dir = "{state_dir}"\n'
        f'registrar_url = "http://127.0.0.1:{platform.http_port}"\n'
        f'broker_url = "mqtt://127.0.0.1:{platform.mqtt_port}"\n'
        f'release_public_key = "{public_key}"\n'
        f"update_trial_s = {trial_s}\n"
        "keepalive_s = 10\n"
        "[[apps]]\n"
        f'name = "{APP}"\n'
        f'command = ["{sys.executable}", "app.py"]\n'
        "release = true\n"
    )


def transitions(log_text: str, version: str) -> dict[str, float]:
    """The agent's update transitions for `version`: {new state: epoch seconds} (the first)."""
    seen: dict[str, float] = {}
    for stamp, logged_version, _left, new in TRANSITION.findall(log_text):
        if logged_version == version:
            when = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
            seen.setdefault(new, when)
    return seen


async def wait_online(http: aiohttp.ClientSession, count: int, limit_s: float) -> float | None:
    began = time.monotonic()
    params = {"customer": CUSTOMER, "online": "true", "limit": "1"}
    while time.monotonic() - began < limit_s:
        async with http.get(f"{ADMIN}/devices", params=params) as response:
            if response.status == 200 and (await response.json())["total"] >= count:
                return round(time.monotonic() - began, 2)
        await asyncio.sleep(0.2)
    return None


async def one_update(http: aiohttp.ClientSession, version: str, log: Path) -> dict[str, Any]:
    load_before = load()
    began_wall, began = time.time(), time.perf_counter()
    body = {"device": f"{CUSTOMER}/{AGENT_ID}", "action": "update"}
    body["args"] = {"app": APP, "version": version}  # type: ignore[assignment]
    async with http.post(f"{ADMIN}/commands", json=body) as response:
        assert response.status == 201, await response.text()
        [command] = (await response.json())["commands"]
    shown: dict[str, Any] = {}
    for _ in range(4):
        async with http.get(f"{ADMIN}/commands/{command['id']}", params={"wait": "30"}) as r:
            assert r.status == 200, await r.text()
            shown = await r.json()
        if shown["state"] not in ("queued", "sent"):
            break
    seconds = time.perf_counter() - began
    ended_wall = began_wall + seconds
    result = shown.get("result") or {}
    marks = transitions(await asyncio.to_thread(log.read_text, errors="replace"), version)
    order = ["downloading", "verified", "staged", "switching", "trial", "committed"]
    steps: dict[str, float | None] = {}
    names = {
        "downloading": "delivery",
        "verified": "download_and_verify",
        "staged": "unpack",
        "switching": "switch",
        "trial": "switch_to_trial",
        "committed": "trial",
    }
    previous = began_wall
    for state in order:
        at = marks.get(state)
        steps[names[state]] = None if at is None else round(at - previous, 3)
        previous = at if at is not None else previous
    steps["reply_to_operator"] = (
        round(ended_wall - marks["committed"], 3) if "committed" in marks else None
    )
    return {
        "version": version,
        "state": shown.get("state"),
        "outcome": result.get("outcome"),
        "reason": result.get("reason"),
        "seconds": round(seconds, 3),
        "steps_s": steps,
        "load_average_before": load_before,
        "load_average_after": load(),
    }


def start_agent(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "iotbiz.agent", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def part_update(
    platform: Platform,
    folder: Path,
    http: aiohttp.ClientSession,
    public_key: Path,
    versions: Sequence[str],
    args: argparse.Namespace,
) -> dict[str, Any]:
    state_dir = folder / "agent-state"
    config = folder / "agent.toml"
    config.write_text(agent_toml(platform, state_dir, public_key, args.trial_s))
    log = folder / "agent.log"
    proc = await asyncio.to_thread(start_agent, config, log)
    try:
        online_s = await wait_online(http, 1, 60)
        assert online_s is not None, log.read_text()[-3000:]
        updates = [await one_update(http, v, log) for v in versions]
    finally:
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait, 30)
    return {"trial_s": args.trial_s, "agent_online_s": online_s, "updates": updates}


# -- part 2: downloads ---------------------------------------------------------------------------


async def fetch(
    url: str, credentials: Credentials, expected: bytes, headers: dict[str, str] | None = None
) -> tuple[float, float, bool, int]:
    """(start, end perf_counter, whole and equal, status)."""
    auth = basic_auth(credentials)
    timeout = aiohttp.ClientTimeout(total=300)
    began = time.perf_counter()
    digest = hashlib.sha256()
    size = 0
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(url, headers={**auth, **(headers or {})}) as response,
    ):
        async for chunk in response.content.iter_chunked(256 * 1024):
            digest.update(chunk)
            size += len(chunk)
        status = response.status
    same = digest.digest() == hashlib.sha256(expected).digest()
    whole = status == 200 and size == len(expected) and same
    return began, time.perf_counter(), whole, status


async def part_downloads(
    http: aiohttp.ClientSession,
    base: str,
    version: str,
    data: bytes,
    enrolled: Sequence[Credentials],
    counts: Sequence[int],
) -> dict[str, Any]:
    url = f"{base}/api/v1/releases/{APP}/{version}"
    mb = len(data) / 1e6
    for credentials in enrolled[: max(counts)]:  # a release is offered by an update command
        body = {"device": credentials.name, "action": "update"}
        body["args"] = {"app": APP, "version": version}  # type: ignore[assignment]
        async with http.post(f"{ADMIN}/commands", json=body) as response:
            assert response.status == 201, await response.text()
    rows = []
    for count in counts:
        devices = list(enrolled[:count])
        load_before = load()
        results = await asyncio.gather(*(fetch(url, d, data) for d in devices))
        first, last = min(r[0] for r in results), max(r[1] for r in results)
        each = [mb / (r[1] - r[0]) for r in results]
        rows.append(
            {
                "devices": count,
                "whole": sum(r[2] for r in results),
                "statuses": sorted({r[3] for r in results}),
                "wall_s": round(last - first, 3),
                "total_mb_s": round(mb * count / (last - first), 1),
                "per_device_mb_s_p50": round(percentile(each, 50) or 0, 1),
                "per_device_mb_s_min": round(min(each), 1),
                "per_device_mb_s_max": round(max(each), 1),
                "load_average_before": load_before,
                "load_average_after": load(),
            }
        )
    return {"mb": round(mb, 2), "rows": rows, "resume": await resume(url, enrolled[0], data)}


async def resume(url: str, credentials: Credentials, data: bytes) -> dict[str, Any]:
    """Read half, drop the connection, then ask for the rest with Range."""
    auth = basic_auth(credentials)
    half = len(data) // 2
    got = bytearray()
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.get(url, headers=auth) as response:
            assert response.status == 200, (response.status, await response.text())
            while len(got) < half:
                chunk = await response.content.read(min(65536, half - len(got)))
                assert chunk, f"the body ended at {len(got)} bytes"
                got += chunk
            response.close()  # cut off mid-body
        began = time.perf_counter()
        headers = {"Range": f"bytes={len(got)}-"}
        async with session.get(url, headers={**auth, **headers}) as response:
            status = response.status
            content_range = response.headers.get("Content-Range")
            rest = await response.read()
        seconds = time.perf_counter() - began
    return {
        "cut_at": len(got),
        "status": status,
        "content_range": content_range,
        "rest_bytes": len(rest),
        "rest_s": round(seconds, 3),
        "joined_equal": bytes(got) + rest == data,
        "load_average": load(),
    }


# -- part 3: a rollout to simulated devices ------------------------------------------------------


class UpdatingDevice(AgentLikeDevice):
    """Answers `update` as the agent does when it commits, after `delay_s`; notes when each
    command reached it and when it answered."""

    def __init__(
        self,
        credentials: Credentials,
        client: MqttClient,
        *,
        qos: int,
        arrivals: dict[str, float],
        delay_s: float,
        answered: dict[str, float],
    ) -> None:
        super().__init__(credentials, client, qos=qos, arrivals=arrivals)
        self._delay_s = delay_s
        self._answered_at = answered
        self._pending: set[asyncio.Task[None]] = set()

    def on_command(self, client: MqttClient, topic: str, payload: bytes, qos: int) -> None:
        try:
            command = json.loads(payload)
            command_id, action = command["id"], command.get("action")
        except (ValueError, KeyError, TypeError):
            self.bad_commands += 1
            return
        if action != "update" or not isinstance(command_id, str):
            super().on_command(client, topic, payload, qos)
            return
        first = command_id not in self._arrivals
        self._arrivals.setdefault(command_id, time.perf_counter())
        if first:
            task = asyncio.get_running_loop().create_task(self._answer(command))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
        else:
            self.repeats += 1

    async def _answer(self, command: dict[str, Any]) -> None:
        await asyncio.sleep(self._delay_s)
        args = command.get("args") or {}
        result = {"outcome": "committed", "app": args.get("app"), "version": args.get("version")}
        body = {"id": command["id"], "ok": True, "result": result}
        if self.client.is_open:
            self.client.publish(self._reply_topic, json.dumps(body).encode(), qos=1)
            self.replies += 1
            self._answered_at.setdefault(command["id"], time.perf_counter())


class UpdatingFleet(Fleet):
    """bench_commands' Fleet (the agent's connect backoff), of UpdatingDevices."""

    def __init__(self, port: int, arrivals: dict[str, float], delay_s: float) -> None:
        super().__init__(port, arrivals, 0.0)
        self.delay_s = delay_s
        self.answered: dict[str, float] = {}

    async def _connect_one(self, credentials: Credentials, deadline: float) -> None:
        backoff = BACKOFF_START_S
        while True:
            client: MqttClient | None = None
            try:
                client = await open_mqtt(self.port, credentials.login(), keepalive_s=60)
                device = UpdatingDevice(
                    credentials,
                    client,
                    qos=1,
                    arrivals=self.arrivals,
                    delay_s=self.delay_s,
                    answered=self.answered,
                )
                code = await client.subscribe(device_topic(credentials.name, "cmd"), 1, 30)
                if code == 0x80:
                    raise MqttError(f"{credentials.name}: SUBACK refused")
                device.say_online()
                self.devices.append(device)
                # no telemetry; PINGREQ within the keep-alive (cancelled at the end)
                stop_at = time.monotonic() + 24 * 3600
                self.tasks.append(asyncio.create_task(device.run(0.0, stop_at, 60)))
                return
            except MqttError as exc:
                self.refusals[str(exc).split(": ", 1)[-1].split(" (")[0]] += 1
                if client is not None:
                    client.abort()
            delay = random.uniform(backoff / 2, backoff)
            if time.monotonic() + delay > deadline:
                self.gave_up += 1
                return
            await asyncio.sleep(delay)
            backoff = min(backoff * 2, BACKOFF_CAP_S)


async def part_rollout(
    platform: Platform,
    http: aiohttp.ClientSession,
    enrolled: Sequence[Credentials],
    version: str,
    args: argparse.Namespace,
) -> dict[str, Any]:
    arrivals: dict[str, float] = {}
    fleet = UpdatingFleet(platform.mqtt_port, arrivals, args.sim_update_s)
    try:
        await fleet.connect(enrolled, args.setup_timeout)
        online_s = await wait_online(http, len(fleet.devices), 120)  # the agent has stopped
        load_before = load()
        body = {
            "app": APP,
            "version": version,
            "devices": [c.name for c in enrolled],
            "batch_size": args.batch_size,
        }
        began = time.perf_counter()
        async with http.post(f"{ADMIN}/rollouts", json=body) as response:
            assert response.status == 201, await response.text()
            rollout = await response.json()
        post_s = time.perf_counter() - began
        batch_seen: dict[int, float] = {}
        shown: dict[str, Any] = rollout
        while time.perf_counter() - began < args.rollout_timeout:
            async with http.get(f"{ADMIN}/rollouts/{rollout['id']}") as response:
                assert response.status == 200, await response.text()
                shown = await response.json()
            batch_seen.setdefault(int(shown.get("batch") or 0), time.perf_counter() - began)
            if shown["state"] not in ("running", "pending", "waiting", "paused"):
                break
            await asyncio.sleep(0.2)
        total_s = time.perf_counter() - began
        batches: dict[int, list[tuple[float, float]]] = {}
        for device in shown.get("devices", []):
            command_id = device.get("command_id")
            if command_id in arrivals and command_id in fleet.answered:
                batches.setdefault(int(device["batch"]), []).append(
                    (arrivals[command_id] - began, fleet.answered[command_id] - began)
                )
        per_batch = [
            {
                "batch": index,
                "devices": len(times),
                "first_command_s": round(min(t[0] for t in times), 2),
                "last_reply_s": round(max(t[1] for t in times), 2),
                "seconds": round(max(t[1] for t in times) - min(t[0] for t in times), 2),
                "platform_at_batch_s": round(batch_seen[index], 2) if index in batch_seen else None,
            }
            for index, times in sorted(batches.items())
        ]
        results = [d.get("result") for d in shown.get("devices", [])]
        return {
            "devices": len(enrolled),
            "connected": len(fleet.devices),
            "connect_s": round(fleet.seconds, 1),
            "connect_refusals": dict(fleet.refusals),
            "online_s": online_s,
            "batch_size": args.batch_size,
            "sim_update_s": args.sim_update_s,
            "post_ms": round(post_s * 1000, 1),
            "state": shown["state"],
            "reason": shown.get("reason"),
            "committed": shown.get("committed"),
            "failed": shown.get("failed"),
            "batches": shown.get("batches"),
            "device_results": {str(k): results.count(k) for k in set(results)},
            "total_s": round(total_s, 2),
            "per_batch": per_batch,
            "repeats": sum(d.repeats for d in fleet.devices),
            "load_average_before": load_before,
            "load_average_after": load(),
        }
    finally:
        for task in fleet.tasks:
            task.cancel()
        await asyncio.gather(*fleet.tasks, return_exceptions=True)
        await disconnect_all([d.client for d in fleet.devices])


# -- the run -------------------------------------------------------------------------------------


async def bench(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    private_key, public_key = keygen(folder / "keys")
    os.environ["IOTBIZ_RELEASES_SIGNING_KEY_FILE"] = str(private_key)
    os.environ["IOTBIZ_ROLLOUTS_POLL_S"] = str(args.rollout_poll_s)
    platform = Platform(folder)
    sims = max(max(args.download_devices), args.rollout_devices)
    add_customer(platform.db, CUSTOMER, sims + 10)
    await asyncio.to_thread(platform.start)
    report: dict[str, Any] = {"load_average_at_start": load(), "cpus": os.cpu_count()}
    try:
        base = f"http://127.0.0.1:{platform.http_port}"
        token = (folder / "admin.token").read_text().strip()
        headers = {"Authorization": f"Bearer {token}"}
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(base, headers=headers, timeout=timeout) as http:
            size = round(args.size_mb * 2**20)
            versions = ["1.0", "2.0", "3.0"]
            releases: dict[str, bytes] = {}
            for version in versions:
                releases[version] = artifact(version, size)
                params = {"app": APP, "version": version}
                began = time.perf_counter()
                data = releases[version]
                async with http.post(f"{ADMIN}/releases", params=params, data=data) as response:
                    assert response.status == 201, await response.text()
                report.setdefault("upload_s", []).append(round(time.perf_counter() - began, 3))
            report["artifact_bytes"] = len(releases["1.0"])
            began = time.perf_counter()
            hashlib.sha256(releases["1.0"]).digest()
            report["sha256_in_bench_ms"] = round((time.perf_counter() - began) * 1000, 1)
            report["update"] = await part_update(
                platform, folder, http, public_key, versions[:2], args
            )
            enrolled = await enroll_devices(
                base, CUSTOMER, device_ids(sims), concurrency=4, limit_s=args.setup_timeout
            )
            report["enrolled"] = len(enrolled.credentials)
            report["downloads"] = await part_downloads(
                http, base, "2.0", releases["2.0"], enrolled.credentials, args.download_devices
            )
            if args.rollout_devices > 0:
                report["rollout"] = await part_rollout(
                    platform, http, enrolled.credentials[: args.rollout_devices], "3.0", args
                )
    finally:
        code, stop_s = await asyncio.to_thread(platform.stop, 30)
        report["platform_sigterm"] = {"exit_code": code, "seconds": round(stop_s, 2)}
        report["load_average_at_end"] = load()
    return report


def print_report(report: dict[str, Any]) -> None:
    update = report["update"]
    print(
        f"artifact {report['artifact_bytes']} bytes (random, gzip cannot shrink it), uploads"
        f" {report['upload_s']} s; sha256 of it in this process {report['sha256_in_bench_ms']} ms;"
        f" {report['cpus']} CPUs; agent online after {update['agent_online_s']} s;"
        f" update_trial_s = {update['trial_s']}"
    )
    steps = list(update["updates"][0]["steps_s"])
    print("\n| version | outcome | POST to committed s | " + " | ".join(steps) + " | load avg |")
    print("|---" * (len(steps) + 4) + "|")
    for row in update["updates"]:
        values = " | ".join(str(row["steps_s"][s]) for s in steps)
        print(
            f"| {row['version']} | {row['outcome']} | {row['seconds']} | {values}"
            f" | {row['load_average_before']} -> {row['load_average_after']} |"
        )
    downloads = report["downloads"]
    print(f"\ndownloads of {downloads['mb']} MB each, own basic auth")
    print("| devices | whole | wall s | total MB/s | per device MB/s p50 (min-max) | load avg |")
    print("|---|---|---|---|---|---|")
    for row in downloads["rows"]:
        print(
            f"| {row['devices']} | {row['whole']} | {row['wall_s']} | {row['total_mb_s']}"
            f" | {row['per_device_mb_s_p50']} ({row['per_device_mb_s_min']}"
            f"-{row['per_device_mb_s_max']}) | {row['load_average_before']}"
            f" -> {row['load_average_after']} |"
        )
    print(f"resumed: {downloads['resume']}")
    rollout = report.get("rollout")
    if rollout:
        print(
            f"\nrollout to {rollout['devices']} simulated devices ({rollout['connected']}"
            f" connected in {rollout['connect_s']} s, refusals {rollout['connect_refusals']}),"
            f" batch {rollout['batch_size']}, each answering after {rollout['sim_update_s']} s:"
            f" {rollout['state']} ({rollout['reason']}) committed {rollout['committed']} failed"
            f" {rollout['failed']} in {rollout['total_s']} s (POST {rollout['post_ms']} ms);"
            f" load avg {rollout['load_average_before']} -> {rollout['load_average_after']}"
        )
        print("| batch | devices | first command s | last reply s | batch s | platform at s |")
        print("|---|---|---|---|---|---|")
        for row in rollout["per_batch"]:
            print(
                f"| {row['batch']} | {row['devices']} | {row['first_command_s']}"
                f" | {row['last_reply_s']} | {row['seconds']} | {row['platform_at_batch_s']} |"
            )
    print(
        f"\nplatform SIGTERM {report['platform_sigterm']}; load average at start"
        f" {report['load_average_at_start']}, at end {report['load_average_at_end']}"
    )


def succeeded(report: dict[str, Any]) -> bool:
    updates_ok = all(u["outcome"] == "committed" for u in report["update"]["updates"])
    rows = report["downloads"]["rows"]
    downloads_ok = all(r["whole"] == r["devices"] for r in rows)
    downloads_ok = downloads_ok and report["downloads"]["resume"]["joined_equal"]
    rollout = report.get("rollout")
    rollout_ok = rollout is None or (
        rollout["state"] == "completed" and rollout["committed"] == rollout["devices"]
    )
    return updates_ok and downloads_ok and rollout_ok


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=10, help="random MiB per release (10)")
    parser.add_argument("--trial-s", type=float, default=2.0, help="agent update_trial_s (2)")
    parser.add_argument(
        "--download-devices",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 10, 50],
        help="concurrent downloaders per round (1,10,50)",
    )
    parser.add_argument("--rollout-devices", type=int, default=1000, help="0 skips (1000)")
    parser.add_argument("--batch-size", type=int, default=100, help="rollout batch (100)")
    parser.add_argument(
        "--sim-update-s", type=float, default=0.5, help="a simulated update's seconds (0.5)"
    )
    parser.add_argument(
        "--rollout-poll-s", type=float, default=1.0, help="platform rollouts.poll_s (1)"
    )
    parser.add_argument("--rollout-timeout", type=float, default=600, help="seconds (600)")
    parser.add_argument("--setup-timeout", type=float, default=300, help="seconds (300)")
    parser.add_argument("--keep", type=Path, help="keep the logs and store in this folder")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if args.size_mb <= 0 or args.rollout_devices < 0 or min(args.download_devices) < 1:
        parser.error("--size-mb and --download-devices must be positive")
    raise_open_files_limit()
    with contextlib.ExitStack() as stack:
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            folder = args.keep
        else:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-upd-")))
        report = asyncio.run(bench(args, folder))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0 if succeeded(report) else 1


if __name__ == "__main__":
    sys.exit(main())
