"""The operator CLI, `iotbiz`: serve the platform, manage customers and devices.

`account add|list|remove` manage operator MQTT accounts; `release add|list|remove` application
releases for upgrades (`release keygen`: their signing key pair). Store commands work on the store
the settings name (`--config`, `IOTBIZ_CONFIG`, `IOTBIZ_STORE_PATH`, `IOTBIZ_STORE_URL`): the
PostgreSQL database of `store.url` when it is set, else the SQLite file of `--db` or `store.path`;
a running platform may use the same store at the same time.
Tables for people, `--json` for scripts; exit code 0 on success, 1 on failure, 2 on bad usage.

Which commands create the store when it does not exist: `serve`, `customer add` and `account add`
(a new user adds a customer before the platform ever ran, as the README shows). Every other
command only reads or changes what is there already: a missing store is then an error, one line
on stderr naming the path, and nothing is created (a mistyped `--db` must not show an empty
fleet, nor leave a stray folder and database behind).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from iotbiz import __version__, cli_remote, cli_rollouts
from iotbiz.errors import ConfigError, IotbizError, StoreNotFound
from iotbiz.models import Customer, Device, iso_time
from iotbiz.names import DeviceName, is_account_name, is_customer_id, parse_device_name
from iotbiz.settings import Settings, load_settings

if TYPE_CHECKING:
    from iotbiz.store.interface import DeviceStore

# What `pip install iotbiz` leaves out (the agent does not need it): the [platform] extra.
PLATFORM_PACKAGES = frozenset(
    {
        "aiohttp",
        "aiosqlite",
        "amqtt",
        "asyncpg",
        "bcrypt",
        "cryptography",
        "prometheus_client",
        "uvloop",
    }
)

Command = Callable[[argparse.Namespace, "DeviceStore"], Awaitable[None]]


def main(argv: Sequence[str] | None = None, prog: str = "iotbiz") -> int:
    parser = _parser(prog)
    code: int
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        local = getattr(args, "local", None)
        if local is not None:  # needs neither a store nor a running platform
            _check_platform_installed(args.command)
            code = local(args)
            return code
        settings = _settings(args)
        remote = getattr(args, "remote", None)
        if remote is not None:  # talks to a running platform: no platform packages needed
            code = remote(args, settings)
            return code
        _check_platform_installed(args.command)
        if args.command == "serve":
            from iotbiz.platform import run_platform

            _configure_logging(settings.log.level)
            run_platform(settings)
        else:
            logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
            args.settings = settings
            asyncio.run(_with_store(settings, args.run, args))
    except IotbizError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def _check_platform_installed(command: str) -> None:
    """A one-line error, not a traceback, when a command needs the [platform] extra that a
    device's install (`pip install iotbiz`: the agent only) leaves out."""
    try:
        import iotbiz.platform  # noqa: F401 - imports every platform dependency
    except ModuleNotFoundError as exc:
        if exc.name not in PLATFORM_PACKAGES:
            raise
        raise ConfigError(
            f"`{command}` needs the platform, which this install lacks ({exc.name} is missing):"
            " pip install 'iotbiz[platform]'"
        ) from exc


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        # One line per HTTP request: thousands a second while a fleet enrolls; DEBUG shows them.
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
        # amqtt's state machines narrate every transition at INFO.
        logging.getLogger("transitions").setLevel(logging.WARNING)
        # ... and its broker two lines per connection ("Connection from", "N connections
        # acquired"): 57,000 lines for a 5,000-device connect storm. The platform logs its own
        # listeners and sums up refused logins.
        logging.getLogger("amqtt.broker").setLevel(logging.WARNING)


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, dict[str, Any]] = {}
    if args.db is not None:
        overrides["store"] = {"path": args.db}
    if args.command == "serve":
        if args.host is not None:
            overrides["http"] = {"host": args.host}
            overrides["mqtt"] = {"host": args.host}
        if args.http_port is not None:
            overrides.setdefault("http", {})["port"] = args.http_port
        if args.mqtt_port is not None:
            overrides.setdefault("mqtt", {})["port"] = args.mqtt_port
        if args.mqtts_port is not None:
            overrides.setdefault("mqtt", {})["mqtts_port"] = args.mqtts_port
        if args.tls_cert is not None:
            overrides["tls"] = {"cert_file": str(args.tls_cert)}
        if args.tls_key is not None:
            overrides.setdefault("tls", {})["key_file"] = str(args.tls_key)
        if args.log_level is not None:
            overrides["log"] = {"level": args.log_level}
        if args.broker is not None:
            overrides["broker"] = {"mode": args.broker}
        if args.broker_url is not None:
            overrides.setdefault("broker", {})["url"] = args.broker_url
    return load_settings(args.config, overrides=overrides)


