"""A private PostgreSQL server for the test session, and a fresh database per test.

`PostgresServer.start()` runs `initdb` into a new temporary folder and starts `postgres` on
127.0.0.1 on a free port (chosen, tried, and chosen again if another process took it meanwhile)
and on a unix socket in that folder; `stop()` stops it (`pg_ctl stop -m fast`) and removes the
folder. PostgreSQL refuses to run as root, so when the tests run as root the server runs as the
user `postgres` and the folder is given to it. Every wait is bounded.

The server only accepts password logins (scram-sha-256) of one superuser, so that tests can
check that the password never shows in the store's messages. `create_database()` makes an empty
database (CREATE DATABASE copies the template: milliseconds) and returns its URL. Its collation
is ICU's en-US, as a production database's often is, so that the store's ordering is tested
against a locale that does not sort by bytes as SQLite does.

When the server cannot start (PostgreSQL missing: run scripts/services-setup; a port never
free; a broken installation) `start()` raises ServiceUnavailable with the reason and the
server's log, and the fixtures turn that into a test failure, never a skip.
"""

from __future__ import annotations

import itertools
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import asyncpg

USER = "iotbiz_test"
START_TIMEOUT_S = 30
STOP_TIMEOUT_S = 30
INITDB_TIMEOUT_S = 120
PORT_ATTEMPTS = 5
# Speed over durability: the data is thrown away at the end of the session.
SERVER_OPTIONS = (
    "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
)


class ServiceUnavailable(RuntimeError):
    """A test service could not start; the message says why."""


def find_bin_dir(candidates: list[Path] | None = None) -> Path:
    """The folder holding initdb, pg_ctl and postgres: on PATH, else Debian's newest
    /usr/lib/postgresql/N/bin."""
    if candidates is None:
        on_path = shutil.which("pg_ctl")
        candidates = [Path(on_path).resolve().parent] if on_path else []
        debian = sorted(
            Path("/usr/lib/postgresql").glob("*/bin"),
            key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
            reverse=True,
        )
        candidates += debian
    for folder in candidates:
        if all((folder / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return folder
    raise ServiceUnavailable(
        "PostgreSQL is not installed (no initdb, pg_ctl and postgres on PATH or in "
        "/usr/lib/postgresql/*/bin): run scripts/services-setup"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True, slots=True)
class _RunAs:
    user: str | None

    def run(
        self, args: list[str], *, timeout_s: float, cwd: Path
    ) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                args,
                capture_output=True,
                text=True,
                timeout=timeout_s,
                cwd=cwd,
                user=self.user,
                group=self.user,
                extra_groups=[] if self.user else None,
                check=False,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise ServiceUnavailable(f"cannot run {args[0]}: {exc}") from exc


class PostgresServer:
    def __init__(self, bin_dir: Path, base: Path, password: str, run_as: _RunAs) -> None:
        self.bin_dir = bin_dir
        self.base = base
        self.data = base / "data"
        self.socket_dir = base / "socket"
        self.log_path = base / "postgres.log"
        self.password = password
        self.port = 0
        self._run_as = run_as
        self._databases = itertools.count(1)

    @classmethod
    def start(cls, bin_dir: Path | None = None) -> PostgresServer:
        """initdb and start a private server; ServiceUnavailable (with the reason) if it cannot."""
        bin_dir = find_bin_dir() if bin_dir is None else find_bin_dir([bin_dir])
        run_as = _RunAs("postgres" if os.geteuid() == 0 else None)
        base = Path(tempfile.mkdtemp(prefix="iotbiz-postgres-"))
        server = cls(bin_dir, base, secrets.token_urlsafe(16), run_as)
        try:
            server._init()
            server._start()
        except BaseException:
            shutil.rmtree(base, ignore_errors=True)
            raise
        return server

    def _init(self) -> None:
        self.socket_dir.mkdir()
        pwfile = self.base / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._run_as.user:
            for path in (self.base, self.socket_dir, pwfile):
                shutil.chown(path, self._run_as.user, self._run_as.user)
        done = self._run_as.run(
            [
                str(self.bin_dir / "initdb"),
                "-D", str(self.data),
                "-U", USER,
                f"--pwfile={pwfile}",
                "--auth=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            timeout_s=INITDB_TIMEOUT_S,
            cwd=self.base,
        )  # fmt: skip
        pwfile.unlink()
        if done.returncode != 0:
            raise ServiceUnavailable(
                f"initdb failed (exit {done.returncode}): {(done.stderr or done.stdout).strip()}"
            )

    def _start(self) -> None:
        """Start on a free port; another process may take it between the choice and the bind,
        so a clash is retried on a new port."""
        reason = ""
        for _ in range(PORT_ATTEMPTS):
            port = free_port()
            options = (
                f"-p {port} -c listen_addresses=127.0.0.1 "
                f"-c unix_socket_directories={self.socket_dir} {SERVER_OPTIONS}"
            )
            done = self._run_as.run(
                [
                    str(self.bin_dir / "pg_ctl"),
                    "start", "-w", "-t", str(START_TIMEOUT_S),
                    "-D", str(self.data),
                    "-l", str(self.log_path),
                    "-o", options,
                ],
                timeout_s=START_TIMEOUT_S + 10,
                cwd=self.base,
            )  # fmt: skip
            if done.returncode == 0:
                self.port = port
                return
            log = self.log()
            reason = f"pg_ctl start failed (exit {done.returncode}): {done.stderr.strip()}\n{log}"
            if "could not bind" not in log and "already in use" not in log:
                break
            self._stop_quietly()
        raise ServiceUnavailable(reason)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def url(self, database: str = "postgres", *, password: str | None = None) -> str:
        secret = self.password if password is None else password
        return f"postgresql://{USER}:{secret}@127.0.0.1:{self.port}/{database}"

    async def create_database(self) -> str:
        """A new empty database; its URL."""
        name = f"test_{next(self._databases)}"
        conn = await asyncpg.connect(self.url(), timeout=10)
        try:
            await conn.execute(
                f'CREATE DATABASE "{name}" TEMPLATE template0'
                " LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C'",
                timeout=30,
            )
        finally:
            await conn.close(timeout=10)
        return self.url(name)

    async def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        conn = await asyncpg.connect(self.url(), timeout=10)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', timeout=30)
        finally:
            await conn.close(timeout=10)

    def _stop_quietly(self) -> None:
        self._run_as.run(
            [str(self.bin_dir / "pg_ctl"), "stop", "-m", "fast", "-w", "-t", str(STOP_TIMEOUT_S),
             "-D", str(self.data)],
            timeout_s=STOP_TIMEOUT_S + 10,
            cwd=self.base,
        )  # fmt: skip

    def stop(self) -> None:
        """Stop the server (fast: open sessions are ended) and remove its folder."""
        try:
            if (self.data / "postmaster.pid").exists():
                self._stop_quietly()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)
