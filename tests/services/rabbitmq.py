"""A private RabbitMQ node for tests: its own folder, node name, epmd and loopback ports.

Debian's `/usr/sbin/rabbitmq-*` wrappers `su` to the rabbitmq user and write to /var/lib and
/var/log; the node here runs `/usr/lib/rabbitmq/bin/rabbitmq-server` directly as the current
user (root included: RabbitMQ only warns) with every path in the node's folder: mnesia, logs,
config, enabled plugins, pid file and the Erlang cookie (HOME). Its own `epmd -port P` runs in
the foreground as a child of the test, so that nothing outlives the session (the node would
otherwise start a daemon epmd of its own).

Plugins: rabbitmq_mqtt, rabbitmq_auth_backend_http (auth_backends = http, then internal for the
management user only) and rabbitmq_management. The HTTP backend asks `auth_url` (chosen before
the node starts: its config is read once), so the test serves the registrar on `auth_port`.

Ready means the MQTT port accepts connections (the listener opens last); the wait is bounded
and a node that cannot start fails the test with its log, never skips it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
START_TIMEOUT_S = 90.0  # about 15-20 s on a busy 2-core machine
STOP_TIMEOUT_S = 30.0
AUTH_PREFIX = "/api/v1/broker-auth/rabbitmq"
# Without it RabbitMQ's MQTT plugin reads a username `a:b` as vhost `a`, user `b`, and a device
# id in MAC form holds colons; 3.10 has no rabbitmq.conf key for it, only this.
ADVANCED = "[{rabbitmq_mqtt, [{ignore_colons_in_username, true}]}].\n"


@dataclass(frozen=True, slots=True)
class RabbitNode:
    folder: Path
    node_name: str
    amqp_port: int
    mqtt_port: int
    management_port: int
    auth_port: int  # where the node's HTTP auth backend sends its questions
    management_user: str
    management_password: str

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.management_port}"

    def log(self) -> str:
        parts = []
        for path in [*sorted((self.folder / "log").glob("*.log")), self.folder / "stdout.log"]:
            if path.exists():
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _config(node: RabbitNode) -> str:
    auth = f"http://127.0.0.1:{node.auth_port}{AUTH_PREFIX}"
    return "\n".join(
        [
            f"listeners.tcp.default = 127.0.0.1:{node.amqp_port}",
            f"mqtt.listeners.tcp.default = 127.0.0.1:{node.mqtt_port}",
            "mqtt.allow_anonymous = false",
            "management.tcp.ip = 127.0.0.1",
            f"management.tcp.port = {node.management_port}",
            "auth_backends.1 = http",
            "auth_backends.2 = internal",
            "auth_http.http_method = post",
            f"auth_http.user_path = {auth}/user",
            f"auth_http.vhost_path = {auth}/vhost",
            f"auth_http.resource_path = {auth}/resource",
            f"auth_http.topic_path = {auth}/topic",
            f"default_user = {node.management_user}",
            f"default_pass = {node.management_password}",
            "default_user_tags.administrator = true",
            "loopback_users = none",
            "log.console = false",
            "log.file.level = info",
            "",
        ]
    )


def _wait_port(port: int, procs: list[subprocess.Popen[bytes]], node: RabbitNode) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise AssertionError(
                    f"RabbitMQ node {node.node_name}: {proc.args[0]} exited ({proc.returncode})"
                    f" before its MQTT port opened:\n{node.log()}"
                )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(
        f"RabbitMQ node {node.node_name} not listening on MQTT {port} after"
        f" {START_TIMEOUT_S} s:\n{node.log()}"
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (a clean shutdown, a few seconds), SIGKILL of its process group if it hangs."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=STOP_TIMEOUT_S)
    with contextlib.suppress(ProcessLookupError):  # beam's helpers share the group
        os.killpg(proc.pid, signal.SIGKILL)


@contextmanager
def rabbitmq_node(folder: Path) -> Iterator[RabbitNode]:
    """Start a private node in `folder` (created), yield it once its MQTT port is open, stop it
    (and its epmd) on the way out."""
    if not SERVER.exists():
        raise AssertionError(f"{SERVER} missing: run scripts/services-setup")
    epmd_bin = shutil.which("epmd") or next(Path("/usr/lib/erlang").glob("erts-*/bin/epmd"), None)
    if epmd_bin is None:
        raise AssertionError("epmd missing: run scripts/services-setup")
    folder.mkdir(parents=True, exist_ok=True)
    node = RabbitNode(
        folder=folder,
        node_name=f"iotbiz-test-{os.getpid()}-{secrets.token_hex(3)}@localhost",
        amqp_port=free_port(),
        mqtt_port=free_port(),
        management_port=free_port(),
        auth_port=free_port(),
        management_user="iotbiz-test-admin",
        management_password=secrets.token_urlsafe(16),
    )
    epmd_port, dist_port = free_port(), free_port()
    home = folder / "home"
    home.mkdir(exist_ok=True)
    cookie = home / ".erlang.cookie"
    cookie.write_text(secrets.token_hex(20))
    cookie.chmod(0o400)
    (folder / "rabbitmq.conf").write_text(_config(node))
    (folder / "advanced.config").write_text(ADVANCED)
    plugins = "[rabbitmq_mqtt,rabbitmq_auth_backend_http,rabbitmq_management]."
    (folder / "enabled_plugins").write_text(plugins)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "RABBITMQ_NODENAME": node.node_name,
        "RABBITMQ_MNESIA_BASE": str(folder / "mnesia"),
        "RABBITMQ_LOG_BASE": str(folder / "log"),
        "RABBITMQ_CONFIG_FILE": str(folder / "rabbitmq.conf"),
        "RABBITMQ_ADVANCED_CONFIG_FILE": str(folder / "advanced.config"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(folder / "enabled_plugins"),
        "RABBITMQ_PLUGINS_EXPAND_DIR": str(folder / "plugins-expand"),
        "RABBITMQ_PID_FILE": str(folder / "rabbitmq.pid"),
        "RABBITMQ_DIST_PORT": str(dist_port),
        "ERL_EPMD_PORT": str(epmd_port),
        "ERL_EPMD_ADDRESS": "127.0.0.1",
    }
    procs: list[subprocess.Popen[bytes]] = []
    with (folder / "stdout.log").open("wb") as out:
        try:
            epmd = subprocess.Popen(
                [str(epmd_bin), "-port", str(epmd_port)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            procs.append(epmd)
            server = subprocess.Popen(
                [str(SERVER)],
                env=env,
                cwd=folder,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            procs.append(server)
            _wait_port(node.mqtt_port, procs, node)
            yield node
        finally:
            for proc in reversed(procs):
                _stop(proc)
