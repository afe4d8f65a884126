"""Bringing a simulated store's people, products and layout into a gateway.

Enrolment goes through the same service the admin API uses; nothing here bypasses consent
or identity rules.
"""

from __future__ import annotations

from gateway.app.config import Settings
from gateway.presence.floor import rectangle
from gateway.presence.settings import FloorZone, ReceiverSettings, ZoneBand
from gateway.profiles.rotating import RotatingIdentities
from gateway.profiles.service import GatewayService, NewProfile
from simulators.scenario import Scenario


def apply_scenario(settings: Settings, scenario: Scenario) -> Settings:
    """The store, its receivers (bands and positions) and its floor plan: each zone's rect as a ``[[zones]]``
    polygon, so the tracker gets the same adjacency a hand-written gateway.toml would give it."""
    settings.store.id = scenario.store.id
    settings.store.name = scenario.store.name
    settings.store.timezone = scenario.store.timezone
    settings.receivers = [
        ReceiverSettings(id=r.id, zones=[ZoneBand(z.name, z.max_m) for z in r.zones],
                         measured_power=r.measured_power, path_loss_exponent=r.path_loss_exponent,
                         position=[float(r.position[0]), float(r.position[1])])
        for r in scenario.receivers
    ]
    settings.zones = [FloorZone(z.name, rectangle(*z.rect)) for z in scenario.zones]
    return settings


def enrol(service: GatewayService, scenario: Scenario, *, static_beacons: bool = True) -> dict[str, int]:
    """Profiles (with beacon, email and consents), owned devices and the catalogue; returns person -> profile id.
    ``static_beacons=False``: no beacon identifier (the people get a rotating one, ``enrol_apps``)."""
    ids: dict[str, int] = {}
    for p in scenario.people:
        identifiers = [("beacon", p.beacon.key)] if static_beacons else []
        if p.email:
            identifiers.append(("email_sha256", p.email))
        view = service.create_profile(NewProfile(
            external_id=p.id, name=p.name, attributes=dict(p.attributes), identifiers=identifiers,
            consents={purpose: True for purpose in p.consents}), source="scenario")
        ids[p.id] = view["id"]
    for d in scenario.devices:
        service.register_device(d.id, d.kind, ids.get(d.owner))
    service.upsert_catalogue({"sku": c.sku, "name": c.name, "price": c.price, "zone": c.zone, "aisle": c.aisle}
                             for c in scenario.catalogue)
    return ids


def enrol_apps(rotating: RotatingIdentities, scenario: Scenario, ids: dict[str, int]) -> dict[str, bytes]:
    """Each enrolled person's app gets its rotating beacon's secret (as the API's POST would hand it to the
    app); returns walker key (the person's beacon key) -> secret, what the simulated phones advertise from."""
    return {p.beacon.key: bytes.fromhex(rotating.enrol(ids[p.id], "app")["secret"]) for p in scenario.people}
