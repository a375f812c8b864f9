"""Releases over HTTP against a real platform (broker authority, dispatcher, store): the admin
API adds, lists and removes them; `update` commands are filled in from them and offer them; a
device downloads what it is offered with its own MQTT credentials, resuming with Range."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import tarfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest_asyncio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from iotbiz.platform import Platform
from iotbiz.releases import keygen
from iotbiz.settings import Settings
from tests.registrar.admin_helpers import (
    ADMIN,
    AUTH,
    TOKEN,
    assert_error,
    enroll,
    ok_json,
    platform,
)
from tests.test_cli_cmd import run_cli

Session = aiohttp.ClientSession
__all__ = ["platform"]  # the fixture, used by name


def artifact(size: int) -> bytes:
    """A .tar.gz holding `size` random (incompressible) bytes."""
    buffer = io.BytesIO()
    payload = os.urandom(size)
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        info = tarfile.TarInfo("blob")
        info.size = size
        archive.addfile(info, io.BytesIO(payload[:size]))
    return buffer.getvalue()


@pytest_asyncio.fixture
async def api(platform: Platform) -> AsyncIterator[Session]:
    async with aiohttp.ClientSession(
        f"http://127.0.0.1:{platform.http_port}", headers=AUTH
    ) as session:
        yield session


@pytest_asyncio.fixture
async def plain(platform: Platform) -> AsyncIterator[Session]:
    """A session without the admin token: the device's."""
    async with aiohttp.ClientSession(f"http://127.0.0.1:{platform.http_port}") as session:
        yield session


async def upload(api: Session, app: str, version: str, data: bytes) -> dict[str, Any]:
    async with api.post(
        f"{ADMIN}/releases", params={"app": app, "version": version}, data=data
    ) as response:
        body: dict[str, Any] = await ok_json(response, 201)
        return body


async def send_update(api: Session, device: str, **args: Any) -> dict[str, Any]:
    async with api.post(
        f"{ADMIN}/commands", json={"device": device, "action": "update", "args": args}
    ) as response:
        body: dict[str, Any] = await ok_json(response, 201)
        return body


def basic(name: str, password: str, **headers: str) -> dict[str, str]:
    """Headers with HTTP basic auth (and `headers`)."""
    return {"Authorization": aiohttp.encode_basic_auth(name, password), **headers}


async def test_admin_add_list_remove(platform: Platform, api: Session) -> None:
    data = artifact(5000)
    added = await upload(api, "web", "1.0.0", data)
    assert added["sha256"] == hashlib.sha256(data).hexdigest()
    assert added["size"] == len(data)
    assert added["signature"] is None
    assert added["url"] == "/api/v1/releases/web/1.0.0"
    assert added["actor"].startswith("admin:")
    async with api.post(
        f"{ADMIN}/releases", params={"app": "web", "version": "1.0.0"}, data=data
    ) as r:
        await assert_error(r, 409, "release web 1.0.0 exists already")
    not_gzip = "the artifact is not a .tar.gz (no gzip header)"
    for params, body, error in (
        (
            {"app": "web"},
            data,
            "app and version are required (query parameters or multipart fields)",
        ),
        ({"app": "../x", "version": "1"}, data, None),
        ({"app": "web", "version": "2"}, b"plain text", not_gzip),
        ({"app": "web", "version": "2", "x": "1"}, data, None),
    ):
        async with api.post(f"{ADMIN}/releases", params=params, data=body) as response:
            await assert_error(response, 400, error)
    async with api.get(f"{ADMIN}/releases") as response:
        listed = await ok_json(response)
    assert [(r["app"], r["version"]) for r in listed["releases"]] == [("web", "1.0.0")]
    async with api.delete(f"{ADMIN}/releases/web/1.0.0") as response:
        assert (await ok_json(response))["sha256"] == added["sha256"]
    async with api.delete(f"{ADMIN}/releases/web/1.0.0") as response:
        await assert_error(response, 404, "no release web 1.0.0")
    assert not (platform.store.path.parent / "releases" / "web" / "1.0.0").exists()


async def test_too_large_upload_is_413(platform: Platform, api: Session) -> None:
    limit = platform.settings.releases.max_bytes
    headers = {"Content-Length": str(limit + 1)}
    async with api.post(
        f"{ADMIN}/releases", params={"app": "web", "version": "1"}, data=b"x", headers=headers
    ) as response:
        await assert_error(response, 413)


