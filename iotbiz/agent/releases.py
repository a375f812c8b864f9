"""Release artifacts on the device: checked, then unpacked safely into a read-only folder.

Everything here is blocking (hashing, unpacking, fsync): call it in a thread from async code.

- `check_free_space`: the artifact and its unpacked copy must fit, with a reserve left over.
- `verify_artifact`: size and sha256 of the downloaded file; `SignatureCheck.verify`: the Ed25519
  signature of the raw sha256 digest (32 bytes), with the `cryptography` library, which is only
  imported when `release_public_key` is set (`pip install 'iotbiz[signing]'`).
- `unpack`: a .tar.gz into `releases/V`, through a hidden `.V.partial` folder renamed into place
  once complete and fsynced, so that a crash never leaves a half-unpacked release under its name.
  Refused (before anything is written): absolute paths, `..`, links that point out of the
  release, hard links, device files, FIFOs, anything but regular files, folders and in-release
  symlinks; also names twice in the archive. The unpacked release is made read-only.
- `remove_tree`: removes a read-only release.

UpdateError (the message is the reason given to the operator) is the one error raised here.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import shutil
import stat
import tarfile
from pathlib import Path, PurePosixPath
from typing import Any

from iotbiz.errors import ConfigError, IotbizError

CHUNK = 1 << 16
FREE_RESERVE_BYTES = 16 << 20  # left free after the download and the unpacked release
UNPACK_FACTOR = 4  # before the download: the unpacked release is guessed at this many x the size
MAX_MEMBERS = 100_000


class UpdateError(IotbizError):
    """An update (or a rollback) that cannot go on; the message is the reason."""


def check_free_space(folder: Path, needed: int) -> None:
    """UpdateError unless `needed` bytes fit in `folder`'s file system with the reserve left."""
    free = shutil.disk_usage(folder).free
    if needed + FREE_RESERVE_BYTES > free:
        raise UpdateError(
            f"not enough disk space: {needed} bytes needed (and {FREE_RESERVE_BYTES} kept free),"
            f" {free} free in {folder}"
        )


def space_for_download(size: int, downloaded: int) -> int:
    """What an artifact of `size` bytes needs before its download: the rest of the download and
    a guess at its unpacked size (checked again with the real size before unpacking)."""
    return max(0, size - downloaded) + UNPACK_FACTOR * size


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_artifact(path: Path, size: int, sha256: str) -> None:
    """UpdateError unless `path` has `size` bytes whose sha256 is `sha256` (hex)."""
    actual = path.stat().st_size
    if actual != size:
        raise UpdateError(f"size mismatch: {actual} bytes, the release has {size}")
    found = sha256_of(path)
    if found != sha256.lower():
        raise UpdateError(f"sha256 mismatch: {found}, the release has {sha256.lower()}")


class SignatureCheck:
    """The Ed25519 public key that releases must be signed with (PEM, `release_public_key`)."""

    def __init__(self, key_file: Path) -> None:
        try:
            from cryptography.exceptions import InvalidSignature
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
            from cryptography.hazmat.primitives.serialization import load_pem_public_key
        except ImportError as exc:
            raise ConfigError(
                "release_public_key is set but the cryptography library is missing:"
                " pip install 'iotbiz[signing]'"
            ) from exc
        try:
            key = load_pem_public_key(key_file.read_bytes())
        except OSError as exc:
            raise ConfigError(f"release_public_key: {key_file}: {exc.strerror}") from exc
        except ValueError as exc:
            raise ConfigError(f"release_public_key: {key_file}: not a PEM public key") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError(f"release_public_key: {key_file}: not an Ed25519 public key")
        self._key = key
        self._invalid = InvalidSignature

    def verify(self, sha256: str, signature: Any) -> None:
        """UpdateError unless `signature` (base64) signs the raw digest `sha256` (hex)."""
        if not isinstance(signature, str) or not signature:
            raise UpdateError("the release is not signed and this device requires signatures")
        try:
            raw = base64.b64decode(signature, validate=True)
            digest = bytes.fromhex(sha256)
        except (binascii.Error, ValueError) as exc:
            raise UpdateError("bad signature: not base64") from exc
        try:
            self._key.verify(raw, digest)
        except self._invalid as exc:
            raise UpdateError("bad signature: not made with this device's release key") from exc


def unpacked_size(artifact: Path) -> int:
    """The bytes the archive's regular files take once unpacked (from its headers)."""
    total = 0
    with tarfile.open(artifact, "r:gz") as archive:
        for member in archive:
            total += member.size if member.isfile() else 0
    return total


def unpack(artifact: Path, target: Path) -> None:
    """Unpack the .tar.gz `artifact` into the new folder `target`, read-only, all or nothing.

    The archive is read twice: first every member is checked (nothing written if one is
    refused), then it is unpacked into `.NAME.partial` beside `target`, fsynced, made read-only
    and renamed to `target`."""
    try:
        members = _checked_members(artifact)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise UpdateError(f"bad archive: {exc}") from exc
    partial = target.parent / f".{target.name}.partial"
    remove_tree(partial)
    partial.mkdir(mode=0o755)
    try:
        with tarfile.open(artifact, "r:gz") as archive:
            for member in archive:
                _extract(archive, member, partial, members)
        _check_links_resolved(partial)
        _seal(partial)
        if target.exists():
            remove_tree(target)
        os.rename(partial, target)
        fsync_dir(target.parent)
    except (tarfile.TarError, OSError, EOFError) as exc:
        remove_tree(partial)
        raise UpdateError(f"cannot unpack: {exc}") from exc
    except BaseException:
        remove_tree(partial)
        raise


