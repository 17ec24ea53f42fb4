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
    "c-fedavg": ("fedavg", [(102, 25), (108, 6), (114, 6), (120, 6), (126, 6)]),
}


def write_stage(folder: Path, earlier: float | None = None) -> None:
    for name, (defense, rounds) in STAGE.items():
        cell = folder / "cells" / name
        cell.mkdir(parents=True)
        # a grid writes a defense with arguments as its class path: the registry names it
        choice = {"class_path": "defenses.multi_krum.MultiKrum", "init_args": {"f": 1}} \
            if defense == "multi_krum" else defense
        (cell / "config.yaml").write_text(yaml.safe_dump({"defense": choice}))
        records = [{"round": i, "ended_at": t, "time": {"round": s}} for i, (t, s) in enumerate(rounds)]
        if earlier is not None:  # an earlier stage's rounds, and a record written before rounds kept their end
            records = [{"round": -2, "time": {"round": 1.0}},
                       {"round": -1, "ended_at": earlier, "time": {"round": 99.0}}] + records
        (cell / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def write_target(path: Path) -> None:
    path.write_text(yaml.safe_dump({"name": "target", "base": {"federation": {"rounds": 4}},
                                    "axes": {"defense": ["fedavg", "multi_krum"], "seed": [0, 1, 2]}}))


@pytest.mark.parametrize("earlier", [None, 50.0])
def test_projection_counts_the_rounds_after_every_cell_is_warm(tmp_path, earlier):
    write_stage(tmp_path / "runs", earlier)
    write_target(tmp_path / "target.yaml")
    stages = projection.read_stage(tmp_path / "runs", since=None if earlier is None else 60.0)
    result = projection.project(stages)
    # by hand: warm when the last first round ended (b, at 105); then a's 110, 120, 130, b's 125,
    # 145, c's 108, 114, 120, 126 end: 9 cell-rounds in 145 - 105 = 40 s
    assert result.warm_at == 105 and result.rounds_after_warm == 9
    assert result.throughput == pytest.approx(9 / 40)
    # start-up: first round less the median of the others: a 40 - 10, b 30 - 20, c 25 - 6; the largest
    assert result.startup == pytest.approx(30)
    # target: 6 cells x 4 rounds = 24 cell-rounds at 9/40 per s, two waves of 3 cells
    assert result.seconds_for(6, 4) == pytest.approx(24 * 40 / 9 + 2 * 30)
    assert result.seconds_for(6, 4, cached=True) == pytest.approx(24 * 40 / 9 + 30), "the first wave compiles"
    text = projection.main([str(tmp_path / "runs"), "--grid", str(tmp_path / "target.yaml")]
                           + ([] if earlier is None else ["--since", "60"]))
    assert f"{(24 * 40 / 9 + 60) / 3600:.2f} hours" in text and f"{(24 * 40 / 9 + 30) / 3600:.2f} hours if" in text
    assert "fedavg 2, multi_krum 1" in text and "fedavg 3, multi_krum 3" in text


def test_projection_refuses_a_stage_that_never_got_warm(tmp_path):
    cell = tmp_path / "runs" / "cells" / "only"
    cell.mkdir(parents=True)
    (cell / "metrics.jsonl").write_text(json.dumps({"round": 0, "ended_at": 10.0, "time": {"round": 5.0}}) + "\n")
    with pytest.raises(SystemExit, match="run the stage longer"):
        projection.project(projection.read_stage(tmp_path / "runs"))
