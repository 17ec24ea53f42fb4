"""fabric.tf32: which float32 work a CUDA run lets onto TF32 tensor cores."""

import pytest
import torch

from fedbench.experiment import FabricConfig

# torch's two switches, as its documentation defines them: cuDNN's convolutions may use TF32
# (torch.backends.cudnn.allow_tf32), float32 matrix products use TF32 at "high" and never at "highest"
EXPECTED = {"convolutions": (True, "highest"), "none": (False, "highest"), "all": (True, "high")}


@pytest.fixture
def switches():
    """torch's TF32 switches now; put back after the test."""
    def now():
        return torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()

    before = now()
    yield now
    torch.backends.cudnn.allow_tf32 = before[0]
    torch.set_float32_matmul_precision(before[1])


@pytest.mark.parametrize("tf32", sorted(EXPECTED))
def test_on_cuda_each_setting_sets_both_switches(tf32, switches):
    torch.backends.cudnn.allow_tf32 = not EXPECTED[tf32][0]
    torch.set_float32_matmul_precision("medium")
    FabricConfig(tf32=tf32).apply_tf32(torch.device("cuda"))  # sets flags only: no GPU needed
    assert switches() == EXPECTED[tf32]


def test_on_cpu_nothing_changes(switches):
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("medium")
    FabricConfig(tf32="all").apply_tf32(torch.device("cpu"))
    assert switches() == (False, "medium")


def test_the_default_is_torch_s_own():
    assert FabricConfig().tf32 == "convolutions"


def test_a_bad_value_names_the_field_and_the_allowed_values():
    problems = FabricConfig(tf32="sometimes").problems()
    assert [field for field, _, _ in problems] == ["fabric.tf32"]
    assert all(value in problems[0][2] for value in ("convolutions", "none", "all"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: a run on a GPU sets the switches as it starts")
def test_a_cuda_run_sets_the_switches_as_it_starts(tmp_path, switches):
    from attacks.base import ATTACKS
    from defenses.base import DEFENSES
    from fedbench.data import DataConfig
    from fedbench.engine import FederatedRun
    from fedbench.experiment import Experiment, OutputConfig
    from fedbench.tracking import WandbConfig

    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    FederatedRun(Experiment(
        attack=ATTACKS.get("none")(), defense=DEFENSES.get("fedavg")(), data=DataConfig(train_subset=200),
        fabric=FabricConfig(accelerator="cuda", tf32="none"), output=OutputConfig(dir=str(tmp_path), progress=False),
        wandb=WandbConfig(mode="disabled")))
    assert switches() == (False, "highest")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: TF32 exists on NVIDIA GPUs")
def test_on_cuda_none_convolves_and_multiplies_in_full_float32(switches):
    """With ``none`` a cuDNN convolution and a matrix product of float32 agree with float64
    to float32 rounding (TF32 keeps 10 mantissa bits: errors near 1e-3 of the scale)."""
    generator = torch.Generator().manual_seed(0)
    x, w = torch.randn(8, 16, 32, 32, generator=generator), torch.randn(32, 16, 5, 5, generator=generator)
    a, b = torch.randn(256, 512, generator=generator), torch.randn(512, 256, generator=generator)
    FabricConfig(tf32="none").apply_tf32(torch.device("cuda"))
    conv = torch.nn.functional.conv2d(x.cuda(), w.cuda()).cpu().double()
    product = (a.cuda() @ b.cuda()).cpu().double()
    exact_conv = torch.nn.functional.conv2d(x.double(), w.double())
    assert (conv - exact_conv).abs().max() < 1e-5 * exact_conv.abs().max()
    assert (product - a.double() @ b.double()).abs().max() < 1e-5 * (a.double() @ b.double()).abs().max()
