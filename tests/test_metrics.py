"""/metrics over the wire: a live gateway takes real traffic, then its exposition is scraped and parsed.

The text is parsed with prometheus_client's own parser (an independent implementation of the
format), so a malformed line, a wrong type or a histogram whose buckets do not add up fails here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from beacons.types import Advertisement
from gateway.metrics import Family, Histogram, RateWindow, flatten_stats, metric_name, render, stats_families
from tests.live_gateway import T0, base_url, enrol, live_settings, running, walk_in
from tests.sse import SseReader


def parse(text: str) -> dict[str, Any]:
    """name -> {"type", "samples": {(sample name, frozenset(labels)): value}}."""
    out: dict[str, Any] = {}
    for fam in text_string_to_metric_families(text):
        out[fam.name] = {"type": fam.type, "samples": {(s.name, frozenset(s.labels.items())): s.value
                                                       for s in fam.samples}}
    return out


def value(metrics: dict[str, Any], family: str, sample: str | None = None, **labels: str) -> float:
    fam = metrics[family]
    return float(fam["samples"][(sample or family, frozenset(labels.items()))])


async def test_metrics_after_real_traffic_count_what_happened(tmp_path: Path) -> None:
    async with running(live_settings(tmp_path)) as rt:
        pid, token = enrol(rt, "alice", 1)
        async with httpx.AsyncClient(base_url=base_url(rt), timeout=10) as client:
            reader = await SseReader(client, "/v1/me/stream", {"Authorization": f"Bearer {token}"}).start()
            try:
                assert reader.status == 200
                adverts = walk_in(1, T0)
                broken = Advertisement("06:11:22:33:44:55", -70, T0, "rx", b"\x1a\xff\x4c\x00\x02")  # truncated AD
                rt.inject([*adverts, broken])
                await rt.flush()
                assert await reader.wait(lambda r: len(r.events) == 1)
                # A stage adds its own counters to Pipeline.stats(): they appear without touching the collector.
                stats = rt.pipeline.stats
                rt.pipeline.stats = lambda: {**stats(), "telemetry": {"rejected": {"bad_json": 2}}}  # type: ignore
                r = await client.get("/metrics")
            finally:
                await reader.close()
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    m = parse(r.text)

    assert value(m, "gateway_adverts", "gateway_adverts_total") == len(adverts) + 1
    # per receiver, every advert it heard (the malformed one too: the receiver's traffic, beacon or not)
    assert value(m, "gateway_receiver_adverts", "gateway_receiver_adverts_total", receiver="rx") == len(adverts) + 1
    assert m["gateway_adverts"]["type"] == "counter"
    assert value(m, "gateway_readings", "gateway_readings_total") == 0
    assert value(m, "gateway_decisions", "gateway_decisions_total", reason="fired") == 1
    assert value(m, "gateway_deliveries", "gateway_deliveries_total", channel="sse", outcome="streamed") == 1
    # The malformed advert is a parse reject; the stage's own new key shows up as a counter.
    rejects = {name: fam for name, fam in m.items() if name.startswith("gateway_parse_rejected")}
    assert sum(next(iter(f["samples"].values())) for f in rejects.values()) >= 1, sorted(m)
    assert value(m, "gateway_telemetry_rejected_bad_json", "gateway_telemetry_rejected_bad_json_total") == 2
    # Queue depths: nothing waits once the stream took it.
    assert value(m, "gateway_queue_depth", queue="adverts") == 0
    assert value(m, "gateway_queue_depth", queue="outbox_pending") == 0
    assert value(m, "gateway_outbox_pending") == 0
    assert value(m, "gateway_stream_clients") in (0, 1)  # the reader just hung up; the server may not know yet
    # Latency histograms: one observation each, in some bucket, counted in +Inf.
    h = m["gateway_advert_to_commit_seconds"]
    assert h["type"] == "histogram"
    assert value(m, "gateway_advert_to_commit_seconds", "gateway_advert_to_commit_seconds_count") == 1
    assert value(m, "gateway_advert_to_commit_seconds", "gateway_advert_to_commit_seconds_bucket", le="+Inf") == 1
    assert value(m, "gateway_commit_to_delivery_seconds", "gateway_commit_to_delivery_seconds_count",
                 channel="sse") == 1
    assert value(m, "gateway_present") == 1  # alice is in the shop (the truncated advert never parsed)
    assert pid


def test_histogram_buckets_are_cumulative_and_labelled() -> None:
    h = Histogram("x_seconds", "x", buckets=(0.1, 1.0), labelnames=("channel",))
    for v in (0.05, 0.5, 0.5, 5.0):
        h.observe(v, "sse")
    h.observe(0.2, "webhook")
    m = parse(render([h]))
    assert value(m, "x_seconds", "x_seconds_bucket", channel="sse", le="0.1") == 1
    assert value(m, "x_seconds", "x_seconds_bucket", channel="sse", le="1.0") == 3
    assert value(m, "x_seconds", "x_seconds_bucket", channel="sse", le="+Inf") == 4
    assert value(m, "x_seconds", "x_seconds_sum", channel="sse") == pytest.approx(6.05)
    assert value(m, "x_seconds", "x_seconds_count", channel="webhook") == 1
    with pytest.raises(ValueError):
        h.observe(1.0)  # the label is required


def test_generic_stats_become_valid_families_whatever_their_keys() -> None:
    stats = {"parse": {"rejected": {"bad-length": 3, "9lives": 1}}, "guard": {"state_size": 12, "dropped": {}},
             "figures": {"adverts": 5, "ok_total": 2}}
    names = dict(flatten_stats(stats))
    assert names["gateway_parse_rejected_bad_length"] == 3
    fams = {f.name: f for f in stats_families(stats)}
    assert fams["gateway_guard_state_size"].type == "gauge"
    assert fams["gateway_figures_adverts_total"].type == "counter"
    assert "gateway_figures_ok_total" in fams  # already ends in _total: not doubled
    m = parse(render([*fams.values(), Family("a", "gauge", 'quote " and \\ backslash').add(1, zone='s"1\n')]))
    assert value(m, "gateway_parse_rejected_9lives", "gateway_parse_rejected_9lives_total") == 1
    assert value(m, "a", zone='s"1\n') == 1
    assert metric_name("9", "x y") == "_9_x_y"


def test_rate_window_gives_each_totals_growth_per_second_over_its_window() -> None:
    w = RateWindow(window_s=10.0)
    assert w.rates() == {}
    w.sample(100.0, {"rx-a": 0})
    assert w.rates() == {}  # one sample: no span yet
    w.sample(105.0, {"rx-a": 50, "rx-b": 10})  # a receiver that appears counts from zero
    assert w.rates() == {"rx-a": 10.0, "rx-b": 2.0}
    w.sample(110.0, {"rx-a": 150, "rx-b": 10})
    assert w.rates() == {"rx-a": 15.0, "rx-b": 1.0}
    w.sample(120.0, {"rx-a": 150, "rx-b": 10})  # silence: the window slides past the busy seconds
    assert w.rates() == {"rx-a": 0.0, "rx-b": 0.0}
    before = w.rates()
    w.sample(119.0, {"rx-a": 999})  # a clock that went back is ignored
    assert w.rates() == before
