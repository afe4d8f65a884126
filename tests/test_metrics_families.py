"""The names and types /metrics shows are an interface (dashboards and alerts read them): pinned here.

The runtime's own families are pinned exactly; those ``Pipeline.stats()`` yields generically must all
still be there with their type (a stage may add more: they show up without touching the collector).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from devices.mqtt import MqttIntake, MqttSettings
from gateway.app.config import Settings
from gateway.app.metrics import gateway_families
from gateway.app.runtime import Runtime
from gateway.delivery.outbox import depths as outbox_depths
from gateway.metrics import render

RUNTIME_FAMILIES = {
    "gateway_adverts": "counter", "gateway_readings": "counter", "gateway_remote_sightings": "counter",
    "gateway_adverts_dropped": "counter", "gateway_database_outages": "counter", "gateway_database_up": "gauge",
    "gateway_decisions": "counter", "gateway_deliveries": "counter", "gateway_dead_letters": "counter",
    "gateway_remote_sends_in_flight": "gauge", "gateway_queue_depth": "gauge", "gateway_outbox_pending": "gauge",
    "gateway_stream_clients": "gauge", "gateway_stream_dropped_clients": "counter", "gateway_present": "gauge",
    "gateway_advert_to_commit_seconds": "histogram", "gateway_commit_to_delivery_seconds": "histogram",
}
QUEUES = ["adverts", "dead_letters", "outbox_pending", "outbox_scheduled", "readings", "retries_due", "sightings"]
STATS_FAMILIES = {
    **{f"gateway_guard_{k}": "counter" for k in (
        "admitted", "dropped_address_flood", "dropped_transient", "dropped_uuid_flood", "evicted", "expired",
        "ignored_addresses", "ignored_uuids", "rotating_identities", "stable_identities", "state_addresses",
        "state_identities", "state_uuids")},
    **{f"gateway_mqtt_{k}": "counter" for k in ("accepted", "acked", "connects", "received", "rejected", "stale_acks")},
    "gateway_mqtt_queue_depth": "gauge", "gateway_mqtt_unacked_size": "gauge",
    "gateway_presence_clock_steps": "counter", "gateway_presence_in_zone": "counter",
    "gateway_presence_tracked": "gauge",
    **{f"gateway_telemetry_{k}": "counter" for k in (
        "accepted", "dead_lettered", "duplicates", "events", "purged", "registered", "statuses", "went_offline")},
}


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[Runtime]:
    """A runtime never started (its MQTT intake never connects), on a migrated database."""
    settings = Settings()
    settings.data_dir = str(tmp_path)
    settings.database.url = f"sqlite:///{tmp_path / 'gw.db'}"
    settings.campaigns.dir = str(tmp_path)
    intake = MqttIntake(MqttSettings(host="127.0.0.1", port=1, client_id="metrics-test", store_id="s1"))
    rt = Runtime(settings, mqtt=intake, serve_api=False)
    rt.db.upgrade()
    try:
        yield rt
    finally:
        rt.db.dispose()


def test_every_metric_family_keeps_its_name_type_and_labels(runtime: Runtime) -> None:
    runtime.pipeline.engine.counts["fired"] += 1  # a sample each, so the labels show
    runtime.dispatcher.outcomes[("sse", "streamed")] += 1
    runtime.dispatcher.dead_lettered["webhook"] += 1
    with runtime.db.session() as s:
        text = render(gateway_families(runtime, outbox_depths(s)))
    shown = {fam.name: fam for fam in text_string_to_metric_families(text)}
    types = {name: fam.type for name, fam in shown.items()}

    assert {n: t for n, t in types.items() if n in RUNTIME_FAMILIES} == RUNTIME_FAMILIES
    assert sorted(s.labels["queue"] for s in shown["gateway_queue_depth"].samples) == QUEUES
    labels = {name: sorted({k for s in shown[name].samples for k in s.labels})
              for name in ("gateway_decisions", "gateway_deliveries", "gateway_dead_letters")}
    assert labels == {"gateway_decisions": ["reason"], "gateway_deliveries": ["channel", "outcome"],
                      "gateway_dead_letters": ["channel"]}
    missing = {n: t for n, t in STATS_FAMILIES.items() if types.get(n) != t}
    assert not missing, f"gone or retyped: {missing}"
