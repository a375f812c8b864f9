"""The device's identity: its id, and credentials obtained by registering and activating.

Enrollment is a small state machine driven by what is on disk, so that an agent killed at any
point recovers on its next start:

    no credentials      -> register (201: new password)  -> write it (0600, fsynced), pending
    pending credentials -> activate (200)                 -> write activated
                           activate 403 (lost/expired)    -> register again (device still pending)
    activated           -> done; a restarted agent never registers again

Network errors and 5xx are retried with capped exponential backoff and jitter: every error that
urllib and http.client can raise for a request (OSError, which covers URLError, timeouts, refused
or reset connections and ssl.SSLError; http.client.HTTPException, which covers BadStatusLine,
IncompleteRead and RemoteDisconnected; ValueError from a malformed response), so enrollment never
gives up. 429 waits for Retry-After. A 403 on register (unknown customer, limit reached, already
activated with the credentials lost, revoked) is logged with what the operator must do and
retried slowly, since only an operator can fix it.

The HTTP request runs in a daemon thread, not the default executor: a registrar that accepts
the connection and never answers must not keep a stopping agent waiting for the thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import random
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psutil

from iotbiz.agent.files import read_json, write_json
from iotbiz.errors import ConfigError
from iotbiz.names import DeviceName, normalize_device_id
from iotbiz.settings import AgentSettings
from iotbiz.tls import client_context

log = logging.getLogger(__name__)

CREDENTIALS_FILE = "credentials.json"
HTTP_TIMEOUT_S = 15.0
BACKOFF_START_S = 1.0
BACKOFF_CAP_S = 60.0
REFUSED_RETRY_S = 300.0
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Credentials:
    customer_id: str
    device_id: str
    password: str
    activated: bool

    @property
    def name(self) -> DeviceName:
        return DeviceName(self.customer_id, self.device_id)

    def to_json(self) -> dict[str, Any]:
        return {
            "customer_id": self.customer_id,
            "device_id": self.device_id,
            "password": self.password,
            "activated": self.activated,
        }


def primary_mac() -> str | None:
    """The MAC of the interface that carries the default route, else of the first interface
    (by name) that has a MAC and is not loopback."""
    addresses = psutil.net_if_addrs()
    macs: dict[str, str] = {
        name: address.address
        for name, entries in addresses.items()
        for address in entries
        if address.family == psutil.AF_LINK and address.address not in ("", "00:00:00:00:00:00")
    }
    default = _default_route_interface()
    if default in macs:
        return macs[default]
    candidates = sorted(name for name in macs if name != "lo")
    return macs[candidates[0]] if candidates else None


def _default_route_interface() -> str | None:
    try:
        with open("/proc/net/route") as routes:
            for line in routes.readlines()[1:]:
                fields = line.split()
                if len(fields) > 2 and fields[1] == "00000000":
                    return fields[0]
    except OSError:
        return None
    return None


def resolve_device_id(settings: AgentSettings) -> str:
    raw = settings.device_id if settings.device_id is not None else primary_mac()
    if raw is None:
        raise ConfigError("device_id: not set and no network interface with a MAC address found")
    device_id = normalize_device_id(raw)
    if device_id is None:
        raise ConfigError(f"device_id: not a valid device id: {raw!r}")
    return device_id


class Enrollment:
    def __init__(
        self,
        settings: AgentSettings,
        device_id: str,
        *,
        refused_retry_s: float = REFUSED_RETRY_S,
        backoff_cap_s: float = BACKOFF_CAP_S,
    ) -> None:
        self._settings = settings
        self._refused_retry_s = refused_retry_s
        self._backoff_cap_s = backoff_cap_s
        self._device_id = device_id
        self._path = settings.state_dir / CREDENTIALS_FILE
        self.attempts = 0
        # https: the platform's certificate and host name verified (ca_file or the system's)
        self._tls = (
            client_context(settings.ca_file)
            if settings.registrar_url.startswith("https:")
            else None
        )

    @property
    def path(self) -> Path:
        return self._path

    def load(self) -> Credentials | None:
        """Credentials on disk for this customer and device, if any."""
        data = read_json(self._path)
        if not isinstance(data, dict):
            return None
        try:
            credentials = Credentials(
                str(data["customer_id"]),
                str(data["device_id"]),
                str(data["password"]),
                bool(data["activated"]),
            )
        except KeyError:
            return None
        if (credentials.customer_id, credentials.device_id) != (
            self._settings.customer_id,
            self._device_id,
        ):
            log.warning("credentials on disk are for %s; enrolling anew", credentials.name)
            return None
        return credentials

    async def credentials(self) -> Credentials:
        """Enroll if needed and return activated credentials; retries until it succeeds."""
        backoff = BACKOFF_START_S
        while True:
            current = await asyncio.to_thread(self.load)
            if current is not None and current.activated:
                return current
            self.attempts += 1
            try:
                if current is None:
                    current = await self._register()
                activated = await self._activate(current)
                if activated is not None:
                    return activated
                # 403: the password was superseded (a lost register response) or expired
                log.info("activation of %s refused; registering again", current.name)
                await self._register()
                continue
            except _Refused as exc:
                log.error(
                    "registration of %s/%s refused by the platform: %s. %s; retrying in %.0f s",
                    self._settings.customer_id,
                    self._device_id,
                    exc,
                    refusal_hint(str(exc), DeviceName(self._settings.customer_id, self._device_id)),
                    self._refused_retry_s,
                )
                await asyncio.sleep(self._refused_retry_s)
            except _RetryLater as exc:
                delay = exc.after_s if exc.after_s is not None else _jitter(backoff)
                log.warning("enrollment: %s; retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                backoff = min(backoff * 2, self._backoff_cap_s)

    async def recheck(self, credentials: Credentials) -> bool:
        """After the broker refused `credentials`: True if they were forgotten because the
        registrar refuses them too (activate does not say why: a device reset, forgotten by the
        platform, or revoked), so the next `credentials()` enrolls anew and registration tells
        which (a revoked device is refused there, with the operator's hint, until a reset);
        False if they still stand (a passing platform problem)."""
        try:
            status, answer = await self._post(
                "/api/v1/activate",
                {
                    "customer_id": credentials.customer_id,
                    "mac_address": credentials.device_id,
                    "password": credentials.password,
                },
            )
        except _RetryLater as exc:
            log.warning("cannot check the refused credentials: %s", exc)
            return False
        reason = answer.get("error") if isinstance(answer, dict) else None
        if status == 403:  # forgotten (reset) or revoked: enrolling again tells which
            log.warning("the platform refuses %s (%s): enrolling again", credentials.name, reason)
            await asyncio.to_thread(self._path.unlink, True)
            return True
        log.error(
            "MQTT login of %s refused; registrar says %s %s", credentials.name, status, reason
        )
        return False

    async def _register(self) -> Credentials:
        body = {"customer_id": self._settings.customer_id, "mac_address": self._device_id}
        status, answer = await self._post("/api/v1/register", body)
        if status == 201 and isinstance(answer, dict) and isinstance(answer.get("password"), str):
            credentials = Credentials(
                self._settings.customer_id, self._device_id, answer["password"], activated=False
            )
            # Written before activation: a crash from here on resumes with this password.
            await asyncio.to_thread(write_json, self._path, credentials.to_json())
            log.info("registered %s (pending)", credentials.name)
            return credentials
        raise self._error("register", status, answer)

    async def _activate(self, credentials: Credentials) -> Credentials | None:
        """The activated credentials, or None if the platform refused these (403)."""
        body = {
            "customer_id": credentials.customer_id,
            "mac_address": credentials.device_id,
            "password": credentials.password,
        }
        status, answer = await self._post("/api/v1/activate", body)
        if status == 200:
            activated = Credentials(
                credentials.customer_id, credentials.device_id, credentials.password, True
            )
            await asyncio.to_thread(write_json, self._path, activated.to_json())
            log.info("activated %s", credentials.name)
            return activated
        if status == 403:
            return None
        raise self._error("activate", status, answer)

    def _error(self, what: str, status: int, answer: Any) -> Exception:
        reason = answer.get("error") if isinstance(answer, dict) else None
        if status == 403:
            return _Refused(str(reason))
        if status == 429:
            return _RetryLater(f"{what}: rate limited", after_s=_retry_after(answer))
        return _RetryLater(f"{what}: HTTP {status} {reason or ''}".strip())

    async def _post(self, path: str, body: dict[str, str]) -> tuple[int, Any]:
        url = self._settings.registrar_url.rstrip("/") + path
        return await _in_daemon_thread(_post_json, url, body, self._tls)


def refusal_hint(reason: str, name: DeviceName) -> str:
    """What an operator can do about a refused registration, by the registrar's reason."""
    if reason == "unknown customer":
        return (
            f"The customer {name.customer_id} does not exist: an operator must create it "
            f"(`iotbiz customer add {name.customer_id} --limit N`)"
        )
    if reason == "device limit reached":
        return (
            f"The customer {name.customer_id} has all the devices it may have: an operator "
            f"must raise its limit (`iotbiz customer set-limit {name.customer_id} N`)"
        )
    if reason == "device already activated":
        return (
            f"{name} was activated before and its credentials are lost (a reinstall or a "
            f"hardware swap): an operator must reset it (`iotbiz device reset {name}`)"
        )
    if reason == "device revoked":
        return f"{name} is revoked: it may not enroll unless an operator resets it"
    return "An operator must look into it"


async def _in_daemon_thread(function: Callable[..., T], *args: Any) -> T:
    """`function(*args)` in a daemon thread; cancelling the await leaves the thread to finish
    (its result is dropped) without holding up the process's exit."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def run() -> None:
        try:
            result, error = function(*args), None
        except BaseException as exc:  # handed over to the awaiting task, as to_thread does
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(_settle, future, result, error)

    threading.Thread(target=run, name="registrar-http", daemon=True).start()
    return await future


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the awaiting task was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class _Refused(Exception):
    """A 403 that only an operator can fix."""


class _RetryLater(Exception):
    def __init__(self, message: str, *, after_s: float | None = None) -> None:
        super().__init__(message)
        self.after_s = after_s


def _post_json(url: str, body: dict[str, str], tls: ssl.SSLContext | None) -> tuple[int, Any]:
    """POST JSON; (status, parsed body or None). Network failures raise _RetryLater."""
    request = urllib.request.Request(  # noqa: S310 - the configured registrar URL (http/https)
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        try:
            with urllib.request.urlopen(  # noqa: S310 - the configured registrar URL
                request, timeout=HTTP_TIMEOUT_S, context=tls
            ) as response:
                return response.status, _parse(response.read())
        except urllib.error.HTTPError as exc:
            retry_after = exc.headers.get("Retry-After")
            answer = _parse(exc.read())
            if exc.code == 429 and isinstance(answer, dict):
                answer["retry_after"] = retry_after
            return exc.code, answer
    except (OSError, http.client.HTTPException, ValueError) as exc:
        # OSError: URLError, timeouts, refused/reset connections, ssl.SSLError;
        # HTTPException: BadStatusLine, IncompleteRead, RemoteDisconnected, LineTooLong...;
        # ValueError: a malformed response (e.g. a bad chunk size)
        raise _RetryLater(f"registrar unreachable ({type(exc).__name__}: {exc})") from exc


def _parse(data: bytes) -> Any:
    try:
        return json.loads(data) if data else None
    except ValueError:
        return None


def _retry_after(answer: Any) -> float | None:
    try:
        return max(1.0, float(answer["retry_after"]))
    except (KeyError, TypeError, ValueError):
        return None


def _jitter(delay: float) -> float:
    return random.uniform(delay / 2, delay)  # noqa: S311 - jitter, not cryptography
