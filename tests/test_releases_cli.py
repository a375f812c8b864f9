"""`iotbiz release add|list|remove|keygen` through the real CLI (a child process): artifacts
stored beside the store with their sha256 and size, signed with the configured key."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import stat
import tarfile
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from tests.processes import run_cli
from tests.services.postgres import PostgresServer


def make_artifact(path: Path, files: dict[str, bytes]) -> bytes:
    """A .tar.gz with `files`; its bytes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def test_add_list_remove(tmp_path: Path) -> None:
    db = tmp_path / "data" / "iotbiz.db"
    assert run_cli("customer", "add", "abc123", "--limit", "1", "--db", str(db)).returncode == 0
    data = make_artifact(tmp_path / "web.tar.gz", {"run.sh": b"echo hi\n"})
    added = run_cli(
        "release", "add", "--app", "web", "--version", "1.0.0", str(tmp_path / "web.tar.gz"),
        "--db", str(db), "--json",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    release = json.loads(added.stdout)
    assert release["sha256"] == hashlib.sha256(data).hexdigest()
    assert release["size"] == len(data)
    assert release["signature"] is None
    assert release["url"] == "/api/v1/releases/web/1.0.0"
    stored = tmp_path / "data" / "releases" / "web" / "1.0.0" / "artifact.tar.gz"
    assert stored.read_bytes() == data
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    assert not [p for p in stored.parent.parent.iterdir() if p.name.startswith(".")]

    again = run_cli(
        "release", "add", "--app", "web", "--version", "1.0.0", str(tmp_path / "web.tar.gz"),
        "--db", str(db),
    )  # fmt: skip
    assert (again.returncode, again.stderr) == (1, "iotbiz: release web 1.0.0 exists already\n")

    listed = run_cli("release", "list", "--db", str(db))
    assert listed.returncode == 0
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["APP", "VERSION", "SIZE", "SIGNED", "SHA256", "CREATED"]
    assert lines[1].split()[:4] == ["web", "1.0.0", str(len(data)), "no"]

    removed = run_cli("release", "remove", "web", "1.0.0", "--db", str(db))
    assert (removed.returncode, removed.stdout) == (0, "release web 1.0.0 removed\n")
    assert not stored.parent.exists()
    assert json.loads(run_cli("release", "list", "--db", str(db), "--json").stdout) == []
    gone = run_cli("release", "remove", "web", "1.0.0", "--db", str(db))
    assert (gone.returncode, gone.stderr) == (1, "iotbiz: no release web 1.0.0\n")


def test_refusals(tmp_path: Path) -> None:
    db = str(tmp_path / "iotbiz.db")
    assert run_cli("customer", "add", "abc123", "--limit", "1", "--db", db).returncode == 0
    (tmp_path / "plain.txt").write_bytes(b"not a tarball")
    cases = [
        (["--app", "web", "--version", "1", str(tmp_path / "plain.txt")], "not a .tar.gz"),
        (["--app", "web", "--version", "1", str(tmp_path / "missing.tar.gz")], "cannot read"),
        (["--app", "../x", "--version", "1", str(tmp_path / "plain.txt")], "app '../x'"),
        (["--app", "web", "--version", "..", str(tmp_path / "plain.txt")], "version '..'"),
    ]
    for args, error in cases:
        result = run_cli("release", "add", *args, "--db", db)
        assert result.returncode == 1, result
        assert error in result.stderr
        assert result.stderr.count("\n") == 1  # one line, no traceback
    assert json.loads(run_cli("release", "list", "--db", db, "--json").stdout) == []
    assert not list((tmp_path / "releases").rglob("*.partial"))


def test_too_large_is_refused(tmp_path: Path) -> None:
    db = str(tmp_path / "iotbiz.db")
    config = tmp_path / "iotbiz.toml"
    config.write_text(f'[store]\npath = "{db}"\n[releases]\nmax_bytes = 100\n')
    assert run_cli("customer", "add", "abc123", "--limit", "1", "--db", db).returncode == 0
    make_artifact(tmp_path / "big.tar.gz", {"blob": bytes(range(256)) * 64})
    result = run_cli(
        "release", "add", "--app", "web", "--version", "1", str(tmp_path / "big.tar.gz"),
        "--config", str(config),
    )  # fmt: skip
    assert result.returncode == 1
    assert "larger than releases.max_bytes (100 bytes)" in result.stderr
    assert [p for p in (tmp_path / "releases").rglob("*") if not p.is_dir()] == []


def test_keygen_and_signed_releases(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    made = run_cli("release", "keygen", "--dir", str(keys), "--json")
    assert made.returncode == 0, made.stderr
    paths = json.loads(made.stdout)
    private, public = Path(paths["private_key"]), Path(paths["public_key"])
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    again = run_cli("release", "keygen", "--dir", str(keys))
    assert again.returncode == 1
    assert "exists already" in again.stderr

    db = tmp_path / "iotbiz.db"
    config = tmp_path / "iotbiz.toml"
    config.write_text(f'[store]\npath = "{db}"\n[releases]\nsigning_key_file = "{private}"\n')
    assert run_cli("customer", "add", "abc123", "--limit", "1", "--db", str(db)).returncode == 0
    data = make_artifact(tmp_path / "web.tar.gz", {"app.py": b"print('v2')\n"})
    added = run_cli(
        "release", "add", "--app", "web", "--version", "2.0", str(tmp_path / "web.tar.gz"),
        "--config", str(config), "--json",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    signature = base64.b64decode(json.loads(added.stdout)["signature"])
    key = serialization.load_pem_public_key(public.read_bytes())
    assert isinstance(key, Ed25519PublicKey)
    key.verify(signature, hashlib.sha256(data).digest())  # raises if it does not verify
    try:
        key.verify(signature, hashlib.sha256(data + b"x").digest())
    except InvalidSignature:
        pass
    else:
        raise AssertionError("a signature of other bytes verified")

    (tmp_path / "bad.pem").write_text("nonsense")
    config.write_text(
        f'[store]\npath = "{db}"\n[releases]\nsigning_key_file = "{tmp_path / "bad.pem"}"\n'
    )
    bad = run_cli(
        "release", "add", "--app", "web", "--version", "2.1", str(tmp_path / "web.tar.gz"),
        "--config", str(config),
    )  # fmt: skip
    assert bad.returncode == 1
    assert "is not a PEM private key" in bad.stderr


def test_on_postgresql_the_artifacts_go_to_releases_folder(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    url = asyncio.run(postgres_server.create_database())
    try:
        folder = tmp_path / "shared" / "releases"
        config = tmp_path / "platform.toml"
        config.write_text(f'[store]\nurl = "{url}"\n[releases]\nfolder = "{folder}"\n')
        data = make_artifact(tmp_path / "web.tar.gz", {"run.sh": b"echo hi\n"})
        added = run_cli(
            "release", "add", "--app", "web", "--version", "2.0", str(tmp_path / "web.tar.gz"),
            "--config", str(config), "--json",
        )  # fmt: skip
        assert added.returncode == 0, added.stderr
        assert json.loads(added.stdout)["sha256"] == hashlib.sha256(data).hexdigest()
        assert (folder / "web" / "2.0" / "artifact.tar.gz").read_bytes() == data
        listed = run_cli("release", "list", "--config", str(config), "--json")
        assert [(r["app"], r["version"]) for r in json.loads(listed.stdout)] == [("web", "2.0")]
        removed = run_cli("release", "remove", "web", "2.0", "--config", str(config))
        assert (removed.returncode, removed.stdout) == (0, "release web 2.0 removed\n")
        assert not (folder / "web" / "2.0").exists()
        assert not (tmp_path / "releases").exists()  # nothing beside the (unused) store path
    finally:
        asyncio.run(postgres_server.drop_database(url))
