"""Settings: precedence, validation, and documentation of every setting."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iotbiz import cli
from iotbiz.errors import ConfigError
from iotbiz.settings import (
    BrokerEndpoint,
    Settings,
    broker_endpoint,
    describe,
    describe_agent,
    load_agent_settings,
    load_settings,
)

EXAMPLE = Path(__file__).parent.parent / "config" / "iotbiz.example.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "platform.toml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    settings = load_settings(None, environ={})
    assert settings == Settings()
    assert settings.http.port == 8080
    assert settings.mqtt.port == 1883
    assert settings.store.path == Path("iotbiz.db")


def test_precedence_defaults_toml_environment_flags(tmp_path: Path) -> None:
    config = write(tmp_path, "[http]\nport = 9001\nhost = '0.0.0.0'\n[mqtt]\nport = 9002\n")
    settings = load_settings(config, environ={})
    assert (settings.http.port, settings.http.host, settings.mqtt.port) == (9001, "0.0.0.0", 9002)

    environ = {"IOTBIZ_HTTP_PORT": "9101", "IOTBIZ_REGISTRAR_PENDING_TTL_S": "60"}
    settings = load_settings(config, environ=environ)
    assert (settings.http.port, settings.mqtt.port) == (9101, 9002)
    assert settings.registrar.pending_ttl_s == 60.0

    settings = load_settings(config, environ=environ, overrides={"http": {"port": 9201}})
    assert settings.http.port == 9201
    assert settings.http.host == "0.0.0.0"


def test_config_file_from_environment(tmp_path: Path) -> None:
    config = write(tmp_path, "[store]\npath = 'elsewhere.db'\n")
    settings = load_settings(None, environ={"IOTBIZ_CONFIG": str(config)})
    assert settings.store.path == Path("elsewhere.db")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[http]\nprot = 1\n", "unknown setting http.prot in"),
        ("[htpp]\nport = 1\n", "unknown setting section [htpp] in"),
        ("http = 5\n", "http: must be a table of settings in"),
        ("[http]\nport = '80'\n", "http.port: expected an integer, got '80'"),
        ("[http]\nport = true\n", "http.port: expected an integer, got True"),
        ("[http]\nport = 70000\n", "http.port: must be at most 65535, got 70000"),
        ("[registrar]\nbcrypt_cost = 3\n", "registrar.bcrypt_cost: must be at least 4, got 3"),
        ("[registrar]\npending_ttl_s = 'x'\n", "registrar.pending_ttl_s: expected a number"),
        ("[store]\npath = 5\n", "store.path: expected a path, got 5"),
        ("[log]\nlevel = 'LOUD'\n", "log.level: must be one of"),
        (
            "[store]\nurl = 'mysql://x/y'\n",
            "store.url: must start with postgresql:// (or be empty: SQLite)",
        ),
        ("[http\n", "config file "),
    ],
)
def test_bad_config_files_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        load_settings(write(tmp_path, text), environ={})


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"IOTBIZ_HTTP_PROT": "1"}, "unknown setting http.prot in environment"),
        ({"IOTBIZ_NOPE": "1"}, "unknown setting in environment: IOTBIZ_NOPE"),
        ({"IOTBIZ_HTTP_PORT": "eighty"}, "http.port: expected an integer, got 'eighty'"),
        ({"IOTBIZ_HTTP_PORT": "-1"}, "http.port: must be at least 0, got -1"),
    ],
)
def test_bad_environment_names_the_key(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        load_settings(None, environ=environ)


def test_agent_variables_are_not_the_platforms() -> None:
    assert load_settings(None, environ={"IOTBIZ_AGENT_STATE_DIR": "/x"}) == Settings()


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "missing.toml", environ={})


def test_every_setting_is_documented_in_the_example() -> None:
    """The example file names every setting with its default and help (and nothing else)."""
    text = EXAMPLE.read_text()
    example = tomllib.loads(text)
    declared = {(section, key) for section, key, _, _ in describe()}
    in_example = {(section, key) for section, values in example.items() for key in values}
    assert in_example == declared
    for section, key, default, help_text in describe():
        assert example[section][key] == (str(default) if isinstance(default, Path) else default)
        assert help_text in text, f"{section}.{key}: help missing from {EXAMPLE.name}"
    assert load_settings(EXAMPLE, environ={}) == Settings()


AGENT_EXAMPLE = Path(__file__).parent.parent / "config" / "agent.example.toml"


def test_every_agent_setting_is_documented_in_the_example() -> None:
    text = AGENT_EXAMPLE.read_text()
    for table, key, _, help_text in describe_agent():
        assert help_text in text, f"{table or 'top level'}.{key}: help missing"
        written = f"[[{key}]]" if key in ("apps", "health") and not table else f"{key} = "
        if key == "health":
            written = "[apps.health]"
        assert written in text, f"{table or 'top level'}.{key}: not in the example"
    settings = load_agent_settings(AGENT_EXAMPLE, environ={})
    assert settings.customer_id == "abc123"
    [app] = settings.apps
    assert app.health is not None
    assert app.health.http == "http://127.0.0.1:8000/"


def write_agent(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text('customer_id = "abc123"\n' + text)
    return path


def test_agent_precedence(tmp_path: Path) -> None:
    config = write_agent(tmp_path, "telemetry_interval_s = 5\nkeepalive_s = 20\n")
    settings = load_agent_settings(
        config,
        environ={"IOTBIZ_AGENT_TELEMETRY_INTERVAL_S": "7", "IOTBIZ_HTTP_PORT": "not mine"},
        overrides={"keepalive_s": 40},
    )
    assert (settings.telemetry_interval_s, settings.keepalive_s) == (7.0, 40)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("colour = 1\n", "unknown setting colour in"),
        ("keepalive_s = 'x'\n", "keepalive_s: expected an integer, got 'x'"),
        ("[[apps]]\nname = 'a'\n", "apps[0].command: required"),
        ("[[apps]]\ncommand = ['x']\n", "apps[0].name: must be 1 to 64"),
        ("[[apps]]\nname = 'a/b'\ncommand = ['x']\n", "apps[0].name: must be 1 to 64"),
        ("[[apps]]\nname = 'a'\ncommand = 'x'\n", "apps[0].command: expected a non-empty list"),
        ("[[apps]]\nname = 'a'\ncommand = ['x']\nrestart = 'sometimes'\n", "apps[0].restart"),
        (
            "[[apps]]\nname = 'a'\ncommand = ['x']\n[[apps]]\nname = 'a'\ncommand = ['y']\n",
            "apps[1].name: 'a' is used twice",
        ),
        ("[[apps]]\nname = 'a'\ncommand = ['x']\nhealth = {}\n", "apps[0].health: give exactly"),
        (
            "[[apps]]\nname = 'a'\ncommand = ['x']\nhealth = {http = 'u', command = ['c']}\n",
            "apps[0].health: give exactly",
        ),
        ("[[apps]]\nname = 'a'\ncommand = ['x']\nsize = 1\n", "unknown setting apps[0].size"),
        ("[[apps]]\nname = 'a'\ncommand = ['x']\nenv = {A = 1}\n", "apps[0].env: expected a table"),
        ("apps = 5\n", "apps: must be an array of tables"),
        ("broker_url = 'http://x'\n", "broker_url: must start with mqtt://"),
        ("registrar_url = 'ftp://x'\n", "registrar_url: must start with http://"),
        ("device_id = 'a b'\n", "device_id: not a valid device id"),
    ],
)
def test_bad_agent_configs_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        load_agent_settings(write_agent(tmp_path, text), environ={})


def test_the_agent_needs_a_customer(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^customer_id: required"):
        load_agent_settings(None, environ={})


# -- [broker]: embedded or external broker ---------------------------------------------------------


def test_broker_defaults() -> None:
    broker = load_settings(None, environ={}).broker
    assert (broker.mode, broker.url, broker.service_password) == (
        "embedded",
        "mqtt://127.0.0.1:1883",
        "",
    )
    assert (broker.management_url, broker.management_user, broker.management_password) == (
        "",
        "",
        "",
    )
    assert broker_endpoint(broker.url) == BrokerEndpoint("127.0.0.1", 1883, tls=False)


def test_broker_precedence_toml_environment_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write(
        tmp_path,
        "[broker]\nmode = 'external'\nurl = 'mqtt://rabbit:1883'\nservice_password = 'toml'\n",
    )
    broker = load_settings(config, environ={}).broker
    assert (broker.mode, broker.url, broker.service_password) == (
        "external",
        "mqtt://rabbit:1883",
        "toml",
    )
    environ = {
        "IOTBIZ_BROKER_URL": "mqtts://rabbit.example",
        "IOTBIZ_BROKER_SERVICE_PASSWORD": "env",
        "IOTBIZ_BROKER_AUTH_SECRET": "s3cret",  # broker_auth.secret, not broker.auth_secret
    }
    settings = load_settings(config, environ=environ)
    assert (settings.broker.url, settings.broker.service_password) == (
        "mqtts://rabbit.example",
        "env",
    )
    assert settings.broker_auth.secret == "s3cret"
    assert broker_endpoint(settings.broker.url) == BrokerEndpoint("rabbit.example", 8883, tls=True)
    # the serve flags win over both
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    args = cli._parser("iotbiz").parse_args(
        ["serve", "--config", str(config), "--broker", "embedded", "--broker-url", "mqtt://[::1]:7"]
    )
    settings = cli._settings(args)
    assert (settings.broker.mode, settings.broker.url) == ("embedded", "mqtt://[::1]:7")
    assert broker_endpoint(settings.broker.url) == BrokerEndpoint("::1", 7, tls=False)
    assert settings.broker.service_password == "env"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"mode": "extrenal"},
            "broker.mode: must be embedded or external, got 'extrenal'",
        ),
        (
            {"url": "http://rabbit:1883"},
            "broker.url: must start with mqtt:// or mqtts://, got 'http://rabbit:1883'",
        ),
        (
            {"url": "rabbit:1883"},
            "broker.url: must start with mqtt:// or mqtts://, got 'rabbit:1883'",
        ),
        ({"url": "mqtt://:1883"}, "broker.url: no host in 'mqtt://:1883'"),
        (
            {"url": "mqtt://rabbit:0"},
            "broker.url: the port must be a number from 1 to 65535, got 'mqtt://rabbit:0'",
        ),
        (
            {"url": "mqtt://rabbit:70000"},
            "broker.url: the port must be a number from 1 to 65535, got 'mqtt://rabbit:70000'",
        ),
        (
            {"url": "mqtt://rabbit:mqtt"},
            "broker.url: the port must be a number from 1 to 65535, got 'mqtt://rabbit:mqtt'",
        ),
        (
            {"url": "mqtt://rabbit:1883/vhost"},
            "broker.url: must be mqtt[s]://HOST:PORT only, got 'mqtt://rabbit:1883/vhost'",
        ),
        (
            {"url": "mqtt://me:pw@rabbit:1883"},
            "broker.url: no user or password in the URL (see broker.service_password),"
            " got 'mqtt://me:pw@rabbit:1883'",
        ),
        (
            {"management_url": "rabbit:15672"},
            "broker.management_url: must be http://HOST:PORT or https://HOST:PORT,"
            " got 'rabbit:15672'",
        ),
        (
            {"management_url": "http://rabbit:99999", "management_user": "a"},
            "broker.management_url: the port must be a number from 1 to 65535,"
            " got 'http://rabbit:99999'",
        ),
        (
            {"management_url": "http://rabbit:15672", "management_user": "admin"},
            "broker.management_user and broker.management_password: required with"
            " broker.management_url",
        ),
        ({"url": "mqtt://[::1:1883"}, "broker.url: not a valid URL, got 'mqtt://[::1:1883'"),
        (
            {"url": "mqtt://rabbit:1883\n"},
            "broker.url: must be mqtt[s]://HOST:PORT only, got 'mqtt://rabbit:1883\\n'",
        ),
        (
            {"management_url": "http://[x]:15672", "management_user": "a"},
            "broker.management_url: must be http://HOST:PORT or https://HOST:PORT,"
            " got 'http://[x]:15672'",
        ),
        ({"mode": 1}, "broker.mode: expected a string, got 1"),
    ],
)
def test_bad_broker_settings_are_one_line_errors(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(None, environ={}, overrides={"broker": values})
    assert str(raised.value) == message


def test_bad_broker_flag_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--broker", "rabbitmq"], prog="python -m iotbiz.broker") == 1
    assert capsys.readouterr().err == (
        "python -m iotbiz.broker: broker.mode: must be embedded or external, got 'rabbitmq'\n"
    )


@given(st.text(max_size=40) | st.builds(lambda rest: f"mqtt://{rest}", st.text(max_size=30)))
@settings(max_examples=300, deadline=None)
def test_any_broker_url_is_an_endpoint_or_a_one_line_error(url: str) -> None:
    for overrides in ({"url": url}, {"management_url": url, "management_user": "a"}):
        error = ""
        try:
            loaded = load_settings(None, environ={}, overrides={"broker": overrides})
        except ConfigError as exc:
            error = str(exc)
        if error:
            assert "\n" not in error
            assert error.startswith("broker.")
        elif "url" in overrides:
            endpoint = broker_endpoint(loaded.broker.url)
            assert endpoint.host
            assert 1 <= endpoint.port <= 65535
