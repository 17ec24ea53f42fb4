"""Clients split over 2 CPU processes (gloo) give the single-process result bit for bit.

Both runs fix ``fabric.cpu_threads``: CPU kernels sum per thread, and Fabric gives each of two launched
processes half the cores, so without it the two runs would differ in the last bits."""

import subprocess
import sys

import pytest
import torch


@pytest.mark.parametrize("extra", [
    ["--defense", "sdfc", "--attack", "pixel_pattern", "--attack.malicious_fraction", "0.4"],
    ["--defense", "median", "--federation.client_fraction", "0.4"],  # a rank may get no client
    # a server-side attack crafts from every row of the round, which every rank holds
    ["--defense", "median", "--attack", "alie", "--attack.malicious_fraction", "0.4"],
])
def test_two_processes_equal_one(tiny_root, tmp_path, extra):
    common = [sys.executable, "-m", "fedbench.cli", "run", "--data.root", str(tiny_root), "--data.download", "false",
              "--train.local_steps", "3", "--federation.num_clients", "5", "--federation.rounds", "3",
              "--output.checkpoint_every", "1", "--output.progress", "false", "--wandb.mode", "disabled",
              "--output.dir", str(tmp_path), "--fabric.accelerator", "cpu", "--fabric.cpu_threads", "1", *extra]
    # both at once (one thread per process: the numbers do not depend on what shares the cores)
    started = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for command in ([*common, "--output.name", "one"],
                               [*common, "--output.name", "two", "--fabric.devices", "2"])]
    (_, one_err), (two_out, two_err) = (process.communicate(timeout=300) for process in started)
    assert [process.returncode for process in started] == [0, 0], (one_err[-2000:], two_err[-2000:])
    a = torch.load(tmp_path / "one" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "checkpoints" / "last.pt", weights_only=True)
    assert b["world_size"] == 2 and a["round"] == b["round"] == 2
    assert torch.equal(a["global_params"], b["global_params"])
    for ra, rb in zip(a["records"], b["records"]):
        for key in ("clients", "clean_acc", "clean_loss", "asr", "weights", "excluded", "local_steps", "defense"):
            assert ra[key] == rb[key], key
    assert two_out.count("->") == 1, "one result line, from the main process"
