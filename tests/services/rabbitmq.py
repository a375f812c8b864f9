"""Private RabbitMQ for tests: one node, or a cluster of nodes, on loopback only.

Debian's `/usr/sbin/rabbitmq-*` wrappers `su` to the rabbitmq user and write to /var/lib and
/var/log; a node here runs `/usr/lib/rabbitmq/bin/rabbitmq-server` directly as the current
user (root included: RabbitMQ only warns) with every path in the node's folder: mnesia, logs,
config, enabled plugins, pid file and the Erlang cookie (HOME). Its own `epmd -port P` runs in
the foreground as a child of the test, so that nothing outlives the session (the node would
otherwise start a daemon epmd of its own). Erlang distribution listens on 127.0.0.1 only.

Plugins: rabbitmq_mqtt, rabbitmq_auth_backend_http (auth_backends = http, then internal for the
management user only) and rabbitmq_management. The HTTP backend asks `auth_url` (chosen before
the node starts: its config is read once), so the test serves the registrar on `auth_port`.

Ready means the MQTT and then the AMQP port accept connections (in 3.10 the plugins' listeners,
MQTT and management, open first and the AMQP listener last: a node whose AMQP port is taken
stops right after its MQTT port opened), and then an MQTT login succeeds. Ports are picked
below the kernel's ephemeral range (`free_port`), never the same one twice in a process; a
port is only checked free, not held, until the node binds it, so a node (or a cluster) whose
boot fails because a port was taken meanwhile (`eaddrinuse` in its log) is started again on
new ports, up to PORT_ATTEMPTS times. The wait is bounded and a node that cannot start fails
the test with its log, never skips it.

A cluster (`rabbitmq_cluster`): nodes rabbit-1@localhost ... rabbit-N@localhost, each in its
own sub-folder with its own AMQP, MQTT, management and distribution ports, all sharing one
epmd (a node finds its peers' distribution ports there), one Erlang cookie (one HOME) and one
`auth_url`. Node 1 boots first, alone; then the others at once, which find it through
`cluster_formation.classic_config` and join its cluster as they boot (see BOOT in the
cluster's docstring for why not all at once, and not `rabbitmqctl join_cluster`). Ready
means every node's MQTT and AMQP ports are open, node 1's management API lists all N nodes as
running (one cluster, not N clusters of one) and every node accepts an MQTT login; a node
that exits meanwhile fails the start at once with its log.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TypeVar

from tests.mqtt_wire import connect_packet

SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
START_TIMEOUT_S = 90.0  # about 15-20 s on a busy 2-core machine
CLUSTER_START_TIMEOUT_S = 240.0  # N nodes booting at once on the same 2 cores
STOP_TIMEOUT_S = 30.0
AUTH_PREFIX = "/api/v1/broker-auth/rabbitmq"
MANAGEMENT_USER = "iotbiz-test-admin"
# Without it RabbitMQ's MQTT plugin reads a username `a:b` as vhost `a`, user `b`, and a device
# id in MAC form holds colons; 3.10 has no rabbitmq.conf key for it, only this.
ADVANCED = "[{rabbitmq_mqtt, [{ignore_colons_in_username, true}]}].\n"
PLUGINS = "[rabbitmq_mqtt,rabbitmq_auth_backend_http,rabbitmq_management]."
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
PORTS_FROM = 20000  # ports picked for the nodes: from here to the ephemeral range
PORT_ATTEMPTS = 3  # boots on new ports after a port was taken between the choice and the bind
_handed_out: set[int] = set()  # every port free_port returned in this process
_Booted = TypeVar("_Booted")


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
    """A loopback port that nobody holds, picked below the kernel's ephemeral range: the node
    binds it seconds later, and the platform binds `auth_port` anew for every test, and in
    the ephemeral range any process's outgoing connection may take it in between (bind to
    port 0 picks there). Never one it returned before: the ports a cluster's nodes get are
    only bound as they boot, so a check alone could hand the same port to two of them."""
    for _ in range(200):
        port = random.randint(PORTS_FROM, _ephemeral_start() - 1)  # noqa: S311 (not crypto)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise AssertionError(f"no free port from {PORTS_FROM} below the ephemeral range")


def _ephemeral_start() -> int:
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _config(node: RabbitNode, extra: Sequence[str] = ()) -> str:
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
            *extra,
            "",
        ]
    )


def _epmd_binary() -> str:
    if not SERVER.exists():
        raise AssertionError(f"{SERVER} missing: run scripts/services-setup")
    found = shutil.which("epmd") or next(Path("/usr/lib/erlang").glob("erts-*/bin/epmd"), None)
    if found is None:
        raise AssertionError("epmd missing: run scripts/services-setup")
    return str(found)


def _write_cookie(home: Path) -> None:
    home.mkdir(parents=True, exist_ok=True)
    cookie = home / ".erlang.cookie"
    cookie.write_text(secrets.token_hex(20))
    cookie.chmod(0o400)


def _base_env(home: Path, epmd_port: int) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "ERL_EPMD_PORT": str(epmd_port),
        "ERL_EPMD_ADDRESS": "127.0.0.1",
    }


def _prepare(
    node: RabbitNode, base_env: dict[str, str], extra_config: Sequence[str] = ()
) -> dict[str, str]:
    """Write the node's config files into its folder; the server's environment."""
    folder = node.folder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "rabbitmq.conf").write_text(_config(node, extra_config))
    (folder / "advanced.config").write_text(ADVANCED)
    (folder / "enabled_plugins").write_text(PLUGINS)
    return {
        **base_env,
        "RABBITMQ_NODENAME": node.node_name,
        "RABBITMQ_MNESIA_BASE": str(folder / "mnesia"),
        "RABBITMQ_LOG_BASE": str(folder / "log"),
        "RABBITMQ_CONFIG_FILE": str(folder / "rabbitmq.conf"),
        "RABBITMQ_ADVANCED_CONFIG_FILE": str(folder / "advanced.config"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(folder / "enabled_plugins"),
        "RABBITMQ_PLUGINS_EXPAND_DIR": str(folder / "plugins-expand"),
        "RABBITMQ_PID_FILE": str(folder / "rabbitmq.pid"),
        "RABBITMQ_DIST_PORT": str(free_port()),
        "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
    }


def _spawn(
    args: list[str], env: dict[str, str], cwd: Path, out: IO[bytes]
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        args, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def _mqtt_login(port: int, username: str, password: str) -> int | str:
    """CONNECT (a clean session) and DISCONNECT; the CONNACK return code, or what failed."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10.0) as sock:
            sock.sendall(connect_packet(f"probe-{secrets.token_hex(4)}", username, password, 10))
            connack = b""
            while len(connack) < 4 and (chunk := sock.recv(4 - len(connack))):
                connack += chunk
            if len(connack) < 4 or connack[0] != 0x20:
                return f"not a CONNACK: {connack!r}"
            sock.sendall(b"\xe0\x00")  # DISCONNECT
            return connack[3]
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