async def _with_store(settings: Settings, run: Command, args: argparse.Namespace) -> None:
    from iotbiz.store.opening import open_store

    try:
        store = await open_store(settings.store, create=args.creates_store)
    except StoreNotFound as exc:
        raise StoreNotFound(
            f"no store at {settings.store.path} (created by `iotbiz serve` or `iotbiz customer"
            " add`; check --db or --config)"
        ) from exc
    try:
        await run(args, store)
    finally:
        await store.close()


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no name for this uid (e.g. in a container)
        return f"cli:uid{os.getuid()}"


# -- commands -------------------------------------------------------------------------------------


async def _customer_add(args: argparse.Namespace, store: DeviceStore) -> None:
    customer = await store.add_customer(args.customer_id, args.limit, actor=_actor())
    _emit(args, customer.to_json(), f"customer {customer.customer_id} added, limit {args.limit}")


async def _customer_list(args: argparse.Namespace, store: DeviceStore) -> None:
    customers = await store.list_customers()
    if args.json:
        _print_json([c.to_json() for c in customers])
        return
    _print_table(
        ["CUSTOMER", "LIMIT", "ACTIVE", "PENDING", "CREATED"],
        [_customer_row(c) for c in customers],
    )


def _customer_row(c: Customer) -> list[str]:
    created = iso_time(c.created_at) or ""
    return [
        c.customer_id,
        str(c.device_limit),
        str(c.active_devices),
        str(c.pending_devices),
        created,
    ]


async def _customer_set_limit(args: argparse.Namespace, store: DeviceStore) -> None:
    await store.set_device_limit(args.customer_id, args.limit, actor=_actor())
    customer = await store.get_customer(args.customer_id)
    assert customer is not None  # noqa: S101 - updated just now
    _emit(args, customer.to_json(), f"customer {args.customer_id}: limit {args.limit}")


async def _device_list(args: argparse.Namespace, store: DeviceStore) -> None:
    tags = dict(args.tag) if args.tag else None
    devices: list[Device] = []
    after = None
    while True:  # every page (the store pages by 1,000 at most)
        page, _total = await store.find_devices(
            customer_id=args.customer, tags=tags, limit=1000, after=after
        )
        devices += page
        if len(page) < 1000:
            break
        after = DeviceName(page[-1].customer_id, page[-1].device_id)
    if args.json:
        _print_json([d.to_json() for d in devices])
        return
    _print_table(
        ["DEVICE", "STATE", "ONLINE", "LAST SEEN", "CPU", "MEMORY", "APPS"],
        [_device_row(d) for d in devices],
    )


def _device_row(d: Device) -> list[str]:
    online = "yes" if d.online else "no"
    telemetry: dict[str, Any] = d.telemetry if isinstance(d.telemetry, dict) else {}
    system = _object(telemetry.get("system"))
    cpu = system.get("cpu_percent")
    memory = _object(system.get("memory")).get("percent")
    apps = telemetry.get("apps")
    states = [
        f"{app.get('name')}={app.get('state')}"
        for app in (apps if isinstance(apps, list) else [])
        if isinstance(app, dict)
    ]
    return [
        d.name,
        d.state.value,
        online,
        iso_time(d.last_seen_at) or "-",
        f"{cpu:.0f}%" if isinstance(cpu, int | float) else "-",
        f"{memory:.0f}%" if isinstance(memory, int | float) else "-",
        " ".join(states) or "-",
    ]


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


