"""The fleet-scale step of scripts/bench.py: what a message and a connect cost as the fleet grows.

    python scripts/bench.py --fleet-scale 1000,2000,5000,10000 [--scale-rate 1000] [--scale-qos 1]
        [--scale-seconds 20] [--commands-per-s 10] [--scale-brokers iotbiz,mosquitto]
        [--py-spy profile.txt] [--out fleet.json] [--plot docs/fleet-scale.png]

The largest fleet is enrolled once; then, for each size, a fresh platform process: the fleet
connects at once (cold: every login pays bcrypt; each device subscribes to its `cmd`), leaves,
connects again (warm), and then sends telemetry at the SAME total rate whatever the fleet size
(round-robin over the devices, so each sends rate/size msgs/s) while an operator account
follows `devices/+/+/telemetry` and `devices/+/+/reply` and sends `ping` commands to random
devices, which answer at once. Measured per size: broker CPU per telemetry message received by
the operator (the platform's process CPU over the window, all of it: presence, the service
client and the store included), delivery p50/p99, messages lost (sent minus received after a
drain; the broker's own drop counters from /metrics beside it), command round trip p50/p99
and unanswered commands, cold and warm connect of the whole fleet, RSS per connected device.
With --py-spy, each size is profiled into PATH.SIZE (raw collapsed stacks) and summarized in
the JSON.

mosquitto 2 (scripts/bench-setup installs it) is the anchor: at each size, right after the
platform, a private mosquitto on a free port with the same accounts (`mosquitto_passwd -U`) and
a per-device ACL as `pattern` lines on the username, under the same load and the same
measurements. Commands are a platform feature, so mosquitto carries the telemetry only (no
command columns); it caches no credentials, so its cold and warm connects both hash every
password (PBKDF2-SHA512, mosquitto_passwd's default); its RSS is the mosquitto process's.
--plot draws cost per message and delivery p99 against fleet size for both to a PNG.

The platform runs from the current directory's `iotbiz` (`python -m iotbiz.broker`), so running
this from a `git worktree` of another commit measures that commit with the same load.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import resource
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleet_sim import (
    Credentials,
    Login,
    MqttClient,
    MqttError,
    Operator,
    SimDevice,
    device_address,
    device_topic,
    disconnect_all,
    encode_topic,
    ms,
    open_mqtt,
    percentile,
    telemetry_payload,
)

KEEPALIVE_S = 600  # the devices publish rarely at large sizes; the step is shorter than this
# A refused or closed CONNECT is retried as the agent does (iotbiz/agent/link.py: BACKOFF_START_S,
# doubled up to BACKOFF_CAP_S, jittered to between half and all of it): the platform sheds a cold
# storm beyond its share of the bcrypt queue with CONNACK 3 and expects the device back later.
BACKOFF_START_S = 1.0
BACKOFF_CAP_S = 60.0
STORM_S = 300.0  # the whole fleet connected within this, or the rest is counted as failed
WARMUP_S = 3.0
DRAIN_S = 5.0


@dataclass(frozen=True, slots=True)
class ScaleLoad:
    rate: float  # total telemetry msgs/s, whatever the fleet size
    qos: int
    seconds: float  # measured window
    commands_per_s: float


async def _storm(port: int, logins: Sequence[Login], cpu: Callable[[], float]) -> tuple[Any, Any]:
    """The fleet connects at once, each device from an address of its own and retrying a
    refused CONNECT with the agent's backoff; time until the last CONNACK and the last SUBACK
    of its `cmd`."""
    before, started = cpu(), time.perf_counter()
    deadline = time.monotonic() + STORM_S
    clients: list[MqttClient] = []
    errors: Counter[str] = Counter()
    retried: Counter[int] = Counter()
    last = {"connack": started, "suback": started}

    async def one(index: int, login: Login) -> None:
        backoff, attempts = BACKOFF_START_S, 0
        source = device_address(index)
        while True:
            attempts += 1
            try:
                client = await open_mqtt(
                    port, login, keepalive_s=KEEPALIVE_S, wait_s=30.0, source=source
                )
                break
            except MqttError as exc:
                errors[_kind(exc)] += 1
                delay = random.uniform(backoff / 2, backoff)  # jitter
                if time.monotonic() + delay > deadline:
                    return
                await asyncio.sleep(delay)
                backoff = min(2 * backoff, BACKOFF_CAP_S)
        retried[attempts - 1] += 1
        last["connack"] = time.perf_counter()
        clients.append(client)
        try:
            if await client.subscribe(device_topic(login.client_id, "cmd"), 1, 30.0) == 0x80:
                errors["SUBACK refused"] += 1
        except MqttError as exc:
            errors[_kind(exc)] += 1
            return
        last["suback"] = time.perf_counter()

    await asyncio.gather(*(one(index, login) for index, login in enumerate(logins)))
    result = {
        "connected": len(clients),
        "connack_s": round(last["connack"] - started, 2),
        "suback_s": round(last["suback"] - started, 2),
        "broker_cpu_s": round(cpu() - before, 2),
        "errors": dict(errors),  # failed attempts, by kind (each retried)
        "retries": {str(k): v for k, v in sorted(retried.items())},  # devices by retry count
    }
    return result, clients


def _kind(exc: MqttError) -> str:
    text = str(exc)
    if "CONNACK refused with code" in text:
        return "CONNACK " + text.rsplit(" ", 1)[-1]
    for kind in ("no CONNACK", "no SUBACK", "cannot connect", "closed"):
        if kind in text:
            return kind
    return text


async def _drive(
    devices: Sequence[SimDevice], load: ScaleLoad, stop_at: float, sent: list[int]
) -> None:
    """Telemetry round-robin over the fleet at `load.rate` msgs/s in all until `stop_at`."""
    topics = [encode_topic(device_topic(d.credentials.name, "telemetry")) for d in devices]
    order = itertools.cycle(range(len(devices)))
    start = time.monotonic()
    while (now := time.monotonic()) < stop_at:
        due = int((now - start) * load.rate) - sent[0]
        for _ in range(max(0, due)):
            index = next(order)
            client = devices[index].client
            if client.is_open:
                client.publish(topics[index], telemetry_payload(sent[0]), load.qos)
            sent[0] += 1
        await asyncio.sleep(0.005)


async def measure_size(
    port: int,
    fleet: Sequence[Credentials],
    operator_login: Login,
    load: ScaleLoad,
    cpu: Callable[[], float],
    rss: Callable[[], int],
    profile: Callable[[], Any],
    drops: Callable[[], dict[str, float]],
) -> dict[str, Any]:
    """One fleet size against a freshly started platform on `port`."""
    logins = [c.login() for c in fleet]
    await asyncio.sleep(1.0)
    idle = rss()
    cold, clients = await _storm(port, logins, cpu)
    await disconnect_all(clients)
    await asyncio.sleep(2.0)  # amqtt's session monitor forgets clean sessions every second
    warm, clients = await _storm(port, logins, cpu)
    await asyncio.sleep(1.5)
    loaded = rss()
    by_name = {c.name: c for c in fleet}
    devices = [SimDevice(by_name[c.client_id], c, qos=load.qos) for c in clients]
    operator = Operator()
    op_client: MqttClient = await open_mqtt(
        port, operator_login, on_publish=operator.on_message, wait_s=30
    )
    try:
        for topic_filter in ("devices/+/+/reply", "devices/+/+/telemetry"):
            if await op_client.subscribe(topic_filter, 1) == 0x80:
                raise RuntimeError(f"subscription to {topic_filter} refused")
        sent = [0]
        stop_at = time.monotonic() + WARMUP_S + load.seconds
        names = [d.credentials.name for d in devices]
        tasks = [
            asyncio.create_task(_drive(devices, load, stop_at, sent)),
            asyncio.create_task(operator.run(op_client, names, load.commands_per_s, stop_at)),
        ]
        await asyncio.sleep(WARMUP_S)
        sent_before, received_before = sent[0], operator.telemetry_received
        latencies_from = len(operator.telemetry_latencies)
        rtts_from = len(operator.command_rtts)
        drops_before = drops()
        began, cpu_before, client_before = time.monotonic(), cpu(), _own_cpu()
        with profile():
            await asyncio.sleep(load.seconds)
        elapsed, broker_cpu = time.monotonic() - began, cpu() - cpu_before
        client_cpu = _own_cpu() - client_before
        received = operator.telemetry_received - received_before
        window_sent = sent[0] - sent_before
        await asyncio.gather(*tasks)
        for _ in range(int(DRAIN_S * 10)):  # drain (bounded): the rest is counted as lost
            if operator.telemetry_received >= sent[0] and not operator.unanswered:
                break
            await asyncio.sleep(0.1)
        drops_after = drops()
    finally:
        await disconnect_all([*(d.client for d in devices), op_client])
    latencies = operator.telemetry_latencies[latencies_from:]
    rtts = operator.command_rtts[rtts_from:]
    return {
        "devices": len(fleet),
        "cold": cold,
        "warm": warm,
        "rss_idle_mb": round(idle / 2**20, 1),
        "rss_connected_mb": round(loaded / 2**20, 1),
        "kb_per_device": round((loaded - idle) / 1024 / len(fleet), 1),
        "traffic": {
            "qos": load.qos,
            "offered_per_s": load.rate,
            "seconds": round(elapsed, 1),
            "sent_in_window": window_sent,
            "received_in_window": received,
            "msgs_per_s": round(received / elapsed),
            "broker_cpu": round(broker_cpu / elapsed, 2),  # cores
            "broker_us_per_msg": round(broker_cpu / received * 1e6, 1) if received else None,
            "client_cpu": round(client_cpu / elapsed, 2),  # this load generator, cores
            "p50_ms": ms(percentile(latencies, 50)),
            "p99_ms": ms(percentile(latencies, 99)),
            "sent": sent[0],
            "lost": sent[0] - operator.telemetry_received,
            "broker_drops": {k: v - drops_before.get(k, 0) for k, v in drops_after.items()},
            "commands_sent": operator.commands_sent,
            "commands_unanswered": operator.unanswered,
            "command_rtt_p50_ms": ms(percentile(rtts, 50)),
            "command_rtt_p99_ms": ms(percentile(rtts, 99)),
        },
    }


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def markdown(result: dict[str, Any]) -> str:
    brokers = result["fleet_scale"]["brokers"]
    load = result["fleet_scale"]["load"]
    out = [
        f"Fleet scale: {load['rate']:g} telemetry msgs/s in all at QoS {load['qos']}, "
        f"{load['commands_per_s']:g} commands/s (IoTBiz only), {load['seconds']:g} s measured "
        "per size.",
        "",
        "| devices | broker | broker us/msg | broker cores | load cores | msgs/s | p50 ms | p99 ms "
        "| lost | broker dropped | cmd p99 ms | cmd unanswered | cold s | warm s | cold retried "
        "| KB/device |",
        "|---" * 16 + "|",
    ]
    sizes = sorted({int(n) for b in brokers.values() for n in b["sizes"]})
    for size in sizes:
        for name, broker in brokers.items():
            s = broker["sizes"].get(str(size))
            if s is None:
                continue
            t = s["traffic"]
            commands = name == "iotbiz"
            cells = [
                t["broker_us_per_msg"],
                t["broker_cpu"],
                t["client_cpu"],
                t["msgs_per_s"],
                t["p50_ms"],
                t["p99_ms"],
                t["lost"],
                t.get("broker_drops", {}).get("dropped_deliveries"),
                t["command_rtt_p99_ms"] if commands else None,
                t["commands_unanswered"] if commands else None,
                s["cold"]["connack_s"],
                s["warm"]["connack_s"],
                sum(v for k, v in s["cold"].get("retries", {}).items() if k != "0"),
                s["kb_per_device"],
            ]
            out.append(
                f"| {size} | {name} | "
                + " | ".join("-" if c is None else str(c) for c in cells)
                + " |"
            )
    out.append("")
    for name, broker in brokers.items():
        a, b = (cost_per_message(broker, n) for n in (sizes[0], sizes[-1]))
        if a and b:
            out.append(f"{name}: CPU per message at {sizes[-1]} / at {sizes[0]}: {b / a:.2f}")
    if "iotbiz" in brokers and "mosquitto" in brokers:
        ratios = []
        for size in sizes:
            a, b = (cost_per_message(brokers[n], size) for n in ("iotbiz", "mosquitto"))
            ratios.append(f"{size}: {a / b:.1f}x" if a and b else f"{size}: -")
        out.append("IoTBiz / mosquitto CPU per message: " + ", ".join(ratios))
    for size, profile in result["fleet_scale"].get("profiles", {}).items():
        out += ["", f"py-spy at {size} devices (own share of samples):", ""]
        out += [f"- {share:.1%}: {frame}" for frame, share in profile["own"]]
    return "\n".join(out)


def cost_per_message(broker: dict[str, Any], size: int) -> float | None:
    measured = broker["sizes"].get(str(size))
    return None if measured is None else measured["traffic"]["broker_us_per_msg"]


LABELS = {"iotbiz": "IoTBiz (embedded amqtt)", "mosquitto": "mosquitto 2"}


def plot(result: dict[str, Any], path: Path) -> None:
    """Cost per message and delivery p99 against fleet size, one line per broker, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot, ticker

    load = result["fleet_scale"]["load"]
    figure, (cost_axes, p99_axes) = pyplot.subplots(1, 2, figsize=(10, 4.2), layout="constrained")
    every_size: set[int] = set()
    for name, broker in result["fleet_scale"]["brokers"].items():
        sizes = sorted(int(n) for n in broker["sizes"])
        every_size.update(sizes)
        traffic = [broker["sizes"][str(n)]["traffic"] for n in sizes]
        style = {"marker": "o", "label": LABELS.get(name, name)}
        cost_axes.plot(sizes, [t["broker_us_per_msg"] for t in traffic], **style)
        p99_axes.plot(sizes, [t["p99_ms"] for t in traffic], **style)
    for axes, title, unit in (
        (cost_axes, "Broker CPU per message", "us per message (process CPU / delivered)"),
        (p99_axes, "Delivery latency p99", "ms, device to operator (log)"),
    ):
        axes.set_xscale("log")
        axes.set_xticks(sorted(every_size), [f"{n:,}" for n in sorted(every_size)])
        axes.xaxis.set_minor_formatter(ticker.NullFormatter())
        axes.set_xlabel("connected devices (log)")
        axes.set_ylabel(unit)
        axes.set_title(title)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend()
    cost_axes.set_ylim(bottom=0)
    p99_axes.set_yscale("log")
    plain = ticker.FuncFormatter(lambda value, _: f"{value:g}")
    p99_axes.yaxis.set_major_formatter(plain)
    p99_axes.yaxis.set_minor_formatter(plain)
    cores = result.get("machine", {}).get("cores")
    figure.suptitle(
        f"Fleet scale: {load['rate']:g} msgs/s QoS {load['qos']} in all, {load['seconds']:g} s "
        f"per size, load generator on the same {cores} cores"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    pyplot.close(figure)


def profile_path(base: Path | None, size: int) -> Path | None:
    return None if base is None else base.with_name(f"{base.name}.{size}")
