"""The CLI commands that talk to a running platform through its admin API: `iotbiz cmd`.

Standard library only (urllib), so that they work on a device's install too (`pip install
iotbiz`, without the platform's packages). `--url` (default http://127.0.0.1:8080) names the
platform; the admin token is `--token`, else the setting `admin.token` (`IOTBIZ_ADMIN_TOKEN`, or
`[admin] token` in `--config`), else the `admin.token` file the platform wrote beside the store
named by `--db`/`--config`.

Exit codes of `cmd`: 0 every command done; 1 a command failed or expired (or the request was
refused); 3 no final answer within `--wait` seconds (the commands stay queued on the platform and
may still run: `iotbiz cmd` never cancels them).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from iotbiz.admin_token import TOKEN_FILE, read_admin_token, token_path
from iotbiz.errors import ConfigError, IotbizError
from iotbiz.settings import Settings

DEFAULT_URL = "http://127.0.0.1:8080"
REQUEST_TIMEOUT_S = 70.0  # above the longest server-side wait (60 s)
MAX_SERVER_WAIT_S = 60
POLL_S = 0.5
EXIT_FAILED = 1
EXIT_TIMED_OUT = 3
FINAL = ("done", "failed", "expired")


class AdminClient:
    """A small client of the admin API: JSON in and out, errors as IotbizError."""

    def __init__(self, url: str, token: str) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"--url: not an http(s) URL: {url!r}")
        self._url = url.rstrip("/")
        self._token = token

    def request(
        self, method: str, path: str, body: Any = None, *, query: dict[str, Any] | None = None
    ) -> Any:
        url = f"{self._url}{path}"
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(  # noqa: S310 - the operator's own --url, http(s) only
            url,
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {self._token}", "Content-Type": "application/json"},
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=REQUEST_TIMEOUT_S) as response:
                return _json(response.read())
        except urllib.error.HTTPError as exc:
            answer = _json(exc.read())
            exc.close()
            reason = answer.get("error") if isinstance(answer, dict) else None
            raise IotbizError(f"{method} {path}: {exc.code} {reason or exc.reason}") from exc
        except (OSError, ValueError) as exc:
            raise IotbizError(f"cannot reach the platform at {self._url}: {exc}") from exc


def _json(data: bytes) -> Any:
    try:
        return json.loads(data) if data else None
    except ValueError:
        return None


def admin_token(args: argparse.Namespace, settings: Settings) -> str:
    """--token, else the platform's own rule (the setting, else the token file beside the
    store)."""
    if args.token:
        return str(args.token)
    token = read_admin_token(settings)
    if token is None and settings.store.url:
        raise ConfigError(
            "no admin token: give --token, set IOTBIZ_ADMIN_TOKEN, or set admin.token in the"
            " --config file (a platform on a PostgreSQL store has no admin.token file)"
        )
    if token is None:
        raise ConfigError(
            "no admin token: give --token, set IOTBIZ_ADMIN_TOKEN, or point --db/--config at "
            f"the platform's store (its {TOKEN_FILE} is written at the first start; looked in "
            f"{token_path(settings)})"
        )
    return token


# -- iotbiz cmd -----------------------------------------------------------------------------------


def remote_options() -> argparse.ArgumentParser:
    """--url, --token, --json: the options of every command that talks to the admin API."""
    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument("--url", default=DEFAULT_URL, help=f"the platform (default {DEFAULT_URL})")
    remote.add_argument("--token", help="admin token (default: IOTBIZ_ADMIN_TOKEN or admin.token)")
    remote.add_argument("--json", action="store_true", help="print JSON for scripts")
    return remote


def add_parsers(commands: Any, store_opts: argparse.ArgumentParser) -> None:
    remote = remote_options()
    cmd = commands.add_parser(
        "cmd",
        parents=[store_opts, remote],
        help="send a command to devices and print the replies",
        usage="%(prog)s [options] (DEVICE [DEVICE ...] | --customer ID) ACTION",
        description="Send ACTION to one or more devices (or to all of a customer's, --customer) "
        "and wait for the replies. Exit code 0: every command done; 1: failed or expired; 3: no "
        "answer within --wait seconds.",
    )
    cmd.add_argument(
        "targets", nargs="+", metavar="DEVICE", help="CUSTOMER/DEVICE names, then the ACTION"
    )
    cmd.add_argument(
        "--arg", action="append", default=[], metavar="KEY=VALUE", help="an argument (repeatable)"
    )
    cmd.add_argument("--customer", help="send to all of this customer's active devices")
    cmd.add_argument(
        "--tag",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="with --customer: only devices with this tag (repeatable: all must match)",
    )
    cmd.add_argument("--wait", type=float, default=30.0, help="seconds to wait (0: do not wait)")
    cmd.add_argument("--expires", type=float, help="seconds the command may wait for its device")
    cmd.set_defaults(remote=run_cmd)


# Command arguments that are names, always sent as text: `version=1.10` is "1.10", not 1.1.
TEXT_ARGS = frozenset({"app", "name", "version"})


def parse_pairs(pairs: list[str], what: str, *, values_as_json: bool) -> dict[str, Any]:
    """`["k=v", ...]` -> a dict; with values_as_json, `lines=50` gives 50 and `name=web` "web"
    (and the names in TEXT_ARGS stay text whatever they look like)."""
    result: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"{what}: expected KEY=VALUE, got {pair!r}")
        if values_as_json and key not in TEXT_ARGS:
            try:
                result[key] = json.loads(value)
            except ValueError:
                result[key] = value
        else:
            result[key] = value
    return result


def run_cmd(args: argparse.Namespace, settings: Settings) -> int:
    if args.wait < 0:
        raise ConfigError("--wait: must be 0 or more seconds")
    client = AdminClient(args.url, admin_token(args, settings))
    body: dict[str, Any] = {
        "action": args.targets[-1],
        "args": parse_pairs(args.arg, "--arg", values_as_json=True),
    }
    devices = args.targets[:-1]
    if args.customer is not None:
        if devices:
            raise ConfigError("give device names or --customer, not both")
        body["customer_id"] = args.customer
        if args.tag:
            body["tags"] = parse_pairs(args.tag, "--tag", values_as_json=False)
    elif not devices:
        raise ConfigError("name at least one device (CUSTOMER/DEVICE) before the action")
    elif args.tag:
        raise ConfigError("--tag only goes with --customer")
    elif len(devices) == 1:
        body["device"] = devices[0]
    else:
        body["devices"] = devices
    if args.expires is not None:
        body["expires_in_s"] = args.expires
    sent = client.request("POST", "/api/v1/admin/commands", body)
    commands = list(sent["commands"])
    if args.wait > 0:
        commands = _wait_for(client, sent["batch_id"], commands, args.wait)
    return _report(args, commands)


def _wait_for(
    client: AdminClient, batch_id: str, commands: list[dict[str, Any]], wait_s: float
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + wait_s
    if len(commands) == 1:
        command = commands[0]
        while command["state"] not in FINAL and (left := deadline - time.monotonic()) > 0:
            command = client.request(
                "GET",
                f"/api/v1/admin/commands/{urllib.parse.quote(command['id'])}",
                query={"wait": max(0, min(MAX_SERVER_WAIT_S, int(left)))},
            )
            if int(left) == 0:
                break
        return [command]
    by_id = {c["id"]: c for c in commands}
    progress = Progress(len(by_id))
    try:
        while time.monotonic() < deadline:
            cursor = None
            while True:
                page = client.request(
                    "GET",
                    "/api/v1/admin/commands",
                    query={"batch": batch_id, "limit": 1000, "cursor": cursor},
                )
                for command in page["commands"]:
                    if command["id"] in by_id:
                        by_id[command["id"]] = command
                cursor = page.get("next_cursor")
                if not cursor:
                    break
            done = sum(1 for c in by_id.values() if c["state"] in FINAL)
            progress.show(done)
            if done == len(by_id):
                break
            time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))
    finally:
        progress.close()
    return [by_id[c["id"]] for c in commands]


class Progress:
    """`[#####.....] 12/50 answered` on stderr, redrawn in place; only on a terminal."""

    WIDTH = 30

    def __init__(self, total: int, what: str = "answered") -> None:
        self._total = total
        self._what = what
        self._on = sys.stderr.isatty()

    def show(self, done: int) -> None:
        if not self._on:
            return
        filled = self.WIDTH * done // max(1, self._total)
        bar = "#" * filled + "." * (self.WIDTH - filled)
        sys.stderr.write(f"\r[{bar}] {done}/{self._total} {self._what}")
        sys.stderr.flush()

    def close(self) -> None:
        if self._on:
            sys.stderr.write("\n")


def _report(args: argparse.Namespace, commands: list[dict[str, Any]]) -> int:
    states = [c["state"] for c in commands]
    code = 0
    if any(s in ("failed", "expired") for s in states):
        code = EXIT_FAILED
    elif args.wait > 0 and any(s not in FINAL for s in states):
        code = EXIT_TIMED_OUT
    if args.json:
        print(json.dumps(commands[0] if len(commands) == 1 else commands, indent=2))
        return code
    if len(commands) == 1 and args.wait > 0:
        command = commands[0]
        if command["state"] == "done":
            print(json.dumps(command.get("result"), indent=2))
        elif command["state"] in ("failed", "expired"):
            detail = command.get("error") or command["state"]
            print(f"iotbiz: {command['device']}: {command['state']}: {detail}", file=sys.stderr)
        else:
            print(
                f"iotbiz: {command['device']}: no answer within {args.wait:g} s (the command is "
                f"{command['state']}, id {command['id']})",
                file=sys.stderr,
            )
        return code
    rows = [[c["device"], c["state"], _summary(c), c["id"]] for c in commands]
    widths = [
        max(len(r[i]) for r in [["DEVICE", "STATE", "RESULT", "ID"], *rows]) for i in range(4)
    ]
    for row in [["DEVICE", "STATE", "RESULT", "ID"], *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return code


def _summary(command: dict[str, Any]) -> str:
    if command["state"] == "done":
        text = json.dumps(command.get("result"), separators=(",", ":"))
    elif command["state"] in ("failed", "expired"):
        text = str(command.get("error") or "")
    else:
        text = ""
    return text if len(text) <= 60 else text[:57] + "..."