async def _device_show(args: argparse.Namespace, store: DeviceStore) -> None:
    device = await store.get_device(args.name)
    if device is None:
        raise IotbizError(f"no device {args.name}")
    if args.json:
        _print_json(device.to_json())
        return
    for key, value in device.to_json().items():
        if isinstance(value, dict | list):
            value = json.dumps(value, sort_keys=True)
        print(f"{key + ':':<20}{'-' if value is None else value}")


async def _device_revoke(args: argparse.Namespace, store: DeviceStore) -> None:
    device = await store.revoke_device(args.name, actor=_actor())
    _emit(args, device.to_json(), f"device {device.name} revoked")


async def _device_reset(args: argparse.Namespace, store: DeviceStore) -> None:
    device = await store.reset_device(args.name, actor=_actor())
    _emit(
        args,
        {"name": device.name, "reset": True, "previous_state": device.state.value},
        f"device {device.name} reset ({device.state.value} before); it may register again",
    )


async def _device_tag(args: argparse.Namespace, store: DeviceStore) -> None:
    changes: dict[str, str | None] = {key: (value or None) for key, value in args.changes}
    try:
        tags = await store.set_tags(args.name, changes, actor=_actor())
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    text = " ".join(f"{k}={v}" for k, v in sorted(tags.items())) or "(no tags)"
    _emit(args, {"name": str(args.name), "tags": tags}, f"{args.name}: {text}")


async def _audit(args: argparse.Namespace, store: DeviceStore) -> None:
    entries = await store.audit_entries(subject=args.subject, limit=args.limit, before=args.before)
    if args.json:
        _print_json([e.to_json() for e in entries])
        return
    _print_table(
        ["AT", "ACTOR", "ACTION", "SUBJECT", "DETAIL"],
        [
            [
                iso_time(e.at) or "",
                e.actor,
                e.action,
                e.subject,
                json.dumps(e.detail, sort_keys=True) if e.detail else "",
            ]
            for e in entries
        ],
    )


async def _account_add(args: argparse.Namespace, store: DeviceStore) -> None:
    from iotbiz.passwords import PasswordHasher, generate_password
    from iotbiz.platform import SERVICE_USERNAME

    if args.name == SERVICE_USERNAME:
        raise IotbizError(f"{SERVICE_USERNAME} is the platform's own account name")
    password = generate_password()
    settings: Settings = args.settings
    hasher = PasswordHasher(settings.registrar.bcrypt_cost, threads=1)
    try:
        password_hash = await hasher.hash(password)
    finally:
        hasher.close()
    account = await store.add_account(
        args.name, password_hash, superuser=args.superuser, actor=_actor()
    )
    role = "superuser" if account.superuser else "service role"
    _emit(
        args,
        {**account.to_json(), "password": password},
        f"account {account.name} added ({role}); its MQTT password, shown only now:\n{password}",
    )


async def _account_list(args: argparse.Namespace, store: DeviceStore) -> None:
    accounts = await store.list_accounts()
    if args.json:
        _print_json([a.to_json() for a in accounts])
        return
    _print_table(
        ["ACCOUNT", "ROLE", "CREATED"],
        [
            [a.name, "superuser" if a.superuser else "service", iso_time(a.created_at) or ""]
            for a in accounts
        ],
    )


async def _account_remove(args: argparse.Namespace, store: DeviceStore) -> None:
    await store.remove_account(args.name, actor=_actor())
    _emit(args, {"name": args.name, "removed": True}, f"account {args.name} removed")


async def _release_add(args: argparse.Namespace, store: DeviceStore) -> None:
    from iotbiz import releases

    settings: Settings = args.settings
    release = await releases.add_release(
        store, settings, args.app, args.version, args.file, actor=_actor()
    )
    signed = "signed" if release.signature else "unsigned"
    _emit(
        args,
        release.to_json(),
        f"release {release.app} {release.version} added ({release.size} bytes, {signed},"
        f" sha256 {release.sha256})",
    )


