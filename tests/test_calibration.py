"""Calibration: zone signatures learned from a labelled walk, the TOML that keeps them, and the tracker,
replay and `gateway calibrate` that use them."""

from __future__ import annotations

import dataclasses
import json
import random
import sys
from pathlib import Path

import pytest

from beacons.types import Sighting
from gateway.app.cli import main
from gateway.errors import ConfigError
from gateway.presence.calibration import (
    TUNABLE,
    WINDOW_FLOOR_DBM,
    Calibration,
    dumps,
    learn,
    load,
    parse,
    report,
    separations,
)
from gateway.presence.settings import PresenceSettings, ReceiverSettings, ZoneBand
from gateway.presence.traces import Label, open_trace, read_labels
from gateway.presence.tracker import PresenceTracker
from gateway.presence.tuning import BAND_WEIGHTS, learn_tuned, tune_scores
from tests.fixtures import TWO_RECEIVERS as CONFIG

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "data" / "datasets"  # excerpts of the public datasets (SOURCE.md, licences beside)

# Two receivers 10 m apart; "middle" lies between them and has no receiver (no band) of its own.
RECEIVERS = [ReceiverSettings("a", [ZoneBand("left", 3.0)], measured_power=-59),
             ReceiverSettings("b", [ZoneBand("right", 3.0)], measured_power=-59)]
MEANS = {"left": (-55, -80), "middle": (-68, -68), "right": (-80, -55)}  # (a, b) dBm per zone


def walk(route: list[tuple[str, float]], seed: int, key: str = "tag",
         means: dict[str, tuple[int, int]] | None = None) -> tuple[list[Sighting], list[Label]]:
    """A tag walking ``route`` (zone, seconds), heard by both receivers at 5 Hz with 4 dB of noise around
    ``means`` (default ``MEANS``)."""
    means = means or MEANS
    rng = random.Random(seed)
    sightings, labels, t0 = [], [], 0.0
    for zone, seconds in route:
        for i in range(int(seconds * 5)):
            t = t0 + i / 5
            for rx, mean in zip("ab", means[zone], strict=True):
                sightings.append(Sighting(key, rx, round(mean + rng.gauss(0, 4)), t, None))
        labels.append(Label(key, t0, t0 + seconds, zone))
        t0 += seconds
    return sightings, labels


ROUTE = [("left", 40.0), ("middle", 40.0), ("right", 40.0), ("middle", 30.0), ("left", 30.0)]


@pytest.fixture(scope="module")
def cal() -> Calibration:
    sightings, labels = walk(ROUTE, seed=1)
    return learn(sightings, labels, RECEIVERS, PresenceSettings())


def zones_entered(tracker: PresenceTracker, sightings: list[Sighting]) -> list[str | None]:
    return [e.zone for e in tracker.observe_many(sightings) if e.kind == "enter"]


def test_a_zone_without_a_receiver_of_its_own_is_learned_and_told_apart(cal: Calibration) -> None:
    assert [z.name for z in cal.zones] == ["left", "middle", "right"]
    middle = {sg.receiver: sg for sg in cal.zone("middle").signature}  # type: ignore[union-attr]
    assert middle["a"].mean == pytest.approx(-68, abs=2) and middle["b"].mean == pytest.approx(-68, abs=2)
    assert set(cal.zone("middle").neighbours) == {"left", "right"}  # type: ignore[union-attr]
    test, _ = walk([("left", 30.0), ("middle", 30.0), ("right", 30.0)], seed=2)  # another walk, other noise
    assert zones_entered(PresenceTracker(PresenceSettings(), RECEIVERS, calibration=cal), test) == [
        "left", "middle", "right"]
    # Without calibration the tracker has no "middle" state at all: it can only say left or right.
    assert "middle" not in zones_entered(PresenceTracker(PresenceSettings(), RECEIVERS), test)


