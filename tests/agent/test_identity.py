"""Enrollment from the device's side, against the real registrar: every crash point recovers."""

from __future__ import annotations

import asyncio
import contextlib
import stat
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from aiohttp.test_utils import TestClient

from iotbiz.agent.files import write_json
from iotbiz.agent.identity import CREDENTIALS_FILE, Credentials, Enrollment
from iotbiz.names import DeviceName
from iotbiz.settings import AgentSettings, load_agent_settings
from iotbiz.store import Store

NAME = DeviceName("abc123", "dev-1")
Client = TestClient[Any, Any]


def agent_settings(tmp_path: Path, registrar_url: str, customer: str = "abc123") -> AgentSettings:
    return load_agent_settings(
        None,
        environ={},
        overrides={
            "customer_id": customer,
            "registrar_url": registrar_url,
            "state_dir": tmp_path / "agent",
        },
    )


@pytest.fixture
def make_enrollment(tmp_path: Path, client: Client) -> Callable[..., Enrollment]:
    def make(customer: str = "abc123") -> Enrollment:
        url = str(client.make_url("/")).rstrip("/")
        settings = agent_settings(tmp_path, url, customer)
        settings.state_dir.mkdir(exist_ok=True)
        return Enrollment(settings, "dev-1", refused_retry_s=0.05, backoff_cap_s=0.1)

    return make


async def actions(store: Store) -> list[str]:
    return [e.action for e in reversed(await store.audit_entries(subject=str(NAME)))]


async def test_enrolls_once_and_keeps_the_password_private(
    make_enrollment: Callable[..., Enrollment], store: Store
) -> None:
    enrollment = make_enrollment()
    credentials = await asyncio.wait_for(enrollment.credentials(), 10)
    assert credentials.activated
    assert stat.S_IMODE(enrollment.path.stat().st_mode) == 0o600
    again = await asyncio.wait_for(make_enrollment().credentials(), 10)  # a restarted agent
    assert again == credentials
    assert await actions(store) == ["device.register", "device.activate"]


async def test_killed_after_register_resumes_with_activation(
    make_enrollment: Callable[..., Enrollment], store: Store
) -> None:
    enrollment = make_enrollment()
    pending = await enrollment._register()  # the agent dies right after writing the password
    assert not pending.activated
    credentials = await asyncio.wait_for(make_enrollment().credentials(), 10)
    assert credentials.password == pending.password
    assert await actions(store) == ["device.register", "device.activate"]


async def test_a_lost_register_response_registers_again(
    make_enrollment: Callable[..., Enrollment], store: Store
) -> None:
    enrollment = make_enrollment()
    stale = await enrollment._register()
    await enrollment._register()  # this response was "lost": the disk holds an older password
    write_json(enrollment.path, stale.to_json())
    credentials = await asyncio.wait_for(make_enrollment().credentials(), 10)
    assert credentials.activated
    assert credentials.password != stale.password
    assert (await actions(store))[-1] == "device.activate"


async def test_a_lost_activate_response_is_retried(
    make_enrollment: Callable[..., Enrollment], store: Store
) -> None:
    enrollment = make_enrollment()
    pending = await enrollment._register()
    assert await enrollment._activate(pending) is not None
    write_json(enrollment.path, pending.to_json())  # as if the agent died before recording it
    credentials = await asyncio.wait_for(make_enrollment().credentials(), 10)
    assert credentials.activated
    assert await actions(store) == ["device.register", "device.activate"]


async def until(check: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.01)


async def refusals(enrollment: Enrollment, count: int = 3) -> None:
    """Run `enrollment` until it was refused `count` times (it retries), then cancel it."""
    task = asyncio.create_task(enrollment.credentials())
    try:
        await until(lambda: enrollment.attempts >= count or task.done(), f"{count} attempts")
        assert not task.done(), "enrollment gave up"
    finally:
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_refusal_is_logged_and_retried(
    make_enrollment: Callable[..., Enrollment], caplog: pytest.LogCaptureFixture
) -> None:
    enrollment = make_enrollment("nobody")
    await refusals(enrollment)
    assert "registration of nobody/dev-1 refused by the platform: unknown customer" in caplog.text


