"""Hypothesis strategies for hostile raw HTTP requests, and the rule every answer must keep.

Shared by `tests/registrar/test_http_fuzz.py` (a bounded number of cases in every test run) and
`scripts/fuzz.py` (a nightly-size run). A request is bytes on a socket: methods, paths, headers
and bodies both plausible and broken (bad bytes, wrong lengths, huge numbers, junk encodings).
The rule: the platform answers with a documented status below 500 and, for an error, the JSON
error shape `{"error": "..."}`, or it closes the connection; it never hangs and never answers
500.
"""

from __future__ import annotations

import json
import socket
import string
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

ROUTES = [
    "/api/v1/register",
    "/api/v1/activate",
    "/healthz",
    "/metrics",
    "/api/v1/openapi.json",
    "/",
    "/console/app.js",
    "/console/../../etc/passwd",
    "/api/v1/console/login",
    "/api/v1/console/session",
    "/api/v1/console/logout",
    "/api/v1/admin/customers",
    "/api/v1/admin/customers/abc123",
    "/api/v1/admin/devices",
    "/api/v1/admin/devices/abc123/dev-0",
    "/api/v1/admin/devices/abc123/dev-0/telemetry",
    "/api/v1/admin/devices/abc123/dev-0/events",
    "/api/v1/admin/commands",
    "/api/v1/admin/commands/c-0",
    "/api/v1/admin/audit",
    "/api/v1/admin/events",
]
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["customer_id", "mac_address", "password", "token", "action"])
            | st.text(max_size=10),
            children,
            max_size=5,
        )
    ),
    max_leaves=12,
)
TOKEN = st.text(alphabet=string.ascii_letters + "-_", min_size=1, max_size=10)
HEADER_VALUE = st.text(max_size=40) | st.binary(max_size=40).map(lambda b: b.decode("latin-1"))


@dataclass(frozen=True)
class Case:
    raw: bytes
    method: str

    def __repr__(self) -> str:
        return f"Case({self.raw[:300]!r})"


@st.composite
def requests(draw: Any, token: str = "") -> Case:
    method = draw(
        st.sampled_from(["GET", "POST", "PATCH", "PUT", "DELETE", "HEAD", "OPTIONS"])
        | st.text(alphabet=string.ascii_uppercase, min_size=1, max_size=10)
    )
    path = draw(
        st.sampled_from(ROUTES)
        | st.sampled_from(ROUTES).flatmap(
            lambda route: st.text(max_size=20).map(lambda tail: route + tail)
        )
        | st.binary(max_size=30).map(lambda b: "/" + b.decode("latin-1"))
    )
    query = draw(
        st.none()
        | st.dictionaries(
            st.sampled_from(["limit", "cursor", "q", "tag", "before", "wait", "online", "x"]),
            st.text(max_size=20),
            max_size=3,
        )
    )
    if query:
        path += "?" + "&".join(f"{key}={value}" for key, value in query.items())
    body_kind = draw(st.sampled_from(["none", "json", "bytes"]))
    body = b""
    if body_kind == "json":
        body = json.dumps(draw(JSON)).encode()
    elif body_kind == "bytes":
        body = draw(st.binary(max_size=300))
    headers: list[tuple[str, str]] = [("Host", "fuzz"), ("Connection", "close")]
    length = draw(
        st.sampled_from(["right", "none", "wrong"])
        if body
        else st.sampled_from(["none", "right", "wrong"])
    )
    if length == "right":
        headers.append(("Content-Length", str(len(body))))
    elif length == "wrong":
        headers.append(
            (
                "Content-Length",
                draw(
                    st.sampled_from(["-1", "99999999999999999999", "1e3", "", " 5", "0x10"])
                    | st.integers(0, 100_000).map(str)
                ),
            )
        )
    for name in draw(
        st.lists(
            st.sampled_from(
                [
                    "Content-Type",
                    "Authorization",
                    "Cookie",
                    "Expect",
                    "Transfer-Encoding",
                    "X-CSRF-Token",
                    "Accept",
                    "Origin",
                ]
            )
            | TOKEN,
            max_size=4,
        )
    ):
        value = draw(HEADER_VALUE)
        if name == "Authorization" and token and method == "GET" and draw(st.booleans()):
            value = f"Bearer {token}"  # the real token only on reads: nothing is changed for real
        headers.append((name, value))
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
    return Case(head.encode("utf-8", "surrogateescape") + b"\r\n" + body, method)


def exchange(port: int, case: Case, timeout_s: float = 5.0) -> bytes:
    """Send the case and read until the server closes (or `timeout_s`: a hang is a failure)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        try:
            # not half-closed after it: aiohttp takes the end of input for a client gone and
            # answers nothing; an incomplete request waits for the header or body timeout
            sock.sendall(case.raw)
        except OSError:
            return b""  # closed on us while sending (a refused request): fine
        data = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return data
            except TimeoutError as exc:
                raise AssertionError(f"no answer and no close within {timeout_s} s") from exc
            if not chunk:
                return data
            data += chunk


def check_answer(case: Case, answer: bytes) -> int:
    """The rule (module docstring); returns the status (0 for a closed connection)."""
    if not answer:
        return 0
    head, _, body = answer.partition(b"\r\n\r\n")
    while head.startswith(b"HTTP/1.1 100"):  # an interim answer, then the real one
        head, _, body = body.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    status = int(status_line.split()[1])
    assert status < 500, (status, answer[:500])
    headers = {
        name.strip().lower(): value.strip()
        for name, _, value in (
            line.partition(":") for line in head.decode("latin-1").split("\r\n")[1:]
        )
    }
    assert headers.get("server") == "IoTBiz", headers
    if status >= 400 and case.method != "HEAD":
        assert headers.get("content-type", "").startswith("application/json"), answer[:500]
        error = json.loads(body)
        assert list(error) == ["error"], error
        assert isinstance(error["error"], str)
    return status