def test_learn_on_a_real_excerpt_finds_each_rooms_own_anchor_loudest(tmp_path: Path) -> None:
    # The Kolakowski flat's robot test (first 600 rows; tests/data/datasets/SOURCE.md, CC BY 4.0), converted
    # as the benchmark does; the rooms' anchors are those benchmarks/datasets.py puts in each room.
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from datasets import build

    files = build(FIXTURES, tmp_path)["flat-robot-test"]
    from gateway.app.config import load_settings

    settings = load_settings(files["config"])
    with open(files["labels"], newline="") as fh:
        labels, _ = read_labels(fh)
    f, reader = open_trace(files["trace"])
    with f:
        cal = learn(reader, labels, list(settings.receivers), settings.presence)
    assert {z.name for z in cal.zones} >= {"west", "centre", "east", "south"}
    for z in cal.zones:
        own = {b.name for r in settings.receivers for b in r.zones if b.name == z.name}
        loudest = max((sg for sg in z.signature if sg.mean is not None), key=lambda sg: sg.mean or -999)
        bands = {b.name for r in settings.receivers if r.id == loudest.receiver for b in r.zones}
        if own and z.seconds >= 20:
            assert z.name in bands, (z.name, loudest)
    assert parse(dumps(cal)) == dataclasses.replace(cal, source=())


def test_the_toml_round_trips_and_says_how_it_was_made(cal: Calibration) -> None:
    text = dumps(dataclasses.replace(cal, source=("from walk.csv",)))
    assert text.startswith("# Presence calibration") and "# from walk.csv" in text
    assert '[zones."middle".signature]' in text and "heard = " in text
    assert parse(text) == dataclasses.replace(cal, source=())  # the header is a comment; the rest comes back


@pytest.mark.parametrize(("change", "key"), [
    (('[zones."middle"]\nseconds', '[zones."middle"]\nsecs'), ":35: zones.middle.seconds: Field required"),
    (('[zones."middle"]\nseconds', '[zones."middle"]\nsecs'), ":36: zones.middle.secs: unknown field (known: "),
    (("stay_s = ", "stay_s = -"), ".stay_s: Input should be greater than 0"),
    (('"b" = { mean', '"b" = { mean = "loud", x'), ":29: zones.left.signature.b.mean: Input should be a valid number"),
    (("transit_s = ", "transit_s = 0 #"), ":9: transitions.transit_s: Input should be greater than 0"),
    (("transit_s = ", "transit_s = '5' #"), ":9: transitions.transit_s: Input should be a valid number"),
    (("heard = ", "heard = nan, x = "), "signature.a.heard: Input should be a finite number"),
    (('neighbours = ["left", "right"]', 'neighbours = ["attic"]'), ":38: zones.middle.neighbours: 'attic' is not a"),
    (("[transitions]", "[transitions"), "line 8"),  # not TOML at all: tomllib says the line
    (("[transitions]", "[model]\nwindowed_weight = true\n[transitions]"), "model.windowed_weight: Input should be"),
])
def test_bad_toml_is_a_config_error_naming_the_file_the_line_and_the_key(tmp_path: Path, cal: Calibration,
                                                            change: tuple[str, str], key: str) -> None:
    path = tmp_path / "cal.toml"
    text = dumps(cal)
    assert change[0] in text
    path.write_text(text.replace(change[0], change[1], 1))
    with pytest.raises(ConfigError) as exc:
        load(path)
    assert str(path) in str(exc.value) and key in str(exc.value)


def test_the_report_names_each_zones_nearest_neighbour(cal: Calibration) -> None:
    apart = separations(cal)
    assert apart["left"][0] == "middle" and apart["right"][0] == "middle"  # middle lies between them
    assert apart["left"][1] > 1.0  # 13 dB apart on both receivers with sd about 3: well separated
    text = report(cal)
    assert all(z in text for z in ("left", "middle", "right")) and "receiver a" in text


def test_tracker_without_calibration_is_unchanged_and_with_one_follows_the_walk(cal: Calibration) -> None:
    test, _ = walk([("left", 30.0), ("right", 30.0)], seed=3)
    plain, again = PresenceTracker(PresenceSettings(), RECEIVERS), PresenceTracker(
        PresenceSettings(), RECEIVERS, calibration=None, adjacency=None)
    a, b = plain.observe_many(test), again.observe_many(test)
    assert a == b and [e.zone for e in a if e.kind == "enter"] == ["left", "right"]
    assert plain.zones == ("left", "right")


