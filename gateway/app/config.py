"""Settings: a TOML file, then ``GATEWAY_<SECTION>_<KEY>`` environment variables on top.

Every setting has a default that works for a single store on a Pi, so an empty file is valid. The sections
are plain dataclasses (the stages build and read them directly); pydantic validates them when they are
loaded, pydantic-settings reads the environment, and every mistake becomes one ``ConfigError`` that names
the key and where it came from (the file and its line, or the variable).

A field declared ``repr=False`` holds a secret: it is never shown in a repr nor echoed in an error.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import tomllib
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from gateway.delivery.webhook import WebhookSettings
from gateway.delivery.webpush import WebPushSettings
from gateway.errors import ConfigError
from gateway.presence import floor
from gateway.presence.settings import FloorZone, PresenceSettings, ReceiverSettings
from gateway.storage.models import Purpose

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
"""The repository's examples/, installed with the package (a link in the source tree)."""

ENV_PREFIX = "GATEWAY_"


def example(path: str) -> str:
    """``examples/...`` as given when it exists from here (a checkout), else the installed copy, so the
    defaults and ``gateway demo`` work from any directory; any other path is returned as it is."""
    p = Path(path)
    if p.is_absolute() or not p.parts or p.parts[0] != "examples" or p.exists():
        return path
    packaged = EXAMPLES.joinpath(*p.parts[1:])
    return str(packaged) if packaged.exists() else path