def _wait_mqtt_login(
    node: RabbitNode, procs: Sequence[subprocess.Popen[bytes]], deadline: float
) -> None:
    """Wait until the node accepts an MQTT login (the management user's, whom the internal
    backend knows): the MQTT plugin registers every client id with `mqtt_node`, a Raft
    cluster across the nodes, which elects its leader seconds after the listeners open; until
    then a CONNECT waits, and on a busy machine was answered 3 (server unavailable)."""
    code: int | str = "no answer"
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise AssertionError(f"{proc.args!r} exited ({proc.returncode}):\n{node.log()}")
        code = _mqtt_login(node.mqtt_port, node.management_user, node.management_password)
        if code == 0:
            return
        time.sleep(0.5)
    raise AssertionError(
        f"RabbitMQ node {node.node_name}: MQTT login answered {code}, not 0:\n{node.log()}"
    )


def _wait_port(
    port: int,
    procs: Sequence[subprocess.Popen[bytes]],
    node: RabbitNode,
    timeout: float = START_TIMEOUT_S,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                program = proc.args[0] if isinstance(proc.args, list) else proc.args
                raise AssertionError(
                    f"RabbitMQ node {node.node_name}: {program!s} exited ({proc.returncode})"
                    f" before its port {port} opened:\n{node.log()}"
                )
        if _listening(port):
            return
        time.sleep(0.2)
    raise AssertionError(
        f"RabbitMQ node {node.node_name} not listening on port {port} after"
        f" {timeout} s:\n{node.log()}"
    )


def _stop(proc: subprocess.Popen[bytes], sig: signal.Signals = signal.SIGTERM) -> None:
    """SIGTERM (a clean shutdown, a few seconds), SIGKILL of its process group if it hangs;
    `sig=SIGKILL` kills the group at once (a crash)."""
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=STOP_TIMEOUT_S)
    with contextlib.suppress(ProcessLookupError):  # beam's helpers share the group
        os.killpg(proc.pid, signal.SIGKILL)