def test_adjacency_alone_confines_direct_moves() -> None:
    """A floor plan where left and right do not touch: one step from certainly-left moves nothing straight
    to right (it all goes through no zone), where the plain prior moves direct_share of the stays that end;
    a walk from left to right still ends in right."""
    def one_step(tracker: PresenceTracker) -> list[float]:
        tracker.observe(Sighting("tag", "a", -55, 0.0, None))
        tr = tracker.tracks["tag"]
        tr.post, tr.llr = [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]  # left, right, no zone; no evidence this step
        tr.quiet = tr.quiet_stepped + 10.0  # the 10 s are silence: no receiver's evidence, only the prior
        tracker._step("tag", tr, tr.stepped + 10.0)
        return tr.post

    apart = one_step(PresenceTracker(PresenceSettings(), RECEIVERS, adjacency={"left": set(), "right": set()}))
    touching = one_step(PresenceTracker(PresenceSettings(), RECEIVERS, adjacency={"left": {"right"}}))
    plain = one_step(PresenceTracker(PresenceSettings(), RECEIVERS))
    assert apart[1] == 0.0 and apart[2] > 0.1  # 10 s of a 60 s mean stay end, all in no zone
    assert touching[1] == pytest.approx(plain[1]) and touching[1] > 0.02  # direct_share 0.2 of them
    test, _ = walk([("left", 30.0), ("right", 30.0)], seed=4)
    graph = PresenceTracker(PresenceSettings(), RECEIVERS, adjacency={"left": set(), "right": set()})
    assert [e.zone for e in graph.observe_many(test) if e.kind == "enter"] == ["left", "right"]


def test_why_is_on_enter_and_exit_with_receivers_and_posteriors(cal: Calibration) -> None:
    test, _ = walk([("left", 30.0), ("right", 30.0)], seed=5)
    events = PresenceTracker(PresenceSettings(), RECEIVERS, calibration=cal).observe_many(test)
    switches = [e for e in events if e.kind in ("enter", "exit")]
    assert switches and all(e.why is not None for e in switches)
    enter_right = next(e for e in events if e.kind == "enter" and e.zone == "right")
    assert enter_right.why is not None
    assert enter_right.why.heard[0][0] == "b"  # the loudest receiver heard lately comes first
    assert enter_right.why.after[0][0] == "right"  # and the posterior after the step puts right on top
    assert all(e.why is None for e in events if e.kind == "dwell")


def test_gateway_calibrate_then_replay_with_the_calibration(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            cal: Calibration) -> None:
    from gateway.presence.traces import TraceWriter, write_labels

    sightings, labels = walk(ROUTE, seed=6)
    (tmp_path / "gw.toml").write_text(CONFIG)
    with open(tmp_path / "walk.csv", "w", newline="") as f:
        TraceWriter(f).write_many(sightings)
    with open(tmp_path / "walk.labels.csv", "w", newline="") as f:
        write_labels(f, labels)
    with open(tmp_path / "walk.csv", "a") as f:
        f.write("12.0,a,tag,loud\n")  # a bad row: counted with its line, never a traceback
    out = tmp_path / "cal.toml"
    assert main(["calibrate", str(tmp_path / "walk.csv"), "--labels", str(tmp_path / "walk.labels.csv"),
                 "--config", str(tmp_path / "gw.toml"), "--out", str(out)]) == 0
    printed, err = capsys.readouterr()
    assert "middle" in printed and "1 bad rows" in err and "line" in err
    assert [z.name for z in load(out).zones] == ["left", "middle", "right"]

    test, test_labels = walk([("left", 30.0), ("middle", 30.0), ("right", 30.0)], seed=7)
    with open(tmp_path / "test.csv", "w", newline="") as f:
        TraceWriter(f).write_many(test)
    with open(tmp_path / "test.labels.csv", "w", newline="") as f:
        write_labels(f, test_labels)
    assert main(["replay", str(tmp_path / "test.csv"), "--config", str(tmp_path / "gw.toml"), "--labels",
                 str(tmp_path / "test.labels.csv"), "--calibration", str(out)]) == 0
    lines = capsys.readouterr()[0].splitlines()
    events = [json.loads(x) for x in lines[:-1]]
    assert [e["zone"] for e in events if e["event"] == "enter"] == ["left", "middle", "right"]
    assert all("why" in e for e in events if e["event"] == "enter")
    scores = json.loads(lines[-1])
    assert scores["calibrated"] is True and scores["ours"]["zone_accuracy"] > 0.9


def test_gateway_calibrate_refuses_input_that_teaches_nothing(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "gw.toml").write_text(CONFIG)
    (tmp_path / "t.csv").write_text("time,receiver,beacon,rssi\n0,a,tag,-60\n")
    (tmp_path / "l.csv").write_text("beacon,start,end,zone\nother,0,60,left\n")
    (tmp_path / "bad.csv").write_text("when,who\n")
    args = ["--labels", str(tmp_path / "l.csv"), "--config", str(tmp_path / "gw.toml"), "--out", str(tmp_path / "o")]
    assert main(["calibrate", str(tmp_path / "t.csv"), *args]) == 2
    assert main(["calibrate", str(tmp_path / "bad.csv"), *args]) == 2
    err = capsys.readouterr()[1].strip().splitlines()
    assert len(err) == 2 and "nothing to learn" in err[0] and "line 1" in err[1]
    assert not (tmp_path / "o").exists()