def masked_url(url: str) -> str:
    """A database URL fit for a log: its password masked (an unparsable one is not shown at all)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<not a database URL>"


@dataclass
class StoreSettings:
    id: str = "store-001"
    name: str = "Store"
    timezone: str = "UTC"


@dataclass
class DatabaseSettings:
    url: str = field(default="sqlite:///data/gateway.db", repr=False)  # may carry a password: shown masked
    busy_timeout_ms: int = 5000  # SQLite: how long a write waits for another writer before it is held and retried

    def __repr__(self) -> str:
        return f"DatabaseSettings(url={masked_url(self.url)!r}, busy_timeout_ms={self.busy_timeout_ms!r})"


@dataclass
class ApiSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    admin_key: str = field(default="", repr=False)  # empty: a random one is generated at start and printed once
    token_secret: str = field(default="", repr=False)  # empty: derived per data dir and kept in it
    token_ttl_s: int = 30 * 24 * 3600
    cors_origins: list[str] = field(default_factory=list)
    cors_methods: list[str] = field(default_factory=lambda: ["GET", "POST", "PUT", "DELETE"])
    cors_headers: list[str] = field(default_factory=lambda: [
        "Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID", "X-API-Key"])
    heartbeat_s: float = 15.0
    stream_write_timeout_s: float = 30.0  # a client that reads nothing this long is disconnected; 0: never
    rate_limit_per_s: float = 10.0  # per customer app token, on average; 0: no limit
    rate_limit_burst: int = 60  # ...and at once
    admin_rate_limit_per_s: float = 50.0  # per admin API key; 0: no limit
    admin_rate_limit_burst: int = 200
    idempotency_ttl_s: float = 86400.0  # how long the answer to a POST with an Idempotency-Key is replayed
    max_body_bytes: int = 1 << 20  # a larger request body is refused with 413 before it is read whole
    catalogue_max_body_bytes: int = 8 << 20  # PUT /v1/catalogue (the whole catalogue at once) may send this much

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "catalogue_max_body_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"api.{name}: must be positive, got {getattr(self, name)!r}")
        if not self.stream_write_timeout_s >= 0:
            raise ConfigError(f"api.stream_write_timeout_s: must be 0 (never) or more, "
                              f"got {self.stream_write_timeout_s!r}")


@dataclass
class MqttSettings:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 1883
    protocol: str = "5"  # "5" or "3.1.1"
    client_id: str = ""  # empty: "gateway-<store id>"
    username: str = ""
    password: str = field(default="", repr=False)
    tls: bool = False
    ca_file: str = ""
    topic_prefix: str = "stores"
    keepalive: int = 30
    tls_verify: bool = True  # verify the broker's certificate and host name (false only for a lab broker)
    client_cert: str = ""  # TLS client certificate (PEM), if the broker asks for one
    client_key: str = ""
    session_expiry: int = 3600  # MQTT 5: seconds the broker keeps our session (and queues for us) while away
    reconnect_min_delay: int = 1  # reconnect backoff, doubling from min to max seconds
    reconnect_max_delay: int = 30
    receive_maximum: int = 10000  # MQTT 5: unacknowledged QoS 1 messages in flight to us (acks follow commits)
    max_batch: int = 4000  # messages per transaction at most; the next batch arrives while one commits
    share_group: str = ""  # non-empty: subscribe as $share/<group>/... so several workers split the load


@dataclass
class DevicesSettings:
    """The device registry and telemetry storage (docs/telemetry.md)."""

    # device profiles (*.yaml): metrics, units, ranges, interval
    profiles_dir: str = field(default_factory=lambda: example("examples/device-profiles"))
    unknown_policy: str = "accept"  # a device id never seen: reject | quarantine | accept
    default_profile: str = ""  # profile for devices whose kind names none; empty: their metrics are not checked
    require_profile: bool = False  # true: readings of a device with no profile are dead-lettered
    offline_after_s: float = 300.0  # silence before a device without a profile counts as offline
    raw_retention_days: float = 30.0  # raw readings are purged after this
    minute_retention_days: float = 7.0  # per-minute rollups
    hour_retention_days: float = 400.0  # per-hour rollups
    dead_letter_retention_days: float = 14.0


@dataclass
class BleSettings:
    enabled: bool = True
    adapter: str = "hci0"
    scanning_mode: str = "passive"  # passive | active
    receiver: str = ""  # the receiver id this adapter's sightings carry ([[receivers]] id); empty: the adapter name
    stale_after_s: float = 4.0  # passive mode: restart the scan when tracked tags go this long unheard (0: never)

    def __post_init__(self) -> None:
        if self.scanning_mode not in ("passive", "active"):
            raise ConfigError(f"ble.scanning_mode: expected passive or active, got {self.scanning_mode!r}")
        if not self.adapter:
            raise ConfigError("ble.adapter: must not be empty")
        if not self.stale_after_s >= 0:
            raise ConfigError(f"ble.stale_after_s: must not be negative, got {self.stale_after_s!r}")


@dataclass
class CartSettings:
    abandon_after_s: float = 1800.0


@dataclass
class CampaignSettings:
    dir: str = field(default_factory=lambda: example("examples/campaigns"))


@dataclass
class CapSettings:
    window_s: float
    max: int
    purposes: list[str] = field(default_factory=lambda: ["offers", "cart_reminders"])
    channel: str = ""  # empty: across channels; "webpush", "webhook" or "sse": that channel only


@dataclass
class TierSettings:
    name: str
    min_points: int


@dataclass
class LoyaltySettings:
    points_per_visit: int = 10  # earned once per visit, at its start
    tiers: list[TierSettings] = field(default_factory=lambda: [
        TierSettings("bronze", 0), TierSettings("silver", 50), TierSettings("gold", 150)])


@dataclass
class EngineSettings:
    # Rolling frequency caps per profile across campaigns (marketing purposes by default).
    caps: list[CapSettings] = field(default_factory=lambda: [CapSettings(3600, 3), CapSettings(86400, 6)])


@dataclass
class RemoteSettings:
    """Receivers other than our own adapter: ESPresense nodes over MQTT, the shop's app over HTTP.

    Each is a receiver id like any other, so it needs a ``[[receivers]]`` entry with zones:
    ``espresense:<room>`` (or the id ``rooms`` maps the room to) and ``beacon:<store beacon key>``.
    """

    espresense: bool = True
    espresense_prefix: str = "espresense"
    rooms: dict[str, str] = field(default_factory=dict)  # ESPresense room -> receiver id
    app_max_age_s: float = 30.0  # app-reported sightings older than this are refused
    app_max_ahead_s: float = 5.0  # ...and so are those further in the future (clock skew allowance)


@dataclass
class DeliverySettings:
    """The outbox dispatcher's retries per notification and channel (kept in the db, survive restarts)."""

    max_attempts: int = 8  # failed attempts before a channel is dead-lettered for that notification
    backoff_base_s: float = 2.0  # wait after the first failure; doubles after each one...
    backoff_max_s: float = 600.0  # ...up to this
    jitter: float = 0.5  # share of each wait taken off at random (0..1), so retries do not stampede
    retry_poll_s: float = 1.0  # how often the retry loop looks for due retries
    concurrency: int = 16  # remote sends (webhook, Web Push) in flight at once, per channel


