"""Settings: the documented example loads, env variables override, mistakes are named."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

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
