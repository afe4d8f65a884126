"""Each benchmark runs end to end with --quick and ends with one JSON object holding its keys.

Only the shape is checked, never the speed: that lives in the benchmarks themselves. What a benchmark
checks for itself (the soak: head office holds what the store holds) must hold, since a false one there is
a bug, not a slow machine. Add a benchmark as one more (script, keys) row.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

BENCHMARKS = [
    ("ble_pipeline.py", {"adverts_per_s", "anchor_adverts_per_s", "ratio", "adverts", "identities", "campaigns",
                         "profiles", "decisions", "notifications"}),
    ("ha_occupancy.py", {"people", "zones", "cpu_us_per_step", "wall_us_per_step", "count_changes",
                         "count_messages"}),
    ("footprint.py", {"rss_mb", "ready_s", "idle_rss_mb", "hwm_mb", "cpu_s", "rss_ok", "ready_ok"}),
    ("dashboard_load.py", {"first_load_bytes", "first_load_gzip_bytes", "budget_bytes", "ratio"}),
    ("notify_latency.py", {"p50_ms", "p99_ms", "people", "people_requested", "goal_p99_ms", "ratio"}),
    ("presence_quality.py", {"zone_accuracy", "false_exits_per_person_hour", "enter_latency_p90_s", "baselines"}),
    ("record_overhead.py", {"adverts", "us_per_advert_off", "us_per_advert_on", "overhead_pct", "recorded_rows"}),
    ("rotating.py", {"adverts_per_s", "baseline_adverts_per_s", "ratio", "table_mb", "cpu_s", "wall_s",
                     "baseline_cpu_s", "enrolled"}),
    ("soak.py", {"rss_mb", "rss_growth_pct", "tables", "tables_max", "figures", "figures_match", "cpu_s", "wall_s",
                 "hq_db", "hq_rss_mb", "hq_rss_growth_pct", "hq_tables", "hq_events", "hq_equal", "hq_mismatches",
                 "uplink_published"}),
    ("sse_fanout.py", {"clients", "fanout_s", "received", "fired", "goal_fanout_s", "ratio"}),
    ("telemetry_ingest.py", {"msgs_per_s", "anchor_msgs_per_s", "ratio", "ratio_2_workers", "lost",
                             "lost_2_workers", "messages", "devices"}),
]


@pytest.mark.parametrize(("script", "keys"), BENCHMARKS, ids=[s for s, _ in BENCHMARKS])
def test_benchmark_quick_run_ends_with_json_holding_its_keys(script: str, keys: set[str]) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines, "the benchmark printed nothing"
    result = json.loads(lines[-1])
    assert isinstance(result, dict)
    missing = keys - result.keys()
    assert not missing, f"{script} lacks {sorted(missing)}"
    if script == "soak.py":  # head office, fed by the store's uplink, holds the store's rows and figures
        assert result["figures_match"], result["figures"]
        assert result["hq_mismatches"] == [] and result["hq_equal"] is True, result["hq_mismatches"]
        assert result["uplink_published"] > 0 and result["hq_events"] > 0