class _PortTaken(AssertionError):
    """A boot failed because one of its ports was taken between the choice and the bind."""


def _port_clash(log: str) -> bool:
    return "eaddrinuse" in log or "address already in use" in log.lower()


def _on_new_ports(boot: Callable[[], _Booted], folder: Path) -> _Booted:
    """`boot()`, again in an emptied `folder` on new ports while it fails with `_PortTaken`."""
    for _ in range(PORT_ATTEMPTS - 1):
        try:
            return boot()
        except _PortTaken:
            shutil.rmtree(folder, ignore_errors=True)
    return boot()


def _boot_node(
    folder: Path, extra_config: Sequence[str]
) -> tuple[RabbitNode, list[subprocess.Popen[bytes]]]:
    """A private node in `folder` (created), ready; its processes (epmd, then the server)."""
    epmd_bin = _epmd_binary()
    folder.mkdir(parents=True, exist_ok=True)
    node = RabbitNode(
        folder=folder,
        node_name=f"iotbiz-test-{os.getpid()}-{secrets.token_hex(3)}@localhost",
        amqp_port=free_port(),
        mqtt_port=free_port(),
        management_port=free_port(),
        auth_port=free_port(),
        management_user=MANAGEMENT_USER,
        management_password=secrets.token_urlsafe(16),
    )
    epmd_port = free_port()
    home = folder / "home"
    _write_cookie(home)
    base_env = _base_env(home, epmd_port)
    env = _prepare(node, base_env, extra_config)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with (folder / "stdout.log").open("wb") as out:  # the children keep their own copy
            procs.append(_spawn([epmd_bin, "-port", str(epmd_port)], base_env, folder, out))
            procs.append(_spawn([str(SERVER)], env, folder, out))
        _wait_port(node.mqtt_port, procs, node)
        _wait_port(node.amqp_port, procs, node)
        _wait_mqtt_login(node, procs, time.monotonic() + START_TIMEOUT_S)
    except BaseException as exc:
        for proc in reversed(procs):
            _stop(proc)
        if isinstance(exc, AssertionError) and _port_clash(node.log()):
            raise _PortTaken(str(exc)) from exc
        raise
    return node, procs


@contextmanager
def rabbitmq_node(folder: Path, *, extra_config: Sequence[str] = ()) -> Iterator[RabbitNode]:
    """Start a private node in `folder` (created), yield it once its MQTT port is open, stop it
    (and its epmd) on the way out. `extra_config`: more rabbitmq.conf lines (a TLS listener)."""
    node, procs = _on_new_ports(lambda: _boot_node(folder, extra_config), folder)
    try:
        yield node
    finally:
        for proc in reversed(procs):
            _stop(proc)


