"""/metrics in the Prometheus text format, through the field's client library (prometheus-client).

The gateway already counts what it does (``Pipeline.stats()``, ``Engine.counts``, the dispatcher's
outcomes); this module gives the generic pieces: metric families built at scrape time (``Family``), the
latency histograms observed on the hot path (``Histogram``, prometheus-client's underneath), and the
client's exposition (``render``). ``flatten_stats`` walks ``Pipeline.stats()`` generically, so a counter
another stage adds to that dict shows up in ``/metrics`` without touching this file. Which families a
running gateway shows is the runtime's business: ``gateway/app/metrics.py``.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import prometheus_client
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

prometheus_client.disable_created_metrics()  # no *_created series: the gateway's counters start with it

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds: from a tenth of a millisecond (a batch committed on the loop) to 10 s (a slow webhook).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_NAME_BAD = re.compile(r"[^a-zA-Z0-9_]")
Labels = tuple[tuple[str, str], ...]


def metric_name(*parts: str) -> str:
    """A valid metric name from free-form parts ("guard", "dropped", "flood" -> guard_dropped_flood)."""
    name = "_".join(_NAME_BAD.sub("_", p).strip("_") for p in parts if p)
    name = re.sub(r"_+", "_", name)
    return name if name and not name[0].isdigit() else f"_{name}"


@dataclass
class Family:
    """One metric family built at scrape time: a name, its type and help, its samples (labels -> value)."""

    name: str
    type: str  # counter | gauge
    help: str
    samples: dict[Labels, float] = field(default_factory=dict)

    def add(self, value: float, **labels: str) -> Family:
        key = tuple(sorted(labels.items()))
        self.samples[key] = self.samples.get(key, 0.0) + float(value)
        return self

    def metric(self) -> Metric:
        """The family as prometheus-client's (a counter's name ends in ``_total``, as the client writes it)."""
        names = sorted({k for labels in self.samples for k, _ in labels})
        cls = CounterMetricFamily if self.type == "counter" else GaugeMetricFamily
        out = cls(self.name, self.help, labels=names)
        for labels, value in sorted(self.samples.items()):
            given = dict(labels)
            out.add_metric([str(given.get(k, "")) for k in names], value)
        return out


class Histogram:
    """A latency histogram with optional labels (prometheus-client's, kept out of any global registry, so
    each runtime has its own)."""

    def __init__(self, name: str, help: str, buckets: Sequence[float] = LATENCY_BUCKETS,
                 labelnames: Sequence[str] = ()) -> None:
        if list(buckets) != sorted(buckets) or not buckets:
            raise ValueError("histogram buckets must be sorted and non-empty")
        self.name, self.help = name, help
        self.labelnames = tuple(labelnames)
        self._h = prometheus_client.Histogram(name, help, labelnames=self.labelnames, buckets=tuple(buckets),
                                              registry=None)

    def observe(self, value: float, *labelvalues: str) -> None:
        if len(labelvalues) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}")
        (self._h.labels(*labelvalues) if self.labelnames else self._h).observe(value)

    def count(self, *labelvalues: str) -> int:
        wanted = dict(zip(self.labelnames, labelvalues, strict=True))
        for fam in self._h.collect():
            for sample in fam.samples:
                if sample.name == f"{self.name}_count" and sample.labels == wanted:
                    return int(sample.value)
        return 0

    def metric(self) -> Metric:
        (fam,) = self._h.collect()
        return fam


def flatten_stats(stats: Mapping[str, Any], prefix: str = "gateway") -> Iterator[tuple[str, float]]:
    """(metric name, value) for every number in a nested dict, depth first, in key order.

    Counts of things (the stages' stats) are monotonic, so they are exported as counters named
    ``<path>_total``; a key ending in ``_size``, ``_depth`` or ``state`` (a current size) is a gauge.
    """
    for key in sorted(stats, key=str):
        value = stats[key]
        name = metric_name(prefix, str(key))
        if isinstance(value, Mapping):
            yield from flatten_stats(value, name)
        elif isinstance(value, int | float):  # bool is an int: a flag exports as 0 or 1
            yield name, float(value)


def is_gauge(name: str) -> bool:
    return name.endswith(("_size", "_depth", "_state", "_open", "_tracked", "_clients", "_now"))


def stats_families(stats: Mapping[str, Any], prefix: str = "gateway") -> list[Family]:
    """The generic part of /metrics: every number in ``Pipeline.stats()`` as its own family."""
    out: list[Family] = []
    for name, value in flatten_stats(stats, prefix):
        if is_gauge(name):
            out.append(Family(name, "gauge", f"Current {name[len(prefix) + 1:].replace('_', ' ')}").add(value))
        else:
            total = name if name.endswith("_total") else f"{name}_total"
            out.append(Family(total, "counter", f"Count of {name[len(prefix) + 1:].replace('_', ' ')}").add(value))
    return out


class _Scrape(Collector):
    """The families of one scrape, for prometheus-client's exposition."""

    def __init__(self, families: Iterable[Family | Histogram]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        seen: set[str] = set()
        for fam in self.families:  # a name seen twice keeps its first family (a fixed one wins over a generic one)
            if fam.name in seen:
                continue
            seen.add(fam.name)
            yield fam.metric()


def render(families: Iterable[Family | Histogram]) -> str:
    """The exposition text (prometheus-client's, format 0.0.4)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Scrape(list(families)))
    return prometheus_client.generate_latest(registry).decode()


def hub_families(hub: Any) -> list[Family]:
    """The live streams: how many are open, how many were cut off for falling behind."""
    return [Family("gateway_stream_clients", "gauge", "Open SSE and WebSocket streams").add(hub.open_streams()),
            Family("gateway_stream_dropped_clients_total", "counter", "Streams cut off for falling behind")
            .add(hub.dropped_clients)]


class RateWindow:
    """Per-second rates of growing totals (e.g. adverts per receiver) over the last ``window_s``: samples of
    the totals taken at the caller's times, so it needs no clock and a test can step it. Samples are kept
    only as long as the window needs them."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, dict[str, int]]] = deque()
        self._rates: dict[str, float] = {}

    def sample(self, now: float, totals: Mapping[str, int]) -> None:
        samples = self._samples
        if samples and now < samples[-1][0]:
            return  # time went backwards (a replayed trace's clock): keep what we have
        samples.append((now, dict(totals)))
        while len(samples) > 2 and samples[1][0] <= now - self.window_s:
            samples.popleft()
        t0, first = samples[0]
        span = now - t0
        self._rates = ({k: max(0, n - first.get(k, 0)) / span for k, n in samples[-1][1].items()}
                       if span > 0 else {})

    def rates(self) -> dict[str, float]:
        """Each total's growth per second between the oldest and the newest sample (a new dict on each sample,
        so a reader on another thread sees one sample's rates whole)."""
        return self._rates