@dataclass
class LoggingSettings:
    format: str = "text"  # text | json (one JSON object per line, for a log shipper)
    level: str = "INFO"


@dataclass
class DeviceRuleSettings:
    """Device rules and their alarms (docs/device-rules.md)."""

    # rule files (*.yaml); empty: no device rules
    dir: str = field(default_factory=lambda: example("examples/device-rules"))
    staff_alerts_mqtt: bool = True  # active alarms retained on <topic_prefix>/<store>/alerts/<device>/<rule>


@dataclass
class InteractionSettings:
    conversion_window_s: float = 7 * 86400.0  # a purchase this soon after a notification converts it (last touch)


@dataclass
class DashboardSettings:
    """The staff dashboard (docs/dashboard.md). By default it counts people and names nobody; with
    ``show_customers`` it also names, by first name, the enrolled customers in each zone who consented to
    ``show_purpose`` (pick the purpose whose consent text covers being recognised by staff)."""

    show_customers: bool = False
    show_purpose: str = "presence_sharing"
    floor_image: str = ""  # a PNG or JPEG drawn under the floor plan; empty: none
    floor_image_bounds: list[float] = field(default_factory=list)  # [x0, y0, x1, y1] metres; empty: the zones' box

    def __post_init__(self) -> None:
        if self.show_purpose not in set(Purpose):
            raise ConfigError(f"dashboard.show_purpose: expected one of {', '.join(Purpose)}, "
                              f"got {self.show_purpose!r}")


@dataclass
class PrivacySettings:
    presence_retention_days: float = 395.0  # visits, zone stays and decisions older than this are purged (0: keep)


@dataclass
class HomeAssistantSettings:
    """Zone occupancy out to Home Assistant over the [mqtt] broker, with device-based discovery
    (docs/home-assistant.md). Nothing about an individual goes out unless ``track_customers`` is on, and
    then only for customers who consented to ``track_purpose``."""

    enabled: bool = False
    discovery_prefix: str = "homeassistant"  # Home Assistant's discovery prefix (its MQTT options)
    node_id: str = ""  # the discovery topic's object id; empty: the store id, made fit ([a-zA-Z0-9_-])
    track_customers: bool = False  # a device_tracker per consenting customer (their zone, or not_home)
    track_purpose: str = "presence_sharing"  # the consent a customer must have given to be tracked
    min_interval_s: float = 1.0  # a zone's state goes out at most once per this (changes meanwhile coalesce)
    support_url: str = ""  # the discovery origin's support URL (Home Assistant logs it); empty: left out

    def __post_init__(self) -> None:
        p = self.discovery_prefix
        if not p or p.startswith("/") or p.endswith("/") or any(c in p for c in "+#\x00"):
            raise ConfigError(f"homeassistant.discovery_prefix: not a topic prefix, got {p!r}")
        if self.node_id and re.fullmatch(r"[a-zA-Z0-9_-]+", self.node_id) is None:
            raise ConfigError(f"homeassistant.node_id: only letters, digits, _ and - are allowed, got {self.node_id!r}")
        if self.track_purpose not in set(Purpose):
            raise ConfigError(f"homeassistant.track_purpose: expected one of {', '.join(Purpose)}, "
                              f"got {self.track_purpose!r}")
        if not self.min_interval_s >= 0:
            raise ConfigError(f"homeassistant.min_interval_s: must not be negative, got {self.min_interval_s!r}")
        if self.support_url and not self.support_url.startswith(("http://", "https://")):
            raise ConfigError(f"homeassistant.support_url: expected an http(s) URL, got {self.support_url!r}")


@dataclass
class IdentitySettings:
    """Rotating identities (docs/identities.md): the key their secrets are encrypted with at rest, and the
    shop app's rotating iBeacon."""

    key_file: str = ""  # 32 bytes (raw, hex or base64); empty: generated once as <data_dir>/identities.key
    app_uuid: str = "d0e7033a-1e52-423c-a694-c5474a38b74e"  # the app's iBeacon uuid; major/minor rotate
    app_period_s: int = 900  # how long one app beacon window lasts (new secrets are issued with it)
    rpa_cache_size: int = 65536  # addresses remembered (matched or not), in memory only

    def __post_init__(self) -> None:
        if re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", self.app_uuid.lower()) is None:
            raise ConfigError(f"identities.app_uuid: not a uuid (8-4-4-4-12 hex digits), got {self.app_uuid!r}")
        self.app_uuid = self.app_uuid.lower()
        if not 60 <= self.app_period_s <= 86400:
            raise ConfigError(f"identities.app_period_s: expected 60 to 86400 seconds, got {self.app_period_s!r}")
        if self.rpa_cache_size < 16:
            raise ConfigError(f"identities.rpa_cache_size: expected at least 16, got {self.rpa_cache_size!r}")


