"""Settings: the documented example loads, env variables override, mistakes are named."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import get_args, get_origin, get_type_hints

import pytest

from gateway.app.config import ConfigError, Settings, load_settings

EXAMPLE = Path(__file__).resolve().parents[1] / "examples/gateway.toml"


def test_example_documents_every_setting():
    text = EXAMPLE.read_text()
    settings = load_settings(EXAMPLE, environ={})
    assert settings.receivers[0].zones[0].name == "entrance"
    for section in Settings.model_fields:
        value = getattr(settings, section)
        if dataclasses.is_dataclass(value):
            assert f"[{section}]" in text, section
            for f in dataclasses.fields(value):
                assert re.search(rf"^{f.name} = ", text, re.M), f"{section}.{f.name} undocumented"


def test_env_overrides_file_and_coerces_types():
    s = load_settings(EXAMPLE, environ={"GATEWAY_API_PORT": "9100", "GATEWAY_MQTT_ENABLED": "false",
                                        "GATEWAY_API_CORS_ORIGINS": "https://a.example, https://b.example",
                                        "GATEWAY_DATABASE_URL": "postgresql+psycopg://x@h/db",
                                        "GATEWAY_DATA_DIR": "/var/lib/gw"})
    assert s.api.port == 9100
    assert s.mqtt.enabled is False
    assert s.api.cors_origins == ["https://a.example", "https://b.example"]
    assert s.database.url.startswith("postgresql")
    assert s.data_dir == "/var/lib/gw"


@pytest.mark.parametrize("text, message", [
    ("[api]\nprot = 1\n", "unknown setting(s) prot"),
    ("[api]\nport = 'eighty'\n", "api.port: expected int"),
    ("[mqtt]\nenabled = 'maybe'\n", "mqtt.enabled: expected true or false"),
    ("[api\n", "gw.toml"),
])
def test_mistakes_are_named(tmp_path, text, message):
    path = tmp_path / "gw.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_settings(path, environ={})


def test_bad_env_value_is_named():
    with pytest.raises(ConfigError, match="GATEWAY_API_PORT"):
        load_settings(None, environ={"GATEWAY_API_PORT": "x"})


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_settings("/nonexistent/gw.toml", environ={})


def _file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gw.toml"
    path.write_text(text)
    return path


def test_the_environment_overrides_the_file_which_overrides_the_defaults(tmp_path):
    path = _file(tmp_path, '[api]\nhost = "0.0.0.0"\nport = 9001\n[store]\nid = "s-7"\n')
    s = load_settings(path, environ={})
    assert (s.api.host, s.api.port, s.store.id, s.store.name) == ("0.0.0.0", 9001, "s-7", "Store")
    s = load_settings(path, environ={"GATEWAY_API_PORT": "9100", "GATEWAY_STORE_NAME": "Lyon"})
    assert (s.api.host, s.api.port) == ("0.0.0.0", 9100)  # the file's other keys of the section stay
    assert (s.store.id, s.store.name) == ("s-7", "Lyon")


def test_the_spellings_of_booleans_lists_and_tables_in_the_environment(tmp_path):
    s = load_settings(None, environ={
        "GATEWAY_MQTT_TLS": "yes", "GATEWAY_BLE_ENABLED": "OFF", "GATEWAY_WEBHOOK_URL": "https://a.example/h",
        "GATEWAY_API_CORS_METHODS": '["GET", "POST"]', "GATEWAY_REMOTE_ROOMS": '{"hall": "rx-hall"}',
        "GATEWAY_DEVICE_RULES_DIR": "/etc/rules", "GATEWAY_DEVICES_PROFILES_DIR": "/etc/profiles"})
    assert s.mqtt.tls is True and s.ble.enabled is False
    assert s.webhook.url == ["https://a.example/h"] and s.api.cors_methods == ["GET", "POST"]
    assert s.remote.rooms == {"hall": "rx-hall"}
    assert (s.device_rules.dir, s.devices.profiles_dir) == ("/etc/rules", "/etc/profiles")


def test_caps_tiers_and_receivers_come_from_the_environment_as_json(tmp_path):
    path = _file(tmp_path, '[[receivers]]\nid = "hci0"\n')
    s = load_settings(path, environ={
        "GATEWAY_ENGINE_CAPS": '[{"window_s": 600, "max": 1, "purposes": "offers", "channel": "webpush"}]',
        "GATEWAY_LOYALTY_TIERS": '[{"name": "member", "min_points": 0}, {"name": "vip", "min_points": 500}]',
        "GATEWAY_RECEIVERS": '[{"id": "rx-door", "zones": [{"name": "entrance", "max_m": 3}], "measured_power": -60}]'})
    [cap] = s.engine.caps
    assert (cap.window_s, cap.max, cap.purposes, cap.channel) == (600.0, 1, ["offers"], "webpush")
    assert [(t.name, t.min_points) for t in s.loyalty.tiers] == [("member", 0), ("vip", 500)]
    [rx] = s.receivers  # the variable replaces the file's list whole
    assert (rx.id, rx.zones[0].name, rx.zones[0].max_m, rx.measured_power) == ("rx-door", "entrance", 3.0, -60)


def test_a_one_url_string_in_the_file_is_a_list_of_one(tmp_path):
    s = load_settings(_file(tmp_path, '[webhook]\nurl = "https://push.example/gw"\n'), environ={})
    assert s.webhook.url == ["https://push.example/gw"]


@pytest.mark.parametrize("text, message", [
    ('[store]\nid = "s"\n\n[api]\nhost = "h"\nport = "eighty"\n',
     "gw.toml, line 6: api.port: expected int, got 'eighty'"),
    ("[api]\nmax_body_bytes = 0\n", "gw.toml, line 2: api.max_body_bytes: must be positive, got 0"),
    ('[[receivers]]\nid = "a"\n[[receivers]]\nid = "b"\nzones = [{ name = "z", max_m = -1 }]\n',
     "gw.toml, line 5: receivers.zones: zone 'z' max_m must be positive"),
    ("[engine]\ncaps = [{ window_s = 60 }]\n", "gw.toml, line 2: engine.caps[0].max: required"),
    ("[presence]\nexit_after_s = 10\nvisit_end_after_s = 5\n",
     "gw.toml, line 3: presence.visit_end_after_s: must not be shorter than exit_after_s"),
])
def test_a_bad_value_in_the_file_names_its_key_and_line(tmp_path, text, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_settings(_file(tmp_path, text), environ={})


@pytest.mark.parametrize("environ, message", [
    ({"GATEWAY_MQTT_PORT": "x"}, "GATEWAY_MQTT_PORT: expected int, got 'x'"),
    ({"GATEWAY_BLE_SCANNING_MODE": "loud"}, "GATEWAY_BLE_SCANNING_MODE: ble.scanning_mode: expected passive or active"),
    ({"GATEWAY_ENGINE_CAPS": "3600:3"}, "GATEWAY_ENGINE_CAPS: engine.caps[0]: expected a table, got '3600:3'"),
    ({"GATEWAY_RECEIVERS": "hci0"}, "GATEWAY_RECEIVERS: expected JSON"),
])
def test_a_bad_value_in_the_environment_names_its_variable(environ, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_settings(None, environ=environ)


def test_unknown_keys_are_refused_wherever_they_are(tmp_path):
    with pytest.raises(ConfigError, match=re.escape("gw.toml, line 3: api: unknown setting(s) prot, tyop")):
        load_settings(_file(tmp_path, "[api]\nport = 1\nprot = 1\ntyop = 2\n"), environ={})
    with pytest.raises(ConfigError, match=re.escape("gw.toml, line 1: config: unknown setting(s) datadir")):
        load_settings(_file(tmp_path, 'datadir = "x"\n'), environ={})
    with pytest.raises(ConfigError, match=re.escape("receivers[0]: unknown setting(s) zone")):
        load_settings(_file(tmp_path, '[[receivers]]\nid = "a"\nzone = []\n'), environ={})
    with pytest.raises(ConfigError, match=re.escape("GATEWAY_MQTT_PASSWD: mqtt: unknown setting(s) passwd")):
        load_settings(None, environ={"GATEWAY_MQTT_PASSWD": "x"})
    assert load_settings(None, environ={"GATEWAY_TEST_POSTGRES_URL": "x"}).data_dir == "data"  # not a section


SECRETS = {"admin_key": "adm-0a1b2c3d4e", "token_secret": "tok-5f6a7b8c9d", "mqtt": "mq-pw-1a2b3c4d",
           "webhook": "wh-2b3c4d5e6f", "vapid": "-----BEGIN PRIVATE KEY-----vapid-3c4d5e", "db": "db-pw-4d5e6f7a"}


def test_secrets_are_never_shown(tmp_path, caplog):
    path = _file(tmp_path, f'[api]\nadmin_key = "{SECRETS["admin_key"]}"\n[webpush]\nvapid_private_key = '
                           f'"{SECRETS["vapid"]}"\n[webhook]\nsecret = "{SECRETS["webhook"]}"\n')
    s = load_settings(path, environ={"GATEWAY_API_TOKEN_SECRET": SECRETS["token_secret"],
                                     "GATEWAY_MQTT_PASSWORD": SECRETS["mqtt"],
                                     "GATEWAY_DATABASE_URL": f"postgresql+psycopg://gw:{SECRETS['db']}@db.example/gw"})
    assert s.api.admin_key == SECRETS["admin_key"] and s.database.url.endswith("@db.example/gw")  # loaded...
    with caplog.at_level("INFO"):
        logging.getLogger("gateway.test").info("settings: %s / %r", s, s)
    for shown in (repr(s), str(s), caplog.text):
        assert "db.example" in shown and "token_ttl_s" in shown  # ...and everything else is shown
        assert not [name for name, secret in SECRETS.items() if secret in shown]
    for text in (f'[webhook]\nsecret = ["{SECRETS["webhook"]}"]\n',
                 f'[mqtt]\npassword = {{ pw = "{SECRETS["mqtt"]}" }}\n'):
        with pytest.raises(ConfigError) as err:
            load_settings(_file(tmp_path, text), environ={})
        assert "expected str" in str(err.value) and not [n for n, v in SECRETS.items() if v in str(err.value)]


OPERATIONS = Path(__file__).resolve().parents[1] / "docs/operations.md"


def reference() -> str:
    """The settings reference of docs/operations.md, from the model (``python -m tests.test_config`` prints it)."""
    rows = ["| key | environment variable | default |", "|---|---|---|"]
    defaults = Settings()
    for name, info in Settings.model_fields.items():
        value = getattr(defaults, name)
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                variable = f"GATEWAY_{name}_{f.name}".upper()
                rows += [_row(f"{name}.{f.name}", f"`{variable}`", getattr(value, f.name)),
                         *_entries(f"{name}.{f.name}", variable, get_type_hints(type(value))[f.name])]
        else:
            rows += [_row(name, f"`GATEWAY_{name.upper()}`", value), *_entries(name, f"GATEWAY_{name}".upper(),
                                                                               info.annotation)]
    return "\n".join(rows)


def _entries(key: str, variable: str, typ: object) -> list[str]:
    """The keys of each entry of a list of tables (caps, tiers, receivers and their zones)."""
    (item,) = get_args(typ) if get_origin(typ) is list else (None,)
    if not (isinstance(item, type) and dataclasses.is_dataclass(item)):
        return []
    rows = []
    for f in dataclasses.fields(item):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        rows += [_row(f"{key}[].{f.name}", f"in `{variable}`", default),
                 *_entries(f"{key}[].{f.name}", variable, get_type_hints(item)[f.name])]
    return rows


def _row(key: str, variable: str, default: object) -> str:
    shown = "required" if default is dataclasses.MISSING else f"`{json.dumps(default, default=dataclasses.asdict)}`"
    return f"| `{key}` | {variable} | {shown} |"


def test_the_operations_guide_lists_every_key_with_its_variable_and_default(monkeypatch):
    monkeypatch.chdir(OPERATIONS.parents[1])  # the example directories' defaults, as a checkout sees them
    assert reference() in OPERATIONS.read_text(), "docs/operations.md: paste `python -m tests.test_config`"


if __name__ == "__main__":
    print(reference())
