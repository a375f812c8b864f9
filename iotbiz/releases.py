"""Application releases on the platform: artifacts in the releases folder, their sha256, size
and Ed25519 signature, and the `update` command's arguments filled in from them.

An artifact (a .tar.gz) is kept at `APP/VERSION/artifact.tar.gz` in the releases folder
(`releases.folder`, else `releases` in the store file's folder). Adding one copies it there while
hashing it (in a thread: nothing blocks the event loop), refusing it beyond `releases.max_bytes`,
then signs the raw 32-byte sha256 digest with the Ed25519 key of `releases.signing_key_file`
(when set), moves the file into place (fsynced) and records the release in the store; the
release is offered to no device yet. `iotbiz release keygen` writes a key pair
(`release-signing.key` 0600, `release-signing.pub` for the agents' `release_public_key`).

The version's content must never change: remove a release and add it again with the same
version, and devices that kept a partial download of the old one fail its sha256 check.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import secrets
import shutil
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from iotbiz.errors import ConfigError, ConflictError, IotbizError
from iotbiz.names import DeviceName
from iotbiz.settings import Settings
from iotbiz.store import Release
from iotbiz.store.interface import DeviceStore

APP_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}", re.ASCII)
VERSION = re.compile(r"[A-Za-z0-9_.+-]{1,64}", re.ASCII)
APP_RULE = "1 to 64 of A-Z a-z 0-9 _ . -"
VERSION_RULE = "1 to 64 of A-Z a-z 0-9 _ . + -"
ARTIFACT = "artifact.tar.gz"
FOLDER = "releases"
KEY_FILE = "release-signing.key"
PUBLIC_KEY_FILE = "release-signing.pub"
CHUNK_BYTES = 1024 * 1024
GZIP_MAGIC = b"\x1f\x8b"
UPDATE_ARGS = ("app", "version", "force")


class ReleaseError(IotbizError):
    """A release that cannot be added: bad name, too large, not a .tar.gz, unreadable."""


class TooLarge(ReleaseError):
    """The artifact is larger than `releases.max_bytes`."""


def check_name(app: str, version: str) -> None:
    """Raise ReleaseError unless `app` and `version` are valid (they become path parts and a
    URL: `.` and `..` alone are refused too)."""
    if not APP_NAME.fullmatch(app) or app in (".", ".."):
        raise ReleaseError(f"app {app!r} is not valid: {APP_RULE}")
    if not VERSION.fullmatch(version) or version in (".", ".."):
        raise ReleaseError(f"version {version!r} is not valid: {VERSION_RULE}")


def releases_folder(settings: Settings) -> Path:
    """`releases.folder`, else `releases` beside the SQLite store file."""
    if settings.releases.folder:
        return Path(settings.releases.folder)
    return settings.store.path.parent / FOLDER


def artifact_path(settings: Settings, app: str, version: str) -> Path:
    return releases_folder(settings) / app / version / ARTIFACT


# -- adding and removing ----------------------------------------------------------------------


@dataclass(slots=True)
class _Spool:
    """A temporary file beside the artifact's place, hashed as it is written (in a thread)."""

    path: Path
    stream: BinaryIO
    limit: int
    size: int = 0
    hash: Any = field(default_factory=hashlib.sha256)

    def write(self, data: bytes) -> None:
        if self.size == 0 and data and not (GZIP_MAGIC.startswith(data[:2])):
            raise ReleaseError("the artifact is not a .tar.gz (no gzip header)")
        self.size += len(data)
        if self.size > self.limit:
            raise TooLarge(f"the artifact is larger than releases.max_bytes ({self.limit} bytes)")
        self.hash.update(data)
        self.stream.write(data)

    def digest(self) -> bytes:
        digest: bytes = self.hash.digest()
        return digest

    def copy_from(self, source: Path) -> None:
        try:
            with source.open("rb") as stream:
                while chunk := stream.read(CHUNK_BYTES):
                    self.write(chunk)
        except OSError as exc:
            raise ReleaseError(f"cannot read {source}: {exc.strerror or exc}") from exc

    def finish(self) -> None:
        if self.size < len(GZIP_MAGIC):
            raise ReleaseError("the artifact is not a .tar.gz (too short)")
        self.stream.flush()
        os.fsync(self.stream.fileno())
        self.stream.close()

    def discard(self) -> None:
        self.stream.close()
        self.path.unlink(missing_ok=True)


def _open_spool(folder: Path, version: str, limit: int) -> _Spool:
    _make_folders(folder)
    path = folder / f".{version}.{secrets.token_hex(4)}.partial"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    return _Spool(path, os.fdopen(fd, "wb"), limit)


def _make_folders(folder: Path) -> None:
    missing = [f for f in (folder, *folder.parents) if not f.exists()]
    for created in reversed(missing):
        created.mkdir(mode=0o700, exist_ok=True)