def test_replay_with_a_bad_calibration_file_names_each_problem_and_exits_2(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "gw.toml").write_text(CONFIG)
    (tmp_path / "t.csv").write_text("time,receiver,beacon,rssi\n0,a,tag,-60\n")
    (tmp_path / "cal.toml").write_text("[transitions]\ntransit_s = 'soon'\n")
    assert main(["replay", str(tmp_path / "t.csv"), "--config", str(tmp_path / "gw.toml"),
                 "--calibration", str(tmp_path / "cal.toml")]) == 2
    err = capsys.readouterr()[1].strip().splitlines()  # one line per problem, each with the file and line
    assert err[0].startswith("gateway replay: ") and err[0].endswith(
        "cal.toml:2: transitions.transit_s: Input should be a valid number")
    assert [line.split("cal.toml:")[1] for line in err[1:]] == ["1: transitions.direct_share: Field required",
                                                               "1: transitions.outside_share: Field required"]



def test_two_walks_tune_the_look_time_and_the_file_carries_it() -> None:
    first, first_labels = walk(ROUTE, seed=8, key="walk-1")
    second, second_labels = walk(list(reversed(ROUTE)), seed=9, key="walk-2")
    rows = sorted(first + second, key=lambda s: s.time)
    cal = learn_tuned(rows, first_labels + second_labels, RECEIVERS, PresenceSettings())
    tuned = dict(cal.tuned)
    assert {"fade_time_s", "rssi_drift_db_s", "switch_posterior"} <= set(tuned) <= TUNABLE
    text = dumps(cal)
    assert "[presence]" in text and parse(text).tuned == cal.tuned
    tracker = PresenceTracker(PresenceSettings(), RECEIVERS, calibration=cal)
    assert tracker.settings.fade_time_s == tuned["fade_time_s"]  # the walk's choice over the config's
    assert learn(rows, first_labels + second_labels, RECEIVERS, PresenceSettings()).tuned == ()  # learn: no tuning


def test_leaving_a_walk_out_scores_it_only_where_the_other_walks_taught_the_zone() -> None:
    # Walk 1 goes through "middle" (no receiver of its own), walk 2 never does: the fold that leaves walk 1
    # out was taught no "middle", so it cannot say how well a model knows that zone (the calibration used
    # later, taught by both, does). Walk 1's 70 s in "middle" are then not scored, each of its stretches in
    # taught zones scored on its own.
    first, first_labels = walk(ROUTE, seed=8, key="walk-1")
    second, second_labels = walk([("left", 40.0), ("right", 40.0), ("left", 40.0)], seed=9, key="walk-2")
    rows = sorted(first + second, key=lambda s: s.time)
    labels = first_labels + second_labels
    own = ((("fade_time_s", 3.0), ("rssi_drift_db_s", 1.5), ("switch_posterior", 0.995)),)
    taught = tune_scores(rows, labels, RECEIVERS, PresenceSettings(), grid=own)[(own[0], 0.0)]
    every = tune_scores(rows, labels, RECEIVERS, PresenceSettings(), grid=own, taught_only=False)[(own[0], 0.0)]
    assert every[0] < 0.8 and taught[0] > 0.9  # untaught, "middle" is read as another state
    assert taught[2] != every[2]  # the labels' changes: walk 1 scored as three stretches


def _accuracy(tracker: PresenceTracker, sightings: list[Sighting], labels: list[Label]) -> float:
    """The share of drains (10 sightings each) after which the tracker's zone is the labelled one."""
    right = total = 0
    for i in range(0, len(sightings), 10):
        tracker.observe_many(sightings[i:i + 10])
        t = sightings[i].time
        truth = next(lb.zone for lb in labels if lb.start <= t < lb.end)
        total += 1
        right += tracker.tracks[sightings[i].key].zone == truth
    return right / total