async def test_an_unknown_customer_is_for_the_operator_to_create(
    make_enrollment: Callable[..., Enrollment], caplog: pytest.LogCaptureFixture
) -> None:
    await refusals(make_enrollment("nobody"))
    assert "`iotbiz customer add nobody --limit N`" in caplog.text
    assert "device reset" not in caplog.text


async def test_a_reached_limit_is_for_the_operator_to_raise(
    make_enrollment: Callable[..., Enrollment], store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    await store.add_customer("small", 1, actor="test")
    first = make_enrollment("small")
    await asyncio.wait_for(first.credentials(), 10)
    other = Enrollment(
        agent_settings(first.path.parent.parent / "other", first._settings.registrar_url, "small"),
        "dev-2",
        refused_retry_s=0.05,
    )
    other._settings.state_dir.mkdir(parents=True)
    await refusals(other)
    assert "refused by the platform: device limit reached" in caplog.text
    assert "`iotbiz customer set-limit small N`" in caplog.text
    assert "device reset" not in caplog.text


async def test_lost_credentials_of_an_active_device_are_for_a_reset(
    make_enrollment: Callable[..., Enrollment], caplog: pytest.LogCaptureFixture
) -> None:
    enrollment = make_enrollment()
    await asyncio.wait_for(enrollment.credentials(), 10)
    enrollment.path.unlink()  # a reinstall: the password is gone
    await refusals(make_enrollment())
    assert "refused by the platform: device already activated" in caplog.text
    assert "`iotbiz device reset abc123/dev-1`" in caplog.text


async def test_a_revoked_device_gets_no_command_to_run(
    make_enrollment: Callable[..., Enrollment], store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    enrollment = make_enrollment()
    await asyncio.wait_for(enrollment.credentials(), 10)
    await store.revoke_device(NAME, actor="test")
    enrollment.path.unlink()
    await refusals(make_enrollment())
    assert "refused by the platform: device revoked" in caplog.text
    assert "abc123/dev-1 is revoked" in caplog.text
    assert "`iotbiz" not in caplog.text


# -- a registrar that answers badly: every network error is retried ------------------------------

CREATED = b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
BAD_ANSWERS = {
    "garbage": b"SSH-2.0-OpenSSH_9.6\r\n",  # BadStatusLine
    "bad status": b"HTTP/1.1 2x1 Created\r\n\r\n",  # BadStatusLine
    "closed at once": b"",  # RemoteDisconnected
    "closed mid-headers": CREATED + b"Content-Len",  # RemoteDisconnected/IncompleteRead
    "truncated body": CREATED + b'Content-Length: 100\r\n\r\n{"password": "x',  # IncompleteRead
    "bad chunk": CREATED + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",  # IncompleteRead
    "header too long": CREATED + b"X: " + b"a" * 70000 + b"\r\n\r\n",  # LineTooLong
    "bad length": CREATED + b"Content-Length: -5\r\n\r\n",  # ValueError
}


class BadRegistrar:
    """A TCP server on 127.0.0.1 port 0 that gives each connection the next bad answer of
    `answers`, then relays every later connection to the real registrar."""

    def __init__(
        self, answers: Sequence[bytes], registrar: tuple[str, int], *, tls: bool = False
    ) -> None:
        self._answers = list(answers)
        self._tls = tls
        self._registrar = registrar
        self.connections = 0
        self.relayed = 0
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            if self._answers:
                answer = self._answers.pop(0)
                if self._tls:
                    await reader.read(1)  # a ClientHello
                else:
                    await reader.readuntil(b"\r\n\r\n")  # the request's headers
                writer.write(answer)
                await writer.drain()
                return
            self.relayed += 1
            up_reader, up_writer = await asyncio.open_connection(*self._registrar)
            try:
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            finally:
                up_writer.close()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    with contextlib.suppress(OSError):
        writer.write_eof()


@pytest.fixture
async def bad_registrar(client: Client) -> AsyncIterator[Callable[..., Any]]:
    made: list[BadRegistrar] = []

    async def make(answers: Sequence[bytes], *, tls: bool = False) -> BadRegistrar:
        url = urlsplit(str(client.make_url("/")))
        server = BadRegistrar(answers, (url.hostname or "127.0.0.1", url.port or 80), tls=tls)
        await server.start()
        made.append(server)
        return server

    yield make
    for server in made:
        await server.close()


@pytest.mark.parametrize("answer", sorted(BAD_ANSWERS))
async def test_a_bad_answer_is_retried_until_the_registrar_answers(
    tmp_path: Path, bad_registrar: Callable[..., Any], store: Store, answer: str
) -> None:
    """Issue 8 fault 5: http.client.BadStatusLine (and IncompleteRead, ValueError...) escaped
    `_post_json` and ended enrollment for good."""
    server = await bad_registrar([BAD_ANSWERS[answer]] * 3)
    settings = agent_settings(tmp_path, f"http://127.0.0.1:{server.port}")
    settings.state_dir.mkdir()
    enrollment = Enrollment(settings, "dev-1", backoff_cap_s=0.05)
    credentials = await asyncio.wait_for(enrollment.credentials(), 20)
    assert credentials.activated
    assert enrollment.attempts >= 4  # three bad answers, then the real registrar
    assert server.relayed >= 2  # register and activate
    assert await actions(store) == ["device.register", "device.activate"]


async def test_every_bad_answer_in_a_row_is_retried(
    tmp_path: Path, bad_registrar: Callable[..., Any], store: Store
) -> None:
    server = await bad_registrar(list(BAD_ANSWERS.values()))
    settings = agent_settings(tmp_path, f"http://127.0.0.1:{server.port}")
    settings.state_dir.mkdir()
    enrollment = Enrollment(settings, "dev-1", backoff_cap_s=0.05)
    credentials = await asyncio.wait_for(enrollment.credentials(), 20)
    assert credentials.activated
    assert server.connections >= len(BAD_ANSWERS) + 2


async def test_tls_to_a_plain_server_is_retried(tmp_path: Path, bad_registrar: Any) -> None:
    """ssl.SSLError (an OSError) on a registrar that does not speak TLS: retried, not raised."""
    server = await bad_registrar([b"HTTP/1.1 400 Bad Request\r\n\r\n"] * 100, tls=True)
    settings = agent_settings(tmp_path, f"https://127.0.0.1:{server.port}")
    settings.state_dir.mkdir()
    enrollment = Enrollment(settings, "dev-1", backoff_cap_s=0.05)
    task = asyncio.create_task(enrollment.credentials())
    try:
        await until(lambda: enrollment.attempts >= 3 or task.done(), "three attempts")
        assert not task.done(), task.exception()
    finally:
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_an_unreachable_registrar_is_retried(tmp_path: Path) -> None:
    settings = agent_settings(tmp_path, "http://127.0.0.1:9")  # discard port: nothing listens
    settings.state_dir.mkdir()
    enrollment = Enrollment(settings, "dev-1", backoff_cap_s=0.05)
    task = asyncio.create_task(enrollment.credentials())
    try:
        await until(lambda: enrollment.attempts >= 3 or task.done(), "three attempts")
        assert not task.done(), task.exception()
    finally:
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not (settings.state_dir / CREDENTIALS_FILE).exists()


async def test_credentials_of_another_device_are_ignored(
    make_enrollment: Callable[..., Enrollment],
) -> None:
    enrollment = make_enrollment()
    write_json(enrollment.path, Credentials("abc123", "other", "pw", True).to_json())
    assert enrollment.load() is None
    credentials = await asyncio.wait_for(enrollment.credentials(), 10)
    assert credentials.device_id == "dev-1"


async def test_recheck_forgets_credentials_only_when_the_registrar_refuses_them(
    make_enrollment: Callable[..., Enrollment], store: Store
) -> None:
    enrollment = make_enrollment()
    credentials = await enrollment.credentials()
    assert not await enrollment.recheck(credentials)  # still valid: kept
    assert enrollment.load() == credentials
    await store.reset_device(NAME, actor="test")
    assert await enrollment.recheck(credentials)  # reset: forgotten, enroll again
    assert enrollment.load() is None
    credentials = await enrollment.credentials()
    await store.revoke_device(NAME, actor="test")
    assert await enrollment.recheck(credentials)  # revoked: forgotten too; registering says so
    assert enrollment.load() is None