def _checked_members(artifact: Path) -> set[str]:
    """The normalised names in the archive; UpdateError for the first one refused."""
    names: set[str] = set()
    with tarfile.open(artifact, "r:gz") as archive:
        for count, member in enumerate(archive):
            if count >= MAX_MEMBERS:
                raise UpdateError(f"bad archive: more than {MAX_MEMBERS} entries")
            name = _safe_name(member.name)
            if name in names:
                raise UpdateError(f"bad archive: {member.name!r} is in it twice")
            if member.issym():
                _check_link(name, member.linkname)
            elif member.islnk():
                raise UpdateError(f"bad archive: {member.name!r} is a hard link")
            elif not (member.isfile() or member.isdir()):
                raise UpdateError(f"bad archive: {member.name!r} is a device, FIFO or other file")
            names.add(name)
    return names


def _safe_name(raw: str) -> str:
    """`raw` as a relative path inside the release ("." for the top); UpdateError otherwise."""
    if raw.startswith("/") or "\\" in raw or "\x00" in raw:
        raise UpdateError(f"bad archive: absolute or odd path {raw!r}")
    parts = [part for part in PurePosixPath(raw).parts if part != "."]
    if ".." in parts:
        raise UpdateError(f"bad archive: {raw!r} goes up with '..'")
    return "/".join(parts) or "."


def _check_link(name: str, target: str) -> None:
    """A symlink at `name` must point inside the release, relatively."""
    if not target or target.startswith("/"):
        raise UpdateError(f"bad archive: link {name!r} points to the absolute path {target!r}")
    depth = len(PurePosixPath(name).parent.parts) if name != "." else 0
    for part in PurePosixPath(target).parts:
        if part == "..":
            depth -= 1
            if depth < 0:
                raise UpdateError(f"bad archive: link {name!r} -> {target!r} leaves the release")
        elif part != ".":
            depth += 1


def _extract(
    archive: tarfile.TarFile, member: tarfile.TarInfo, root: Path, names: set[str]
) -> None:
    name = _safe_name(member.name)
    if name not in names:  # the archive changed between the two reads
        raise UpdateError(f"bad archive: {member.name!r} was not in it when checked")
    path = root / name if name != "." else root
    _check_parents(root, path)
    if member.isdir():
        path.mkdir(mode=0o755, exist_ok=True)
    elif member.issym():
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        os.symlink(member.linkname, path)
    else:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        source = archive.extractfile(member)
        if source is None:
            raise UpdateError(f"bad archive: {member.name!r} has no content")
        executable = member.mode & 0o111
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as out, source:
            shutil.copyfileobj(source, out, CHUNK)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(path, 0o755 if executable else 0o644)


def _check_parents(root: Path, path: Path) -> None:
    """No folder on the way from `root` to `path` may be a symlink (written through, it could
    lead out of the release)."""
    current = root
    for part in path.relative_to(root).parts[:-1]:
        current = current / part
        if current.is_symlink():
            raise UpdateError(f"bad archive: {path.relative_to(root)} is under a symlink")


def _check_links_resolved(root: Path) -> None:
    """Every symlink, resolved as the kernel will (links through links), stays in the release:
    the per-link check is lexical, and `a -> ../../x` beside `b -> a/..` could still leave."""
    top = Path(os.path.realpath(root))
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            if path.is_symlink():
                resolved = Path(os.path.realpath(path))
                if resolved != top and not resolved.is_relative_to(top):
                    rel = path.relative_to(root)
                    raise UpdateError(f"bad archive: link {str(rel)!r} leaves the release")


def _seal(root: Path) -> None:
    """Make the tree read-only (files 0444/0555, folders 0555) and fsync its folders."""
    for folder, dirs, files in os.walk(root, topdown=False):
        for name in files:
            path = Path(folder) / name
            if path.is_symlink():
                continue
            mode = path.stat().st_mode
            os.chmod(path, 0o555 if mode & 0o111 else 0o444)
        for name in dirs:
            path = Path(folder) / name
            if not path.is_symlink():
                fsync_dir(path)
                os.chmod(path, 0o555)  # noqa: S103 - read-only; an app with a `user` must read it
    fsync_dir(root)
    os.chmod(root, 0o555)  # noqa: S103 - as above


def remove_tree(path: Path) -> None:
    """Remove `path` (a read-only release, a partial one, or a plain file); nothing if missing."""
    if path.is_symlink() or path.is_file():
        path.unlink()
        return
    if not path.exists():
        return
    for folder, dirs, _ in os.walk(path):
        os.chmod(folder, 0o700)
        for name in dirs:
            child = Path(folder) / name
            if not child.is_symlink():
                os.chmod(child, 0o700)
    shutil.rmtree(path)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_release_dir(path: Path) -> bool:
    """A complete release folder (not a hidden partial one)."""
    return path.is_dir() and not path.is_symlink() and not path.name.startswith(".")


def read_only(path: Path) -> bool:
    return not stat.S_IMODE(path.stat().st_mode) & 0o222
