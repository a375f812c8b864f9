"""Quick broker benchmark: the IoTBiz platform (plugins on) against plain amqtt, in one run.

Each broker runs as its own process on loopback; the load comes from this process over raw
sockets with hand-built MQTT packets, so client overhead stays small. Measures:
  - connect storm: N devices connect at once (IoTBiz: cold = just restarted, warm = again);
  - QoS 0 throughput: one publisher, one subscriber, M messages, messages per second.

    python scripts/bench_broker.py [--devices 300] [--messages 20000] [--json]

The full benchmark (mosquitto, QoS 1, latency, memory) is scripts/bench.py's job.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.mqtt_wire import connect_packet, publish_packet, subscribe_packet

PLAIN_AMQTT = """
import asyncio, sys
from amqtt.broker import Broker
async def main():
    broker = Broker({"listeners": {"default": {"type": "tcp", "bind": "127.0.0.1:%d"}},
                     "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin":
                                 {"allow_anonymous": True}}})
    await broker.start()
    print("listening", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def process(args: list[str], ready: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    # The benchmark enrolls from one address: no per-address rate limit.
    env = {**os.environ, "IOTBIZ_REGISTRAR_RATE_PER_IP": "0"}
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 30
        while ready not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{args} did not start:\n{log.read_text()}")
            time.sleep(0.05)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


async def read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    first = (await reader.readexactly(1))[0]
    length, shift = 0, 0
    while True:
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return first, await reader.readexactly(length)


async def open_client(
    port: int, client_id: str, username: str | None, password: str | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(connect_packet(client_id, username, password, keepalive=120))
    first, body = await asyncio.wait_for(read_packet(reader), 60)
    if first != 0x20 or body[1] != 0:
        raise RuntimeError(f"CONNACK refused for {client_id}: {body!r}")
    return reader, writer


async def connect_storm(port: int, logins: list[tuple[str, str | None, str | None]]) -> float:
    """Seconds until every login has its CONNACK; the connections are then closed."""
    start = time.perf_counter()
    clients = await asyncio.gather(*(open_client(port, *login) for login in logins))
    elapsed = time.perf_counter() - start
    for _, writer in clients:
        writer.write(b"\xe0\x00")  # DISCONNECT
        writer.close()
    await asyncio.sleep(0.5)
    return elapsed


async def throughput(
    port: int,
    publisher: tuple[str, str | None, str | None],
    subscriber: tuple[str, str | None, str | None],
    topic: str,
    topic_filter: str,
    count: int,
) -> float:
    """QoS 0 messages per second from one publisher to one subscriber."""
    sub_reader, sub_writer = await open_client(port, *subscriber)
    sub_writer.write(subscribe_packet(topic_filter, 0))
    first, body = await read_packet(sub_reader)
    if first != 0x90 or body[-1] != 0:
        raise RuntimeError(f"subscription refused: SUBACK {body!r}")
    _, pub_writer = await open_client(port, *publisher)
    message = publish_packet(topic, json.dumps({"cpu_percent": 12.5, "seq": 0}).encode())
    start = time.perf_counter()

    async def send() -> None:
        for i in range(count):
            pub_writer.write(message)
            if i % 100 == 0:
                await pub_writer.drain()
        await pub_writer.drain()

    sender = asyncio.create_task(send())
    received = 0
    try:
        while received < count:
            first, _ = await asyncio.wait_for(read_packet(sub_reader), 30)
            if first >> 4 == 3:
                received += 1
    except TimeoutError:
        pass
    elapsed = time.perf_counter() - start
    await sender
    for writer in (pub_writer, sub_writer):
        writer.close()
    return received / elapsed


async def enroll(url: str, count: int) -> dict[str, str]:
    passwords = {}
    async with aiohttp.ClientSession(url) as http:
        for i in range(count):
            body: dict[str, Any] = {"customer_id": "bench", "mac_address": f"dev-{i}"}
            async with http.post("/api/v1/register", json=body) as response:
                body["password"] = (await response.json())["password"]
            async with http.post("/api/v1/activate", json=body) as response:
                assert response.status == 200, await response.text()
            passwords[f"bench/dev-{i}"] = body["password"]
    return passwords


def run_iotbiz(folder: Path, devices: int, messages: int) -> dict[str, float]:
    db = folder / "bench.db"
    cli = [sys.executable, "-m", "iotbiz"]
    subprocess.run(
        [*cli, "customer", "add", "bench", "--limit", str(devices + 1), "--db", str(db)],
        check=True,
        capture_output=True,
    )
    root = json.loads(
        subprocess.run(
            [*cli, "account", "add", "root", "--superuser", "--db", str(db), "--json"],
            check=True,
            capture_output=True,
        ).stdout
    )["password"]
    http_port, mqtt_port = free_port(), free_port()
    args = [
        *(sys.executable, "-m", "iotbiz.broker", "--db", str(db), "--log-level", "INFO"),
        *("--http-port", str(http_port), "--mqtt-port", str(mqtt_port)),
    ]
    ready = "registrar listening"
    with process(args, ready, folder / "iotbiz-1.log"):
        passwords = asyncio.run(enroll(f"http://127.0.0.1:{http_port}", devices))
    logins = [(name, name, password) for name, password in passwords.items()]
    with process(args, ready, folder / "iotbiz-2.log"):  # restarted: a cold credential cache
        cold = asyncio.run(connect_storm(mqtt_port, logins))
        warm = asyncio.run(connect_storm(mqtt_port, logins))
        rate = asyncio.run(
            throughput(
                mqtt_port,
                logins[0],
                ("root", "root", root),
                "devices/bench/dev-0/telemetry",
                "devices/+/+/telemetry",
                messages,
            )
        )
    return {"connect_cold_s": cold, "connect_warm_s": warm, "qos0_msgs_per_s": rate}


def run_plain(folder: Path, devices: int, messages: int) -> dict[str, float]:
    port = free_port()
    args = [sys.executable, "-c", PLAIN_AMQTT % port]
    logins: list[tuple[str, str | None, str | None]] = [
        (f"bench/dev-{i}", None, None) for i in range(devices)
    ]
    with process(args, "listening", folder / "amqtt.log"):
        storm = asyncio.run(connect_storm(port, logins))
        rate = asyncio.run(
            throughput(
                port,
                logins[0],
                ("root", None, None),
                "devices/bench/dev-0/telemetry",
                "devices/+/+/telemetry",
                messages,
            )
        )
    return {"connect_s": storm, "qos0_msgs_per_s": rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=300)
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        plain = run_plain(folder, args.devices, args.messages)
        iotbiz = run_iotbiz(folder, args.devices, args.messages)
    result = {
        "devices": args.devices,
        "messages": args.messages,
        "cores": os.cpu_count(),
        "plain_amqtt": {k: round(v, 3) for k, v in plain.items()},
        "iotbiz": {k: round(v, 3) for k, v in iotbiz.items()},
        "throughput_ratio_iotbiz_to_plain": round(
            iotbiz["qos0_msgs_per_s"] / plain["qos0_msgs_per_s"], 2
        ),
        "warm_connect_ratio_iotbiz_to_plain": round(
            iotbiz["connect_warm_s"] / plain["connect_s"], 2
        ),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
