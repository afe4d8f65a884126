"""Settings: a TOML file, then ``GATEWAY_<SECTION>_<KEY>`` environment variables on top.

Every setting has a default that works for a single store on a Pi, so an empty file is valid.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints


class ConfigError(ValueError):
    pass


@dataclass
class StoreSettings:
    id: str = "store-001"
    name: str = "Store"
    timezone: str = "UTC"


@dataclass
class DatabaseSettings:
    url: str = "sqlite:///data/gateway.db"


@dataclass
class ApiSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    admin_key: str = ""  # empty: a random one is generated at start and printed once
    token_secret: str = ""  # empty: derived per data dir and kept in it
    token_ttl_s: int = 30 * 24 * 3600
    cors_origins: list[str] = field(default_factory=list)
    heartbeat_s: float = 15.0


@dataclass
class MqttSettings:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 1883
    protocol: str = "5"  # "5" or "3.1.1"
    client_id: str = ""  # empty: "gateway-<store id>"
    username: str = ""
    password: str = ""
    tls: bool = False
    ca_file: str = ""
    topic_prefix: str = "stores"
    keepalive: int = 30


@dataclass
class BleSettings:
    enabled: bool = True
    adapter: str = "hci0"
    scanning_mode: str = "passive"  # passive | active


@dataclass
class ZoneBand:
    name: str
    max_m: float


@dataclass
class ReceiverSettings:
    id: str
    zones: list[ZoneBand] = field(default_factory=list)
    measured_power: int | None = None  # RSSI at 1 m; None: use the beacon's advertised tx power
    path_loss_exponent: float = 2.0


@dataclass
class PresenceSettings:
    exit_after_s: float = 10.0  # silence before an identity has left (CLBeacon semantics)
    dwell_every_s: float = 15.0  # a dwell event every N s inside a zone
    smoothing: float = 0.3  # EMA weight of a new RSSI sample
    visit_end_after_s: float = 300.0  # silence after which the visit (not just the zone) ends


@dataclass
class CartSettings:
    abandon_after_s: float = 1800.0


@dataclass
class CampaignSettings:
    dir: str = "examples/campaigns"


@dataclass
class Settings:
    store: StoreSettings = field(default_factory=StoreSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    api: ApiSettings = field(default_factory=ApiSettings)
    mqtt: MqttSettings = field(default_factory=MqttSettings)
    ble: BleSettings = field(default_factory=BleSettings)
    presence: PresenceSettings = field(default_factory=PresenceSettings)
    carts: CartSettings = field(default_factory=CartSettings)
    campaigns: CampaignSettings = field(default_factory=CampaignSettings)
    receivers: list[ReceiverSettings] = field(default_factory=list)
    data_dir: str = "data"


def _coerce(value: Any, typ: Any, where: str) -> Any:
    origin = getattr(typ, "__origin__", None)
    if dataclasses.is_dataclass(typ) and isinstance(typ, type):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a table")
        return _build(typ, value, where)
    if origin is list:
        (item,) = typ.__args__
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if typ is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false")
        return value
    if typ in (int, float, str):
        try:
            return typ(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {typ.__name__}, got {value!r}") from None
    args = getattr(typ, "__args__", ())
    if type(None) in args:  # Optional[X]
        if value is None or value == "":
            return None
        inner = next(a for a in args if a is not type(None))
        return _coerce(value, inner, where)
    return value


def _build(cls: type, data: Mapping[str, Any], where: str) -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown setting(s) {', '.join(sorted(unknown))}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where or 'config'}: {exc}") from None


def apply_env(settings: Settings, environ: Mapping[str, str]) -> Settings:
    """``GATEWAY_API_PORT=9000`` sets ``[api] port``; ``GATEWAY_DATA_DIR`` sets ``data_dir``."""
    hints = get_type_hints(Settings)
    for fld in dataclasses.fields(Settings):
        typ = hints[fld.name]
        if dataclasses.is_dataclass(typ):
            section = getattr(settings, fld.name)
            sub_hints = get_type_hints(typ)
            for sub in dataclasses.fields(typ):
                key = f"GATEWAY_{fld.name}_{sub.name}".upper()
                if key in environ:
                    setattr(section, sub.name, _coerce(environ[key], sub_hints[sub.name], key))
        else:
            key = f"GATEWAY_{fld.name}".upper()
            if key in environ and typ is str:
                setattr(settings, fld.name, environ[key])
    return settings


def load_settings(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: {exc}") from None
    settings = _build(Settings, data, "")
    return apply_env(settings, os.environ if environ is None else environ)
