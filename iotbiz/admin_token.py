"""The admin token's rule, in one place for the platform and the CLI (standard library only, so
that the CLI's client side works on a device's install too).

The token is the setting `admin.token` (TOML `[admin] token`, environment `IOTBIZ_ADMIN_TOKEN`);
when that is empty, the file `admin.token` beside the store file: generated at the first start
(`secrets.token_urlsafe(32)`, mode 0600, created exclusively so that two processes starting at
once agree on one token) and read, never replaced, afterwards. The CLI finds the token of a
platform with `read_admin_token(settings)`, the same rule without creating anything.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from contextlib import suppress
from pathlib import Path

from iotbiz.errors import ConfigError
from iotbiz.settings import Settings

log = logging.getLogger(__name__)

TOKEN_FILE = "admin.token"  # noqa: S105 - a file name
MAX_TOKEN_LENGTH = 512
# A bearer token as RFC 6750 draws it (b64token): what can be sent in the header as it is.
_TOKEN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/=")


def token_path(settings: Settings) -> Path:
    """The generated token's file: `admin.token` in the store file's folder."""
    return settings.store.path.parent / TOKEN_FILE


def read_admin_token(settings: Settings) -> str | None:
    """The admin token of the platform these settings describe: the setting, else the token
    file's content; None when neither exists (the platform never started). Raises ConfigError
    for an unusable token."""
    if settings.admin.token:
        return _checked(settings.admin.token, "admin.token")
    if settings.store.url:
        return None
    path = token_path(settings)
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the admin token from {path}: {exc}") from exc
    _warn_if_readable_by_others(path)
    return _checked(text.strip(), str(path))


def load_or_create_admin_token(settings: Settings) -> str:
    """The admin token (see `read_admin_token`), generating the token file when there is none.
    Blocking file I/O: call it from a thread in async code."""
    existing = read_admin_token(settings)
    if existing is not None:
        return existing
    if settings.store.url:
        raise ConfigError(
            "admin.token: required with a PostgreSQL store (store.url): every platform process"
            " must use the same token, and there is no store folder to generate it into"
        )
    path = token_path(settings)
    token = secrets.token_urlsafe(32)
    if _create_exclusively(path, token):
        log.info("admin token generated in %s", path)
        return token
    found = read_admin_token(settings)  # another process created it first: use its token
    if found is None:
        raise ConfigError(f"admin token file {path} vanished while it was created")
    return found


def _create_exclusively(path: Path, token: str) -> bool:
    """Write `token` to `path` unless the file exists (then False). The file appears whole or not
    at all: written to a temporary file (O_EXCL, 0600), then hard-linked to its name, which
    fails if the name exists."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(descriptor, f"{token}\n".encode("ascii"))
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        try:
            os.link(temporary, path)
        except FileExistsError:
            return False
        return True
    except OSError as exc:
        raise ConfigError(f"cannot write the admin token file {path}: {exc}") from exc
    finally:
        with suppress(FileNotFoundError):
            temporary.unlink()


def _checked(token: str, source: str) -> str:
    if not token or len(token) > MAX_TOKEN_LENGTH or not set(token) <= _TOKEN_CHARS:
        raise ConfigError(
            f"{source}: the admin token must be 1 to {MAX_TOKEN_LENGTH} of"
            " A-Z a-z 0-9 - . _ ~ + / ="
        )
    return token


def _warn_if_readable_by_others(path: Path) -> None:
    with suppress(OSError):
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            log.warning("admin token file %s is readable by others; chmod 600 it", path)
