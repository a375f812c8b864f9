"""The operator CLI: customers and devices, tables and --json, errors and exit codes.

The store commands run on both backends: the SQLite file of `--db`, and a PostgreSQL database
named by `store.url` in a `--config` file (`cli_store`)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from iotbiz.cli import main
from iotbiz.models import PresenceUpdate
from iotbiz.names import DeviceName
from iotbiz.settings import StoreSettings
from iotbiz.store.opening import open_store
from tests.processes import run_cli
from tests.services.postgres import PostgresServer


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


class CLIStore:
    """A store for the CLI to use: `flags` name it on the command line, `settings` open it."""

    def __init__(self, flags: list[str], settings: StoreSettings) -> None:
        self.flags = flags
        self.settings = settings


@pytest.fixture(params=["sqlite", "postgresql"])
def cli_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CLIStore]:
    if request.param == "sqlite":
        db = tmp_path / "iotbiz.db"
        yield CLIStore(["--db", str(db)], StoreSettings(path=db))
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    url = asyncio.run(server.create_database())
    config = tmp_path / "platform.toml"
    config.write_text(f'[store]\nurl = "{url}"\n')
    yield CLIStore(["--config", str(config)], StoreSettings(url=url))
    asyncio.run(server.drop_database(url))


def seed_devices(target: CLIStore) -> None:
    """abc123 has dev-1 active and dev-2 pending; xyz has dev-9 pending."""

    async def seed() -> None:
        store = await open_store(target.settings)
        try:
            for name, state in (("abc123/dev-1", "active"), ("abc123/dev-2", "pending")):
                customer, device = name.split("/")
                if await store.get_customer(customer) is None:
                    await store.add_customer(customer, 10, actor="test")
                await store.register_device(
                    DeviceName(customer, device), b"$2b$06$x", ttl_s=60, actor="test"
                )
                if state == "active":
                    await store.activate_device(
                        DeviceName(customer, device), b"$2b$06$x", actor="test"
                    )
            await store.add_customer("xyz", 1, actor="test")
            await store.register_device(
                DeviceName("xyz", "dev-9"), b"$2b$06$x", ttl_s=60, actor="t"
            )
        finally:
            await store.close()

    asyncio.run(seed())


def test_customers(capsys: pytest.CaptureFixture[str], cli_store: CLIStore) -> None:
    db = cli_store.flags
    code, out, _ = cli(capsys, "customer", "add", "abc123", "--limit", "10", *db)
    assert (code, out) == (0, "customer abc123 added, limit 10\n")
    code, out, _ = cli(capsys, "customer", "add", "xyz", "--limit", "2", *db, "--json")
    assert code == 0
    assert json.loads(out)["device_limit"] == 2
    code, out, _ = cli(capsys, "customer", "set-limit", "xyz", "5", *db)
    assert (code, out) == (0, "customer xyz: limit 5\n")

    code, out, _ = cli(capsys, "customer", "list", *db)
    lines = out.splitlines()
    assert lines[0].split() == ["CUSTOMER", "LIMIT", "ACTIVE", "PENDING", "CREATED"]
    assert [line.split()[:4] for line in lines[1:]] == [
        ["abc123", "10", "0", "0"],
        ["xyz", "5", "0", "0"],
    ]
    code, out, _ = cli(capsys, "customer", "list", *db, "--json")
    assert [c["customer_id"] for c in json.loads(out)] == ["abc123", "xyz"]


def test_customer_errors(capsys: pytest.CaptureFixture[str], cli_store: CLIStore) -> None:
    db = cli_store.flags
    assert cli(capsys, "customer", "add", "abc123", "--limit", "1", *db)[0] == 0
    code, _, err = cli(capsys, "customer", "add", "abc123", "--limit", "1", *db)
    assert (code, err) == (1, "iotbiz: customer abc123 exists already\n")
    code, _, err = cli(capsys, "customer", "set-limit", "nobody", "3", *db)
    assert (code, err) == (1, "iotbiz: no customer nobody\n")
    for bad in (["customer", "add", "a/b", "--limit", "1"], ["customer", "set-limit", "x", "-1"]):
        with pytest.raises(SystemExit) as exited:
            main([*bad, *db])
        assert exited.value.code == 2


def test_devices(capsys: pytest.CaptureFixture[str], cli_store: CLIStore) -> None:
    seed_devices(cli_store)
    db = cli_store.flags
    code, out, _ = cli(capsys, "device", "list", *db)
    lines = out.splitlines()
    assert code == 0
    assert lines[0].split() == [
        "DEVICE",
        "STATE",
        "ONLINE",
        "LAST",
        "SEEN",
        "CPU",
        "MEMORY",
        "APPS",
    ]
    assert [line.split()[:3] for line in lines[1:]] == [
        ["abc123/dev-1", "active", "no"],
        ["abc123/dev-2", "pending", "no"],
        ["xyz/dev-9", "pending", "no"],
    ]
    code, out, _ = cli(capsys, "device", "list", "--customer", "xyz", *db, "--json")
    [device] = json.loads(out)
    for key in ("name", "customer_id", "device_id", "state", "online", "last_seen_at", "telemetry"):
        assert key in device
    assert (device["name"], device["state"], device["online"]) == ("xyz/dev-9", "pending", False)
    assert "password_hash" not in out

    code, out, _ = cli(capsys, "device", "show", "abc123/dev-1", *db)
    assert code == 0
    assert "state:              active" in out
    code, out, _ = cli(capsys, "device", "show", "abc123/dev-1", *db, "--json")
    assert json.loads(out)["state"] == "active"

    code, out, _ = cli(capsys, "device", "revoke", "abc123/dev-1", *db)
    assert (code, out) == (0, "device abc123/dev-1 revoked\n")
    code, out, _ = cli(capsys, "device", "reset", "abc123/dev-1", *db, "--json")
    assert json.loads(out) == {"name": "abc123/dev-1", "previous_state": "revoked", "reset": True}
    code, _, err = cli(capsys, "device", "show", "abc123/dev-1", *db)
    assert (code, err) == (1, "iotbiz: no device abc123/dev-1\n")
    code, _, err = cli(capsys, "device", "revoke", "abc123/dev-1", *db)
    assert (code, err) == (1, "iotbiz: no device abc123/dev-1\n")


def test_device_names_accept_any_mac_notation(
    capsys: pytest.CaptureFixture[str], cli_store: CLIStore
) -> None:
    async def seed() -> None:
        store = await open_store(cli_store.settings)
        await store.add_customer("abc123", 1, actor="test")
        await store.register_device(
            DeviceName("abc123", "44:8a:5b:9c:70:93"), b"$2b$06$x", ttl_s=60, actor="test"
        )
        await store.close()

    asyncio.run(seed())
    code, out, _ = cli(capsys, "device", "show", "abc123/448A5B9C7093", *cli_store.flags)
    assert code == 0
    assert "abc123/44:8a:5b:9c:70:93" in out


def test_config_file_names_the_store(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "platform.toml"
    config.write_text(f"[store]\npath = '{tmp_path / 'from-config.db'}'\n")
    assert cli(capsys, "customer", "add", "abc123", "--limit", "1", "--config", str(config))[0] == 0
    assert (tmp_path / "from-config.db").exists()


def test_the_console_script_runs(tmp_path: Path) -> None:
    db = str(tmp_path / "x.db")
    assert run_cli("customer", "add", "abc123", "--limit", "1", "--db", db).returncode == 0
    result = run_cli("customer", "list", "--db", db, "--json")
    assert (result.returncode, result.stderr) == (0, "")
    assert [c["customer_id"] for c in json.loads(result.stdout)] == ["abc123"]
    result = run_cli("device", "show", "not a name", "--db", str(tmp_path / "x.db"))
    assert result.returncode == 2
    assert "not a device name" in result.stderr


def test_accounts(capsys: pytest.CaptureFixture[str], cli_store: CLIStore) -> None:
    db = cli_store.flags
    code, out, _ = cli(capsys, "account", "add", "ops", *db)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "account ops added (service role); its MQTT password, shown only now:"
    assert len(lines[1]) >= 32
    code, out, _ = cli(capsys, "account", "add", "root", "--superuser", *db, "--json")
    created = json.loads(out)
    assert (created["name"], created["superuser"]) == ("root", True)
    assert created["password"] != lines[1]

    code, out, _ = cli(capsys, "account", "list", *db)
    assert [line.split()[:2] for line in out.splitlines()] == [
        ["ACCOUNT", "ROLE"],
        ["ops", "service"],
        ["root", "superuser"],
    ]
    code, out, _ = cli(capsys, "account", "list", *db, "--json")
    assert "password" not in out

    code, _, err = cli(capsys, "account", "add", "ops", *db)
    assert (code, err) == (1, "iotbiz: account ops exists already\n")
    code, _, err = cli(capsys, "account", "add", "iotbiz-platform", *db)
    assert (code, err) == (1, "iotbiz: iotbiz-platform is the platform's own account name\n")
    with pytest.raises(SystemExit):
        main(["account", "add", "a/b", *db])  # '/' would make it look like a device
    assert cli(capsys, "account", "remove", "ops", *db)[:2] == (0, "account ops removed\n")
    code, _, err = cli(capsys, "account", "remove", "ops", *db)
    assert (code, err) == (1, "iotbiz: no account ops\n")


# Commands that only read or change existing things must not create a store: a mistyped --db
# would otherwise show an empty table, as if the fleet had vanished.
NO_CREATE = [
    ["customer", "list"],
    ["customer", "set-limit", "abc123", "3"],
    ["device", "list"],
    ["device", "show", "abc123/dev-1"],
    ["device", "revoke", "abc123/dev-1"],
    ["device", "reset", "abc123/dev-1"],
    ["account", "list"],
    ["account", "remove", "ops"],
]


@pytest.mark.parametrize("command", NO_CREATE, ids=[" ".join(c[:2]) for c in NO_CREATE])
def test_a_missing_store_is_an_error_and_nothing_is_created(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, command: list[str]
) -> None:
    db = tmp_path / "WRONG" / "PATH" / "iotbiz.db"
    code, out, err = cli(capsys, *command, "--db", str(db))
    assert (code, out) == (1, "")
    assert err == (
        f"iotbiz: no store at {db} (created by `iotbiz serve` or `iotbiz customer add`;"
        " check --db or --config)\n"
    )
    assert not (tmp_path / "WRONG").exists()


def test_a_missing_store_named_by_the_config_is_an_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = tmp_path / "platform.toml"
    config.write_text(f"[store]\npath = '{tmp_path / 'typo' / 'iotbiz.db'}'\n")
    code, _, err = cli(capsys, "device", "list", "--config", str(config))
    assert code == 1
    assert err.startswith(f"iotbiz: no store at {tmp_path / 'typo' / 'iotbiz.db'} ")
    assert not (tmp_path / "typo").exists()


@pytest.mark.parametrize(
    "command",
    [["customer", "add", "abc123", "--limit", "1"], ["account", "add", "ops"]],
    ids=["customer add", "account add"],
)
def test_adding_creates_the_store_before_the_platform_ever_ran(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, command: list[str]
) -> None:
    db = tmp_path / "new" / "iotbiz.db"
    assert cli(capsys, *command, "--db", str(db))[0] == 0
    assert db.is_file()
    assert cli(capsys, "customer", "list", "--db", str(db))[0] == 0


def test_device_tags_filters_telemetry_columns_and_the_audit_log(
    capsys: pytest.CaptureFixture[str], cli_store: CLIStore
) -> None:
    seed_devices(cli_store)
    db = cli_store.flags

    async def report() -> None:
        store = await open_store(cli_store.settings)
        telemetry = {
            "system": {"cpu_percent": 12.4, "memory": {"percent": 41.0}},
            "apps": [{"name": "web", "state": "RUNNING"}, {"name": "db", "state": "FATAL"}],
        }
        await store.record_presence(
            [PresenceUpdate(DeviceName("abc123", "dev-1"), 1.0, online=True, telemetry=telemetry)]
        )
        await store.close()

    asyncio.run(report())
    code, out, _ = cli(capsys, "device", "tag", "abc123/dev-1", "site=berlin", "ring=canary", *db)
    assert (code, out) == (0, "abc123/dev-1: ring=canary site=berlin\n")
    code, out, _ = cli(capsys, "device", "tag", "abc123/dev-1", "ring=", *db, "--json")
    assert json.loads(out) == {"name": "abc123/dev-1", "tags": {"site": "berlin"}}
    code, _, err = cli(capsys, "device", "tag", "abc123/dev-1", "bad key=x", *db)
    assert code == 1
    assert err.startswith("iotbiz: ")
    assert len(err.splitlines()) == 1

    code, out, _ = cli(capsys, "device", "list", "--tag", "site=berlin", *db)
    rows = [line.split() for line in out.splitlines()[1:]]
    assert rows == [
        [
            "abc123/dev-1",
            "active",
            "yes",
            "1970-01-01T00:00:01+00:00",
            "12%",
            "41%",
            "web=RUNNING",
            "db=FATAL",
        ]
    ]
    code, out, _ = cli(capsys, "device", "list", "--tag", "site=paris", *db, "--json")
    assert json.loads(out) == []

    code, out, _ = cli(capsys, "audit", "--subject", "abc123/dev-1", *db, "--json")
    assert [e["action"] for e in json.loads(out)][:2] == ["device.tags", "device.tags"]
    code, out, _ = cli(capsys, "audit", "--limit", "1", *db)
    assert out.splitlines()[0].split() == ["AT", "ACTOR", "ACTION", "SUBJECT", "DETAIL"]
    assert len(out.splitlines()) == 2
    code, out, _ = cli(capsys, "audit", "--limit", "2", *db, "--json")
    first_two = json.loads(out)
    code, out, _ = cli(capsys, "audit", "--before", str(first_two[0]["id"]), *db, "--json")
    assert json.loads(out)[0] == first_two[1]
