"""`gateway demo --radio virtual` end to end: bumble tags on a virtual link, heard through bleak, decided on."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from sqlalchemy import func, select

from gateway.app.demo import run_demo
from gateway.storage.db import Database
from gateway.storage.models import Decision, Visit
from tests.conftest import free_port

DEADLINE_S = 45.0  # a bound, not a timing assertion: the first decisions come a few seconds after start


def _counts(db_file: Path) -> tuple[int, int]:
    if not db_file.exists():
        return 0, 0
    db = Database(f"sqlite:///{db_file}")
    try:
        with db.session() as s:
            return (s.scalar(select(func.count()).select_from(Decision)) or 0,
                    s.scalar(select(func.count()).select_from(Visit)) or 0)
    except Exception:  # the demo has not created its tables yet
        return 0, 0
    finally:
        db.engine.dispose()


async def test_demo_with_the_virtual_radio_hears_adverts_through_bleak_and_decides(tmp_path, mosquitto, capsys):
    data = tmp_path / "demo"
    stop = asyncio.Event()
    demo = asyncio.create_task(run_demo(port=free_port(), data_dir=str(data), mqtt_port=mosquitto.port,
                                        stop=stop, radio="virtual"))
    loop = asyncio.get_running_loop()
    end = loop.time() + DEADLINE_S
    decisions = visits = 0
    while loop.time() < end and not demo.done():
        await asyncio.sleep(0.5)
        decisions, visits = await asyncio.to_thread(_counts, data / "gateway.db")
        if decisions and visits:
            break
    stop.set()
    await asyncio.wait_for(demo, 30)  # raises whatever the demo raised
    out = capsys.readouterr().out
    assert "Radio:  virtual" in out and "heard through bleak" in out
    heard = re.search(r"the gateway heard (\d+) adverts", out)
    assert heard and int(heard.group(1)) > 0, out[-2000:]
    assert visits >= 1, "nobody entered a zone"
    assert decisions >= 1, "no campaign decision was made"
