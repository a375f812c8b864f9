"""Release artifacts on the device (iotbiz.agent.releases): real .tar.gz files in tmp_path, real
Ed25519 keys. A good archive unpacks read-only with its modes and in-release links; every kind of
hostile archive is refused with nothing left behind; size, sha256 and signature are checked."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import shutil
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from iotbiz.agent import releases
from iotbiz.agent.releases import SignatureCheck, UpdateError
from iotbiz.errors import ConfigError

pytestmark = pytest.mark.timeout(30)

Member = Callable[[tarfile.TarFile], None]


def add_file(name: str, data: bytes = b"x", mode: int = 0o644) -> Member:
    def add(archive: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(data), mode
        archive.addfile(info, io.BytesIO(data))

    return add


def add_special(name: str, kind: bytes, linkname: str = "") -> Member:
    def add(archive: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, linkname
        archive.addfile(info)

    return add


def make_archive(path: Path, *members: Member) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for member in members:
            member(archive)
    return path


def test_a_good_release_unpacks_read_only(tmp_path: Path) -> None:
    artifact = make_archive(
        tmp_path / "a.tar.gz",
        add_special("bin", tarfile.DIRTYPE),
        add_file("bin/run", b"#!/bin/sh\necho hi\n", 0o755),
        add_file("./app.py", b"print('hi')\n"),
        add_special("bin/app.py", tarfile.SYMTYPE, "../app.py"),
        add_file("deep/er/data.txt", b"data"),
    )
    target = tmp_path / "releases" / "1.0"
    target.parent.mkdir()
    releases.unpack(artifact, target)
    assert (target / "app.py").read_bytes() == b"print('hi')\n"
    assert (target / "bin" / "app.py").read_bytes() == b"print('hi')\n"
    assert os.readlink(target / "bin" / "app.py") == "../app.py"
    assert stat.S_IMODE((target / "bin" / "run").stat().st_mode) == 0o555
    assert stat.S_IMODE((target / "app.py").stat().st_mode) == 0o444
    for folder in (target, target / "bin", target / "deep" / "er"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o555
    if os.geteuid() != 0:  # root writes through modes
        with pytest.raises(PermissionError):
            (target / "new").write_text("no")
    assert sorted(p.name for p in target.parent.iterdir()) == ["1.0"]  # no partial left
    assert releases.unpacked_size(artifact) == len(b"#!/bin/sh\necho hi\n") + 12 + 4
    releases.remove_tree(target)
    assert not target.exists()


@pytest.mark.parametrize(
    ("members", "reason"),
    [
        ((add_file("/etc/evil"),), "absolute"),
        ((add_file("../evil"),), "goes up"),
        ((add_file("a/../../evil"),), "goes up"),
        ((add_special("link", tarfile.SYMTYPE, "/etc/passwd"),), "absolute path"),
        ((add_special("link", tarfile.SYMTYPE, "../outside"),), "leaves the release"),
        ((add_special("a/link", tarfile.SYMTYPE, "../../outside"),), "leaves the release"),
        (
            # each link stays in lexically; resolved through one another they leave
            (
                add_special("a", tarfile.DIRTYPE),
                add_special("a/b", tarfile.DIRTYPE),
                add_special("a/b/c", tarfile.SYMTYPE, "../../top"),
                add_special("a/b/l", tarfile.SYMTYPE, "c/../.."),
            ),
            "leaves the release",
        ),
        ((add_file("x"), add_special("hard", tarfile.LNKTYPE, "x")), "hard link"),
        ((add_special("dev", tarfile.CHRTYPE),), "device"),
        ((add_special("disk", tarfile.BLKTYPE),), "device"),
        ((add_special("fifo", tarfile.FIFOTYPE),), "FIFO"),
        ((add_file("twice"), add_file("./twice")), "twice"),
        (
            # a file written through an in-release link to a folder
            (
                add_special("d", tarfile.DIRTYPE),
                add_special("l", tarfile.SYMTYPE, "d"),
                add_file("l/f"),
            ),
            "under a symlink",
        ),
    ],
)
def test_hostile_archives_are_refused_with_nothing_left(
    tmp_path: Path, members: tuple[Member, ...], reason: str
) -> None:
    artifact = make_archive(tmp_path / "bad.tar.gz", *members)
    (tmp_path / "releases").mkdir()
    target = tmp_path / "releases" / "1.0"
    with pytest.raises(UpdateError, match=reason):
        releases.unpack(artifact, target)
    assert list((tmp_path / "releases").iterdir()) == []
    assert not (tmp_path / "top").exists()


def test_not_an_archive_is_refused(tmp_path: Path) -> None:
    artifact = tmp_path / "junk.tar.gz"
    artifact.write_bytes(b"not gzip at all" * 100)
    (tmp_path / "releases").mkdir()
    with pytest.raises(UpdateError, match="bad archive"):
        releases.unpack(artifact, tmp_path / "releases" / "1.0")
    assert list((tmp_path / "releases").iterdir()) == []


def test_size_and_sha256_are_checked(tmp_path: Path) -> None:
    artifact = tmp_path / "a.bin"
    artifact.write_bytes(b"hello")
    digest = hashlib.sha256(b"hello").hexdigest()
    releases.verify_artifact(artifact, 5, digest)
    releases.verify_artifact(artifact, 5, digest.upper())
    with pytest.raises(UpdateError, match="size mismatch: 5 bytes, the release has 6"):
        releases.verify_artifact(artifact, 6, digest)
    with pytest.raises(UpdateError, match="sha256 mismatch"):
        releases.verify_artifact(artifact, 5, hashlib.sha256(b"other").hexdigest())


def test_free_space_is_checked(tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    releases.check_free_space(tmp_path, 1024)
    with pytest.raises(UpdateError, match="not enough disk space"):
        releases.check_free_space(tmp_path, free)


def write_key_pair(folder: Path) -> tuple[Ed25519PrivateKey, Path]:
    key = Ed25519PrivateKey.generate()
    public = folder / "release-signing.pub"
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return key, public


def test_signatures_of_the_raw_digest(tmp_path: Path) -> None:
    key, public = write_key_pair(tmp_path)
    check = SignatureCheck(public)
    digest = hashlib.sha256(b"release").hexdigest()
    good = base64.b64encode(key.sign(bytes.fromhex(digest))).decode()
    check.verify(digest, good)
    (tmp_path / "other").mkdir()
    other, _ = write_key_pair(tmp_path / "other")
    forged = base64.b64encode(other.sign(bytes.fromhex(digest))).decode()
    with pytest.raises(UpdateError, match="not made with this device's release key"):
        check.verify(digest, forged)
    with pytest.raises(UpdateError, match="not made with this device's release key"):
        check.verify(hashlib.sha256(b"tampered").hexdigest(), good)
    with pytest.raises(UpdateError, match="not signed"):
        check.verify(digest, None)
    with pytest.raises(UpdateError, match="not base64"):
        check.verify(digest, "!!!")


def test_a_public_key_that_is_not_one_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        SignatureCheck(tmp_path / "missing.pub")
    (tmp_path / "junk.pub").write_text("junk")
    with pytest.raises(ConfigError, match="not a PEM public key"):
        SignatureCheck(tmp_path / "junk.pub")
