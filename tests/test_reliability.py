"""Faults a long grid meets: broken updates, kills at any moment, and the same numbers every time."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from attacks.base import Attack
from attacks.huge_update import HugeUpdate
from attacks.nan_update import NaNUpdate
from conftest import tiny_experiment
from defenses.fdcr import FDCR
from defenses.fedavg import FedAvg
from defenses.krum import Krum
from defenses.sdfc import SDFC
from fedbench.engine import FederatedRun
from fedbench.experiment import FederationConfig, OutputConfig
from fedbench.results import read_jsonl


class ShortUpdate(Attack):
    """Sends an update one element short (a client with the wrong model)."""

    def craft_update(self, update, client):
        return update[:-1]


class InfUpdate(Attack):
    def craft_update(self, update, client):
        update = update.clone()
        update[3] = float("inf")
        return update


@pytest.mark.parametrize("attack,reason,max_norm", [
    (NaNUpdate(malicious_fraction=0.4), "non_finite", None),
    (InfUpdate(malicious_fraction=0.4), "non_finite", None),
    (HugeUpdate(malicious_fraction=0.4), "norm_above_limit", 1e4),
    (ShortUpdate(malicious_fraction=0.4), "wrong_size", None),
])
def test_faulty_updates_are_screened_recorded_and_the_run_goes_on(tiny_root, tmp_path, attack, reason, max_norm):
    exp = tiny_experiment(tiny_root, tmp_path, attack=attack,
                          federation=FederationConfig(num_clients=5, rounds=2, final_rounds=2,
                                                      max_update_norm=max_norm))
    run = FederatedRun(exp)
    summary = run.run()
    assert torch.isfinite(run.global_params).all()
    for record in run.records:
        assert record["rejected"] == {"3": reason, "4": reason}
        assert record["weights"][3:] == [0.0, 0.0] and record["excluded"][3:] == [True, True]
        assert record["detection"] is None, "the screening, not the defense, stopped both attackers"
        assert abs(sum(record["weights"]) - 1) < 1e-6
    assert summary["rejected_updates"] == {reason: 4} and summary["detection"] is None
    assert summary["final"]["A"] > 0


def test_without_a_norm_limit_fedavg_is_plain_fedavg_even_for_a_huge_update(tiny_root, tmp_path):
    exp = tiny_experiment(tiny_root, tmp_path, attack=HugeUpdate(malicious_fraction=0.2),
                          federation=FederationConfig(num_clients=5, rounds=1, final_rounds=1))
    run = FederatedRun(exp)
    start = run.global_params.clone()
    record = run.run_round(0)
    assert record["rejected"] == {} and record["excluded"] == [False] * 5
    counts = run.num_samples.double()
    assert record["weights"] == pytest.approx((counts / counts.sum()).tolist())
    moved = float(torch.linalg.vector_norm(run.global_params.double() - start.double()))
    assert moved > 1e4, "the huge update moved the model past the old default limit of 1e4"


def test_when_every_update_is_rejected_the_global_model_does_not_move(tiny_root, tmp_path):
    exp = tiny_experiment(tiny_root, tmp_path, attack=NaNUpdate(malicious_fraction=0.8),
                          federation=FederationConfig(num_clients=5, rounds=1, final_rounds=1,
                                                      max_update_norm=1e-12))
    run = FederatedRun(exp)
    before = run.global_params.clone()
    record = run.run_round(0)
    assert torch.equal(run.global_params, before)
    assert set(record["rejected"].values()) == {"non_finite", "norm_above_limit"} and len(record["rejected"]) == 5


class OverflowsInRoundZero(FedAvg):
    """FedAvg whose round-0 aggregate holds a NaN (what a weighting that overflows gives);
    it counts its aggregations as its state."""

    def __init__(self) -> None:
        super().__init__()
        self.aggregated = 0

    def aggregate(self, updates, num_samples, ctx):
        self.aggregated += 1
        result = super().aggregate(updates, num_samples, ctx)
        result.info = {"round": ctx.round}
        if ctx.round == 0:
            result.update = result.update.clone()
            result.update[0] = float("nan")
        return result

    def state_dict(self):
        return {"aggregated": self.aggregated}

    def load_state_dict(self, state):
        self.aggregated = state.get("aggregated", 0)


def test_a_non_finite_aggregate_is_refused_flagged_and_the_run_goes_on(tiny_root, tmp_path):
    from fedbench.models import ModelConfig

    exp = tiny_experiment(tiny_root, tmp_path, defense=OverflowsInRoundZero(),
                          model=ModelConfig(name="test_cohort.small_bn_net"),
                          federation=FederationConfig(num_clients=5, rounds=2, final_rounds=2))
    run = FederatedRun(exp)
    start, start_buffers = run.global_params.clone(), run.global_buffers.clone()
    first = run.run_round(0)
    assert torch.equal(run.global_params, start), "the refused aggregate did not move the model"
    assert torch.equal(run.global_buffers, start_buffers), "nor its BatchNorm statistics"
    assert exp.defense.aggregated == 0, "nor the defense's state"
    counts = run.num_samples.double()
    assert first["non_finite_aggregate"] is True and first["rejected"] == {}
    assert first["weights"] == pytest.approx((counts / counts.sum()).tolist()), "the defense's verdict is kept"
    assert first["defense"] == {"round": 0}, "and its numbers"
    run.records.append(first)
    second = run.run_round(1)
    run.records.append(second)
    assert second["non_finite_aggregate"] is False and not torch.equal(run.global_params, start)
    assert not torch.equal(run.global_buffers, start_buffers) and exp.defense.aggregated == 1
    summary = run.summary(0.0)
    assert summary["status"] == "finished" and summary["non_finite_aggregate_rounds"] == [0]
    assert summary["final"]["A"] is not None


def test_a_faulty_client_never_reaches_a_robust_defense(tiny_root, tmp_path):
    exp = tiny_experiment(tiny_root, tmp_path, attack=NaNUpdate(malicious_fraction=0.2), defense=Krum(f=0),
                          federation=FederationConfig(num_clients=5, rounds=1, final_rounds=1))
    run = FederatedRun(exp)
    record = run.run_round(0)
    assert len(record["defense"]["scores"]) == 4, "Krum scored only the four screened-in updates"
    assert torch.isfinite(run.global_params).all()


def test_checkpoints_load_with_weights_only_and_a_resumed_run_equals_an_uninterrupted_one(tiny_root, tmp_path):
    def experiment(folder, rounds):
        return tiny_experiment(tiny_root, tmp_path / folder, defense=SDFC(),
                               federation=FederationConfig(num_clients=4, rounds=rounds, final_rounds=2),
                               output=OutputConfig(dir=str(tmp_path / folder), name="run", checkpoint_every=1,
                                                   resume=True, progress=False))

    whole = FederatedRun(experiment("whole", 4))
    whole.run()
    FederatedRun(experiment("split", 2)).run()  # "killed" after round 1, checkpoint on disk
    folder = tmp_path / "split" / "run" / "checkpoints"
    state = torch.load(folder / "last.pt", weights_only=True)
    clients = torch.load(folder / "clients.rank0.round1.pt", weights_only=True)
    assert state["round"] == 1 and len(state["records"]) == 2 and clients["hook"]["delta"]
    assert sorted(p.name for p in folder.iterdir()) == ["clients.rank0.round1.pt", "last.pt"]
    resumed = FederatedRun(experiment("split", 4))
    assert resumed.start_round == 2
    summary = resumed.run()
    assert torch.equal(resumed.global_params, whole.global_params)
    first_two = sum(r["time"]["round"] for r in state["records"])
    assert state["wall_time_s"] >= first_two, "the checkpoint keeps the time spent so far"
    assert summary["wall_time_s"] >= sum(r["time"]["round"] for r in resumed.records), "all four rounds counted"
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("time", "peak_memory_mb", "ended_at")} for r in rs]
    assert strip(read_jsonl(tmp_path / "split" / "run" / "metrics.jsonl")) == \
        strip(read_jsonl(tmp_path / "whole" / "run" / "metrics.jsonl"))


def test_a_run_killed_with_sigkill_leaves_no_summary_and_resumes_from_its_checkpoint(tiny_root, tmp_path):
    out = tmp_path / "runs"
    argv = [sys.executable, "-m", "fedbench.cli", "run", "--data.root", str(tiny_root), "--data.download", "false",
            "--train.local_steps", "6", "--federation.num_clients", "4", "--federation.rounds", "6",
            "--output.dir", str(out), "--output.name", "r", "--output.checkpoint_every", "1",
            "--output.resume", "true", "--output.progress", "false", "--wandb.mode", "disabled"]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = out / "r" / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while time.time() < deadline and not checkpoint.exists():
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "r" / "summary.json").exists(), "no summary from a killed run"
    done_before = len(read_jsonl(out / "r" / "metrics.jsonl"))
    assert done_before < 6
    subprocess.run(argv, check=True, capture_output=True, timeout=300)
    records = read_jsonl(out / "r" / "metrics.jsonl")
    assert [r["round"] for r in records] == list(range(6))
    assert json.loads((out / "r" / "summary.json").read_text())["rounds"] == 6


def test_sigterm_on_a_grid_keeps_finished_cells(tiny_root, tmp_path):
    from test_grid import AXES, write_grid

    path = write_grid(tmp_path, tiny_root, AXES, rounds=3)
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "fedbench.cli", "grid", str(path), "--out", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not list(out.glob("cells/*/summary.json")):
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "resume" in stderr
    finished = list(out.glob("cells/*/summary.json"))
    assert finished and all(json.loads(p.read_text())["status"] == "finished" for p in finished)
    time.sleep(1)
    children = subprocess.run(["pgrep", "-f", f"cells/.*cell_config.yaml"], capture_output=True, text=True)
    assert str(out) not in children.stdout, "the cell process went down with the grid"


def test_the_same_grid_twice_gives_the_same_numbers(tiny_root, tmp_path):
    from test_grid import AXES, write_grid

    path = write_grid(tmp_path, tiny_root, {**AXES, "defense": ["sdfc"]})
    for folder in ("one", "two"):
        subprocess.run([sys.executable, "-m", "fedbench.cli", "grid", str(path), "--out", str(tmp_path / folder),
                        "--isolate", "false"], check=True, capture_output=True, timeout=600)
    for summary in (tmp_path / "one").glob("cells/*/summary.json"):
        twin = tmp_path / "two" / "cells" / summary.parent.name / "summary.json"
        a, b = json.loads(summary.read_text()), json.loads(twin.read_text())
        assert a["final"] == b["final"] and a["seeds"] == b["seeds"] and a["detection"] == b["detection"]
        assert set(a["versions"]) >= {"torch", "torchvision", "lightning", "fedbench"} and a["device"]


def test_a_non_finite_protocol_upload_is_screened_out_with_its_own_reason():
    """Three clients; client 1 uploads an Inf Fisher, client 2 a NaN score, client 0 is
    clean; an integer upload is never judged. Worked by hand: only client 0 is accepted."""
    from fedbench.screening import screen_updates

    updates = torch.zeros(3, 4)
    fisher = torch.tensor([[1.0, 2.0], [float("inf"), 0.0], [3.0, 4.0]])
    score = torch.tensor([0.5, 0.25, float("nan")])
    accepted, reasons = screen_updates(updates, None, [False, False, False],
                                       {"fisher": fisher, "score": score, "count": torch.tensor([1, 2, 3])})
    assert accepted.tolist() == [True, False, False]
    assert reasons == [None, "non_finite_upload", "non_finite_upload"]
    updates[2, 0] = float("nan")  # a non-finite update keeps its own reason
    assert screen_updates(updates, None, None, {"score": score})[1] == [None, None, "non_finite"]


class InfFisherFromClientsThreeAndFour(FDCR):
    """FDCR whose clients 3 and 4 upload an Inf Fisher (what a diverged model gives)."""

    def __init__(self) -> None:
        super().__init__()
        after_training = self.hook.after_training_together

        def inf_for_three_and_four(calls):
            uploads = after_training(calls)
            return [{key: torch.full_like(value, float("inf")) for key, value in sent.items()}
                    if call.client.client_id in (3, 4) else sent for call, sent in zip(calls, uploads)]

        self.hook.after_training_together = inf_for_three_and_four


def test_fdcr_goes_on_when_a_client_uploads_an_inf_fisher(tiny_root, tmp_path):
    # An adaptive-grid cell (cosine constrained, weight 10, against FDCR) crashed in FINCH on
    # NaN distances when a diverged client's Fisher was Inf: such clients are screened out.
    exp = tiny_experiment(tiny_root, tmp_path, defense=InfFisherFromClientsThreeAndFour(),
                          federation=FederationConfig(num_clients=5, rounds=1, final_rounds=1))
    run = FederatedRun(exp)
    record = run.run_round(0)
    assert record["rejected"] == {"3": "non_finite_upload", "4": "non_finite_upload"}
    assert record["weights"][3:] == [0.0, 0.0] and abs(sum(record["weights"]) - 1) < 1e-6
    assert torch.isfinite(run.global_params).all()
