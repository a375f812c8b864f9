"""Platform settings: one typed object, declared once with defaults and help.

Precedence, lowest first: the defaults below < a TOML file (`--config` or `IOTBIZ_CONFIG`) <
environment variables `IOTBIZ_<SECTION>_<KEY>` (e.g. `IOTBIZ_HTTP_PORT=9000`) < command-line flags.
Unknown sections or keys and values of the wrong type are a `ConfigError` naming the key.
This module is the only reader of TOML files and of `os.environ`.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


@dataclass(frozen=True, slots=True)
class HTTPSettings:
    host: str = setting("127.0.0.1", "address the registrar listens on (0.0.0.0: all interfaces)")
    port: int = setting(8080, "TCP port of the registrar (device API, healthz)", min=0, max=65535)


@dataclass(frozen=True, slots=True)
class MQTTSettings:
    host: str = setting("127.0.0.1", "address the MQTT broker listens on (0.0.0.0: all interfaces)")
    port: int = setting(1883, "TCP port of the MQTT broker", min=0, max=65535)
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


@dataclass(frozen=True, slots=True)
class LogSettings:
    level: str = setting("INFO", "log level: DEBUG, INFO, WARNING or ERROR")


@dataclass(frozen=True, slots=True)
class Settings:
    store: StoreSettings = field(default_factory=StoreSettings)
    http: HTTPSettings = field(default_factory=HTTPSettings)
    mqtt: MQTTSettings = field(default_factory=MQTTSettings)
    registrar: RegistrarSettings = field(default_factory=RegistrarSettings)
    log: LogSettings = field(default_factory=LogSettings)


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


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
        section, _, key = rest.partition("_")
        if section not in known or not key:
            raise ConfigError(f"unknown setting in environment: {name}")
        found.setdefault(section, {})[key] = value
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
        cls = known[section]
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        for key, raw in values.items():
            if key not in fields:
                raise ConfigError(f"unknown setting {section}.{key} in {source}")
            name = f"{section}.{key}"
            value = _convert(name, hints[key], raw, from_text=from_text)
            _check_range(name, value, fields[key].metadata)
            layers[section][key] = value


def _convert(name: str, kind: type[Any], raw: Any, *, from_text: bool) -> Any:
    if from_text and kind is not str:
        return _parse_text(name, kind, raw)
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
