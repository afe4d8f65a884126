"""What /metrics and the health probes say about a running gateway: the runtime's own metric families.

The generic pieces (families, histograms, the exposition) are ``gateway/metrics.py``'s; this module
knows the ``Runtime`` and reads only its public state, on its loop. ``db_state`` and ``readiness``
are the database half of /health/live and /health/ready.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, Protocol

from beacons.types import Sighting
from devices.mqtt import TelemetryIntake
from gateway.app.pipeline import Pipeline
from gateway.delivery.hub import StreamHub
from gateway.delivery.outbox import Dispatcher
from gateway.metrics import Family, Histogram, hub_families, stats_families
from gateway.storage.db import Database


class Runtime(Protocol):
    """What the families read of the runtime (``gateway.app.runtime.Runtime``): its public state, read, never set."""

    pipeline: Pipeline
    dispatcher: Dispatcher
    db: Database
    hub: StreamHub
    mqtt: TelemetryIntake | None
    sightings: asyncio.Queue[Sighting]
    adverts_dropped: int
    advert_latency: Histogram

    @property
    def pending_adverts(self) -> int: ...


def gateway_families(rt: Runtime, depths: Mapping[str, int]) -> list[Family | Histogram]:
    """Everything /metrics shows for a running gateway, read on the runtime's loop.

    ``depths`` are the outbox's database-held queue sizes (``outbox.depths``), read off the loop.
    """
    pipeline = rt.pipeline
    figures = pipeline.figures
    fams: list[Family | Histogram] = [
        Family("gateway_adverts_total", "counter", "BLE advertisements received").add(figures.get("adverts", 0)),
        Family("gateway_readings_total", "counter", "Telemetry readings received").add(figures.get("readings", 0)),
        Family("gateway_remote_sightings_total", "counter", "Sightings from remote receivers and the app")
        .add(figures.get("remote_sightings", 0)),
    ]
    heard = Family("gateway_receiver_adverts_total", "counter",
                   "Advertisements (and remote sightings) per receiver, beacon or not")
    for receiver, n in sorted(list(pipeline.heard_by.items())):  # a copy: the worker thread adds receivers
        heard.add(n, receiver=receiver)
    fams.append(heard)
    decisions = Family("gateway_decisions_total", "counter", "Engine decisions by reason (fired or why not)")
    for reason, n in sorted(pipeline.engine.counts.items()):
        decisions.add(n, reason=reason)
    fams += [*_database_families(rt), decisions, *_delivery_families(rt), _queue_depths(rt, depths),
             Family("gateway_outbox_pending", "gauge", "Notifications committed and not yet taken by a channel")
             .add(depths.get("outbox_pending", 0)),
             *hub_families(rt.hub),
             Family("gateway_present", "gauge", "Tracked identities in a zone now")
             .add(sum(pipeline.presence.occupancy().values())),
             rt.advert_latency, rt.dispatcher.latency]
    fams += stats_families(pipeline.stats())
    return fams


def _database_families(rt: Runtime) -> list[Family | Histogram]:
    outage = rt.db.outage
    return [Family("gateway_adverts_dropped_total", "counter",
                   "Advertisements dropped because the pipeline's backlog was full (a stalled database)")
            .add(rt.adverts_dropped),
            Family("gateway_database_outages_total", "counter",
                   "Database outages (a run of locked, full or unreachable errors) since start")
            .add(outage.outages),
            Family("gateway_database_up", "gauge", "0 while a database outage lasts, else 1")
            .add(0 if outage.active else 1)]


def _delivery_families(rt: Runtime) -> list[Family]:
    dispatcher = rt.dispatcher
    deliveries = Family("gateway_deliveries_total", "counter", "Delivery attempts by channel and outcome")
    for (channel, outcome), n in sorted(dispatcher.outcomes.items()):
        deliveries.add(n, channel=channel, outcome=outcome)
    dead = Family("gateway_dead_letters_total", "counter", "Deliveries given up (dead-lettered) by channel")
    for channel, n in sorted(dispatcher.dead_lettered.items()):
        dead.add(n, channel=channel)
    in_flight = Family("gateway_remote_sends_in_flight", "gauge", "Remote channel sends awaiting an answer")
    for ch in dispatcher.remote:
        in_flight.add(dispatcher.in_flight.get(ch.name, 0), channel=ch.name)
    return [deliveries, dead, in_flight]


def _queue_depths(rt: Runtime, depths: Mapping[str, int]) -> Family:
    queues = Family("gateway_queue_depth", "gauge", "Items waiting in the gateway's queues")
    queues.add(rt.pending_adverts, queue="adverts")
    # Telemetry messages taken from the broker and not yet committed (queued or in the batch being committed).
    intake = rt.mqtt.stats() if rt.mqtt is not None else {}
    queues.add(intake.get("unacked_size", 0), queue="readings")
    queues.add(rt.sightings.qsize(), queue="sightings")
    for name, n in sorted(depths.items()):
        queues.add(n, queue=name)
    return queues


def db_state(db: Database) -> str:
    """``ok`` when a write could start now and none has failed for the database's state in the last
    seconds; else ``locked``, ``full``, ``down`` or ``failing`` (it answers a probe, yet writes fail:
    e.g. PostgreSQL's disk is full)."""
    state = db.probe()
    if state == "ok" and db.outage.recent():
        return "failing"
    if state == "ok":
        db.outage.succeeded()
    return state


def readiness(db: Database) -> dict[str, Any]:
    """Ready for traffic: the database can take a write (db_state) and its schema is at this version's
    migrations."""
    state = db_state(db)
    schema = db.schema_state() if state == "ok" else "unknown"
    body: dict[str, Any] = {"status": "ready" if state == "ok" and schema == "current" else "not_ready",
                            "components": {"db": state, "migrations": schema}}
    if state != "ok" and db.outage.active:
        body["components"]["db_error"] = db.outage.reason
    return body