def _place(spool: _Spool, target: Path) -> None:
    """Move the finished spool to `target` (its folder made fresh) and fsync the folders."""
    if target.parent.exists():  # left by an add that crashed before the store knew of it
        shutil.rmtree(target.parent)
    target.parent.mkdir(mode=0o700)
    os.replace(spool.path, target)
    for folder in (target.parent, target.parent.parent):
        _fsync_folder(folder)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def add_release(
    store: DeviceStore,
    settings: Settings,
    app: str,
    version: str,
    source: Path | AsyncIterable[bytes],
    *,
    actor: str,
) -> Release:
    """Store the artifact `source` (a file, or the chunks of an upload) as release (app,
    version). Raises ReleaseError (TooLarge), ConflictError when it exists, ConfigError for an
    unusable signing key (nothing is stored then)."""
    check_name(app, version)
    if await store.get_release(app, version) is not None:
        raise ConflictError(f"release {app} {version} exists already")
    key = None
    if settings.releases.signing_key_file:
        key = await asyncio.to_thread(load_signing_key, Path(settings.releases.signing_key_file))
    target = artifact_path(settings, app, version)
    spool = await asyncio.to_thread(
        _open_spool, target.parent.parent, version, settings.releases.max_bytes
    )
    try:
        if isinstance(source, Path):
            await asyncio.to_thread(spool.copy_from, source)
        else:
            async for chunk in source:
                await asyncio.to_thread(spool.write, chunk)
        await asyncio.to_thread(spool.finish)
    except BaseException:
        await asyncio.to_thread(spool.discard)
        raise
    digest = spool.digest()
    signature = None if key is None else base64.b64encode(key.sign(digest)).decode("ascii")
    try:
        await asyncio.to_thread(_place, spool, target)
        return await store.add_release(
            app, version, sha256=digest.hex(), size=spool.size, signature=signature, actor=actor
        )
    except BaseException:
        await asyncio.to_thread(_remove_files, target.parent, spool.path)
        raise


async def remove_release(
    store: DeviceStore, settings: Settings, app: str, version: str, *, actor: str
) -> Release:
    """Forget the release (and its offers), then delete its artifact. NotFoundError if none."""
    check_name(app, version)
    release = await store.remove_release(app, version, actor=actor)
    await asyncio.to_thread(_remove_files, artifact_path(settings, app, version).parent)
    return release


def _remove_files(folder: Path, *files: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    for file in files:
        file.unlink(missing_ok=True)


# -- signing ----------------------------------------------------------------------------------


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"releases.signing_key_file: cannot read {path}: {exc.strerror or exc}"
        ) from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"releases.signing_key_file: {path} is not a PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"releases.signing_key_file: {path} is not an Ed25519 key")
    return key


def keygen(folder: Path) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair into `folder`: (private key 0600, public key). An existing
    key is never replaced."""
    private_path, public_path = folder / KEY_FILE, folder / PUBLIC_KEY_FILE
    for path in (private_path, public_path):
        if path.exists():
            raise ConfigError(f"{path} exists already: keep it, or move it away first")
    _make_folders(folder)
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_new(private_path, private, 0o600)
    _write_new(public_path, public, 0o644)
    return private_path, public_path


def _write_new(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as stream:
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())
    os.chmod(path, mode)  # whatever the umask


# -- the update command -----------------------------------------------------------------------


async def prepare_update(
    store: DeviceStore, names: list[DeviceName], args: dict[str, Any]
) -> tuple[dict[str, Any], Callable[[], Any]]:
    """The `update` command's args filled in from its release (url, sha256, size, signature,
    force), with the release offered to `names`; and a coroutine function that withdraws the
    offers made here (for when the commands are not created after all). Raises ValueError
    naming what is wrong (unknown fields, no such release)."""
    unknown = sorted(set(args) - set(UPDATE_ARGS))
    if unknown:
        raise ValueError(
            f"update: unknown arg {unknown[0]!r} (give app, version and optionally force;"
            " the platform fills in the rest)"
        )
    app, version, force = args.get("app"), args.get("version"), args.get("force", False)
    if isinstance(version, int) and not isinstance(version, bool) and version >= 0:
        version = str(version)  # `iotbiz cmd --arg version=2` sends it as JSON: 2 (exact)
    if isinstance(version, float):  # 1.10 became 1.1 on its way: nothing to trust
        raise ValueError(
            f"update: version {version!r} must be a string (with iotbiz cmd, quote it as JSON:"
            " --arg 'version=\"1.10\"')"
        )
    if not isinstance(app, str) or not isinstance(version, str):
        raise ValueError("update: args app and version are required strings")
    if not isinstance(force, bool):
        raise ValueError("update: arg force must be true or false")
    try:
        check_name(app, version)
    except ReleaseError as exc:
        raise ValueError(f"update: {exc}") from exc
    release = await store.get_release(app, version)
    if release is None:
        raise ValueError(f"update: no release {app} {version} (add it with iotbiz release add)")
    offered = await store.offer_release(names, app, version)

    async def withdraw() -> None:
        await store.withdraw_offers(offered, app, version)

    filled = {
        "app": app,
        "version": version,
        "url": release.url,
        "sha256": release.sha256,
        "size": release.size,
        "signature": release.signature,
        "force": force,
    }
    return filled, withdraw
