"""The registrar's HTTP server: aiohttp's, with caps and timeouts for a port on the internet.

- Connections: at most `http.max_connections` open at once, and `http.max_connections_per_address`
  from one client address; one more is closed at once (counted), so a flood from one address
  cannot take the file descriptors every other client needs. With an external broker, the
  addresses of `broker_auth.allowed_addresses` have no cap of their own (the broker asks one
  callback per connecting device). The listen queue holds `http.backlog` connections not yet
  accepted (aiohttp's default, 128, overflowed in a 2,000-device storm through RabbitMQ).
- Slow clients: a request's headers must arrive within `http.header_timeout_s` of the connection
  (or of the previous answer on a kept-alive connection), else the connection is closed:
  aiohttp's keep-alive timer, which runs from the connection's start and from each answer and
  fires while no whole request has arrived, is that timeout. Bodies have `http.body_timeout_s`
  (`read_body`: 408).
- Errors before a request exists (a malformed request line or header, a header too long): one
  DEBUG line and a JSON answer `{"error": "bad request"}`, instead of aiohttp's ERROR traceback
  and a text/plain body that echoes the input.
- An `Expect` other than 100-continue is ignored (aiohttp answers it with a text/plain 417 that
  echoes it); a body announced larger than the route takes is refused before it is sent, also
  after `Expect: 100-continue` (`expect_handler`).
- Every answer says `Server: IoTBiz`, not the Python and aiohttp versions.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from multidict import CIMultiDict, CIMultiDictProxy

from iotbiz.errors import HTTPError

log = logging.getLogger(__name__)

SERVER_NAME = "IoTBiz"
LINGER_S = 1.0


class RequestTimeout(HTTPError):
    status = 408
    close_connection = True  # the rest of the body may still come: no keep-alive after it


class PayloadTooLarge(HTTPError):
    status = 413
    close_connection = True


class BodyCutOff(HTTPError):
    """The client went away in the middle of its body: nobody reads the answer."""

    status = 400
    close_connection = True


@dataclass(slots=True)
class ConnectionGuard:
    """Counts open connections, in all and per client address, and refuses those over a cap."""

    max_connections: int
    max_per_address: int
    # Addresses the per-address cap does not apply to: an external broker's (or the nginx in
    # front of the platform's), which asks one auth callback per device connecting (2,000 at
    # once in a connect storm through RabbitMQ). The cap in all still does.
    unlimited: frozenset[str] = frozenset()
    open: int = 0
    by_address: Counter[str] = field(default_factory=Counter)
    refused: int = 0  # connections closed at once for a cap
    bad_requests: int = 0  # malformed requests answered 400 before any handler

    def admit(self, address: str) -> bool:
        over_address_cap = (
            self.by_address[address] >= self.max_per_address and address not in self.unlimited
        )
        if self.open >= self.max_connections or over_address_cap:
            self.refused += 1
            return False
        self.open += 1
        self.by_address[address] += 1
        return True

    def release(self, address: str) -> None:
        self.open -= 1
        self.by_address[address] -= 1
        if self.by_address[address] <= 0:
            del self.by_address[address]


class GuardedRequestHandler(RequestHandler):
    """aiohttp's protocol for one connection, admitted by the guard, with JSON errors."""

    def __init__(self, manager: Any, *, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._address: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        address = str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"
        if not self._guard.admit(address):
            log.debug("HTTP connection from %s closed: over the connection caps", address)
            if isinstance(transport, asyncio.Transport):
                transport.abort()  # connection_lost follows, which ends the handler's task
            else:
                transport.close()
            return
        self._address = address

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._address is not None:
            self._guard.release(self._address)
            self._address = None
        super().connection_lost(exc)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Replaces `RequestHandler.handle_error`, which logs every malformed request at ERROR
        with a traceback and answers text/plain echoing the input: one DEBUG line, counted,
        and the registrar's JSON error shape."""
        self._guard.bad_requests += 1
        log.debug("bad HTTP request from %s: %s", request.remote, exc)
        if status >= 500:
            text = "internal error"
            log.error("HTTP error from %s", request.remote, exc_info=exc)
        else:
            text = {413: "request too large", 431: "request headers too large"}.get(
                status, "bad request"
            )
        response = web.Response(
            status=status,
            body=json.dumps({"error": text}).encode(),
            content_type="application/json",
            headers={"Server": SERVER_NAME},
        )
        response.force_close()
        return response


class GuardedServer(web.Server):
    def __init__(self, *args: Any, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.guard = guard

    def __call__(self) -> RequestHandler:
        """Replaces `Server.__call__` (the protocol factory): our handler, with the guard."""
        return GuardedRequestHandler(self, loop=self._loop, guard=self.guard, **self._kwargs)


class GuardedAppRunner(web.AppRunner):
    """`web.AppRunner` whose server makes `GuardedRequestHandler`s."""

    def __init__(self, app: web.Application, *, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.guard = guard

    async def _make_server(self) -> web.Server:
        """Replaces `AppRunner._make_server`, which builds a plain `web.Server` through
        `Application._make_handler`: the same steps, with `GuardedServer`."""
        loop = asyncio.get_running_loop()
        app = self.app
        app._set_loop(loop)
        app.on_startup.freeze()
        await app.startup()
        app.freeze()

        def make_request(message: Any, *args: Any) -> web.Request:
            return app._make_request(_without_unknown_expect(message), *args)

        return GuardedServer(
            app._handle,
            request_factory=make_request,
            loop=loop,
            guard=self.guard,
            debug=False,
            **self._kwargs,
        )


def _without_unknown_expect(message: Any) -> Any:
    """The request without an `Expect` other than 100-continue, which RFC 9110 lets a server
    ignore: aiohttp answers one, on a path no route has, with a text/plain 417 that echoes it."""
    expect = message.headers.get("Expect")
    if expect is None or expect.strip().lower() == "100-continue":
        return message
    headers = CIMultiDict(message.headers)
    headers.popall("Expect")
    return message._replace(headers=CIMultiDictProxy(headers))


def runner(app: web.Application, settings: Any, **kwargs: Any) -> GuardedAppRunner:
    """The platform's runner for the registrar app, from the `http` settings."""
    http = settings.http
    unlimited: frozenset[str] = frozenset()
    if settings.broker.mode == "external":  # the broker's callbacks come from its addresses
        allowed = settings.broker_auth.allowed_addresses.split(",")
        unlimited = frozenset(address.strip() for address in allowed if address.strip())
    guard = ConnectionGuard(
        http.max_connections, http.max_connections_per_address, unlimited=unlimited
    )
    return GuardedAppRunner(
        app,
        guard=guard,
        keepalive_timeout=http.header_timeout_s,
        # after answering a request whose body was not read (405, 413, 408...), aiohttp reads
        # and drops the rest for this long, then closes (its default: 10 s)
        lingering_time=LINGER_S,
        **kwargs,
    )


async def server_header(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: our name instead of aiohttp's version banner."""
    response.headers["Server"] = SERVER_NAME


async def read_body(request: web.Request, *, limit: int, timeout_s: float) -> bytes:
    """The request's body, at most `limit` bytes (413 at once when Content-Length says more,
    or as soon as more arrive) within `timeout_s` (408)."""
    too_large = PayloadTooLarge(f"request body too large (at most {limit} bytes)")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    raw = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.content.iter_any():
                raw += chunk
                if len(raw) > limit:
                    raise too_large
    except TimeoutError as exc:
        raise RequestTimeout(f"request body not received within {timeout_s:g} s") from exc
    except ConnectionResetError as exc:  # aiohttp's "Connection lost": not our error to log
        log.debug("%s %s: the client left in the middle of its body", request.method, request.path)
        raise BodyCutOff("request body cut off") from exc
    return bytes(raw)


def expect_handler(limit: int) -> Any:
    """A route's answer to `Expect: 100-continue`: 413 up front when the announced body is
    larger than `limit`, so that a client does not send 10 MB to be refused after 4 KB."""

    async def expect(request: web.Request) -> web.StreamResponse | None:
        if request.version != (1, 1) or request.headers.get("Expect", "").lower() != (
            "100-continue"
        ):
            return None
        if request.content_length is not None and request.content_length > limit:
            return web.json_response(
                {"error": f"request body too large (at most {limit} bytes)"},
                status=413,
                headers={"Connection": "close"},
            )
        if request.writer is not None:
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return None

    return expect