async def _release_list(args: argparse.Namespace, store: DeviceStore) -> None:
    found = await store.list_releases(app=args.app)
    if args.json:
        _print_json([r.to_json() for r in found])
        return
    _print_table(
        ["APP", "VERSION", "SIZE", "SIGNED", "SHA256", "CREATED"],
        [
            [
                r.app,
                r.version,
                str(r.size),
                "yes" if r.signature else "no",
                r.sha256[:16],
                iso_time(r.created_at) or "",
            ]
            for r in found
        ],
    )


async def _release_remove(args: argparse.Namespace, store: DeviceStore) -> None:
    from iotbiz import releases

    release = await releases.remove_release(
        store, args.settings, args.app, args.version, actor=_actor()
    )
    _emit(
        args,
        {"app": release.app, "version": release.version, "removed": True},
        f"release {release.app} {release.version} removed",
    )


def _release_keygen(args: argparse.Namespace) -> int:
    from iotbiz.releases import keygen

    private, public = keygen(args.dir)
    if args.json:
        _print_json({"private_key": str(private), "public_key": str(public)})
        return 0
    print(f"wrote {private} (mode 0600: keep it on the platform) and {public}")
    print()
    print("# the platform's settings (TOML):")
    print("[releases]")
    print(f'signing_key_file = "{private.resolve()}"')
    print()
    print("# the agent's settings (where you copy the public key on the device):")
    print(f'release_public_key = "/etc/iotbiz/{public.name}"')
    return 0


# -- output ---------------------------------------------------------------------------------------


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    if args.json:
        _print_json(data)
    else:
        print(text)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def _print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]
    for row in [headers, *rows]:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


# -- argument parsing -----------------------------------------------------------------------------


def _customer_id(text: str) -> str:
    if not is_customer_id(text):
        raise argparse.ArgumentTypeError(f"not a valid customer id: {text!r}")
    return text


def _device_name(text: str) -> DeviceName:
    name = parse_device_name(text)
    if name is None:
        raise argparse.ArgumentTypeError(f"not a device name CUSTOMER/DEVICE: {text!r}")
    return name


def _account_name(text: str) -> str:
    if not is_account_name(text):
        raise argparse.ArgumentTypeError(
            f"not a valid account name (1 to 64 of A-Z a-z 0-9 _ . -): {text!r}"
        )
    return text


def _tag(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"not KEY=VALUE: {text!r}")
    return key, value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"not a whole number >= 0: {text!r}")
    return value


