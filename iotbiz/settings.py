"""Platform settings: one typed object, declared once with defaults and help.

Precedence, lowest first: the defaults below < a TOML file (`--config` or `IOTBIZ_CONFIG`) <
environment variables `IOTBIZ_<SECTION>_<KEY>` (e.g. `IOTBIZ_HTTP_PORT=9000`) < command-line flags.
Unknown sections or keys and values of the wrong type are a `ConfigError` naming the key.
This module is the only reader of TOML files and of `os.environ`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from iotbiz.errors import ConfigError

ENV_PREFIX = "IOTBIZ_"
ENV_CONFIG = "IOTBIZ_CONFIG"
# Variables with this prefix belong to the device agent's own settings, not the platform's.
ENV_RESERVED = ("IOTBIZ_AGENT_",)


def setting(default: Any, help: str, *, min: float | None = None, max: float | None = None) -> Any:
    """Declare one setting: its default, a line of help and an optional range."""
    return field(default=default, metadata={"help": help, "min": min, "max": max})


@dataclass(frozen=True, slots=True)
class StoreSettings:
    path: Path = setting(Path("iotbiz.db"), "SQLite file of the store (created if missing)")
    url: str = setting(
        "",
        "PostgreSQL store instead of the SQLite file: postgresql://USER:PASSWORD@HOST:PORT/DB"
        " (several platform processes may share it; empty: the SQLite file at path)",
    )


@dataclass(frozen=True, slots=True)
class HTTPSettings:
    host: str = setting("127.0.0.1", "address the registrar listens on (0.0.0.0: all interfaces)")
    port: int = setting(8080, "TCP port of the registrar (device API, healthz)", min=0, max=65535)
    header_timeout_s: float = setting(
        10.0,
        "a client must send a request's headers within this many seconds of connecting or of"
        " the previous answer (else the connection is closed)",
        min=0.1,
        max=3600,
    )
    body_timeout_s: float = setting(
        10.0, "a request's body must arrive within this many seconds (else 408)", min=0.1, max=3600
    )
    max_connections: int = setting(
        2000, "HTTP connections open at once; more are closed at once", min=1
    )
    max_connections_per_address: int = setting(
        100,
        "HTTP connections open at once from one client address (with an external broker, not"
        " for broker_auth.allowed_addresses)",
        min=1,
    )
    backlog: int = setting(
        1024, "connections the kernel queues before the registrar accepts them", min=1
    )


@dataclass(frozen=True, slots=True)
class MQTTSettings:
    host: str = setting("127.0.0.1", "address the MQTT broker listens on (0.0.0.0: all interfaces)")
    port: int = setting(
        1883, "TCP port of plain MQTT (with TLS on: only if allow_plain)", min=0, max=65535
    )
    mqtts_port: int = setting(8883, "TCP port of MQTT over TLS (with TLS on)", min=0, max=65535)
    allow_plain: bool = setting(
        False, "with TLS on, also listen for plain MQTT on port (a loopback-only bridge)"
    )
    keepalive_grace: float = setting(
        1.5, "a client silent for this many keep-alive periods is dropped (its will fires)", min=1
    )
    ack_timeout_s: float = setting(
        60.0, "seconds to wait for a QoS 1/2 ack; the message stays queued for a resend", min=0.1
    )
    connect_timeout_s: float = setting(
        10.0, "seconds a new connection has to send its CONNECT packet", min=0.1
    )
    max_packet_bytes: int = setting(
        256 * 1024, "largest MQTT packet accepted; a larger one closes the connection", min=1024
    )
    session_expiry_s: int = setting(
        7 * 86400, "seconds a disconnected persistent session (and its queue) is kept", min=1
    )
    max_queued_messages: int = setting(
        1000,
        "messages queued per client: offline (QoS 1/2) the oldest are dropped, online the newest",
        min=1,
    )
    max_inflight_in: int = setting(
        100,
        "packets of one connection not yet processed; while full it is not read (backpressure)",
        min=1,
    )
    max_broadcast_queue: int = setting(
        10000,
        "accepted messages waiting for delivery, all clients; while full publishers are not read",
        min=1,
    )
    max_keepalive_s: int = setting(
        300,
        "longest keep-alive a client may ask; 0 (none) or more is taken as this",
        min=5,
        max=65535,
    )
    max_connections: int = setting(
        20_000, "MQTT connections open at once; more are closed at once", min=1
    )
    max_connections_per_address: int = setting(
        2000, "MQTT connections open at once from one client address (a NAT gateway)", min=1
    )
    max_pending_per_address: int = setting(
        1000, "connections from one address that have not sent their CONNECT yet", min=1
    )
    login_failures_free: int = setting(
        10, "refused logins a minute from one address answered at once; later ones wait", min=0
    )
    login_delay_max_s: float = setting(
        8.0,
        "the longest wait before refusing a login from an address that keeps failing (0: none)",
        min=0,
        max=60,
    )
    login_hash_share: float = setting(
        0.5,
        "share of the bcrypt queue MQTT logins may fill; beyond it a login waits its turn",
        min=0.01,
        max=1.0,
    )
    login_wait_s: float = setting(
        25.0,
        "longest wait of a login beyond that share for bcrypt, else CONNACK 3 (0: refuse at once)",
        min=0,
        max=60,
    )


@dataclass(frozen=True, slots=True)
class RegistrarSettings:
    pending_ttl_s: float = setting(
        86400.0, "seconds a registration may stay pending before it expires", min=1
    )
    bcrypt_cost: int = setting(
        6, "bcrypt cost of device password hashes (passwords carry 192 random bits)", min=4, max=16
    )
    hash_threads: int = setting(
        0, "threads that run bcrypt off the event loop (0: one per CPU core)", min=0, max=64
    )
    max_queued_hashes: int = setting(
        256, "bcrypt jobs that may wait for a thread before requests get 429", min=1
    )
    rate_per_ip: float = setting(
        50.0,
        "requests per second one client address may make to the device API (0: no limit)",
        min=0,
    )
    rate_burst: int = setting(200, "requests one client address may make in a burst", min=1)
    rate_per_customer: float = setting(
        500.0,
        "device API requests per second for one customer, all addresses together (0: no limit)",
        min=0,
    )
    customer_burst: int = setting(
        2000, "device API requests one customer may make in a burst", min=1
    )


@dataclass(frozen=True, slots=True)
class LogSettings:
    level: str = setting("INFO", "log level: DEBUG, INFO, WARNING or ERROR")


@dataclass(frozen=True, slots=True)
class CommandSettings:
    default_ttl_s: float = setting(
        3600.0, "seconds a command waits for its reply when the sender gives no expiry", min=1
    )
    max_ttl_s: float = setting(
        7 * 86400.0, "longest expiry a command may be given, in seconds", min=1, max=7 * 86400
    )
    resend_after_s: float = setting(
        60.0,
        "a sent command without a reply goes to its online device again after this many seconds",
        min=1,
    )
    poll_s: float = setting(
        1.0, "seconds between looks at the store for commands to send and to expire", min=0.05
    )
    batch_size: int = setting(500, "commands read, published or expired in one go", min=1)
    max_inflight: int = setting(
        100, "command publishes waiting for their PUBACK at once", min=1, max=10000
    )
    max_devices: int = setting(10000, "devices one send may address", min=1)
    max_args_bytes: int = setting(16384, "largest JSON of a command's args", min=2)
    max_pending_replies: int = setting(
        10000,
        "device replies waiting to be written; when full, new ones are dropped (counted)",
        min=1,
    )
    max_waiters: int = setting(1000, "callers waiting for commands to finish at once", min=1)


@dataclass(frozen=True, slots=True)
class HistorySettings:
    sample_interval_s: float = setting(
        60.0, "at most one telemetry sample per device per this many seconds", min=1
    )
    samples_keep_s: float = setting(86400.0, "seconds telemetry samples are kept", min=60)
    events_keep_s: float = setting(7 * 86400.0, "seconds device events are kept", min=60)
    events_per_device: int = setting(1000, "device events kept per device at most", min=1)
    commands_keep_s: float = setting(30 * 86400.0, "seconds finished commands are kept", min=60)
    prune_interval_s: float = setting(300.0, "seconds between retention passes", min=1)
    prune_batch: int = setting(
        500, "devices (or rows) one retention transaction deletes for", min=1
    )
    max_event_bytes: int = setting(8192, "larger events are not recorded (counted)", min=256)
    max_pending_events: int = setting(
        10000, "events waiting to be written; when full, the oldest are dropped (counted)", min=1
    )
    write_interval_s: float = setting(
        600.0,
        "seconds samples are held and then written together (fewer page writes; lost if killed)",
        min=0,
    )
    max_pending_samples: int = setting(
        200000, "samples held or waiting; when full, new ones are dropped (counted)", min=1
    )


@dataclass(frozen=True, slots=True)
class AdminSettings:
    token: str = setting(
        "",
        "admin API bearer token (empty: generated into admin.token beside the store file;"
        " required with a PostgreSQL store.url)",
    )
    public_metrics: bool = setting(False, "serve /metrics without the admin token")


@dataclass(frozen=True, slots=True)
class TLSSettings:
    cert_file: str = setting(
        "", "PEM certificate chain of both doors, HTTPS and MQTT over TLS (empty: TLS off)"
    )
    key_file: str = setting("", "PEM private key of cert_file (mode 0600 or stricter)")


@dataclass(frozen=True, slots=True)
class ConsoleSettings:
    session_ttl_s: float = setting(
        43200.0, "how long a web console login lasts (seconds)", min=60, max=30 * 86400
    )
    stream_interval_s: float = setting(
        1.0, "the console's live updates: at most one event per this many seconds", min=0.05, max=60
    )
    max_streams: int = setting(
        100, "live-update streams open at once (more: 503)", min=1, max=10_000
    )


@dataclass(frozen=True, slots=True)
class ReleaseSettings:
    signing_key_file: str = setting(
        "",
        "PEM Ed25519 private key that signs every release added (empty: releases unsigned);"
        " `iotbiz release keygen` writes one",
    )
    max_bytes: int = setting(
        512 * 1024 * 1024, "largest release artifact accepted (bytes)", min=1, max=2**40
    )
    folder: str = setting(
        "",
        "folder of the release artifacts (empty: `releases` beside the store file); several"
        " platform processes on one PostgreSQL store need it on storage they all share",
    )


@dataclass(frozen=True, slots=True)
class RolloutSettings:
    device_timeout_s: float = setting(
        3600.0,
        "seconds a device of a rollout has for its update before it counts as failed",
        min=1,
        max=7 * 86400,
    )
    batch_size: int = setting(10, "devices per rollout batch when the operator gives none", min=1)
    max_devices: int = setting(100000, "devices one rollout may address", min=1)
    poll_s: float = setting(1.0, "seconds between looks at the running rollouts", min=0.05)


@dataclass(frozen=True, slots=True)
class BrokerAuthSettings:
    allowed_addresses: str = setting(
        "127.0.0.1,::1",
        "comma-separated addresses an external broker's auth callbacks are answered from",
    )
    secret: str = setting(
        "", "when set, the auth callbacks also need it (?secret= or Authorization: Bearer)"
    )


BROKER_MODES = ("embedded", "external")
BROKER_URL_SCHEMES = {"mqtt": 1883, "mqtts": 8883}  # scheme -> its default port
MANAGEMENT_URL_SCHEMES = ("http", "https")


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    mode: str = setting(
        "embedded",
        "embedded: the platform runs its own MQTT broker; external: none, devices and the"
        " platform use the broker at url (RabbitMQ, EMQX), which asks /api/v1/broker-auth/...",
    )
    url: str = setting(
        "mqtt://127.0.0.1:1883",
        "the external broker, mqtt://HOST:PORT or mqtts://HOST:PORT (external mode only)",
    )
    ca_file: str = setting(
        "",
        "PEM CA certificate(s) the external broker's mqtts:// certificate is checked against"
        " (empty: the system's trust store)",
    )
    service_password: str = setting(
        "",
        "password of the platform's service account on the external broker; required in"
        " external mode, the same in every platform process (embedded: random at each start)",
    )
    management_url: str = setting(
        "",
        "RabbitMQ management API, e.g. http://127.0.0.1:15672: a revoked device is disconnected"
        " through it (empty: it stays connected until the broker checks it again)",
    )
    management_user: str = setting(
        "", "user of the management API (a RabbitMQ user tagged administrator)"
    )
    management_password: str = setting("", "password of management_user")
    presence_timeout_s: float = setting(
        60.0,
        "a device silent this long counts as offline (a broker node that dies sends no wills;"
        " keep it above the agents' telemetry_interval_s)",
        min=5,
    )


@dataclass(frozen=True, slots=True)
class BrokerEndpoint:
    """Where the external broker listens, from `broker.url`."""

    host: str
    port: int
    tls: bool  # mqtts://


def broker_endpoint(url: str) -> BrokerEndpoint:
    """The host and port of `broker.url`; ConfigError, one line, for a URL that is not
    mqtt[s]://HOST[:PORT] (the port defaults to 1883, or 8883 for mqtts)."""
    try:
        parts = urlsplit(url)
        parts.hostname  # noqa: B018 - raises ValueError for a bad [IPv6] literal
    except ValueError:
        raise ConfigError(f"broker.url: not a valid URL, got {url!r}") from None
    if parts.scheme not in BROKER_URL_SCHEMES or not url.startswith(f"{parts.scheme}://"):
        raise ConfigError(f"broker.url: must start with mqtt:// or mqtts://, got {url!r}")
    if any(char.isspace() or not char.isprintable() for char in url):
        raise ConfigError(f"broker.url: must be mqtt[s]://HOST:PORT only, got {url!r}")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(
            f"broker.url: no user or password in the URL (see broker.service_password), got {url!r}"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"broker.url: must be mqtt[s]://HOST:PORT only, got {url!r}")
    if not parts.hostname:
        raise ConfigError(f"broker.url: no host in {url!r}")
    try:
        port = parts.port
    except ValueError:
        port = 0  # not a number, or out of range
    else:
        if port is None:
            port = BROKER_URL_SCHEMES[parts.scheme]
    if not 1 <= port <= 65535:
        raise ConfigError(f"broker.url: the port must be a number from 1 to 65535, got {url!r}")
    return BrokerEndpoint(parts.hostname, port, tls=parts.scheme == "mqtts")