def test_band_weight_keeps_the_surveys_geometry_where_a_short_walk_saw_one_spot() -> None:
    # Simulated (no dataset): the walk stands 15 s at one spot of each end zone, 4 dB from where shoppers
    # stand later (nearer the zone's receiver, well inside its 3 m band). The signatures alone put those
    # shoppers in no zone; the config's bands, weighed in, put them back where the floor plan says.
    at_walk = {"left": (-64, -76), "middle": (-68, -68), "right": (-76, -64)}
    at_shelf = {"left": (-52, -80), "middle": (-68, -68), "right": (-80, -52)}
    rows, labels = walk([("left", 15.0), ("middle", 40.0), ("right", 15.0)], seed=1, means=at_walk)
    test, test_labels = walk([("left", 30.0), ("middle", 30.0), ("right", 30.0), ("middle", 30.0), ("left", 30.0)],
                             seed=2, means=at_shelf)
    cal = learn(rows, labels, RECEIVERS, PresenceSettings())
    assert cal.band_weight == 0.0  # learn alone: signatures only, as before

    def accuracy(weight: float) -> float:
        weighed = dataclasses.replace(cal, band_weight=weight)
        return _accuracy(PresenceTracker(PresenceSettings(), RECEIVERS, calibration=weighed), test, test_labels)

    alone, half, full = accuracy(0.0), accuracy(0.5), accuracy(1.0)
    assert alone < 0.5
    assert half > alone + 0.2 and full > half and full >= 0.85


def test_band_weight_round_trips_in_the_toml_and_a_bad_one_names_its_key(tmp_path: Path, cal: Calibration) -> None:
    weighed = dataclasses.replace(cal, band_weight=0.25, source=())  # the header is a comment
    text = dumps(weighed)
    assert "[model]" in text and "band_weight = 0.25" in text
    assert parse(text) == weighed
    assert "[model]" not in dumps(cal) and parse(dumps(cal)).band_weight == 0.0  # as before: no [model]
    for bad, key in (("band_weight = 0.25", "band_weight = 2.0"), ("band_weight = 0.25", "weight = 0.25")):
        path = tmp_path / "cal.toml"
        path.write_text(text.replace(bad, key, 1))
        with pytest.raises(ConfigError) as exc:
            load(path)
        assert str(path) in str(exc.value) and "model." in str(exc.value)


def test_two_walks_choose_the_band_weight_among_the_candidates() -> None:
    first, first_labels = walk(ROUTE, seed=8, key="walk-1")
    second, second_labels = walk(list(reversed(ROUTE)), seed=9, key="walk-2")
    rows = sorted(first + second, key=lambda s: s.time)
    cal = learn_tuned(rows, first_labels + second_labels, RECEIVERS, PresenceSettings())
    assert cal.band_weight in BAND_WEIGHTS
    assert parse(dumps(cal)).band_weight == cal.band_weight


def test_windowed_means_are_learned_with_silence_as_the_floor_and_round_trip(tmp_path: Path) -> None:
    # Receiver b never hears the tag in "left": its windowed reading there is the floor, learned as such.
    rows, labels = walk(ROUTE, seed=3)
    rows = [s for s in rows if not (s.receiver == "b" and any(lb.zone == "left" and lb.start <= s.time < lb.end
                                                              for lb in labels))]
    cal = learn(rows, labels, RECEIVERS, PresenceSettings())
    left = {sg.receiver: sg for sg in cal.zone("left").windowed}  # type: ignore[union-attr]
    right = {sg.receiver: sg for sg in cal.zone("right").windowed}  # type: ignore[union-attr]
    assert left["b"].mean == pytest.approx(WINDOW_FLOOR_DBM, abs=3) and left["b"].heard < 0.2
    assert right["b"].mean == pytest.approx(-55, abs=2) and right["b"].heard == 1.0
    weighed = dataclasses.replace(cal, windowed_weight=6.0, sd_floor_db=4.0, source=())
    text = dumps(weighed)
    assert "windowed_weight = 6.0" in text and '[zones."left".windowed]' in text
    assert parse(text) == weighed
    path = tmp_path / "cal.toml"
    path.write_text(text.replace("windowed_weight = 6.0", "windowed_weight = -1.0"))
    with pytest.raises(ConfigError, match=r"model\.windowed_weight"):
        load(path)
    path.write_text(text.replace("sd_floor_db = 4.0", "sd_floor_db = 'wide'"))
    with pytest.raises(ConfigError, match=r"model\.sd_floor_db"):
        load(path)