class RabbitCluster:
    """A running cluster of private nodes; `nodes[0]` is rabbit-1@localhost. Nodes are
    numbered from 1 as their names are: `stop_node(3)` stops rabbit-3.

    BOOT: `start_s` is how long the cluster took to be ready. Measured on this 2-core machine
    shared with other test runs (2026-12-02): all three blank nodes started at once with
    classic_config (3.10 takes a `global` lock, so they form one cluster) were ready in
    21-30 s, but in about one start in ten a node's `mqtt_node` (the MQTT plugin's Raft
    cluster for client ids, formed as the plugin starts) never found its leader: that node
    answered every CONNECT 3 (server unavailable, "client ID registration timed out") for
    minutes. Node 1 first, then the others once it accepts MQTT logins, avoids that race.
    Booting three standalone nodes and then `rabbitmqctl stop_app`, `join_cluster`,
    `start_app` on nodes 2 and 3 took 45 s (25 s of boot, then 1-6 s for each of the six
    commands).
    """

    def __init__(
        self,
        nodes: Sequence[RabbitNode],
        envs: Sequence[dict[str, str]],
        epmd: subprocess.Popen[bytes],
    ) -> None:
        self.nodes = tuple(nodes)
        self.auth_port = nodes[0].auth_port
        self.start_s = 0.0
        self._envs = tuple(envs)
        self._epmd = epmd
        self._servers: list[subprocess.Popen[bytes] | None] = [None] * len(nodes)

    def node(self, number: int) -> RabbitNode:
        return self.nodes[number - 1]

    def is_running(self, number: int) -> bool:
        server = self._servers[number - 1]
        return server is not None and server.poll() is None

    def _start(self, number: int) -> None:
        node = self.node(number)
        with (node.folder / "stdout.log").open("ab") as out:
            self._servers[number - 1] = _spawn(
                [str(SERVER)], self._envs[number - 1], node.folder, out
            )

    def _wait_ready(self, numbers: Sequence[int], timeout: float) -> None:
        """Wait until nodes `numbers` listen on MQTT and then AMQP (opened last) and every
        running node is in the cluster; fail at once, with its log, if any node exits."""
        deadline = time.monotonic() + timeout
        waiting = {n: [self.node(n).mqtt_port, self.node(n).amqp_port] for n in numbers}
        while True:
            self._check_alive()
            for number, ports in list(waiting.items()):
                while ports and _listening(ports[0]):
                    ports.pop(0)
                if not ports:
                    del waiting[number]
            if not waiting:
                break
            if time.monotonic() > deadline:
                names = [self.node(n).node_name for n in sorted(waiting)]
                raise AssertionError(
                    f"RabbitMQ {names} not listening after {timeout} s:\n{self.log()}"
                )
            time.sleep(0.2)
        running = range(1, len(self.nodes) + 1)
        self.wait_members({self.node(n).node_name for n in running if self.is_running(n)}, deadline)
        for number in numbers:
            servers = [server for server in self._servers if server is not None]
            _wait_mqtt_login(self.node(number), [self._epmd, *servers], deadline)

    def _check_alive(self) -> None:
        if self._epmd.poll() is not None:
            raise AssertionError(f"the cluster's epmd exited ({self._epmd.returncode})")
        for number, server in enumerate(self._servers, start=1):
            if server is not None and server.poll() is not None:
                node = self.node(number)
                raise AssertionError(
                    f"RabbitMQ node {node.node_name} exited ({server.returncode}):\n{node.log()}"
                )

    def start_all(self) -> None:
        """Node 1 first, until it accepts MQTT logins; then the others at once: they find node
        1 through classic_config, join its cluster and its `mqtt_node` (see BOOT)."""
        started = time.monotonic()
        self._start(1)
        self._wait_ready([1], CLUSTER_START_TIMEOUT_S)
        others = range(2, len(self.nodes) + 1)
        for number in others:
            self._start(number)
        self._wait_ready(others, max(CLUSTER_START_TIMEOUT_S - (time.monotonic() - started), 1.0))
        self.start_s = time.monotonic() - started

    def stop_node(self, number: int, *, crash: bool = False) -> None:
        """Stop one node while the others run: SIGTERM, a clean stop as for maintenance (the
        node closes its clients' connections and tells its peers), or with `crash` SIGKILL of
        its process group (the kernel closes its sockets: peers and clients see them reset)."""
        server = self._servers[number - 1]
        if server is None:
            raise AssertionError(f"node {number} is not running")
        _stop(server, signal.SIGKILL if crash else signal.SIGTERM)
        self._servers[number - 1] = None

    def start_node(self, number: int) -> float:
        """Start a stopped node again on its own data (it rejoins the cluster); the seconds
        until every running node is in the cluster again."""
        if self.is_running(number):
            raise AssertionError(f"node {number} is already running")
        started = time.monotonic()
        self._start(number)
        self._wait_ready([number], START_TIMEOUT_S)
        return time.monotonic() - started

    def _management(self, via: int, path: str) -> list[dict[str, object]]:
        node = self.node(via)
        secret = f"{node.management_user}:{node.management_password}".encode()
        request = urllib.request.Request(  # noqa: S310 (a loopback http URL built here)
            f"{node.management_url}{path}",
            headers={"Authorization": f"Basic {base64.b64encode(secret).decode()}"},
        )
        with urllib.request.urlopen(request, timeout=5.0) as response:  # noqa: S310
            listed: list[dict[str, object]] = json.load(response)
        return listed

    def running_members(self, via: int = 1) -> set[str]:
        """The node names that node `via`'s management API lists as running."""
        listed = self._management(via, "/api/nodes?columns=name,running")
        return {str(item["name"]) for item in listed if item.get("running")}

    def connections(self, via: int = 1) -> list[tuple[str, int]]:
        """The cluster's client connections as (user, node number), from node `via`'s
        management API (whose connection list lags by up to a few seconds)."""
        listed = self._management(via, "/api/connections?columns=user,node")
        names = [node.node_name for node in self.nodes]
        return [(str(item["user"]), names.index(str(item["node"])) + 1) for item in listed]

    def wait_members(self, names: set[str], deadline: float) -> None:
        """Wait until a running node lists exactly `names` as the running members."""
        via = next(n for n in range(1, len(self.nodes) + 1) if self.is_running(n))
        seen: set[str] | str = "nothing"
        while time.monotonic() < deadline:
            try:
                seen = self.running_members(via)
            except (OSError, urllib.error.URLError, ValueError) as exc:
                seen = f"{type(exc).__name__}: {exc}"
            if seen == names:
                return
            self._check_alive()
            time.sleep(0.5)
        raise AssertionError(
            f"RabbitMQ cluster: node {via} lists {seen} as running, expected {sorted(names)}:\n"
            f"{self.log()}"
        )

    def log(self) -> str:
        return "\n".join(f"=== {node.node_name}\n{node.log()}" for node in self.nodes)

    def close(self) -> None:
        for number in range(len(self.nodes), 0, -1):
            server = self._servers[number - 1]
            if server is not None:
                _stop(server)
                self._servers[number - 1] = None
        _stop(self._epmd)


