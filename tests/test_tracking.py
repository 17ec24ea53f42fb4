"""Closing a run's loggers (fedbench.tracking.close_loggers) when the run fails."""

from __future__ import annotations

import pytest

from conftest import tiny_experiment


def test_a_run_that_fails_before_it_logs_gets_no_w_and_b_run_and_keeps_its_own_error(tiny_root, tmp_path,
                                                                                      monkeypatch, wandb_environment):
    from fedbench.engine import FederatedRun
    from fedbench.execution import execute
    from fedbench.tracking import WandbConfig

    def fails(self, exp, fabric=None):
        raise RuntimeError("set-up fails")

    monkeypatch.setattr(FederatedRun, "__init__", fails)
    exp = tiny_experiment(tiny_root, tmp_path, wandb=WandbConfig(mode="offline"))
    with pytest.raises(RuntimeError, match="set-up fails"):
        execute(exp)
    assert (exp.run_dir / "wandb").is_dir(), "W&B was configured for the run"
    assert not list(tmp_path.rglob("*.wandb")), "but no W&B run for a run that logged nothing"


def test_a_logger_that_cannot_be_closed_neither_hides_the_error_nor_keeps_the_others_open(capsys):
    from fedbench.tracking import close_loggers

    closed = []

    class Breaks:
        def finalize(self, status):
            raise OSError("disk full")

    class Records:
        def finalize(self, status):
            closed.append(status)

    close_loggers([Breaks(), Records()], None)
    assert closed == ["failed"], "the next logger is still closed, marked failed"
    assert "could not close the Breaks: OSError: disk full" in capsys.readouterr().err