def _check_broker(broker: BrokerSettings) -> None:
    if broker.mode not in BROKER_MODES:
        raise ConfigError(f"broker.mode: must be embedded or external, got {broker.mode!r}")
    broker_endpoint(broker.url)
    url = broker.management_url
    if not url:
        return
    try:
        parts = urlsplit(url)
        valid = (
            parts.scheme in MANAGEMENT_URL_SCHEMES
            and bool(parts.hostname)
            and not any(char.isspace() or not char.isprintable() for char in url)
        )
    except ValueError:  # a bad [IPv6] literal
        valid = False
    if not valid:
        raise ConfigError(
            f"broker.management_url: must be http://HOST:PORT or https://HOST:PORT, got {url!r}"
        )
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise ConfigError(
            f"broker.management_url: the port must be a number from 1 to 65535, got {url!r}"
        ) from None
    if not broker.management_user or not broker.management_password:
        raise ConfigError(
            "broker.management_user and broker.management_password: required with"
            " broker.management_url"
        )


@dataclass(frozen=True, slots=True)
class Settings:
    store: StoreSettings = field(default_factory=StoreSettings)
    http: HTTPSettings = field(default_factory=HTTPSettings)
    mqtt: MQTTSettings = field(default_factory=MQTTSettings)
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    registrar: RegistrarSettings = field(default_factory=RegistrarSettings)
    log: LogSettings = field(default_factory=LogSettings)
    commands: CommandSettings = field(default_factory=CommandSettings)
    history: HistorySettings = field(default_factory=HistorySettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    console: ConsoleSettings = field(default_factory=ConsoleSettings)
    tls: TLSSettings = field(default_factory=TLSSettings)
    releases: ReleaseSettings = field(default_factory=ReleaseSettings)
    rollouts: RolloutSettings = field(default_factory=RolloutSettings)
    broker_auth: BrokerAuthSettings = field(default_factory=BrokerAuthSettings)


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def sections() -> dict[str, type[Any]]:
    """Section name -> its dataclass, in declaration order."""
    hints = typing.get_type_hints(Settings)
    return {f.name: hints[f.name] for f in dataclasses.fields(Settings)}


def describe() -> list[tuple[str, str, Any, str]]:
    """(section, key, default, help) of every setting, for documentation and its test."""
    rows = []
    for section, cls in sections().items():
        for f in dataclasses.fields(cls):
            rows.append((section, f.name, f.default, f.metadata["help"]))
    return rows


def load_settings(
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Settings:
    """Build the settings from defaults, the TOML file, the environment and the flags."""
    environ = os.environ if environ is None else environ
    if config_file is None and environ.get(ENV_CONFIG):
        config_file = Path(environ[ENV_CONFIG])
    layers: dict[str, dict[str, Any]] = {name: {} for name in sections()}
    if config_file is not None:
        _merge(layers, _read_toml(config_file), source=str(config_file), from_text=False)
    _merge(layers, _from_environ(environ), source="environment", from_text=True)
    if overrides:
        _merge(layers, overrides, source="command line", from_text=False)
    built = {name: cls(**layers[name]) for name, cls in sections().items()}
    settings = Settings(**built)
    if settings.log.level.upper() not in LOG_LEVELS:
        raise ConfigError(f"log.level: must be one of {', '.join(LOG_LEVELS)}")
    if settings.store.url and not settings.store.url.startswith(POSTGRES_SCHEMES):
        raise ConfigError("store.url: must start with postgresql:// (or be empty: SQLite)")
    if bool(settings.tls.cert_file) != bool(settings.tls.key_file):
        raise ConfigError("tls.cert_file and tls.key_file: set both (TLS on) or neither")
    _check_broker(settings.broker)
    return settings


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as stream:
            return tomllib.load(stream)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc


def _from_environ(environ: Mapping[str, str]) -> dict[str, dict[str, str]]:
    found: dict[str, dict[str, str]] = {}
    known = sections()
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_CONFIG or name.startswith(ENV_RESERVED):
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        # the longest section name that fits: IOTBIZ_BROKER_AUTH_SECRET is broker_auth.secret,
        # not broker.auth_secret
        matching = [s for s in known if rest.startswith(f"{s}_") and len(rest) > len(s) + 1]
        if not matching:
            raise ConfigError(f"unknown setting in environment: {name}")
        section = max(matching, key=len)
        found.setdefault(section, {})[rest[len(section) + 1 :]] = value
    return found


def _merge(
    layers: dict[str, dict[str, Any]],
    data: Mapping[str, Any],
    *,
    source: str,
    from_text: bool,
) -> None:
    known = sections()
    for section, values in data.items():
        if section not in known:
            raise ConfigError(f"unknown setting section [{section}] in {source}")
        if not isinstance(values, Mapping):
            raise ConfigError(f"{section}: must be a table of settings in {source}")
        layers[section].update(
            _check_table(
                known[section], values, prefix=f"{section}.", source=source, text=from_text
            )
        )


def _check_table(
    cls: type[Any], values: Mapping[str, Any], *, prefix: str, source: str, text: bool = False
) -> dict[str, Any]:
    """Check a table of values against the fields of dataclass `cls`: keyword arguments for it.
    Fields whose type is another dataclass (or a tuple of them) are left to the caller."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    checked: dict[str, Any] = {}
    for key, raw in values.items():
        if key not in fields:
            raise ConfigError(f"unknown setting {prefix}{key} in {source}")
        name = f"{prefix}{key}"
        value = _convert(name, hints[key], raw, from_text=text)
        _check_range(name, value, fields[key].metadata)
        checked[key] = value
    return checked


def _convert(name: str, kind: Any, raw: Any, *, from_text: bool) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (types.UnionType, typing.Union) and type(None) in args:  # X | None
        inner = next(arg for arg in args if arg is not type(None))
        return _convert(name, inner, raw, from_text=from_text)
    if from_text and kind is not str:
        return _parse_text(name, kind, raw)
    if origin is tuple and args == (str, ...):
        if isinstance(raw, list) and raw and all(isinstance(item, str) for item in raw):
            return tuple(raw)
        raise ConfigError(f"{name}: expected a non-empty list of strings, got {raw!r}")
    if origin is dict and args == (str, str):
        if isinstance(raw, Mapping) and all(isinstance(v, str) for v in raw.values()):
            return dict(raw)
        raise ConfigError(f"{name}: expected a table of strings, got {raw!r}")
    if kind is bool:
        if isinstance(raw, bool):
            return raw
    elif kind is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
    elif kind is float:
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            return float(raw)
    elif kind is str:
        if isinstance(raw, str):
            return raw
    elif kind is Path:
        if isinstance(raw, str | Path) and str(raw):
            return Path(raw)
    elif dataclasses.is_dataclass(kind) or origin is tuple:
        return raw  # a nested table or array of tables: checked by its own loader
    else:  # pragma: no cover - a setting of a type this loader does not know
        raise ConfigError(f"{name}: unsupported setting type {kind!r}")
    raise ConfigError(f"{name}: expected {_type_name(kind)}, got {raw!r}")


def _parse_text(name: str, kind: type[Any], text: str) -> Any:
    try:
        if kind is bool:
            lowered = text.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if kind is Path:
            if not text:
                raise ValueError(text)
            return Path(text)
        return kind(text)
    except ValueError as exc:
        raise ConfigError(f"{name}: expected {_type_name(kind)}, got {text!r}") from exc


def _check_range(name: str, value: Any, metadata: Mapping[str, Any]) -> None:
    low, high = metadata.get("min"), metadata.get("max")
    if low is not None and value < low:
        raise ConfigError(f"{name}: must be at least {low}, got {value!r}")
    if high is not None and value > high:
        raise ConfigError(f"{name}: must be at most {high}, got {value!r}")


def _type_name(kind: type[Any]) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        kind, "a path"
    )


# -- the device agent's settings ------------------------------------------------------------------

ENV_AGENT_PREFIX = "IOTBIZ_AGENT_"
RESTART_POLICIES = ("always", "on-failure", "never")
APP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", re.ASCII)


@dataclass(frozen=True, slots=True)
class HealthSettings:
    http: str | None = setting(None, "URL that answers 2xx while the app is healthy")
    command: tuple[str, ...] | None = setting(None, "command that exits 0 while the app is healthy")
    interval_s: float = setting(10.0, "seconds between health checks", min=0.1)
    timeout_s: float = setting(5.0, "seconds one health check may take", min=0.1)
    failures: int = setting(3, "consecutive failed checks that restart the app", min=1)
    grace_s: float = setting(5.0, "seconds after a start before the first check", min=0)


@dataclass(frozen=True, slots=True)
class AppSettings:
    name: str = setting("", "the app's name (A-Z a-z 0-9 _ . -)")
    command: tuple[str, ...] = setting((), "program and arguments, a list of strings")
    restart: str = setting("always", "restart policy: always, on-failure or never")
    cwd: Path | None = setting(None, "working directory (default: the agent's)")
    env: dict[str, str] | None = setting(None, "extra environment variables")
    stop_timeout_s: float = setting(10.0, "seconds between SIGTERM and SIGKILL on stop", min=0)
    backoff_s: float = setting(
        1.0, "first delay before a restart; doubles up to backoff_max_s", min=0
    )
    backoff_max_s: float = setting(60.0, "longest delay before a restart", min=0)
    start_s: float = setting(
        1.0, "seconds an app must run to count as started; a quicker exit is a failed start", min=0
    )
    start_retries: int = setting(
        3,
        "failed starts in a row retried before the app is FATAL (0: none; -1: retry for ever)",
        min=-1,
    )
    user: str | None = setting(
        None, "run as this user (name or uid) with its groups; needs a root agent"
    )
    health: HealthSettings | None = setting(None, "health check: {http = URL} or {command = [...]}")
    release: bool = setting(
        False,
        "runs the platform's releases, in state_dir/apps/NAME/current (not before the first)",
    )


@dataclass(frozen=True, slots=True)
class AgentSettings:
    customer_id: str = setting("", "the customer this device belongs to (required)")
    registrar_url: str = setting("http://127.0.0.1:8080", "the platform's registrar")
    broker_url: str = setting("mqtt://127.0.0.1:1883", "the platform's MQTT broker")
    ca_file: str = setting(
        "", "PEM CA certificate(s) of the platform's TLS (empty: the system's trust store)"
    )
    allow_insecure: bool = setting(
        False, "allow http:// and mqtt:// to a host that is not loopback (a trusted network)"
    )
    device_id: str | None = setting(None, "device id; default: the MAC of the primary interface")
    state_dir: Path = setting(Path("/var/lib/iotbiz-agent"), "credentials, outbox and app logs")
    telemetry_interval_s: float = setting(10.0, "seconds between telemetry messages", min=1)
    keepalive_s: int = setting(
        30, "MQTT keep-alive; the platform notices a dead link in 1.5x", min=5
    )
    outbox_max_messages: int = setting(
        1000, "telemetry kept on disk while offline; the oldest are dropped first", min=1
    )
    replies_max_messages: int = setting(
        256, "command replies kept on disk while offline; the oldest are dropped first", min=1
    )
    max_message_bytes: int = setting(
        128 * 1024,
        "largest MQTT message the agent sends; longer app.logs replies are cut, others dropped",
        min=4096,
    )
    log_max_bytes: int = setting(1024 * 1024, "size of an app's log file before rotation", min=1024)
    log_backups: int = setting(3, "rotated log files kept per app", min=0)
    log_tail_lines: int = setting(200, "recent output lines kept in memory per app", min=1)
    log_level: str = setting("INFO", "agent log level: DEBUG, INFO, WARNING or ERROR")
    release_public_key: str = setting(
        "",
        "PEM Ed25519 public key that releases must be signed with (empty: signatures not checked)",
    )
    update_trial_s: float = setting(
        30.0, "seconds a new release must stay up (and healthy) before it is committed", min=0
    )
    apps: tuple[AppSettings, ...] = setting((), "[[apps]]: the programs this device runs")


def describe_agent() -> list[tuple[str, str, Any, str]]:
    """(table, key, default, help) of every agent setting, for documentation and its test."""
    rows = []
    for table, cls in (("", AgentSettings), ("apps", AppSettings), ("health", HealthSettings)):
        for f in dataclasses.fields(cls):
            rows.append((table, f.name, f.default, f.metadata["help"]))
    return rows


def load_agent_settings(
    config_file: Path | None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> AgentSettings:
    """The agent's settings: defaults < TOML file < `IOTBIZ_AGENT_<KEY>` < flags."""
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = _read_toml(config_file) if config_file is not None else {}
    source = str(config_file) if config_file is not None else "defaults"
    apps = data.pop("apps", [])
    values = _check_table(AgentSettings, data, prefix="", source=source)
    from_env = {
        name[len(ENV_AGENT_PREFIX) :].lower(): value
        for name, value in environ.items()
        if name.startswith(ENV_AGENT_PREFIX)
    }
    if "apps" in from_env:
        raise ConfigError("apps: set in the config file, not the environment")
    values.update(_check_table(AgentSettings, from_env, prefix="", source="environment", text=True))
    values.update(_check_table(AgentSettings, overrides or {}, prefix="", source="command line"))
    values["apps"] = _load_apps(apps, source)
    settings = AgentSettings(**values)
    _check_agent(settings)
    return settings


def _load_apps(apps: Any, source: str) -> tuple[AppSettings, ...]:
    if not isinstance(apps, list) or not all(isinstance(app, Mapping) for app in apps):
        raise ConfigError(f"apps: must be an array of tables ([[apps]]) in {source}")
    loaded, names = [], set()
    for index, table in enumerate(apps):
        prefix = f"apps[{index}]."
        values = _check_table(AppSettings, table, prefix=prefix, source=source)
        if "health" in values:
            health = values["health"]
            if not isinstance(health, Mapping):
                raise ConfigError(f"{prefix}health: must be a table in {source}")
            checked = _check_table(HealthSettings, health, prefix=f"{prefix}health.", source=source)
            if ("http" in checked) == ("command" in checked):
                raise ConfigError(f"{prefix}health: give exactly one of http or command")
            values["health"] = HealthSettings(**checked)
        app = AppSettings(**values)
        if not APP_NAME.fullmatch(app.name):
            raise ConfigError(
                f"{prefix}name: must be 1 to 64 of A-Z a-z 0-9 _ . -, got {app.name!r}"
            )
        if app.name in names:
            raise ConfigError(f"{prefix}name: {app.name!r} is used twice")
        if not app.command:
            raise ConfigError(f"{prefix}command: required, a non-empty list of strings")
        if app.restart not in RESTART_POLICIES:
            raise ConfigError(f"{prefix}restart: must be one of {', '.join(RESTART_POLICIES)}")
        if app.release and app.cwd is not None:
            raise ConfigError(f"{prefix}cwd: not with release = true (it runs in its release)")
        if app.user is not None and not _is_user(app.user):
            raise ConfigError(f"{prefix}user: no such user {app.user!r}")
        names.add(app.name)
        loaded.append(app)
    return tuple(loaded)


def _is_user(user: str) -> bool:
    """Whether `user` (a name, or a uid in digits as supervisord reads it) is in the passwd
    database."""
    import pwd

    try:
        if user.isdigit():
            pwd.getpwuid(int(user))
        else:
            pwd.getpwnam(user)
    except (KeyError, OverflowError):
        return False
    return True


def _check_agent(settings: AgentSettings) -> None:
    # Imported here: settings must not depend on the rest of the package at import time.
    from iotbiz.names import is_customer_id, normalize_device_id
    from iotbiz.tls import check_plain_url

    if not is_customer_id(settings.customer_id):
        raise ConfigError(
            f"customer_id: required, a valid customer id, got {settings.customer_id!r}"
        )
    if settings.device_id is not None and normalize_device_id(settings.device_id) is None:
        raise ConfigError(f"device_id: not a valid device id: {settings.device_id!r}")
    if not settings.registrar_url.startswith(("http://", "https://")):
        raise ConfigError("registrar_url: must start with http:// or https://")
    if not settings.broker_url.startswith(("mqtt://", "mqtts://")):
        raise ConfigError("broker_url: must start with mqtt:// or mqtts://")
    for key in ("registrar_url", "broker_url"):
        check_plain_url(key, getattr(settings, key), allow_insecure=settings.allow_insecure)
    if settings.log_level.upper() not in LOG_LEVELS:
        raise ConfigError(f"log_level: must be one of {', '.join(LOG_LEVELS)}")


# A test hook, read only by the agent's update journal (iotbiz.agent.updates): set to
# "STATE@VERSION", the agent SIGKILLs itself right after writing journal state STATE of an update
# to VERSION, as a power cut would. Never set it outside tests.
ENV_TEST_KILL_AFTER = "TEST_IOTBIZ_KILL_AFTER"


def update_kill_hook(environ: Mapping[str, str] | None = None) -> str | None:
    """The test hook's value ("STATE@VERSION"), or None when it is not set."""
    environ = os.environ if environ is None else environ
    return environ.get(ENV_TEST_KILL_AFTER) or None


def systemd_notify_settings(environ: Mapping[str, str] | None = None) -> tuple[str | None, float]:
    """(NOTIFY_SOCKET, watchdog interval in seconds or 0) as systemd passes them to a service."""
    environ = os.environ if environ is None else environ
    try:
        watchdog_s = int(environ.get("WATCHDOG_USEC", "0")) / 1_000_000
    except ValueError:
        watchdog_s = 0.0
    return environ.get("NOTIFY_SOCKET") or None, watchdog_s
