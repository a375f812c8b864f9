"""The registrar against hostile HTTP clients, through a real platform and raw sockets: caps on
connections per address and in all, slow headers and bodies cut off, malformed requests
answered in the JSON error shape without a traceback in the log, oversized bodies refused up
front, and no version banner."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web

from iotbiz.platform import Platform
from iotbiz.registrar.http_server import runner
from iotbiz.settings import Settings

REGISTER = "/api/v1/register"


@pytest.fixture
async def platform(make_settings: Callable[..., Settings]) -> AsyncIterator[Platform]:
    running = Platform(
        make_settings(
            http={
                "host": "127.0.0.1",
                "header_timeout_s": 0.5,
                "body_timeout_s": 0.5,
                "max_connections_per_address": 5,
                "max_connections": 8,
            },
            registrar={"rate_per_ip": 0.0},
        )
    )
    await running.start()
    await running.store.add_customer("abc123", 10, actor="test")
    try:
        yield running
    finally:
        await running.stop()


async def connect(platform: Platform, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    sock.bind((source, 0))
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", platform.http_port))
    return sock


async def read_all(sock: socket.socket, timeout_s: float = 5.0) -> bytes:
    """Everything the server sends until it closes (ECONNRESET counts as closed)."""
    loop = asyncio.get_running_loop()
    data = b""
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                chunk = await loop.sock_recv(sock, 65536)
            except ConnectionResetError:
                return data
            if not chunk:
                return data
            data += chunk


async def exchange(platform: Platform, request: bytes, source: str = "127.0.0.1") -> bytes:
    sock = await connect(platform, source)
    try:
        await asyncio.get_running_loop().sock_sendall(sock, request)
        return await read_all(sock)
    finally:
        sock.close()


async def read_answer(sock: socket.socket, timeout_s: float = 5.0) -> bytes:
    """One whole answer (headers and the Content-Length of body), without waiting for the
    connection to close."""
    loop = asyncio.get_running_loop()
    data = b""
    async with asyncio.timeout(timeout_s):
        while True:
            head, found, body = data.partition(b"\r\n\r\n")
            if found:
                length = parse(head + b"\r\n\r\n")[1].get("content-length", "0")
                if len(body) >= int(length):
                    return data
            chunk = await loop.sock_recv(sock, 65536)
            assert chunk, f"closed before a whole answer: {data!r}"
            data += chunk


def parse(answer: bytes) -> tuple[int, dict[str, str], Any]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, json.loads(body) if body.strip() else None


def post(body: bytes, *extra: str) -> bytes:
    head = [f"POST {REGISTER} HTTP/1.1", "Host: x", "Content-Type: application/json", *extra]
    if not any(line.lower().startswith("content-length") for line in extra):
        head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header<script>: 1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n",
        b"GET /\x00<b> HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /api/v1/register HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,  # a TLS hello
    ],
)
async def test_a_malformed_request_gets_the_json_error_and_no_traceback(
    platform: Platform, request_bytes: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    answer = await exchange(platform, request_bytes)
    status, headers, body = parse(answer)
    assert 400 <= status < 500
    assert headers["content-type"].startswith("application/json")
    assert headers["server"] == "IoTBiz"
    assert list(body) == ["error"]
    assert b"<script>" not in answer
    assert b"aaaa" not in answer
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert "Traceback" not in caplog.text


async def test_answers_name_iotbiz_not_the_versions(platform: Platform) -> None:
    answer = await exchange(
        platform, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    status, headers, _ = parse(answer)
    assert status == 200
    assert headers["server"] == "IoTBiz"
    assert b"aiohttp" not in answer
    assert b"Python" not in answer


async def test_an_oversized_body_is_refused_before_it_is_sent(platform: Platform) -> None:
    big = "Content-Length: 10485760"
    too_large = (413, {"error": "request body too large (at most 4096 bytes)"})
    for extra in ([], ["Expect: 100-continue"]):
        sock = await connect(platform)
        try:
            await asyncio.get_running_loop().sock_sendall(sock, post(b"", big, *extra))
            answer = await read_answer(sock)  # at once, not after 10 MB
        finally:
            sock.close()
        assert b"100 Continue" not in answer  # the client was told before it sent anything
        status, headers, body = parse(answer)
        assert (status, body) == too_large
        assert headers["connection"] == "close"
    # a body that fits is let in
    fits = json.dumps({"customer_id": "abc123", "mac_address": "44:8a:5b:00:00:01"}).encode()
    answer = await exchange(platform, post(fits, "Expect: 100-continue", "Connection: close"))
    assert answer.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201")


async def test_slow_headers_are_cut_off(platform: Platform) -> None:
    sock = await connect(platform)
    try:
        await asyncio.get_running_loop().sock_sendall(sock, b"POST /api/v1/register HTTP/1.1\r\n")
        started = time.monotonic()
        assert await read_all(sock, timeout_s=5) == b""  # closed, no answer
        assert time.monotonic() - started < 3  # header_timeout_s 0.5, aiohttp's timer rounding
    finally:
        sock.close()


async def test_a_slow_body_is_408(platform: Platform) -> None:
    sock = await connect(platform)
    try:
        await asyncio.get_running_loop().sock_sendall(sock, post(b'{"cust', "Content-Length: 100"))
        status, _, body = parse(await read_answer(sock))
        assert (status, body) == (408, {"error": "request body not received within 0.5 s"})
    finally:
        sock.close()


async def test_connections_are_capped_per_address_and_in_all(platform: Platform) -> None:
    idle = [await connect(platform) for _ in range(5)]
    try:
        # a sixth from the same address is closed at once
        sixth = await connect(platform)
        assert await read_all(sixth, timeout_s=2) == b""
        sixth.close()
        # another address still gets in, up to the total cap (8)
        status, _, _ = parse(
            await exchange(
                platform,
                b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                "127.0.0.2",
            )
        )
        assert status == 200
        others = [await connect(platform, "127.0.0.3") for _ in range(3)]
        over = await connect(platform, "127.0.0.4")
        assert await read_all(over, timeout_s=2) == b""
        over.close()
        for sock in others:
            sock.close()
    finally:
        for sock in idle:
            sock.close()
    # the places are free again once the connections close
    deadline = time.monotonic() + 5
    while True:
        answer = await exchange(
            platform, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        if answer:
            assert parse(answer)[0] == 200
            break
        assert time.monotonic() < deadline, "the connection places were not freed"
        await asyncio.sleep(0.05)


async def test_a_client_gone_in_the_middle_of_a_body_costs_no_error_line(
    platform: Platform, caplog: pytest.LogCaptureFixture
) -> None:
    sock = await connect(platform)
    await asyncio.get_running_loop().sock_sendall(sock, post(b'{"customer', "Content-Length: 200"))
    await asyncio.sleep(0.1)  # the handler is reading the body
    sock.close()
    # the platform goes on, and said nothing above DEBUG about it
    answer = await exchange(
        platform, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert parse(answer)[0] == 200
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


async def test_a_connection_with_an_unread_body_is_closed_soon_after_the_answer(
    platform: Platform,
) -> None:
    """A 405 to a request that announced a body it never sends: answered at once, and closed
    after LINGER_S, not held for aiohttp's 10 s."""
    request = b"GET /api/v1/register HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n"
    sock = await connect(platform)
    try:
        started = time.monotonic()
        await asyncio.get_running_loop().sock_sendall(sock, request)
        answer = await read_answer(sock)
        assert parse(answer)[0] == 405
        assert time.monotonic() - started < 0.5
        assert await read_all(sock, timeout_s=5) == b""
        assert time.monotonic() - started < 3
    finally:
        sock.close()


def test_an_external_brokers_addresses_have_no_per_address_cap(
    make_settings: Callable[..., Settings],
) -> None:
    """RabbitMQ asks one auth callback per connecting device, all from its address (or the
    nginx in front): capped at http.max_connections_per_address, a 2,000-device storm had
    its callbacks closed and its devices refused. The cap in all still holds."""
    external = make_settings(
        http={"max_connections_per_address": 2, "max_connections": 5},
        broker={"mode": "external", "service_password": "x"},
        broker_auth={"allowed_addresses": "127.0.0.9, ::1"},
    )
    guard = runner(web.Application(), external).guard
    assert guard.unlimited == {"127.0.0.9", "::1"}
    assert [guard.admit("127.0.0.9") for _ in range(6)] == [True] * 5 + [False]  # the total cap
    for _ in range(5):
        guard.release("127.0.0.9")
    assert [guard.admit("127.0.0.2") for _ in range(3)] == [True, True, False]  # anyone else
    embedded = make_settings(broker_auth={"allowed_addresses": "127.0.0.9"})
    assert runner(web.Application(), embedded).guard.unlimited == frozenset()
