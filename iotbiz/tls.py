"""TLS contexts, standard library only: the platform's server context (both doors) and the
agent's client context.

The platform makes ONE server context from `tls.cert_file` and `tls.key_file` and hands it to the
registrar (HTTPS) and the broker (MQTT over TLS). TLS 1.2 at least. A key file that others may
read is a start-up error (group read is allowed, for a root-owned key shared with a `ssl-cert`
group, as PostgreSQL allows). `ServerTLS.reload()` (on SIGHUP) loads both files into the same
context again: new handshakes get the new certificate, connections already up keep theirs, so
no device is dropped; a reload that fails keeps the old certificate and says why.

The agent's context verifies the platform's certificate and host name against `ca_file` or, when
that is empty, the system's trust store.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
import stat
from pathlib import Path
from urllib.parse import urlsplit

from iotbiz.errors import ConfigError

log = logging.getLogger(__name__)

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


class ServerTLS:
    """The platform's server context, loaded from a certificate chain and its key."""

    def __init__(self, cert_file: str, key_file: str) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = MINIMUM_VERSION
        self._load()

    def reload(self) -> bool:
        """Load the files again into the same context; False (logged, old certificate kept)
        when they are unreadable or do not match."""
        try:
            self._load()
        except ConfigError as exc:
            log.error("TLS certificate not reloaded, the previous one stays: %s", exc)
            return False
        log.info("TLS certificate reloaded from %s", self.cert_file)
        return True

    def _load(self) -> None:
        if not Path(self.cert_file).is_file():
            raise ConfigError(f"tls: {self.cert_file}: no such file")
        check_key_file(Path(self.key_file))
        try:
            self.context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"tls: cannot load {self.cert_file} with {self.key_file}: {exc}"
            ) from exc


def check_key_file(path: Path) -> None:
    """ConfigError if the key file is missing or others may read or write it."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError as exc:
        raise ConfigError(f"tls.key_file: {path}: no such file") from exc
    except OSError as exc:
        raise ConfigError(f"tls.key_file: {path}: {exc.strerror}") from exc
    if mode & (stat.S_IRWXO | stat.S_IWGRP):
        raise ConfigError(
            f"tls.key_file: {path} has mode {stat.S_IMODE(mode):04o}: others may read it;"
            f" chmod 600 {path}"
        )


def client_context(ca_file: str = "") -> ssl.SSLContext:
    """A context that verifies the server's certificate and host name, TLS 1.2 at least."""
    try:
        context = ssl.create_default_context(cafile=ca_file or None)
    except FileNotFoundError as exc:
        raise ConfigError(f"ca_file: {ca_file}: no such file") from exc
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"ca_file: {ca_file}: not a PEM certificate file ({exc})") from exc
    context.minimum_version = MINIMUM_VERSION
    return context


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.lower() in {"localhost", "localhost."}:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_plain_url(setting: str, url: str, *, allow_insecure: bool) -> None:
    """ConfigError for a plain-text URL (http://, mqtt://) to anything but a loopback address,
    unless `allow_insecure`."""
    parts = urlsplit(url)
    if parts.scheme not in {"http", "mqtt"} or allow_insecure:
        return
    if not is_loopback(parts.hostname or ""):
        secure = {"http": "https", "mqtt": "mqtts"}[parts.scheme]
        raise ConfigError(
            f"{setting} {url} is plain text to another host: use {secure}://"
            " (or set allow_insecure = true on a trusted network)"
        )
