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

from gateway.delivery.webhook import WebhookSettings
from gateway.delivery.webpush import WebPushSettings
from gateway.errors import ConfigError
from gateway.presence.settings import PresenceSettings, ReceiverSettings

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
"""The repository's examples/, installed with the package (a link in the source tree)."""


def example(path: str) -> str:
    """``examples/...`` as given when it exists from here (a checkout), else the installed copy, so the
    defaults and ``gateway demo`` work from any directory; any other path is returned as it is."""
    p = Path(path)
    if p.is_absolute() or not p.parts or p.parts[0] != "examples" or p.exists():
        return path
    packaged = EXAMPLES.joinpath(*p.parts[1:])
    return str(packaged) if packaged.exists() else path


@dataclass
class StoreSettings:
    id: str = "store-001"
    name: str = "Store"
    timezone: str = "UTC"


@dataclass
class DatabaseSettings:
    url: str = "sqlite:///data/gateway.db"
    busy_timeout_ms: int = 5000  # SQLite: how long a write waits for another writer before it is held and retried


@dataclass
class ApiSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    admin_key: str = ""  # empty: a random one is generated at start and printed once
    token_secret: str = ""  # empty: derived per data dir and kept in it
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
    password: str = ""
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
class PrivacySettings:
    presence_retention_days: float = 395.0  # visits, zone stays and decisions older than this are purged (0: keep)


@dataclass
class FigureSettings:
    bounce_s: float = 60.0  # a visit that saw at most one zone and lasted less than this is a bounce


@dataclass
class Settings:
    store: StoreSettings = field(default_factory=StoreSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    api: ApiSettings = field(default_factory=ApiSettings)
    mqtt: MqttSettings = field(default_factory=MqttSettings)
    devices: DevicesSettings = field(default_factory=DevicesSettings)
    device_rules: DeviceRuleSettings = field(default_factory=DeviceRuleSettings)
    ble: BleSettings = field(default_factory=BleSettings)
    presence: PresenceSettings = field(default_factory=PresenceSettings)
    carts: CartSettings = field(default_factory=CartSettings)
    campaigns: CampaignSettings = field(default_factory=CampaignSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)
    loyalty: LoyaltySettings = field(default_factory=LoyaltySettings)
    webhook: WebhookSettings = field(default_factory=WebhookSettings)
    webpush: WebPushSettings = field(default_factory=WebPushSettings)
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    interactions: InteractionSettings = field(default_factory=InteractionSettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    figures: FigureSettings = field(default_factory=FigureSettings)
    remote: RemoteSettings = field(default_factory=RemoteSettings)
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
    if origin is dict:  # a TOML table, or "a=b, c=d" from the environment
        key_t, val_t = typ.__args__
        if isinstance(value, str):
            pairs = [p.partition("=") for p in value.split(",") if p.strip()]
            if any(not sep for _, sep, _ in pairs):
                raise ConfigError(f"{where}: expected key=value pairs, got {value!r}")
            value = {k.strip(): v.strip() for k, _, v in pairs}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a table")
        return {_coerce(k, key_t, where): _coerce(v, val_t, f"{where}.{k}") for k, v in value.items()}
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
