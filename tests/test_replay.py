"""`gateway replay`: a trace through the tracker in virtual time, scored against labels beside the baselines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.app.cli import main
from gateway.presence.scoring import NaiveBayesFingerprint, replay, score_labels, steps
from gateway.presence.traces import Label, open_trace
from tests.fixtures import TWO_RECEIVERS as CONFIG

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "data" / "datasets"
SILENT = """
[[receivers]]
id = "down"
zones = [{ name = "back", max_m = 3.0 }]
"""


def walk(path: Path, bad: str = "") -> Path:
    """A tag 1 m from receiver a for 60 s, then 1 m from b for 60 s, 5 Hz, a little noise."""
    rows = ["time,receiver,beacon,rssi"]
    for i in range(600):
        t = i * 0.2
        near, far = ("a", "b") if t < 60 else ("b", "a")
        rows += [f"{t:.1f},{near},tag,{-59 + (i % 5) - 2}", f"{t:.1f},{far},tag,{-82 + (i % 3)}"]
    path.write_text("\n".join(rows) + "\n" + bad)
    return path


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "gw.toml").write_text(CONFIG)
    (tmp_path / "silent.toml").write_text(CONFIG + SILENT)
    (tmp_path / "labels.csv").write_text("beacon,start,end,zone\ntag,0,60,left\ntag,60,120,right\n")
    return {"trace": walk(tmp_path / "trace.csv"), "config": tmp_path / "gw.toml",
            "silent": tmp_path / "silent.toml", "labels": tmp_path / "labels.csv"}


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, list[str], str]:
    rc = main(["replay", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out.splitlines(), err


def test_replay_prints_one_event_per_line_enter_left_then_right(files: dict[str, Path],
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    rc, lines, err = run(capsys, files["trace"], "--config", files["config"])
    assert rc == 0 and err == ""
    events = [json.loads(line) for line in lines]
    assert {e["event"] for e in events} <= {"enter", "dwell", "exit"}
    moves = [(e["event"], e["zone"]) for e in events if e["event"] != "dwell"]
    assert moves == [("enter", "left"), ("exit", "left"), ("enter", "right"), ("exit", "right")]
    enter_right = next(e for e in events if e == {**e, "event": "enter", "zone": "right"})
    assert 60 <= enter_right["time"] <= 66 and enter_right["beacon"] == "tag"
    assert events[-1]["time"] >= 119.8  # the last exit comes on silence, after the trace ends


def test_with_labels_the_last_line_scores_ours_and_the_three_baselines(files: dict[str, Path],
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    rc, lines, _ = run(capsys, files["trace"], "--config", files["config"], "--labels", files["labels"])
    assert rc == 0
    result = json.loads(lines[-1])
    assert set(result["baselines"]) == {"altbeacon_running_average", "espresense_tukey", "loudest_receiver"}
    for scores in [result["ours"], *result["baselines"].values()]:
        assert {"zone_accuracy", "enter_latency_p50_s", "enter_latency_p90_s", "false_exits_per_person_hour",
                "zone_changes_per_hour", "truth_zone_changes_per_hour"} <= set(scores)
    assert result["ours"]["zone_accuracy"] > 0.9 and result["ours"]["false_exits"] == 0
    assert result["ours"]["zone_changes_per_hour"] == result["ours"]["truth_zone_changes_per_hour"] == 60.0
    assert result["sightings"] == 1200 and result["bad_rows"] == 0
    assert all("event" in json.loads(line) for line in lines[:-1])


def test_a_receiver_silent_for_the_whole_trace_changes_nothing_it_did_not_hear(
        files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    rc, lines, err = run(capsys, files["trace"], "--config", files["silent"], "--labels", files["labels"])
    assert rc == 0 and err == ""
    events = [json.loads(line) for line in lines[:-1]]
    assert "back" not in {e["zone"] for e in events}
    assert [e["zone"] for e in events if e["event"] == "enter"] == ["left", "right"]
    result = json.loads(lines[-1])
    assert result["ours"]["zone_accuracy"] > 0.9
    assert all(s["zone_accuracy"] > 0.5 for s in result["baselines"].values())


def test_bad_rows_are_reported_with_line_numbers_and_the_rest_replays(tmp_path: Path, files: dict[str, Path],
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    trace = walk(tmp_path / "bad.csv", "12x,a,tag,-50\n130,zz,tag,-50\n130,a,tag\n")
    rc, lines, err = run(capsys, trace, "--config", files["config"])
    assert rc == 0
    assert "3 bad rows skipped" in err
    assert f"{trace} line 1202: time '12x' is not a number" in err
    assert f"{trace} line 1203: receiver 'zz' is not in the config's [[receivers]]" in err
    assert f"{trace} line 1204: expected 4 columns, got 3" in err
    assert "Traceback" not in err and lines


@pytest.mark.parametrize("content, message", [
    ("rssi,time\n", "line 1: expected the header time,receiver,beacon,rssi"),
    (None, "No such file"),
])
def test_an_unusable_trace_or_config_is_one_clear_line_and_exit_2(tmp_path: Path, files: dict[str, Path],
                                                                 capsys: pytest.CaptureFixture[str],
                                                                 content: str | None, message: str) -> None:
    trace = tmp_path / "t.csv"
    if content is not None:
        trace.write_text(content)
    rc, lines, err = run(capsys, trace, "--config", files["config"])
    assert rc == 2 and lines == [] and message in err and "Traceback" not in err
    rc, _, err = run(capsys, files["trace"], "--config", tmp_path / "none.toml")
    assert rc == 2 and err.startswith("gateway replay:")


def test_score_labels_counts_seconds_latency_false_exits_and_changes() -> None:
    labels = [Label("p", 0.0, 20.0, "a"), Label("p", 20.0, 40.0, "b")]
    events = [("enter", "p", "a", 2.0), ("exit", "p", "a", 10.0), ("enter", "p", "a", 12.0),
              ("exit", "p", "a", 25.0), ("enter", "p", "b", 25.0)]
    s = score_labels(events, labels, exit_after_s=10.0)
    # Wrong: 0-1 (not yet in), 10-11 (a false exit), 23-24 (still a after the 3 s grace), of 40 seconds.
    assert s["zone_accuracy"] == round(34 / 40, 4)
    assert (s["enter_latency_p50_s"], s["enter_latency_p90_s"]) == (5.0, 5.0)  # 2 s and 5 s: p50 is the upper
    assert s["false_exits"] == 1 and s["false_exits_per_person_hour"] == 90.0  # one exit in 40 s
    # Ours: none -> a -> none -> a -> b: four changes; the labels': none -> a -> b: two.
    assert s["zone_changes_per_hour"] == 360.0 and s["truth_zone_changes_per_hour"] == 180.0


def test_a_walks_unlabelled_time_can_be_left_unscored() -> None:
    # A staff walk: a, then 10 s walking to b, unlabelled; the tracker holds a until it reaches b.
    labels = [Label("p", 0.0, 20.0, "a"), Label("p", 30.0, 50.0, "b")]
    events = [("enter", "p", "a", 0.0), ("exit", "p", "a", 31.0), ("enter", "p", "b", 31.0)]
    as_none = score_labels(events, labels, exit_after_s=10.0)
    unknown = score_labels(events, labels, exit_after_s=10.0, gaps_unknown=True)
    assert as_none["zone_accuracy"] == round(42 / 50, 4)  # 23-30 s: a held in "no zone" (past the 3 s grace)
    assert unknown["zone_accuracy"] == round(39 / 40, 4)  # the labelled seconds only: 30 s, b not yet entered
    assert unknown["false_exits"] == as_none["false_exits"] == 0


def test_presence_real_on_the_excerpts_prints_figures_for_ours_and_each_baseline() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "presence_real.py"), "--root", str(FIXTURES),
                          "--quick"], capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for dataset in ("flat", "hall"):
        d = result[dataset]
        assert d["sightings"] > 0 and d["truth_zone_changes_per_hour"] > 0
        assert 0.0 <= d["ours"]["uncalibrated"]["zone_accuracy"] <= 1.0
        calibrated = d["ours"]["calibrated"]["zone_accuracy"]  # the hall excerpt has no calibration track
        assert calibrated is None if dataset == "hall" else 0.0 <= calibrated <= 1.0
        assert {"altbeacon_running_average", "espresense_tukey", "loudest_receiver"} <= set(d["baselines"])
    held = result["flat"]["held_out"]  # the quick flat: one calibration session, the robot test held out
    assert held["calibrate_on"] == ["flat-calib1"] and held["score_on"] == ["flat-robot-test"]
    assert 0.0 <= held["naive_bayes_fingerprint"]["zone_accuracy"] <= 1.0


def test_the_fingerprint_baseline_learns_which_receiver_means_which_zone(tmp_path: Path) -> None:
    trace = walk(tmp_path / "t.csv")
    labels = [Label("tag", 0.0, 60.0, "left"), Label("tag", 60.0, 120.0, "right")]
    fp = NaiveBayesFingerprint(["a", "b"], exit_after_s=10.0)
    f, reader = open_trace(trace)
    with f:
        fp.fit(reader, labels)
    assert set(fp.model) == {"left", "right"}
    assert fp.model["left"][0][0] > fp.model["left"][1][0] + 15  # receiver a is loud in "left", b faint
    swapped = tmp_path / "swapped.csv"  # the same walk the other way round: right first
    swapped.write_text(trace.read_text().replace(",a,", ",x,").replace(",b,", ",a,").replace(",x,", ",b,"))
    f, reader = open_trace(swapped)
    with f:
        events, _ = replay(fp, steps(reader))
    assert [(k, z) for k, _, z, _ in events] == [("enter", "right"), ("exit", "right"), ("enter", "left")]


def test_replay_speed_quick_reports_sightings_per_cpu_second() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "replay_speed.py"), "--quick"],
                         capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["sightings"] > 10_000 and result["events"] > 0
    assert result["sightings_per_cpu_s"] > 0 and result["parse_sightings_per_cpu_s"] >= result["sightings_per_cpu_s"]
