"""`iotbiz rollout start|status|list|abort`: staged rollouts through the admin API (like
`iotbiz cmd`: standard library only, --url/--token, --json for scripts).

Exit codes: 0 ok (with --wait: the rollout completed); 1 it ended stopped or aborted, or the
request was refused; 2 usage.
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.parse
from typing import Any

from iotbiz.cli_remote import (
    POLL_S,
    AdminClient,
    Progress,
    admin_token,
    parse_pairs,
    remote_options,
)
from iotbiz.errors import ConfigError
from iotbiz.settings import Settings

ROLLOUTS = "/api/v1/admin/rollouts"
EXIT_NOT_COMPLETED = 1
DONE = ("committed", "failed", "skipped")


def add_parsers(commands: Any, store_opts: argparse.ArgumentParser) -> None:
    remote = remote_options()
    rollout = commands.add_parser(
        "rollout",
        help="staged rollouts of a release to devices, batch after batch",
        description="Roll a release out to devices in batches: the next batch starts when every "
        "device of the one before has its result; more failures than --max-failures stop it.",
    )
    actions = rollout.add_subparsers(dest="rollout_action", metavar="ACTION", required=True)
    start = actions.add_parser(
        "start",
        parents=[store_opts, remote],
        help="start a rollout",
        usage="%(prog)s [options] APP VERSION (--devices NAME [NAME ...] | --customer ID)",
    )
    start.add_argument("app", metavar="APP")
    start.add_argument("version", metavar="VERSION")
    start.add_argument(
        "--devices", nargs="+", metavar="NAME", help="CUSTOMER/DEVICE names (or comma-separated)"
    )
    start.add_argument("--customer", help="all of this customer's active devices")
    start.add_argument(
        "--tag",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="with --customer: only devices with this tag (repeatable: all must match)",
    )
    start.add_argument("--batch", type=int, help="devices per batch (default rollouts.batch_size)")
    start.add_argument("--max-failures", type=int, help="failures tolerated (default 0)")
    start.add_argument("--force", action="store_true", help="update even to the same version")
    start.add_argument(
        "--timeout", type=float, help="seconds each device has (default rollouts.device_timeout_s)"
    )
    start.add_argument("--wait", action="store_true", help="show its progress until it ends")
    start.set_defaults(remote=run_start)
    status = actions.add_parser(
        "status", parents=[store_opts, remote], help="a rollout's progress and failed devices"
    )
    status.add_argument("rollout_id", metavar="ID")
    status.add_argument("--wait", action="store_true", help="show its progress until it ends")
    status.set_defaults(remote=run_status)
    listing = actions.add_parser(
        "list", parents=[store_opts, remote], help="rollouts, newest first"
    )
    listing.add_argument("--limit", type=int, default=100, help="how many (default 100)")
    listing.set_defaults(remote=run_list)
    abort = actions.add_parser("abort", parents=[store_opts, remote], help="abort a rollout")
    abort.add_argument("rollout_id", metavar="ID")
    abort.set_defaults(remote=run_abort)


def _client(args: argparse.Namespace, settings: Settings) -> AdminClient:
    return AdminClient(args.url, admin_token(args, settings))


def run_start(args: argparse.Namespace, settings: Settings) -> int:
    body: dict[str, Any] = {"app": args.app, "version": args.version}
    if (args.devices is None) == (args.customer is None):
        raise ConfigError("give --devices or --customer (one of them)")
    if args.devices is not None:
        body["devices"] = [n for item in args.devices for n in item.split(",") if n]
        if args.tag:
            raise ConfigError("--tag only goes with --customer")
    else:
        body["customer_id"] = args.customer
        if args.tag:
            body["tags"] = parse_pairs(args.tag, "--tag", values_as_json=False)
    for key, value in (
        ("batch_size", args.batch),
        ("max_failures", args.max_failures),
        ("timeout_s", args.timeout),
    ):
        if value is not None:
            body[key] = value
    if args.force:
        body["force"] = True
    client = _client(args, settings)
    rollout = client.request("POST", ROLLOUTS, body)
    if not args.json:
        print(f"rollout {rollout['id']}: {_summary(rollout)}")
    if args.wait:
        rollout = _wait(client, rollout)
    return _report(args, client, rollout, final=args.wait)


def run_status(args: argparse.Namespace, settings: Settings) -> int:
    client = _client(args, settings)
    rollout = _get(client, args.rollout_id)
    if args.wait:
        rollout = _wait(client, rollout)
    return _report(args, client, rollout, final=args.wait)


def run_list(args: argparse.Namespace, settings: Settings) -> int:
    client = _client(args, settings)
    page = client.request("GET", ROLLOUTS, query={"limit": args.limit})
    rollouts = page["rollouts"]
    if args.json:
        print(json.dumps(rollouts, indent=2))
        return 0
    for rollout in rollouts:
        print(f"{rollout['id']}  {rollout['app']} {rollout['version']}  {_summary(rollout)}")
    return 0


def run_abort(args: argparse.Namespace, settings: Settings) -> int:
    client = _client(args, settings)
    rollout = client.request("POST", f"{ROLLOUTS}/{_quoted(args.rollout_id)}/abort", {})
    if args.json:
        print(json.dumps(rollout, indent=2))
    else:
        print(f"rollout {rollout['id']}: {_summary(rollout)}")
    return 0


def _quoted(rollout_id: str) -> str:
    return urllib.parse.quote(rollout_id, safe="")


def _get(client: AdminClient, rollout_id: str) -> dict[str, Any]:
    return dict(client.request("GET", f"{ROLLOUTS}/{_quoted(rollout_id)}"))


def _wait(client: AdminClient, rollout: dict[str, Any]) -> dict[str, Any]:
    """Poll until the rollout has ended and every device has its result (no time limit: each
    device's update expires after the rollout's timeout_s, so it does end; Ctrl-C stops
    watching, not the rollout)."""
    progress = Progress(rollout["total"], "devices done")
    try:
        while True:
            progress.show(sum(rollout[result] for result in DONE))
            if rollout["state"] != "running" and not rollout["updating"]:
                return rollout
            time.sleep(POLL_S)
            rollout = _get(client, rollout["id"])
    finally:
        progress.close()


def _summary(rollout: dict[str, Any]) -> str:
    text = (
        f"{rollout['state']}, batch {rollout['batch'] + 1}/{rollout['batches']};"
        f" {rollout['total']} devices: {rollout['committed']} committed, {rollout['failed']}"
        f" failed, {rollout['updating']} updating, {rollout['waiting']} waiting,"
        f" {rollout['skipped']} skipped"
    )
    if rollout.get("reason"):
        text += f" ({rollout['reason']})"
    return text


def _report(
    args: argparse.Namespace, client: AdminClient, rollout: dict[str, Any], *, final: bool
) -> int:
    code = 0
    if final or rollout["state"] != "running":
        code = 0 if rollout["state"] == "completed" else EXIT_NOT_COMPLETED
    if args.json:
        print(json.dumps(_get(client, rollout["id"]), indent=2))
        return code
    if args.rollout_action == "start" and not final:
        return code
    shown = _get(client, rollout["id"])
    print(f"rollout {shown['id']}: {shown['app']} {shown['version']}: {_summary(shown)}")
    for device in shown["devices"]:
        if device["result"] == "failed":
            print(f"  {device['name']}: failed: {device['reason']}")
    return code