async def test_update_is_filled_in_and_the_device_downloads_it(
    platform: Platform, api: Session, plain: Session
) -> None:
    password = await enroll(api, "dev-1")
    other_password = await enroll(api, "dev-2")
    data = artifact(300_000)
    release = await upload(api, "web", "1.2.0", data)
    await upload(api, "web", "9.9.9", artifact(100))
    url = "/api/v1/releases/web/1.2.0"

    # not offered yet: 404, whoever asks; no credentials or wrong ones: 401
    async with plain.get(url, headers=basic("abc123/dev-1", password)) as response:
        await assert_error(response, 404, "release web 1.2.0 is not offered to abc123/dev-1")
    async with plain.get(url) as response:
        await assert_error(response, 401, "missing or wrong device credentials")
        assert response.headers["WWW-Authenticate"] == 'Basic realm="IoTBiz releases"'
    async with plain.get(url, headers=basic("abc123/dev-1", "wrong")) as response:
        await assert_error(response, 401)
    async with plain.get(url, headers={"Authorization": "Basic !!!"}) as response:
        await assert_error(response, 401)

    sent = await send_update(api, "abc123/dev-1", app="web", version="1.2.0")
    [command] = sent["commands"]
    assert command["args"] == {
        "app": "web",
        "version": "1.2.0",
        "url": url,
        "sha256": release["sha256"],
        "size": len(data),
        "signature": None,
        "force": False,
    }
    assert [str(n) for n in await platform.store.release_offers("web", "1.2.0")] == ["abc123/dev-1"]

    async with plain.get(url, headers=basic("abc123/dev-1", password)) as response:
        assert response.status == 200
        assert response.headers["ETag"] == f'"{release["sha256"]}"'
        assert response.headers["Accept-Ranges"] == "bytes"
        assert response.content_type == "application/gzip"
        assert await response.read() == data

    # a broken transfer resumes: exactly the rest, from the credential cache (no bcrypt)
    bcrypt_before = platform.authority.hasher.operations
    cut = 123_457
    headers = {"Range": f"bytes={cut}-"}
    async with plain.get(url, headers=basic("abc123/dev-1", password, **headers)) as response:
        assert response.status == 206
        assert response.headers["Content-Range"] == f"bytes {cut}-{len(data) - 1}/{len(data)}"
        rest = await response.read()
    assert rest == data[cut:]
    headers = {"Range": "bytes=10-19"}
    async with plain.get(url, headers=basic("abc123/dev-1", password, **headers)) as response:
        assert response.status == 206
        assert await response.read() == data[10:20]
    assert platform.authority.hasher.operations == bcrypt_before
    for bad_range in (f"bytes={len(data)}-", "bytes=5-2", "pages=1-2"):
        headers = {"Range": bad_range}
        async with plain.get(url, headers=basic("abc123/dev-1", password, **headers)) as response:
            await assert_error(response, 416)
            assert response.headers["Content-Range"] == f"bytes */{len(data)}"

    # offered to dev-1 only; another release is not offered to dev-1
    async with plain.get(url, headers=basic("abc123/dev-2", other_password)) as response:
        await assert_error(response, 404)
    async with plain.get(
        "/api/v1/releases/web/9.9.9", headers=basic("abc123/dev-1", password)
    ) as response:
        await assert_error(response, 404)
    async with plain.get(
        "/api/v1/releases/web/1.2.0", headers=basic("abc123/dev-1", password), params={"x": "1"}
    ) as response:
        await assert_error(response, 400)

    # revoked: refused at once (before the broker's cache hears of it)
    async with api.post(f"{ADMIN}/devices/abc123/dev-1/revoke") as response:
        await ok_json(response)
    async with plain.get(url, headers=basic("abc123/dev-1", password)) as response:
        await assert_error(response, 401)


async def test_update_refusals_queue_nothing(platform: Platform, api: Session) -> None:
    await enroll(api, "dev-1")
    await upload(api, "web", "1.0", artifact(100))
    no_release = "update: no release web 2.0 (add it with iotbiz release add)"
    cases = [
        ({"app": "web", "version": "2.0"}, no_release),
        ({"app": "web"}, "update: args app and version are required strings"),
        (
            {"app": "web", "version": "1.0", "force": "yes"},
            "update: arg force must be true or false",
        ),
        ({"app": "web", "version": "1.0", "url": "http://evil"}, None),
    ]
    for args, error in cases:
        body = {"device": "abc123/dev-1", "action": "update", "args": args}
        async with api.post(f"{ADMIN}/commands", json=body) as response:
            await assert_error(response, 400, error)
    # a device that is not active: nothing queued, and no offer left behind
    body = {"devices": ["abc123/dev-1", "abc123/ghost"], "action": "update",
            "args": {"app": "web", "version": "1.0"}}  # fmt: skip
    async with api.post(f"{ADMIN}/commands", json=body) as response:
        await assert_error(response, 400)
    assert await platform.store.release_offers("web", "1.0") == []
    async with api.get(f"{ADMIN}/commands") as response:
        assert (await ok_json(response))["commands"] == []

    sent = await send_update(api, "abc123/dev-1", app="web", version="1.0", force=True)
    assert sent["commands"][0]["args"]["force"] is True
    assert [str(n) for n in await platform.store.release_offers("web", "1.0")] == ["abc123/dev-1"]


