"""benchmarks/perf/projection.py: a grid's projected time from a stage's round records."""

import json
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks" / "perf"))
import projection  # noqa: E402

# cell: (defense, [(ended_at, round seconds), ...]) as a stage of three cells at once wrote them;
# c's rounds (5 s by its timer) end 6-7 s apart, as a packed cell's do (its pack-mates aggregate too)
STAGE = {
    "a-fedavg": ("fedavg", [(100, 40), (110, 10), (120, 10), (130, 10)]),
    "b-multi_krum": ("multi_krum", [(105, 30), (125, 20), (145, 20)]),
    "c-fedavg": ("fedavg", [(102, 45), (108, 5), (114, 5), (120, 8), (127, 5)]),
}


def write_cell(folder: Path, name: str, defense: str, records: list[dict]) -> None:
    cell = folder / "cells" / name
    cell.mkdir(parents=True)
    # a grid writes a defense with arguments as its class path: the registry names it
    choice = {"class_path": "defenses.multi_krum.MultiKrum", "init_args": {"f": 1}} \
        if defense == "multi_krum" else defense
    (cell / "config.yaml").write_text(yaml.safe_dump({"defense": choice}))
    (cell / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def write_stage(folder: Path, earlier: float | None = None) -> None:
    for name, (defense, rounds) in STAGE.items():
        records = [{"round": i, "ended_at": t, "time": {"round": s}} for i, (t, s) in enumerate(rounds)]
        if earlier is not None:  # an earlier stage's rounds, and a record written before rounds kept their end
            records = [{"round": -2, "time": {"round": 1.0}},
                       {"round": -1, "ended_at": earlier, "time": {"round": 99.0}}] + records
        write_cell(folder, name, defense, records)
    (folder / "cells" / "d-fedavg").mkdir()  # a cell that ended no round in the stage


def write_target(path: Path) -> None:
    path.write_text(yaml.safe_dump({"name": "target", "base": {"federation": {"rounds": 4}},
                                    "axes": {"defense": ["fedavg", "multi_krum"], "seed": [0, 1, 2]}}))


# by hand, with and without the stage's start (60): per cell, start-up = its first end - 60
# less the median time between its round ends (a 10, b 20, c 6: not c's mean 6.25 nor its
# timer's 5), or without a start its first round's time less the median of its later rounds'
# times (10, 20, 5: not c's mean 5.75): a 100 - 60 - 10 or 40 - 10; b 105 - 60 - 20 or
# 30 - 20; c 102 - 60 - 6 or 45 - 5
STARTUP = {None: max(30, 10, 40), 60.0: max(30, 25, 36)}


@pytest.mark.parametrize("since", [None, 60.0])
def test_projection_counts_the_rounds_while_every_cell_is_warm_and_running(tmp_path, since):
    write_stage(tmp_path / "runs", earlier=None if since is None else 50.0)
    write_target(tmp_path / "target.yaml")
    stages, silent = projection.read_stage(tmp_path / "runs", since=since)
    assert silent == ["d-fedavg"] and [s.name for s in stages] == list(STAGE)
    result = projection.project(stages, since)
    # window: from b's first end (105, the last first end) to c's last (127, the first last end);
    # each cell's ends in it: a 110, 120 (1 round in 10 s), b 105, 125 (1 in 20 s), c 108, 114,
    # 120, 127 (3 in 19 s): 5 rounds, 1/10 + 1/20 + 3/19 cell-rounds per second
    rate = 1 / 10 + 1 / 20 + 3 / 19
    assert (result.warm_at, result.ended_at, result.rounds_in_window) == (105, 127, 5)
    assert result.throughput == pytest.approx(rate)
    assert result.startup == pytest.approx(STARTUP[since])
    # target: 6 cells x 4 rounds = 24 cell-rounds at that rate, two waves of 3 cells (or one compiling)
    training = 24 / rate
    assert result.seconds_for(6, 4) == pytest.approx(training + 2 * STARTUP[since])
    assert result.seconds_for(6, 4, cached=True) == pytest.approx(training + STARTUP[since])
    text = projection.main([str(tmp_path / "runs"), "--grid", str(tmp_path / "target.yaml")]
                           + ([] if since is None else ["--since", "60"]))
    assert f"Projected: {(training + 2 * STARTUP[since]) / 3600:.2f} hours" in text
    assert "fedavg 2, multi_krum 1" in text and "fedavg 3, multi_krum 3" in text
    assert "No round in the stage, left out" in text and "d-fedavg" in text


def test_projection_refuses_records_of_two_stages_without_the_stage_start(tmp_path):
    """A cell resumed hours later: its pause would count as the machine's time."""
    ends = [100, 110, 120, 130, 5000, 5010, 5020]
    write_cell(tmp_path / "runs", "a", "fedavg", [{"round": i, "ended_at": t, "time": {"round": 10.0}}
                                                  for i, t in enumerate(ends)])
    with pytest.raises(SystemExit, match="more than one stage.*paused 4870 s.*pass --since"):
        projection.project(projection.read_stage(tmp_path / "runs")[0])
    assert projection.project(projection.read_stage(tmp_path / "runs", since=1000)[0]).throughput == \
        pytest.approx(2 / 20), "the second stage alone: rounds at 5010 and 5020 after warming at 5000"


def test_projection_refuses_a_resumed_cells_rounds_done_twice(tmp_path):
    write_cell(tmp_path / "runs", "a", "fedavg", [{"round": r, "ended_at": 100.0 + 10 * i, "time": {"round": 10.0}}
                                                  for i, r in enumerate([0, 1, 2, 1, 2, 3])])
    with pytest.raises(SystemExit, match="rounds done twice"):
        projection.project(projection.read_stage(tmp_path / "runs")[0])


def test_projection_refuses_a_stage_that_never_got_warm(tmp_path):
    write_cell(tmp_path / "runs", "only", "fedavg", [{"round": 0, "ended_at": 10.0, "time": {"round": 5.0}}])
    with pytest.raises(SystemExit, match="run the stage longer"):
        projection.project(projection.read_stage(tmp_path / "runs")[0])


def test_projection_of_packed_cells_counts_whole_periods(tmp_path):
    """Two packs of two cells, each pack's cells ending their rounds together (0.5 s apart)
    every 10 s and every 12 s: the machine does 2/10 + 2/12 cell-rounds per second. Round
    ends counted over the window from 105.5 to 200 (31 in 94.5 s) would say 10% less."""
    packs = {"a1": (100.0, 10, 11), "a2": (100.5, 10, 11), "b1": (105.0, 12, 9), "b2": (105.5, 12, 9)}
    for name, (first, period, rounds) in packs.items():
        write_cell(tmp_path / "runs", name, "fedavg", [{"round": k, "ended_at": first + period * k,
                                                       "time": {"round": period - 1.0}} for k in range(rounds)])
    result = projection.project(projection.read_stage(tmp_path / "runs")[0])
    assert (result.warm_at, result.ended_at) == (105.5, 200.0)
    assert result.throughput == pytest.approx(2 / 10 + 2 / 12)