def test_the_windowed_evidence_alone_tells_the_zones_apart() -> None:
    # The per-link signatures silenced (their looks made rare): the windowed means carry the decision.
    rows, labels = walk(ROUTE, seed=4)
    quiet = PresenceSettings(fade_time_s=1000.0, fade_db=1000.0)
    cal = dataclasses.replace(learn(rows, labels, RECEIVERS, quiet), windowed_weight=6.0)
    test, _ = walk([("left", 30.0), ("middle", 30.0), ("right", 30.0)], seed=5)
    assert zones_entered(PresenceTracker(quiet, RECEIVERS, calibration=cal), test) == ["left", "middle", "right"]
    silent = dataclasses.replace(cal, windowed_weight=0.0)  # without it, too little evidence to follow the walk
    assert zones_entered(PresenceTracker(quiet, RECEIVERS, calibration=silent), test) != ["left", "middle", "right"]


def test_exits_to_no_zone_can_need_more_evidence_than_moves() -> None:
    # The tag walks left, then stands 8 s where both receivers hear it faintly (no zone), then walks right.
    means = {**MEANS, "away": (-90, -90)}
    rows, _ = walk([("left", 30.0), ("away", 8.0), ("right", 30.0)], seed=6, means=means)

    def switches(exit_posterior: float) -> list[tuple[str, str | None, float]]:
        tracker = PresenceTracker(PresenceSettings(exit_posterior=exit_posterior), RECEIVERS)
        return [(e.kind, e.zone, e.time) for e in tracker.observe_many(rows) if e.kind in ("enter", "exit")]

    loose, strict = switches(0.0), switches(1.0 - 1e-12)
    assert [k[:2] for k in loose] == [k[:2] for k in strict] == [("enter", "left"), ("exit", "left"),
                                                                  ("enter", "right")]
    assert loose[1][2] < 38.0  # as switch_posterior: the exit while the tag stands in no zone
    assert strict[1][2] >= 38.0 and strict[1][2] == strict[2][2]  # no exit on evidence: left is held until
    # right takes over, and the move to right is as quick as ever
    assert strict[2][2] - 38.0 < 5.0


def test_gateway_calibrate_joins_several_walks_each_its_own_identity(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.presence.traces import TraceWriter, write_labels

    (tmp_path / "gw.toml").write_text(CONFIG)
    files = []
    for k, (route, seed) in enumerate(((ROUTE, 8), (list(reversed(ROUTE)), 9))):
        sightings, labels = walk(route, seed=seed)  # the same tag, the same clock: only the files tell them apart
        trace, lab = tmp_path / f"walk{k}.csv", tmp_path / f"walk{k}.labels.csv"
        with open(trace, "w", newline="") as f:
            TraceWriter(f).write_many(sightings)
        with open(lab, "w", newline="") as f:
            write_labels(f, labels)
        files.append((str(trace), str(lab)))
    out = tmp_path / "cal.toml"
    args = ["calibrate", files[0][0], files[1][0], "--labels", files[0][1], "--labels", files[1][1],
            "--config", str(tmp_path / "gw.toml"), "--out", str(out)]
    assert main(args) == 0
    cal = load(out)
    assert [z.name for z in cal.zones] == ["left", "middle", "right"]
    assert cal.tuned  # two walks: tuned by leaving one out, which one tag in one file could not be
    assert "walk0.csv, " in out.read_text() and "5 labels" not in out.read_text()
    capsys.readouterr()
    assert main([*args[:4], *args[6:]]) == 2  # two traces, one labels file
    err = capsys.readouterr()[1].strip().splitlines()
    assert len(err) == 1 and "one labels file per trace" in err[0]


def test_the_calibration_schema_accepts_what_calibrate_writes_and_flags_what_load_refuses(cal: Calibration) -> None:
    import tomllib

    import jsonschema_rs

    schema = json.loads((ROOT / "docs/schemas/calibration.schema.json").read_text())
    assert schema["title"] == "Presence calibration"
    validator = jsonschema_rs.validator_for(schema)
    text = dumps(dataclasses.replace(cal, band_weight=0.25, windowed_weight=3.0, tuned=(("exit_posterior", 0.9999),)))
    assert not [e.message for e in validator.iter_errors(tomllib.loads(text))]
    for old, new in (("band_weight = 0.25", "band_weight = 2.0"), ("[presence]\n", "[presence]\nsmoothing = 0.3\n"),
                     ("transit_s = ", "transit_s = 0 #"), ("heard = ", "heard = '1', x = ")):
        bad = text.replace(old, new, 1)
        assert bad != text and not validator.is_valid(tomllib.loads(bad)), new
        with pytest.raises(ConfigError):
            parse(bad)