async def test_iotbiz_cmd_update(platform: Platform, api: Session) -> None:
    """`iotbiz cmd DEV update --arg app=A --arg version=V`, the CLI as it is, goes through the
    same filling in (app and version are sent as text, whatever they look like)."""
    await enroll(api, "dev-1")
    await upload(api, "web", "1.2.0", artifact(100))
    await upload(api, "web", "2", artifact(100))
    await upload(api, "web", "1.10", artifact(100))
    device = ["abc123/dev-1", "update", "--wait", "0", "--json", "--token", TOKEN]
    for version, args in (
        ("1.2.0", ["--arg", "app=web", "--arg", "version=1.2.0"]),
        ("2", ["--arg", "app=web", "--arg", "version=2"]),
        ("1.10", ["--arg", "app=web", "--arg", "version=1.10"]),
    ):
        code, out, err = await run_cli(platform, *device, *args)
        assert code == 0, err
        sent = json.loads(out)
        assert sent["args"]["version"] == version
        assert sent["args"]["url"] == f"/api/v1/releases/web/{version}"
    code, _, err = await run_cli(platform, *device, "--arg", "app=web", "--arg", "version=3.0.0")
    assert code == 1
    assert "400 update: no release web 3.0.0" in err


async def test_an_operator_account_may_not_download(
    platform: Platform, api: Session, plain: Session
) -> None:
    password = "operator-password-0123456789"
    password_hash = await platform.authority.hasher.hash(password)
    await platform.store.add_account("ops", password_hash, superuser=False, actor="test")
    await upload(api, "web", "1.0", artifact(100))
    async with plain.get("/api/v1/releases/web/1.0", headers=basic("ops", password)) as r:
        await assert_error(r, 403, "only devices download releases here")


async def test_uploads_are_signed_with_the_signing_key(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    private, public = keygen(tmp_path / "keys")
    settings = make_settings(
        admin={"token": TOKEN},
        http={"host": "127.0.0.1"},
        releases={"signing_key_file": str(private)},
    )
    running = Platform(settings)
    await running.start()
    try:
        async with aiohttp.ClientSession(
            f"http://127.0.0.1:{running.http_port}", headers=AUTH
        ) as api:
            data = artifact(1000)
            added = await upload(api, "web", "1.0", data)
            key = serialization.load_pem_public_key(public.read_bytes())
            assert isinstance(key, Ed25519PublicKey)
            key.verify(base64.b64decode(added["signature"]), hashlib.sha256(data).digest())

            private.write_text("not a key any more")
            async with api.post(
                f"{ADMIN}/releases", params={"app": "web", "version": "1.1"}, data=data
            ) as response:
                await assert_error(response, 503, "the platform's release signing key is unusable")
            assert await running.store.get_release("web", "1.1") is None
            assert not (tmp_path / "releases" / "web" / "1.1").exists()
    finally:
        await running.stop()


async def test_multipart_upload(platform: Platform, api: Session) -> None:
    data = artifact(2000)
    form = aiohttp.FormData()
    form.add_field("app", "web")
    form.add_field("version", "3.0")
    form.add_field("file", data, filename="web.tar.gz", content_type="application/gzip")
    async with api.post(f"{ADMIN}/releases", data=form) as response:
        added = await ok_json(response, 201)
    assert (added["app"], added["version"]) == ("web", "3.0")
    assert added["sha256"] == hashlib.sha256(data).hexdigest()
    stored = platform.store.path.parent / "releases" / "web" / "3.0" / "artifact.tar.gz"
    assert stored.read_bytes() == data

    unknown = "unknown multipart field 'other' (known: app, version, file)"
    no_name = "app and version are required (query parameters or multipart fields)"
    for fields, error in (
        ([("app", "web"), ("version", "3.1")], "multipart body without a part named file"),
        ([("app", "web"), ("other", "x")], unknown),
        ([("file", data)], no_name),
    ):
        form = aiohttp.FormData(default_to_multipart=True)
        for name, value in fields:
            if isinstance(value, bytes):
                form.add_field(name, value, filename="x.tar.gz")
            else:
                form.add_field(name, value)
        async with api.post(f"{ADMIN}/releases", data=form) as response:
            await assert_error(response, 400, error)
    headers = {"Content-Type": "multipart/form-data; boundary=zzz"}
    async with api.post(f"{ADMIN}/releases", data=b"garbage", headers=headers) as response:
        await assert_error(response, 400)


async def test_a_version_with_a_plus_downloads_by_its_url(
    platform: Platform, api: Session, plain: Session
) -> None:
    password = await enroll(api, "dev-1")
    data = artifact(500)
    await upload(api, "web", "1.0+build.7", data)
    sent = await send_update(api, "abc123/dev-1", app="web", version="1.0+build.7")
    url = sent["commands"][0]["args"]["url"]
    assert url == "/api/v1/releases/web/1.0+build.7"
    async with plain.get(url, headers=basic("abc123/dev-1", password)) as response:
        assert response.status == 200
        assert await response.read() == data
