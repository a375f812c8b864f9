"""Enrollment from the device's side, against the real registrar: every crash point recovers."""

from __future__ import annotations

import asyncio
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


async def test_a_refusal_is_logged_and_retried(
    make_enrollment: Callable[..., Enrollment], caplog: pytest.LogCaptureFixture
) -> None:
    enrollment = make_enrollment("nobody")
    task = asyncio.create_task(enrollment.credentials())
    await asyncio.sleep(0.5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert enrollment.attempts >= 3
    assert "registration of nobody/dev-1 refused by the platform: unknown customer" in caplog.text


async def test_an_unreachable_registrar_is_retried(tmp_path: Path) -> None:
    settings = agent_settings(tmp_path, "http://127.0.0.1:9")  # discard port: nothing listens
    settings.state_dir.mkdir()
    enrollment = Enrollment(settings, "dev-1", backoff_cap_s=0.05)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(enrollment.credentials(), 1.0)
    assert enrollment.attempts >= 2
    assert not (settings.state_dir / CREDENTIALS_FILE).exists()


async def test_credentials_of_another_device_are_ignored(
    make_enrollment: Callable[..., Enrollment],
) -> None:
    enrollment = make_enrollment()
    write_json(enrollment.path, Credentials("abc123", "other", "pw", True).to_json())
    assert enrollment.load() is None
    credentials = await asyncio.wait_for(enrollment.credentials(), 10)
    assert credentials.device_id == "dev-1"


async def test_recheck_forgets_credentials_only_after_a_reset(
    make_enrollment: Callable[..., Enrollment], store: Store
) -> None:
    enrollment = make_enrollment()
    credentials = await enrollment.credentials()
    assert not await enrollment.recheck(credentials)  # still valid: kept
    assert enrollment.load() == credentials
    await store.revoke_device(NAME, actor="test")
    assert not await enrollment.recheck(credentials)  # revoked: kept, an operator decides
    await store.reset_device(NAME, actor="test")
    assert await enrollment.recheck(credentials)  # reset: forgotten, enroll again
    assert enrollment.load() is None