@dataclass
class HqSettings:
    """Store and head office (docs/scale-out.md)."""

    uplink: bool = False  # publish this store's events upward (<prefix>/<store>/hq/v1/<kind>) over [mqtt]'s broker
    interval_s: float = 5.0  # how often the uplink looks for new rows
    batch: int = 500  # rows per kind per uplink cycle at most
    client_id: str = "hq"  # gateway hq: its persistent session's client id on the central broker


@dataclass
class FigureSettings:
    bounce_s: float = 60.0  # a visit that saw at most one zone and lasted less than this is a bounce


class Settings(BaseSettings):
    """Every section, with its defaults. ``Settings(...)`` is exactly what it is given (tests and the demo
    build one by hand); ``load_settings`` adds the file and the environment."""

    model_config = SettingsConfigDict(
        extra="forbid", case_sensitive=True, coerce_numbers_to_str=True,
        env_prefix=ENV_PREFIX, env_nested_delimiter="_", env_nested_max_split=1)

    store: StoreSettings = Field(default_factory=StoreSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    devices: DevicesSettings = Field(default_factory=DevicesSettings)
    device_rules: DeviceRuleSettings = Field(default_factory=DeviceRuleSettings)
    ble: BleSettings = Field(default_factory=BleSettings)
    presence: PresenceSettings = Field(default_factory=PresenceSettings)
    carts: CartSettings = Field(default_factory=CartSettings)
    campaigns: CampaignSettings = Field(default_factory=CampaignSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    loyalty: LoyaltySettings = Field(default_factory=LoyaltySettings)
    webhook: WebhookSettings = Field(default_factory=WebhookSettings)
    webpush: WebPushSettings = Field(default_factory=WebPushSettings)
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    interactions: InteractionSettings = Field(default_factory=InteractionSettings)
    privacy: PrivacySettings = Field(default_factory=PrivacySettings)
    dashboard: DashboardSettings = Field(default_factory=DashboardSettings)
    figures: FigureSettings = Field(default_factory=FigureSettings)
    hq: HqSettings = Field(default_factory=HqSettings)
    homeassistant: HomeAssistantSettings = Field(default_factory=HomeAssistantSettings)
    identities: IdentitySettings = Field(default_factory=IdentitySettings)
    remote: RemoteSettings = Field(default_factory=RemoteSettings)
    receivers: list[ReceiverSettings] = Field(default_factory=list)
    zones: list[FloorZone] = Field(default_factory=list)
    data_dir: str = "data"

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)

    @field_validator("*", mode="before")
    @classmethod
    def _one_string_spellings(cls, value: Any, info: ValidationInfo) -> Any:
        assert info.field_name is not None
        return _spelled(value, cls.model_fields[info.field_name].annotation)

    @model_validator(mode="after")
    def _floor_plan(self) -> Settings:
        """[[zones]] (gateway/presence/floor.py): raised at each entry's own place, so the error names its line."""
        found = floor.problems(self.zones, [[b.name for b in r.zones] for r in self.receivers])
        if found:
            raise ValidationError.from_exception_data("Settings", [
                InitErrorDetails(type=PydanticCustomError("floor_plan", message), loc=loc, input=value)
                for loc, message, value in found])
        return self

    @model_validator(mode="after")
    def _homeassistant_needs_mqtt(self) -> Settings:
        """[homeassistant] publishes on the [mqtt] connection: on without it, nothing would go out, silently."""
        if self.homeassistant.enabled and not self.mqtt.enabled:
            raise ValidationError.from_exception_data("Settings", [InitErrorDetails(
                type=PydanticCustomError("needs_mqtt", "needs [mqtt] enabled (it publishes on that connection)"),
                loc=("homeassistant", "enabled"), input=True)])
        return self


# ---------------------------------------------------------------- lists and tables written as one string


def _spelled(value: Any, typ: Any) -> Any:
    """Lists and tables the environment (or a one-URL TOML line) writes as one string, as lists and dicts:
    ``a, b`` or JSON for a list, ``k=v, k2=v2`` or JSON for a table, ``""`` for an optional value unset.
    A string that is neither is left for pydantic to refuse with its key."""
    if isinstance(typ, type) and dataclasses.is_dataclass(typ):
        if not isinstance(value, Mapping):
            return value
        hints = _hints(typ)
        return {k: _spelled(v, hints[k]) if k in hints else v for k, v in value.items()}
    origin = get_origin(typ)
    if origin is list:
        listed = _list(value) if isinstance(value, str) else value
        (item,) = get_args(typ)
        return [_spelled(v, item) for v in listed] if isinstance(listed, list) else listed
    if origin is dict:
        return _table(value) if isinstance(value, str) else value
    if origin in (Union, types.UnionType) and type(None) in get_args(typ) and value == "":
        return None
    return value


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _list(text: str) -> Any:
    if text.lstrip().startswith("["):
        return _json(text)
    return [v.strip() for v in text.split(",") if v.strip()]


def _table(text: str) -> Any:
    if text.lstrip().startswith("{"):
        return _json(text)
    pairs = [p.partition("=") for p in text.split(",") if p.strip()]
    if any(not sep for _, sep, _ in pairs):
        return text
    return {k.strip(): v.strip() for k, _, v in pairs}


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


# ---------------------------------------------------------------- the sources


class _Environment(EnvSettingsSource):
    """``GATEWAY_<SECTION>_<KEY>`` (and ``GATEWAY_<KEY>`` at the top level) from the mapping given, any case."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(Settings, case_sensitive=False)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {k.lower(): v for k, v in self._environ.items()}


def _from_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    try:
        return _Environment(environ)()
    except SettingsError as exc:  # a top-level list or table that is not JSON
        name = re.search(r'field "(\w+)"', str(exc))
        raise ConfigError(f"{ENV_PREFIX}{name[1].upper() if name else '?'}: expected JSON") from None


def _from_file(path: Path) -> tuple[dict[str, Any], dict[tuple[str | int, ...], int]]:
    """The file's tables, and the line of each key and table header in it."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    try:
        return tomllib.loads(text), _key_lines(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None


_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]")
_KEY = re.compile(r"""^\s*((?:[\w-]+|"[^"]*"|'[^']*')(?:\s*\.\s*(?:[\w-]+|"[^"]*"|'[^']*'))*)\s*=""")


def _key_lines(text: str) -> dict[tuple[str | int, ...], int]:
    """Where each ``[table]``, ``[[array]]`` entry and ``key =`` of a TOML text starts (first one wins): enough
    to point at a bad value's line; a key inside an inline table points at the line of the key holding it."""
    lines: dict[tuple[str | int, ...], int] = {}
    arrays: dict[tuple[str | int, ...], int] = {}
    table: tuple[str | int, ...] = ()
    for n, line in enumerate(text.splitlines(), 1):
        if header := _HEADER.match(line):
            table = _dotted(header[2])
            if header[1] == "[[":
                arrays[table] = arrays.get(table, -1) + 1
                table = (*table, arrays[table])
            lines.setdefault(table, n)
        elif key := _KEY.match(line):
            lines.setdefault((*table, *_dotted(key[1])), n)
    return lines


def _dotted(key: str) -> tuple[str, ...]:
    return tuple(part.strip().strip("\"'") for part in re.findall(r"""[\w-]+|"[^"]*"|'[^']*'""", key))


# ---------------------------------------------------------------- loading, and the errors it names


def load_settings(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Defaults, then the file's values, then the environment's (``os.environ`` unless given)."""
    file_path = Path(path) if path is not None else None
    data, lines = _from_file(file_path) if file_path is not None else ({}, {})
    env = _from_environment(os.environ if environ is None else environ)
    try:
        return Settings.model_validate(_merged(data, env))
    except ValidationError as exc:
        raise ConfigError("; ".join(_Origins(file_path, lines, env).explain(exc.errors()))) from None


def _merged(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merged(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


_PHRASES = {
    "int_parsing": "expected int", "int_type": "expected int", "int_from_float": "expected int",
    "float_parsing": "expected float", "float_type": "expected float", "string_type": "expected str",
    "bool_parsing": "expected true or false", "bool_type": "expected true or false",
    "dict_type": "expected a table", "dataclass_type": "expected a table", "list_type": "expected a list",
    "missing": "required",
}
_UNKNOWN = ("unexpected_keyword_argument", "extra_forbidden")
_STRING_SPELLINGS = {"dict_type": "expected key=value pairs or a JSON object", "list_type": "expected a JSON list"}
_KEY_IN_MESSAGE = re.compile(r"^([a-z_]+(?:\.[a-z_]+)*):")


@dataclass
class _Origins:
    """Which source each loaded value came from, to name it in an error: the variable, or the file's line."""

    file: Path | None
    lines: dict[tuple[str | int, ...], int]
    env: dict[str, Any]

    def explain(self, errors: list[ErrorDetails]) -> Iterator[str]:
        unknown: dict[tuple[str | None, tuple[str | int, ...]], list[tuple[str | int, ...]]] = {}
        for err in errors:
            loc = tuple(err["loc"])
            if err["type"] in _UNKNOWN:  # one message per table (and source) naming each stray key
                unknown.setdefault((self.variable(loc), loc[:-1]), []).append(loc)
                continue
            cause = err.get("ctx", {}).get("error")
            if isinstance(cause, ConfigError):  # a section's own check: its message names the key
                yield f"{self.where(self.extended(loc, str(cause)))}: {cause}"
            else:
                where = self.where(loc)
                named = "" if where == f"{ENV_PREFIX}{'_'.join(map(str, loc))}".upper() else f"{_dotted_key(loc)}: "
                yield f"{where}: {named}{self.problem(err, loc)}"
        for (_, table), locs in unknown.items():
            names = ", ".join(str(loc[-1]) for loc in locs)
            yield f"{self.where(locs[0])}: {_dotted_key(table) or 'config'}: unknown setting(s) {names}"

    def where(self, loc: tuple[str | int, ...]) -> str:
        variable = self.variable(loc)
        if variable is not None or self.file is None:
            return variable or "settings"
        line = next((self.lines[loc[:i]] for i in range(len(loc), 0, -1) if loc[:i] in self.lines), None)
        return f"{self.file}, line {line}" if line else str(self.file)

    def variable(self, loc: tuple[str | int, ...]) -> str | None:
        """The environment variable that set this value (or the section or list holding it), if one did."""
        if not loc or loc[0] not in self.env:
            return None
        value = self.env[loc[0]]
        if isinstance(value, dict) and len(loc) > 1 and isinstance(loc[1], str):
            return f"{ENV_PREFIX}{loc[0]}_{loc[1]}".upper() if loc[1] in value else None
        return f"{ENV_PREFIX}{loc[0]}".upper()

    @staticmethod
    def extended(loc: tuple[str | int, ...], message: str) -> tuple[str | int, ...]:
        """``("api",)`` and "api.max_body_bytes: ..." give ``("api", "max_body_bytes")``: the line to point at."""
        key = _KEY_IN_MESSAGE.match(message)
        parts = tuple(key[1].split(".")) if key else ()
        return parts if parts[:len(loc)] == loc and len(parts) > len(loc) else loc

    @staticmethod
    def problem(err: ErrorDetails, loc: tuple[str | int, ...]) -> str:
        value = err.get("input")
        phrase = _PHRASES.get(err["type"], err["msg"])
        if isinstance(value, str) and err["type"] in _STRING_SPELLINGS:
            phrase = _STRING_SPELLINGS[err["type"]]
        if err["type"] == "missing" or _is_secret(loc):
            return phrase
        return f"{phrase}, got {value!r}"


def _dotted_key(loc: tuple[str | int, ...]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def _is_secret(loc: tuple[str | int, ...]) -> bool:
    """Whether the value at ``loc`` is a secret (a ``repr=False`` field of its section) or lies in one."""
    typ: Any = Settings
    for part in loc:
        if isinstance(typ, type) and issubclass(typ, BaseSettings):
            typ = typ.model_fields[str(part)].annotation if part in typ.model_fields else None
        elif isinstance(typ, type) and dataclasses.is_dataclass(typ):
            fields = {f.name: f for f in dataclasses.fields(typ)}
            if part not in fields:
                return False
            if not fields[str(part)].repr:
                return True
            typ = _hints(typ)[str(part)]
        elif get_origin(typ) is list:
            (typ,) = get_args(typ)
        else:
            return False
    return False