def _boot_cluster(folder: Path, nodes: int) -> RabbitCluster:
    """`nodes` private nodes in sub-folders of `folder` (created), started as one cluster."""
    epmd_bin = _epmd_binary()
    folder.mkdir(parents=True, exist_ok=True)
    home = folder / "home"
    _write_cookie(home)
    epmd_port, auth_port = free_port(), free_port()
    password = secrets.token_urlsafe(16)
    members = [
        RabbitNode(
            folder=folder / f"rabbit-{number}",
            node_name=f"rabbit-{number}@localhost",
            amqp_port=free_port(),
            mqtt_port=free_port(),
            management_port=free_port(),
            auth_port=auth_port,
            management_user=MANAGEMENT_USER,
            management_password=password,
        )
        for number in range(1, nodes + 1)
    ]
    # a persistent session's queue (the agent's: clean_session false) as a quorum queue,
    # replicated on every node: as a classic queue it lives on the node the device first used,
    # and while that node is down the device cannot subscribe anywhere else
    sessions = ["mqtt.durable_queue_type = quorum"]
    formation = [
        *sessions,
        "cluster_formation.peer_discovery_backend = classic_config",
        *(
            f"cluster_formation.classic_config.nodes.{number} = {node.node_name}"
            for number, node in enumerate(members, start=1)
        ),
    ]
    base_env = _base_env(home, epmd_port)
    # node 1 boots alone (no peers to look for), the others join it
    envs = [
        _prepare(node, base_env, formation if node is not members[0] else sessions)
        for node in members
    ]
    with (folder / "epmd.log").open("wb") as out:
        epmd = _spawn([epmd_bin, "-port", str(epmd_port)], base_env, folder, out)
    cluster = RabbitCluster(members, envs, epmd)
    try:
        cluster.start_all()
    except BaseException as exc:
        cluster.close()
        epmd_log = (folder / "epmd.log").read_text(errors="replace")
        if isinstance(exc, AssertionError) and _port_clash(cluster.log() + epmd_log):
            raise _PortTaken(str(exc)) from exc
        raise
    return cluster


@contextmanager
def rabbitmq_cluster(folder: Path, nodes: int = 3) -> Iterator[RabbitCluster]:
    """Start `nodes` private nodes in sub-folders of `folder` (created) as one cluster, yield
    it once every node is up and in it, stop them all (and the epmd) on the way out."""
    cluster = _on_new_ports(lambda: _boot_cluster(folder, nodes), folder)
    try:
        yield cluster
    finally:
        cluster.close()
    shutil.rmtree(folder)  # mnesia, logs: tens of MB a run
