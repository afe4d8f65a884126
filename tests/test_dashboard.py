"""The dashboard's pieces without a browser: one-time links, sessions, the walk's labels and their file,
the floor plan's drawing box, and that a printed link's token never reaches a log line."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import pytest

from api.dashboard import Dashboard
from api.dashboard.plan import plan, zone_names
from api.dashboard.sessions import LoginTokens, Sessions, digest
from api.dashboard.walks import NO_ZONE, Walk, WalkError, Walks, labels_csv, walk_labels
from gateway.clock import VirtualClock
from gateway.presence.settings import FloorZone, ReceiverSettings, ZoneBand
from gateway.presence.traces import Label, read_labels
from gateway.security.auth import ALL_SCOPES, Principal

T0 = 1_780_300_800.0  # 2026-06-01 08:00 UTC
ADMIN = Principal("key:config", ALL_SCOPES)
ZONES = [FloorZone("shop", [[0, 0], [6, 0], [6, 4], [0, 4]]), FloorZone("till", [[6, 0], [9, 0], [9, 4], [6, 4]])]
RECEIVERS = [ReceiverSettings("rx", [ZoneBand("shop", 5.0)], position=[2.0, 2.0]),
             ReceiverSettings("rx2", [ZoneBand("till", 3.0)], position=[8.0, 3.0]),
             ReceiverSettings("door", [ZoneBand("shop", 2.0)])]


def test_a_login_token_works_once_and_only_before_it_expires() -> None:
    tokens = LoginTokens(ttl_s=300)
    first, late = tokens.issue(T0), tokens.issue(T0)
    assert tokens.redeem(first, T0 + 10)
    assert not tokens.redeem(first, T0 + 11)  # spent
    assert not tokens.redeem(late, T0 + 300)  # expired at the ttl
    assert not tokens.redeem(late, T0 + 1)  # and spent by the failed try
    assert not tokens.redeem("made-up", T0)


def test_only_hashes_are_kept() -> None:
    tokens, sessions = LoginTokens(), Sessions()
    raw = tokens.issue(T0)
    sid, _ = sessions.open(ADMIN, T0)
    kept = repr(vars(tokens)) + repr(vars(sessions))
    assert raw not in kept and sid not in kept
    assert digest(raw) in kept and digest(sid) in kept


def test_a_session_expires_and_a_closed_one_is_gone() -> None:
    sessions = Sessions(ttl_s=3600)
    sid, opened = sessions.open(ADMIN, T0)
    assert sessions.get(sid, T0 + 3599) == opened
    assert sessions.get(sid, T0 + 3600) is None
    other, _ = sessions.open(ADMIN, T0)
    sessions.close(other)
    assert sessions.get(other, T0) is None
    assert sessions.get(None, T0) is None


def test_sessions_are_bounded_oldest_first() -> None:
    sessions = Sessions(ttl_s=3600, max_sessions=3)
    ids = [sessions.open(ADMIN, T0 + i)[0] for i in range(4)]
    assert len(sessions) == 3
    assert sessions.get(ids[0], T0 + 5) is None and sessions.get(ids[3], T0 + 5) is not None


def test_taps_become_labels_from_each_tap_to_the_next_and_the_stop() -> None:
    walk = Walk("ibeacon:x:1:2", T0, [(T0 + 5, "shop"), (T0 + 45, "till"), (T0 + 65, NO_ZONE), (T0 + 65, "shop")],
                stopped=T0 + 80)
    assert walk_labels(walk) == [Label("ibeacon:x:1:2", T0 + 5, T0 + 45, "shop"),
                                 Label("ibeacon:x:1:2", T0 + 45, T0 + 65, "till"),
                                 Label("ibeacon:x:1:2", T0 + 65, T0 + 80, "shop")]  # the zero-length tap: nothing
    walk.stopped = None
    assert [lb.zone for lb in walk_labels(walk)] == ["shop", "till"]  # under way: the last tap is still open


def test_the_labels_csv_reads_back_as_gateway_calibrate_reads_it() -> None:
    walk = Walk("ibeacon:x:1:2", T0, [(T0 + 1.25, "shop"), (T0 + 30.5, NO_ZONE)], stopped=T0 + 40)
    labels, errors = read_labels(io.StringIO(labels_csv(walk_labels(walk))))
    assert errors.count == 0
    assert labels == [Label("ibeacon:x:1:2", T0 + 1.25, T0 + 30.5, "shop"), Label("ibeacon:x:1:2", T0 + 30.5, T0 + 40,
                                                                                   None)]


def test_walks_survive_a_restart_and_refuse_what_they_cannot_take(tmp_path: Path) -> None:
    path = tmp_path / "dashboard" / "walks.json"
    walks = Walks(path)
    walks.start("ibeacon:x:1:2", T0)
    walks.tap("ibeacon:x:1:2", "shop", ["shop", "till"], T0 + 3)
    with pytest.raises(WalkError, match="no zone 'attic'"):
        walks.tap("ibeacon:x:1:2", "attic", ["shop", "till"], T0 + 4)
    with pytest.raises(WalkError, match="already under way"):
        walks.start("ibeacon:x:1:2", T0 + 5)
    with pytest.raises(WalkError, match="press start first"):
        walks.stop("ibeacon:y:1:2", T0 + 5)
    with pytest.raises(WalkError, match="no commas"):
        walks.start("a,b", T0)
    again = Walks(path)  # a reload, or a restart
    assert again.of("ibeacon:x:1:2") == Walk("ibeacon:x:1:2", T0, [(T0 + 3, "shop")])
    assert list(again.walks) == ["ibeacon:x:1:2"]  # the refused requests left nothing


def test_a_broken_walks_file_is_an_error_naming_its_line(tmp_path: Path) -> None:
    path = tmp_path / "walks.json"
    path.write_text('{"walks": [\n {"tag": "t", "started": 1},\n oops\n]}\n')
    with pytest.raises(ValueError, match=r"walks.json:3: not JSON"):
        Walks(path)
    path.write_text(json.dumps({"walks": [{"tag": "ok", "started": 1}, {"tag": "x", "started": "soon"}]}, indent=1))
    with pytest.raises(ValueError, match=r"walk 2 \(line \d+\) is malformed"):
        Walks(path)


def test_the_plan_flips_y_and_boxes_zones_and_placed_receivers() -> None:
    p = plan(ZONES, RECEIVERS)
    assert p.view_box == "0 0 10.2 5.2"  # 9 x 4 m and 0.6 m around
    shop = p.zones[0]
    assert shop.points.split()[0] == "0.6,4.6"  # the config's (0, 0) is the bottom-left corner on screen
    assert (shop.label_x, shop.label_y) == (3.6, 2.6)
    assert [(r.id, r.x, r.y) for r in p.receivers] == [("rx", 2.6, 2.6), ("rx2", 8.6, 1.6)]
    assert p.unplaced == ["door"]
    assert plan([], [ReceiverSettings("a")]).empty


def test_the_zones_to_tap_are_the_plan_or_else_the_receivers_bands() -> None:
    assert zone_names(ZONES, RECEIVERS) == ["shop", "till"]
    assert zone_names([], RECEIVERS) == ["shop", "till"]


def test_a_printed_login_link_is_masked_in_the_logs() -> None:
    from gateway.app.logs import Redactor

    dash = Dashboard(ZONES, RECEIVERS, clock=VirtualClock(T0))
    link = dash.login_link("http://127.0.0.1:8000")
    token = link.split("token=")[1]
    assert link.startswith("http://127.0.0.1:8000/dashboard/login?token=")
    line = Redactor()(f'127.0.0.1:5000 - "GET /dashboard/login?token={token} HTTP/1.1" 303')
    assert token not in line and "token=***" in line


async def test_the_live_stream_sends_changes_and_ends_when_the_gateway_stops(tmp_path: Path) -> None:
    import httpx

    from tests.live_gateway import base_url, live_settings, running, walk_in

    async with running(live_settings(tmp_path)) as rt:
        rt.dashboard.stream_every_s = 0.05
        base = base_url(rt)
        async with httpx.AsyncClient(base_url=base, timeout=10) as c:
            assert (await c.get("/dashboard/stream")).status_code == 401  # no session, no stream
            assert (await c.get(rt.dashboard.login_link(base))).status_code == 303
            async with c.stream("GET", "/dashboard/stream") as stream:
                assert stream.headers["content-type"].startswith("text/event-stream")
                seen: list[dict[str, object]] = []
                async for line in stream.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    seen.append(json.loads(line[6:]))
                    if len(seen) == 1:  # the view as it is: nobody in; then someone walks in
                        rt.inject(walk_in(1, rt.clock.now()))
                        await rt.flush()
                    else:
                        rt.dashboard.close()  # what Runtime.stop does first: the stream ends, not the timeout
                assert [v["anonymous"] for v in seen] == [0, 1]  # one event per change, nothing in between
                assert rt.dashboard.closed


async def test_open_pages_share_one_live_view_per_look() -> None:
    """Twenty store pages streaming at once walk the tracked people once per look, not twenty times."""
    ticks = [0.0]
    dash = Dashboard(monotonic=lambda: ticks[0], stream_every_s=1.0)
    computed: list[int] = []

    async def compute() -> dict[str, int]:
        computed.append(1)
        await asyncio.sleep(0)  # the others ask while this one is computed: they wait for it
        return {"enrolled": len(computed)}

    views = await asyncio.gather(*(dash.shared(compute) for _ in range(20)))
    assert len(computed) == 1 and set(views) == {'{"enrolled":1}'}
    ticks[0] = 0.4  # within half a look: still the same view
    assert await dash.shared(compute) == '{"enrolled":1}' and len(computed) == 1
    ticks[0] = 0.5
    assert await dash.shared(compute) == '{"enrolled":2}' and len(computed) == 2