def _port(text: str) -> int:
    value = _count(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {text!r}")
    return value


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="IoTBiz platform and operator CLI")
    parser.add_argument("--version", action="version", version=f"iotbiz {__version__}")
    store_opts = argparse.ArgumentParser(add_help=False)
    store_opts.add_argument("--config", type=Path, help="platform TOML file (or IOTBIZ_CONFIG)")
    store_opts.add_argument("--db", type=Path, help="SQLite store file (overrides store.path)")
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--json", action="store_true", help="print JSON for scripts")
    parser.set_defaults(creates_store=False)  # see the module docstring
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve_cmd = commands.add_parser(
        "serve", parents=[store_opts], help="run the platform (same as python -m iotbiz.broker)"
    )
    serve_cmd.add_argument("--host", help="address to listen on for HTTP and MQTT")
    serve_cmd.add_argument("--http-port", type=_port, help="registrar port (default 8080)")
    serve_cmd.add_argument(
        "--mqtt-port", type=_port, help="plain MQTT port (default 1883; with TLS: allow_plain)"
    )
    serve_cmd.add_argument(
        "--mqtts-port", type=_port, help="MQTT over TLS port (default 8883; with TLS on)"
    )
    serve_cmd.add_argument(
        "--tls-cert", type=Path, help="PEM certificate chain: TLS on both doors (tls.cert_file)"
    )
    serve_cmd.add_argument("--tls-key", type=Path, help="PEM key of --tls-cert (tls.key_file)")
    serve_cmd.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    serve_cmd.add_argument(
        "--broker",
        metavar="{embedded,external}",
        help="embedded: run the platform's own MQTT broker (default); external: none, use the"
        " broker at --broker-url (broker.mode)",
    )
    serve_cmd.add_argument(
        "--broker-url",
        metavar="URL",
        help="the external broker, mqtt://HOST:PORT or mqtts://HOST:PORT (broker.url)",
    )

    customer = commands.add_parser("customer", help="customers and their device limits")
    customer_cmds = customer.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = customer_cmds.add_parser("add", parents=[store_opts, output], help="add a customer")
    add.add_argument("customer_id", metavar="ID", type=_customer_id)
    add.add_argument("--limit", type=_count, required=True, help="how many devices it may have")
    add.set_defaults(run=_customer_add, creates_store=True)
    listing = customer_cmds.add_parser("list", parents=[store_opts, output], help="list customers")
    listing.set_defaults(run=_customer_list)
    set_limit = customer_cmds.add_parser(
        "set-limit", parents=[store_opts, output], help="change a customer's device limit"
    )
    set_limit.add_argument("customer_id", metavar="ID", type=_customer_id)
    set_limit.add_argument("limit", metavar="N", type=_count)
    set_limit.set_defaults(run=_customer_set_limit)

    device = commands.add_parser("device", help="devices")
    device_cmds = device.add_subparsers(dest="action", metavar="ACTION", required=True)
    dev_list = device_cmds.add_parser("list", parents=[store_opts, output], help="list devices")
    dev_list.add_argument("--customer", type=_customer_id, help="only this customer's devices")
    dev_list.add_argument(
        "--tag", type=_tag, action="append", metavar="KEY=VALUE", help="only devices with this tag"
    )
    dev_list.set_defaults(run=_device_list)
    dev_tag = device_cmds.add_parser(
        "tag", parents=[store_opts, output], help="set (KEY=VALUE) or remove (KEY=) device tags"
    )
    dev_tag.add_argument("name", metavar="NAME", type=_device_name, help="CUSTOMER/DEVICE")
    dev_tag.add_argument("changes", metavar="KEY=VALUE", type=_tag, nargs="+")
    dev_tag.set_defaults(run=_device_tag)
    for action, run, text in (
        ("show", _device_show, "show one device"),
        ("revoke", _device_revoke, "revoke a device: it can never connect or register again"),
        ("reset", _device_reset, "forget a device so that it may register again"),
    ):
        sub = device_cmds.add_parser(action, parents=[store_opts, output], help=text)
        sub.add_argument("name", metavar="NAME", type=_device_name, help="CUSTOMER/DEVICE")
        sub.set_defaults(run=run)

    account = commands.add_parser("account", help="operator accounts for MQTT")
    account_cmds = account.add_subparsers(dest="action", metavar="ACTION", required=True)
    acc_add = account_cmds.add_parser(
        "add", parents=[store_opts, output], help="add an account; prints its password once"
    )
    acc_add.add_argument("name", metavar="NAME", type=_account_name)
    acc_add.add_argument(
        "--superuser", action="store_true", help="any client id and topic (bridges, test suites)"
    )
    acc_add.set_defaults(run=_account_add, creates_store=True)
    acc_list = account_cmds.add_parser("list", parents=[store_opts, output], help="list accounts")
    acc_list.set_defaults(run=_account_list)
    acc_remove = account_cmds.add_parser(
        "remove", parents=[store_opts, output], help="remove an account (disconnects it)"
    )
    acc_remove.add_argument("name", metavar="NAME", type=_account_name)
    acc_remove.set_defaults(run=_account_remove)

    audit = commands.add_parser(
        "audit", parents=[store_opts, output], help="the audit log, newest first"
    )
    audit.add_argument("--subject", help="only entries about this customer, device or account")
    audit.add_argument("--limit", type=_count, default=50, help="how many entries (default 50)")
    audit.add_argument(
        "--before", type=_count, help="only entries older than this id (the next page)"
    )
    audit.set_defaults(run=_audit)

    _release_parsers(commands, store_opts, output)

    tls = commands.add_parser("tls", help="TLS certificates for a self-hosted platform")
    tls_cmds = tls.add_subparsers(dest="tls_command", metavar="COMMAND", required=True)
    tls_init = tls_cmds.add_parser(
        "init",
        help="make a private CA and a server certificate",
        description="Make a private CA and a server certificate in DIR (keys mode 0600), and "
        "print the platform's and the agent's settings. Run again to issue a new server "
        "certificate from the same CA.",
    )
    tls_init.add_argument("--dir", type=Path, required=True, help="folder for the files")
    tls_init.add_argument("--host", required=True, help="the platform's host name (DNS)")
    tls_init.add_argument(
        "--ip", action="append", default=[], help="an IP address devices use too (repeatable)"
    )
    tls_init.set_defaults(local=_tls_init)

    cli_remote.add_parsers(commands, store_opts)
    cli_rollouts.add_parsers(commands, store_opts)
    return parser


