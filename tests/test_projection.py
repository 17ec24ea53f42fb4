"""benchmarks/perf/projection.py: a grid's projected time from a stage's round records."""

import json
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks" / "perf"))
import projection  # noqa: E402

# cell: (defense, [(ended_at, round seconds), ...]) as a stage of three cells at once wrote them
STAGE = {
    "a-fedavg": ("fedavg", [(100, 40), (110, 10), (120, 10), (130, 10)]),
    "b-multi_krum": ("multi_krum", [(105, 30), (125, 20), (145, 20)]),
    "c-fedavg": ("fedavg", [(102, 45), (108, 6), (114, 6), (120, 9), (126, 6)]),
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


# by hand, with and without the stage's start (60): per cell, start-up = (first end - 60, or
# without a start its first round's time) - the median of its later rounds (10, 20 and 6,
# not c's mean 6.75): a 40 - 10 or 100 - 60 - 10; b 30 - 20 or 105 - 60 - 20; c 45 - 6 or 102 - 60 - 6
STARTUP = {None: max(30, 10, 39), 60.0: max(30, 25, 36)}


@pytest.mark.parametrize("since", [None, 60.0])
def test_projection_counts_the_rounds_while_every_cell_is_warm_and_running(tmp_path, since):
    write_stage(tmp_path / "runs", earlier=None if since is None else 50.0)
    write_target(tmp_path / "target.yaml")
    stages, silent = projection.read_stage(tmp_path / "runs", since=since)
    assert silent == ["d-fedavg"] and [s.name for s in stages] == list(STAGE)
    result = projection.project(stages, since)
    # window: from b's first end (105, the last first end) to c's last (126, the first last end);
    # ending in it: a's 110, 120, b's 125, c's 108, 114, 120, 126: 7 cell-rounds in 21 s
    assert (result.warm_at, result.ended_at, result.rounds_in_window) == (105, 126, 7)
    assert result.throughput == pytest.approx(7 / 21)
    assert result.startup == pytest.approx(STARTUP[since])
    # target: 6 cells x 4 rounds = 24 cell-rounds at 1/3 per s, two waves of 3 cells (or one compiling)
    assert result.seconds_for(6, 4) == pytest.approx(72 + 2 * STARTUP[since])
    assert result.seconds_for(6, 4, cached=True) == pytest.approx(72 + STARTUP[since])
    text = projection.main([str(tmp_path / "runs"), "--grid", str(tmp_path / "target.yaml")]
                           + ([] if since is None else ["--since", "60"]))
    assert f"Projected: {(72 + 2 * STARTUP[since]) / 3600:.2f} hours" in text
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
