"""Disconnecting a revoked name from an external broker: the `Kick` of external-broker mode.

With an embedded broker the platform drops a revoked device's session itself. An external broker
holds the connection; the platform's auth callbacks deny the name's every later check at once
(`Authority` forgets it), but a connection that is already open stays open until the broker asks
again. RabbitMQ's management HTTP API can close it:

    GET    /api/connections/username/{username}   the user's open connections, on every node
    DELETE /api/connections/username/{username}   close them all (X-Reason: shown in its log)

`ManagementKick` lists the name's connections and, when there are any, closes them. Both
endpoints use RabbitMQ's connection tracking, which knows a connection at once; measured on
3.10.8, `DELETE /api/connections/{name}` answered 404 for an MQTT connection a second old (the
statistics database that it looks names up in had not seen it yet, `GET /api/connections` was
still empty), so a device revoked right after connecting stayed connected. Every platform process
follows the store's change feed and kicks, so the connections may be gone by the DELETE (404):
that is success. Each request is bounded (`TIMEOUT_S`); a failure (the API down, refused
credentials, an unexpected status) is logged once per outage, at WARNING, and again when the
API works again, never raised: the task that follows the change feed must go on.

Retained messages cannot be removed through the management API (RabbitMQ keeps them per node, in
its own store), so `drop_retained` is not honoured here: a revoked device's last retained
`status` stays on the broker. Only subscribers allowed `devices/#` (the platform and operator
accounts) can see it.

Without `broker.management_url`, `log_only_kick` stands in (it says so once, at DEBUG): nothing
closes the connection. RabbitMQ 3.10 keeps a connection's allowed topic checks while it is busy
and asks again after a pause (measured, tests/test_e2e_backends.py), so a revoked device goes at
its first publish after a pause, or at its next reconnect.
"""

from __future__ import annotations

import base64
import logging
from urllib.parse import quote

import aiohttp

from iotbiz.broker.authority import Kick
from iotbiz.settings import BrokerSettings

log = logging.getLogger(__name__)

TIMEOUT_S = 10.0  # each request to the management API, connecting included
REASON = "IoTBiz: credentials revoked"


class ManagementKick:
    """Close every connection of a name through RabbitMQ's management HTTP API."""

    def __init__(self, url: str, user: str, password: str, *, timeout_s: float = TIMEOUT_S) -> None:
        self._url = url.rstrip("/")
        login = base64.b64encode(f"{user}:{password}".encode()).decode()
        self._headers = {"Authorization": f"Basic {login}"}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._failing = False  # one warning per outage
        self.closed_connections = 0
        self.failures = 0

    async def __call__(self, username: str, *, drop_retained: bool) -> None:
        """Close `username`'s connections; log (once per outage) and return on failure.
        `drop_retained` cannot be honoured (see the module docstring)."""
        try:
            closed = await self._close_all(username)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self.failures += 1
            message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if not self._failing:
                self._failing = True
                log.warning(
                    "cannot disconnect %s through the broker's management API %s (%s); it stays"
                    " connected until the broker checks it again (every check is denied). Logged"
                    " once until the API answers again",
                    username,
                    self._url,
                    message,
                )
            else:
                log.debug("cannot disconnect %s through the management API: %s", username, message)
            return
        if self._failing:
            self._failing = False
            log.warning("the broker's management API %s answers again", self._url)
        self.closed_connections += closed
        if closed:
            log.info("disconnected %s from the external broker (%d connections)", username, closed)
        else:  # not connected, or another platform process was first
            log.debug("%s has no connection on the external broker to close", username)

    async def _close_all(self, username: str) -> int:
        """List the name's connections; when there are any, close them all in one DELETE."""
        user_url = f"{self._url}/api/connections/username/{quote(username, safe='')}"
        async with aiohttp.ClientSession(headers=self._headers, timeout=self._timeout) as session:
            async with session.get(user_url) as response:
                _check_status(response, "GET", (200,))
                names = _connection_names(await response.json())
            if not names:
                return 0
            async with session.delete(user_url, headers={"X-Reason": REASON}) as response:
                _check_status(response, "DELETE", (200, 204, 404))  # 404: gone meanwhile
            return len(names)


def _check_status(response: aiohttp.ClientResponse, method: str, expected: tuple[int, ...]) -> None:
    if response.status not in expected:
        raise aiohttp.ClientResponseError(
            response.request_info,
            (),
            status=response.status,
            message=f"{method} {response.url.path}: {response.status} {response.reason}",
        )


def _connection_names(connections: object) -> list[str]:
    if not isinstance(connections, list):
        raise ValueError("the connection list is not a JSON array")
    names = []
    for connection in connections:
        name = connection.get("name") if isinstance(connection, dict) else None
        if not isinstance(name, str):
            raise ValueError("a connection without a name")
        names.append(name)
    return names


def log_only_kick() -> Kick:
    """The kick without a management API: nothing to do but say so, once."""
    said = False

    async def kick(username: str, *, drop_retained: bool) -> None:
        nonlocal said
        if not said:
            said = True
            log.debug(
                "revoked %s: no broker.management_url, so its open connection (if any) stays"
                " until the broker checks it again; every later check is denied (said once)",
                username,
            )

    return kick


def external_kick(settings: BrokerSettings) -> Kick:
    """The kick for external-broker mode: the management API's when it is configured."""
    if not settings.management_url:
        return log_only_kick()
    return ManagementKick(
        settings.management_url, settings.management_user, settings.management_password
    )
