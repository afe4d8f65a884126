"""`gateway demo`: a simulated store on the real parts (MQTT broker, SQLite, uvicorn, SSE).

People walk in real time and their tags' adverts enter at the scanner boundary; products and
wearables publish over real MQTT; carts arrive over the real HTTP API.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from beacons.scanner import BleakSource, InjectionScanner, ScannerGroup
from devices.broker import ensure_broker
from devices.mqtt import MqttIntake
from devices.mqtt import MqttSettings as IntakeSettings
from gateway.app.ble import ble_retry
from gateway.app.config import ApiSettings, CampaignSettings, DatabaseSettings, Settings, example
from gateway.app.runtime import Runtime
from gateway.app.scenarios import apply_scenario, enrol, enrol_apps
from gateway.clock import SystemClock
from gateway.presence.settings import PresenceSettings
from simulators.carts import cart_upserts
from simulators.scenario import load_scenario
from simulators.store_sim import AppBeacons, StoreSimulator
from simulators.wearables import MqttPublisher, TelemetryModel, run_realtime

if TYPE_CHECKING:  # bumble and bleak's virtual controller (~11 MB): imported only for --radio virtual
    from simulators.virtual_radio import VirtualStore

log = logging.getLogger("gateway.app.demo")


async def run_demo(*, port: int = 8000, scenario_path: str = "examples/store.yaml",
                   campaigns_dir: str = "examples/campaigns", data_dir: str = "data/demo",
                   mqtt_port: int = 1883, stop: asyncio.Event | None = None, seed: int = 1,
                   radio: str = "inject") -> None:
    """``radio``: "inject" hands the simulator's adverts to the runtime; "virtual" puts the tags on
    bumble's virtual air and hears them through the gateway's own bleak scanner, one adapter per receiver."""
    if radio not in ("inject", "virtual"):
        raise ValueError(f"radio must be 'inject' or 'virtual', not {radio!r}")
    scenario = load_scenario(example(scenario_path))
    data = Path(data_dir)
    if data.exists():
        shutil.rmtree(data)  # a demo starts from an empty store every time
    data.mkdir(parents=True)
    settings = apply_scenario(Settings(
        data_dir=str(data), database=DatabaseSettings(url=f"sqlite:///{data / 'gateway.db'}"),
        api=ApiSettings(port=port), campaigns=CampaignSettings(dir=example(campaigns_dir)),
        presence=PresenceSettings(dwell_every_s=5.0)), scenario)

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

    broker = await ensure_broker("127.0.0.1", mqtt_port)
    print(f"MQTT: {broker.description}")
    intake = MqttIntake(IntakeSettings(host="127.0.0.1", port=mqtt_port, client_id=f"gateway-{scenario.store.id}",
                                       store_id=scenario.store.id, protocol=broker.protocol))
    clock = SystemClock()
    virtual: VirtualStore | None = None
    sources: list[BleakSource] = []
    scanner: InjectionScanner | ScannerGroup
    if radio == "virtual":
        from simulators.virtual_radio import VirtualStore

        virtual = VirtualStore(StoreSimulator(scenario, start=clock.now(), seed=seed, duration_s=8 * 3600),
                               clock=clock.now)
        sources = virtual.sources(clock=clock.now, retry=ble_retry())
        scanner = ScannerGroup(sources)
    else:
        scanner = InjectionScanner()
    runtime = Runtime(settings, clock=clock, scanner=scanner, mqtt=intake)
    publisher: MqttPublisher | None = None
    telemetry: asyncio.Task[int] | None = None
    telemetry_stop = asyncio.Event()  # set on the way out, whatever ended the demo
    try:
        if virtual is not None:
            await virtual.start()
            print(f"Radio:  virtual (bumble tags on a LocalLink, heard through bleak on "
                  f"{', '.join(f'{a} = {rx}' for rx, a in virtual.adapter_of.items())})")
        await runtime.start()
        # The customers carry the shop's app: its rotating beacon, no static identifier anyone could follow.
        ids = enrol(runtime.service, scenario, static_beacons=False)
        assert runtime.service.rotating is not None
        app = AppBeacons(settings.identities.app_uuid, settings.identities.app_period_s,
                         enrol_apps(runtime.service.rotating, scenario, ids))
        if virtual is not None:
            virtual.sim.app = app
        base = f"http://127.0.0.1:{port}"
        admin = {"X-API-Key": runtime.admin_key}
        now = runtime.clock.now()
        async with httpx.AsyncClient(base_url=base, headers=admin, timeout=10) as client:
            for body in cart_upserts(scenario, now):
                cart_id = body.pop("cart_id")
                r = await client.put(f"/v1/carts/{cart_id}", json=body)
                r.raise_for_status()
            alice = ids[scenario.people[0].id]
            r = await client.post(f"/v1/profiles/{alice}/tokens")
            r.raise_for_status()
            token = r.json()["token"]

        print(f"API:    {base}   (docs at {base}/docs)")
        print(f"Admin key (send as X-API-Key): {runtime.admin_key}")
        print(f"Dashboard (a one-time sign-in link): {runtime.dashboard.login_link(base)}")
        print(f"Watch {scenario.people[0].name}'s live stream:")
        print(f"  curl -N -H 'Authorization: Bearer {token}' {base}/v1/me/stream")
        print("Decisions follow, one line each. Ctrl-C stops.\n", flush=True)

        sim = virtual.sim if virtual is not None else StoreSimulator(scenario, start=now, seed=seed,
                                                                     duration_s=8 * 3600, app=app)
        publisher = MqttPublisher("127.0.0.1", mqtt_port, protocol=broker.protocol)
        await asyncio.to_thread(publisher.connect)
        # The products' telemetry is the simulator's own real-time loop, over the same MQTT door.
        telemetry = asyncio.create_task(run_realtime(TelemetryModel(scenario, start=now, seed=seed), publisher,
                                                     runtime.clock, telemetry_stop))
        last_adv = now
        while not stop.is_set():
            if telemetry.done():
                await telemetry  # it only ends early on a failed publish: raise that here
            t = runtime.clock.now()
            if virtual is not None:
                await virtual.sync()
            else:
                runtime.inject(sim.advertisements(last_adv, t))
            last_adv = t
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)
    finally:
        print("\nstopping...", flush=True)
        telemetry_stop.set()
        if telemetry is not None:
            ended = (await asyncio.gather(telemetry, return_exceptions=True))[0]  # its last pass: what fell due
            if isinstance(ended, Exception):
                log.warning("telemetry publishing stopped: %s", ended)
        if publisher is not None:
            await asyncio.to_thread(publisher.close)
        await runtime.stop()
        if virtual is not None:
            await virtual.close()
            heard = sum(s.received for s in sources)
            print(f"virtual radio: the gateway heard {heard} adverts")
        await broker.stop()
        print("stopped.")