def _release_parsers(
    commands: Any, store_opts: argparse.ArgumentParser, output: argparse.ArgumentParser
) -> None:
    release = commands.add_parser("release", help="application releases for upgrades")
    release_cmds = release.add_subparsers(dest="action", metavar="ACTION", required=True)
    rel_add = release_cmds.add_parser(
        "add",
        parents=[store_opts, output],
        help="store a release artifact (.tar.gz), signed with releases.signing_key_file if set",
    )
    rel_add.add_argument("--app", required=True, help="the app's name, as in the agent's [[apps]]")
    rel_add.add_argument("--version", required=True, help="the release's version")
    rel_add.add_argument("file", metavar="FILE.tar.gz", type=Path)
    rel_add.set_defaults(run=_release_add)
    rel_list = release_cmds.add_parser("list", parents=[store_opts, output], help="list releases")
    rel_list.add_argument("--app", help="only this app's releases")
    rel_list.set_defaults(run=_release_list)
    rel_remove = release_cmds.add_parser(
        "remove", parents=[store_opts, output], help="remove a release and its artifact"
    )
    rel_remove.add_argument("app", metavar="APP")
    rel_remove.add_argument("version", metavar="VERSION")
    rel_remove.set_defaults(run=_release_remove)
    rel_keygen = release_cmds.add_parser(
        "keygen",
        parents=[output],
        help="write an Ed25519 key pair for signing releases",
        description="Write release-signing.key (mode 0600: the platform's "
        "releases.signing_key_file) and release-signing.pub (the agents' release_public_key) "
        "into DIR. An existing key is never replaced.",
    )
    rel_keygen.add_argument("--dir", type=Path, required=True, help="folder for the files")
    rel_keygen.set_defaults(local=_release_keygen)


def _tls_init(args: argparse.Namespace) -> int:
    from iotbiz.tls_init import init_tls

    issued = init_tls(args.dir, args.host, args.ip)
    ca = "made a new private CA" if issued.new_ca else "kept the private CA"
    host = args.host
    print(f"{ca}: {issued.ca_cert} (give this file to every device)")
    print(f"issued a server certificate for {', '.join([host, *args.ip])}: {issued.server_cert}")
    print()
    print("# the platform's settings (TOML), or --tls-cert/--tls-key:")
    print("[tls]")
    print(f'cert_file = "{issued.server_cert.resolve()}"')
    print(f'key_file = "{issued.server_key.resolve()}"')
    print()
    print("# the agent's settings (ca_file: where you copy ca.crt on the device):")
    print(f'registrar_url = "https://{host}:8080"')
    print(f'broker_url = "mqtts://{host}:8883"')
    print('ca_file = "/etc/iotbiz/ca.crt"')
    return 0
