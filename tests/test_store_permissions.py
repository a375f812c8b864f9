"""The store's files are for its owner only: created 0600 in 0700 folders whatever the umask,
and an existing store (with its WAL) that others could read is made private when opened."""

from __future__ import annotations

import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from iotbiz.store import Store


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_an_existing_store_readable_by_others_is_made_private(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "iotbiz.db"
    await (await Store.open(path)).close()
    raw = sqlite3.connect(path)  # keeps the WAL file there
    raw.execute("PRAGMA journal_mode = WAL")
    raw.execute("CREATE TABLE scratch (x)")
    wal = path.with_name(path.name + "-wal")
    assert wal.exists()
    path.chmod(0o644)
    wal.chmod(0o644)
    try:
        store = await Store.open(path)
        await store.close()
    finally:
        raw.close()
    assert mode(path) == 0o600
    assert not wal.exists() or mode(wal) == 0o600
    assert "was mode 0644 (readable by others): made it 0600" in caplog.text


def test_the_cli_makes_private_folders_and_files_under_any_umask(tmp_path: Path) -> None:
    db = tmp_path / "a" / "b" / "iotbiz.db"
    script = (
        "import os, sys; os.umask(0); from iotbiz.cli import main;"
        f" sys.exit(main(['customer', 'add', 'acme', '--limit', '3', '--db', {str(db)!r}]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert mode(tmp_path / "a") == 0o700
    assert mode(tmp_path / "a" / "b") == 0o700
    assert mode(db) == 0o600
    for suffix in ("-wal", "-shm"):
        extra = db.with_name(db.name + suffix)
        assert not extra.exists() or mode(extra) & 0o077 == 0, (suffix, oct(mode(extra)))
