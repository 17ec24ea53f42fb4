"""Every client's convolution in one Triton kernel launch (train.cohort_convolution=triton).

Without a GPU the kernels run in Triton's interpreter (conftest.py turns it on before torch
imports Triton): the same kernel code, computed by numpy, slowly; so these tests use small
shapes. The CUDA-only tests at the end run the compiled kernels."""

from __future__ import annotations

import copy
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import vmap

from fedbench.client import LocalTrainConfig

from conftest import triton_launches as counting_launches, triton_unavailable

if triton_unavailable():  # no Triton, or no GPU and the interpreter off (conftest turns it on)
    pytest.skip(f"THE TRITON CONVOLUTION IS UNTESTED HERE: {triton_unavailable()}", allow_module_level=True)

import fedbench.client_conv as client_conv  # noqa: E402
from fedbench.client_conv import conv2d_per_client  # noqa: E402
from test_matmul_conv import convolution_by_loops  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")  # the kernels compiled on a GPU, else interpreted


@pytest.fixture(autouse=True)
def full_float32_references():
    """On a GPU torch's own convolutions, the references here, run in TF32 by default: full
    float32 for these tests, as the kernels compute, and put back after."""
    before = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    yield
    torch.backends.cudnn.allow_tf32 = before[0]
    torch.set_float32_matmul_precision(before[1])


def leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Copies on DEVICE that autograd fills with gradients."""
    return [t.detach().to(DEVICE).requires_grad_() for t in tensors]
GEOMETRIES = [((1, 1), (0, 0), (1, 1)), ((2, 1), (1, 2), (1, 2))]  # stride, padding, dilation per side


def gradients_by_loops(x: np.ndarray, w: np.ndarray, dy: np.ndarray, stride, padding, dilation):
    """dL/dx and dL/dw of a convolution whose output's gradient is dy: every output position
    (i, j) and tap (u, v) read x_padded[:, :, i*s0 + u*d0, j*s1 + v*d1] with w[:, :, u, v],
    so each adds dy[:, :, i, j] @ w[:, :, u, v] to that input's gradient and
    dy[:, :, i, j].T @ that input to w[:, :, u, v]'s."""
    padded = np.pad(x, ((0, 0), (0, 0), (padding[0],) * 2, (padding[1],) * 2))
    dx_padded, dw = np.zeros_like(padded), np.zeros_like(w)
    _, _, rows, cols = dy.shape
    for i in range(rows):
        for j in range(cols):
            for u in range(w.shape[2]):
                for v in range(w.shape[3]):
                    r, c = i * stride[0] + u * dilation[0], j * stride[1] + v * dilation[1]
                    dx_padded[:, :, r, c] += dy[:, :, i, j] @ w[:, :, u, v]
                    dw[:, :, u, v] += dy[:, :, i, j].T @ padded[:, :, r, c]
    dx = dx_padded[:, :, padding[0]:padding[0] + x.shape[2], padding[1]:padding[1] + x.shape[3]]
    return dx, dw


@pytest.mark.parametrize("stride, padding, dilation", GEOMETRIES)
def test_each_client_s_convolution_and_gradients_equal_the_sums_written_out_by_hand(stride, padding, dilation):
    """3 clients, each with its own weights (5 output channels: not a power of two, which
    the kernels pad), a non-square kernel, float32; against float64 sums by loops."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 2, 7, 6, generator=gen)
    w = torch.randn(3, 5, 2, 3, 2, generator=gen)
    b = torch.randn(3, 5, generator=gen)
    xs, ws, bs = leaves(x, w, b)
    out = client_conv2d_of(xs, ws, bs, stride, padding, dilation)
    dy = torch.randn(out.shape, generator=gen)
    (out * dy.to(DEVICE)).sum().backward()
    for k in range(3):
        expected = convolution_by_loops(x[k].double().numpy(), w[k].double().numpy(), b[k].double().numpy(),
                                        stride, padding, dilation)
        np.testing.assert_allclose(out[k].detach().cpu().numpy(), expected, rtol=1e-5, atol=1e-5)
        dx, dw = gradients_by_loops(x[k].double().numpy(), w[k].double().numpy(), dy[k].double().numpy(),
                                    stride, padding, dilation)
        np.testing.assert_allclose(xs.grad[k].cpu().numpy(), dx, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ws.grad[k].cpu().numpy(), dw, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(bs.grad[k].cpu().numpy(), dy[k].double().numpy().sum((0, 2, 3)), rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.parametrize("channels_in, channels_out, side, kernel, padding", [
    (3, 6, 32, 5, 0), (6, 16, 14, 5, 0),  # simple_cnn's two convolutions
    (3, 64, 32, 3, 1),  # ResNet-18's first: 64 output channels over 65,536 positions a client
])
def test_the_models_layers_at_a_batch_of_64_equal_torchs_convolution_in_float64(channels_in, channels_out, side,
                                                                                kernel, padding):
    """The models' convolutions at the papers' batch of 64, 2 clients: blocks as large as a
    real cell's (in the interpreter a block of every position of a client, up to Triton's
    largest tensor); forward and gradients against torch's convolution and autograd, client
    by client, in float64."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, channels_in, side, side, generator=gen)
    w = torch.randn(2, channels_out, channels_in, kernel, kernel, generator=gen) / (channels_in * kernel ** 2) ** 0.5
    b = torch.randn(2, channels_out, generator=gen)
    xs, ws, bs = leaves(x, w, b)
    out = client_conv2d_of(xs, ws, bs, (1, 1), (padding, padding), (1, 1))
    dy = torch.randn(out.shape, generator=gen)
    (out * dy.to(DEVICE)).sum().backward()
    for k in range(2):
        xk, wk, bk = (t[k].double().requires_grad_() for t in (x, w, b))
        want = F.conv2d(xk, wk, bk, padding=padding)
        (want * dy[k].double()).sum().backward()
        for got, expected in [(out[k], want), (xs.grad[k], xk.grad), (ws.grad[k], wk.grad), (bs.grad[k], bk.grad)]:
            gap = (got.detach().cpu().double() - expected.detach()).abs().max() / expected.abs().max()
            assert gap < 1e-5, (k, tuple(expected.shape), float(gap))


def test_the_gpu_s_block_sizes_give_the_same_sums(monkeypatch):
    """On a GPU the kernels take 128 to 512 positions a program, the forward pass 8 output
    channels a program, and the weight gradient 32 taps, 64 positions at a time, in shares
    summed afterwards: in the interpreter with 128 positions, 2 output channels (5 in 3
    programs, the last one's second masked) and 3 shares, several programs and shares per
    client, against sums by loops. A position's sums do not depend on the blocks: the
    forward pass and the input gradient equal, bit for bit, those of the interpreter's own
    blocks (one program of every position and channel per client)."""
    import fedbench.client_conv_kernels as kernels

    gpu_sizes = ([kernels.positions_per_program("cuda", c) for c in (5, 16, 64)],
                 [kernels.output_channels_per_program("cuda", c) for c in (5, 16, 64)],
                 kernels.weight_grad_blocks("cuda", 50, 300))
    assert gpu_sizes == ([512, 256, 128], [8, 8, 8], (32, 64, 1)), "the sizes this test stands in for"
    monkeypatch.setattr(kernels, "positions_per_program", lambda device_type, channels, positions=0: 128)
    monkeypatch.setattr(kernels, "output_channels_per_program", lambda device_type, channels: 2)  # 5 in 3 programs
    monkeypatch.setattr(kernels, "weight_grad_blocks", lambda device_type, taps, positions, channels_out=1: (32, 64, 3))
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(2, 3, 2, 11, 10, generator=gen), torch.randn(2, 5, 2, 5, 5, generator=gen)
    dy, b = torch.randn(2, 3, 5, 11, 8, generator=gen), torch.randn(2, 5, generator=gen)
    xs, ws, bs = leaves(x, w, b)
    out = client_conv2d_of(xs, ws, bs, (1, 1), (2, 1), (1, 1))  # 3 x 11 x 8 = 264 positions a client
    (out * dy.to(DEVICE)).sum().backward()
    monkeypatch.undo()
    own_x, own_w, own_b = leaves(x, w, b)
    own_out = client_conv2d_of(own_x, own_w, own_b, (1, 1), (2, 1), (1, 1))
    (own_out * dy.to(DEVICE)).sum().backward()
    assert torch.equal(out, own_out) and torch.equal(xs.grad, own_x.grad), "a position's sums whatever the blocks"
    for k in range(2):
        bias = b[k].double().numpy()
        expected = convolution_by_loops(x[k].double().numpy(), w[k].double().numpy(), bias, (1, 1), (2, 1), (1, 1))
        np.testing.assert_allclose(out[k].detach().cpu().numpy(), expected, rtol=1e-5, atol=1e-5)
        dx, dw = gradients_by_loops(x[k].double().numpy(), w[k].double().numpy(), dy[k].double().numpy(),
                                    (1, 1), (2, 1), (1, 1))
        np.testing.assert_allclose(xs.grad[k].cpu().numpy(), dx, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ws.grad[k].cpu().numpy(), dw, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(bs.grad[k].cpu().numpy(), dy[k].double().sum((0, 2, 3)).numpy(), rtol=1e-5)


def client_conv2d_of(x, w, b, stride, padding, dilation):
    return client_conv.client_conv2d(x, w, b, [*stride, *padding, *dilation])


@pytest.mark.parametrize("compile_mode", [None, "default"])
def test_under_vmap_every_client_s_convolution_is_one_launch_with_its_own_weights(monkeypatch, compile_mode):
    """vmap over 4 clients (stride 2, padding 1, channels-last images), then regular
    autograd, as the cohort's autograd step runs; against torch's convolution client by
    client. Compiled, the operator is one call in one graph (fullgraph)."""
    if compile_mode and shutil.which("g++") is None and shutil.which("cc") is None:
        pytest.skip("NO C++ COMPILER: torch.compile on CPU needs one, so the compiled Triton convolution is untested")
    torch.manual_seed(0)
    weights, biases = leaves(torch.randn(4, 6, 3, 3, 3), torch.randn(4, 6))
    images = torch.randn(4, 5, 3, 9, 9).to(DEVICE).contiguous(memory_format=torch.channels_last_3d)
    launched = counting_launches(monkeypatch)
    per_client = vmap(lambda w, b, x: conv2d_per_client(x, w, b, stride=2, padding=1).square().sum())
    if compile_mode:
        torch._dynamo.reset()
        per_client = torch.compile(per_client, mode=compile_mode, fullgraph=True)
    losses = per_client(weights, biases, images)
    losses.sum().backward()
    assert launched == ["client_conv_forward", "client_conv_weight_grad"], "one each (the images need no gradient)"
    for k in range(4):
        w, b = weights[k].detach().clone().requires_grad_(), biases[k].detach().clone().requires_grad_()
        reference = F.conv2d(images[k], w, b, stride=2, padding=1).square().sum()
        reference.backward()
        torch.testing.assert_close(losses[k], reference, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(weights.grad[k], w.grad, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(biases.grad[k], b.grad, rtol=1e-4, atol=1e-3)


def test_an_input_gradient_is_one_launch_for_every_client_too(monkeypatch):
    """A second convolution's input needs a gradient (the first convolution's output):
    under vmap, one input-gradient launch for all clients."""
    torch.manual_seed(0)
    x, = leaves(torch.randn(3, 2, 2, 6, 6))
    w = torch.randn(3, 4, 2, 3, 3).to(DEVICE)
    launched = counting_launches(monkeypatch)
    out = vmap(lambda xi, wi: conv2d_per_client(xi, wi, None, padding=1))(x, w)
    out.square().sum().backward()
    assert launched == ["client_conv_forward", "client_conv_input_grad"]
    for k in range(3):
        xk = x[k].detach().clone().requires_grad_()
        F.conv2d(xk, w[k], None, padding=1).square().sum().backward()
        torch.testing.assert_close(x.grad[k], xk.grad, rtol=1e-4, atol=1e-4)


def test_vmapped_at_another_dimension_or_shared_by_every_client_it_still_is_each_client_s(monkeypatch):
    """Inputs vmapped at dimension 1 and weights shared by all clients (not vmapped),
    with gradients of both: one launch each way, against torch's convolution per client."""
    torch.manual_seed(0)
    x, w = leaves(torch.randn(2, 3, 2, 6, 5), torch.randn(4, 2, 3, 3))  # x [N, K, C, H, W]: clients at dimension 1
    launched = counting_launches(monkeypatch)
    out = vmap(lambda xi: conv2d_per_client(xi, w, None, stride=(1, 2), padding=1), in_dims=1)(x)
    (out * torch.arange(out.numel(), device=DEVICE).reshape(out.shape).sin()).sum().backward()
    assert launched == ["client_conv_forward", "client_conv_input_grad", "client_conv_weight_grad"]
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    reference = torch.stack([F.conv2d(xr[:, k], wr, None, stride=(1, 2), padding=1) for k in range(3)])
    (reference * torch.arange(reference.numel(), device=DEVICE).reshape(reference.shape).sin()).sum().backward()
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, wr.grad, rtol=1e-5, atol=1e-4)  # summed over the clients too


def test_under_bf16_autocast_it_computes_in_bf16_as_torchs_convolution_does():
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3), torch.randn(4)
    device = "cuda" if HAS_CUDA else "cpu"
    with torch.autocast(device, dtype=torch.bfloat16):
        out = conv2d_per_client(x.to(device), w.to(device), b.to(device), padding=1)
        reference = F.conv2d(x.to(device), w.to(device), b.to(device), padding=1)
    assert out.dtype == reference.dtype == torch.bfloat16
    exact = F.conv2d(x.double(), w.double(), b.double(), padding=1)
    # within bf16's rounding (8 bits of mantissa) of the float64 convolution
    assert float((out.cpu().double() - exact).abs().max() / exact.abs().max()) < 2e-2


def test_what_the_kernels_do_not_compute_stays_torchs(monkeypatch):
    """groups > 1, string padding, float64, more than 64 channels and a client's tensors of
    2**31 values or more (here a bound lowered to 500) go to F.conv2d (no kernel launched),
    with torch's own numbers; mixed dtypes get F.conv2d's error."""
    torch.manual_seed(0)
    launched = counting_launches(monkeypatch)
    x = torch.randn(2, 4, 8, 8, device=DEVICE)
    for args, kwargs in (((x, torch.randn(6, 2, 3, 3, device=DEVICE)), {"groups": 2}),
                         ((x, torch.randn(6, 4, 3, 3, device=DEVICE)), {"padding": "same"}),
                         ((x.double(), torch.randn(6, 4, 3, 3, dtype=torch.float64, device=DEVICE)), {}),
                         ((x, torch.randn(65, 4, 1, 1, device=DEVICE)), {}),
                         ((torch.randn(1, 65, 3, 3, device=DEVICE), torch.randn(2, 65, 1, 1, device=DEVICE)), {})):
        torch.testing.assert_close(conv2d_per_client(*args, **kwargs), F.conv2d(*args, **kwargs), rtol=0, atol=0)
    assert launched == []
    monkeypatch.setattr(client_conv, "MAX_CLIENT_VALUES", 500)
    # 256 input values; outputs 6 x 36 and 30 x 36
    small, large = torch.randn(6, 4, 3, 3, device=DEVICE), torch.randn(30, 4, 3, 3, device=DEVICE)
    torch.testing.assert_close(conv2d_per_client(x[:1], large), F.conv2d(x[:1], large), rtol=0, atol=0)
    assert launched == [], "1,080 output values: above the bound"
    torch.testing.assert_close(conv2d_per_client(x[:1], small), F.conv2d(x[:1], small), rtol=1e-5, atol=1e-5)
    assert launched == ["client_conv_forward"], "216 output values: computed by the kernels"
    with pytest.raises(RuntimeError, match="should be the same"):
        conv2d_per_client(x, torch.randn(6, 4, 3, 3, dtype=torch.bfloat16, device=DEVICE))


def test_where_the_kernels_cannot_run_one_message_names_the_field_before_any_data_is_read(tmp_path, monkeypatch):
    from fedbench.engine import FederatedRun
    from fedbench.errors import ConfigError
    from conftest import tiny_experiment

    assert client_conv.unavailable(torch.device("cuda")) is None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if not HAS_CUDA:  # here the interpreter was on before Triton was imported (conftest): its probe ran
        assert client_conv.unavailable(torch.device("cpu")) is None
    assert "CUDA" in client_conv.unavailable(torch.device("mps"))
    monkeypatch.delenv("TRITON_INTERPRET")
    why = client_conv.unavailable(torch.device("cpu"))
    assert "CUDA device" in why and "TRITON_INTERPRET=1" in why
    if HAS_CUDA:
        return
    # a data root that does not exist: the message must come before the data is looked for
    exp = tiny_experiment(tmp_path / "no_data", tmp_path,
                          train=LocalTrainConfig(cohort=True, cohort_convolution="triton"))
    with pytest.raises(ConfigError, match="train.cohort_convolution='triton'.*TRITON_INTERPRET=1"):
        FederatedRun(exp)


class TwoConvolutions(nn.Module):
    """Small enough for Triton's interpreter (whose time grows with clients x kernel taps):
    conv(1->2, 3x3, padding 1), conv(2->3, 2x2, stride 2) (its input needs a gradient),
    average pool, linear."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 2, 3, padding=1)
        self.conv2 = nn.Conv2d(2, 3, 2, stride=2)
        self.head = nn.Linear(12, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.head(F.adaptive_avg_pool2d(x, 2).flatten(1))


def two_convolutions(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return TwoConvolutions(num_classes, in_channels, image_size)


def test_an_interpreter_that_cannot_run_the_kernels_loops_gets_one_message_naming_the_field(monkeypatch):
    """Triton 3.6.0's interpreter (torch 2.11's) raises at a loop over a scalar argument,
    which every kernel has: the run stops before any data, as on a CPU without it."""
    import triton

    from fedbench import client_conv_kernels
    from fedbench.errors import ConfigError

    class FailingLaunch:  # what that interpreter raised for the probe, here on purpose
        def __getitem__(self, grid):
            def launch(*args):
                raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
            return launch

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(client_conv_kernels, "interpreter_probe", FailingLaunch())
    client_conv.interpreter_fault.cache_clear()
    try:
        message = client_conv.unavailable(torch.device("cpu"))
        with pytest.raises(ConfigError, match="train.cohort_convolution") as error:
            LocalTrainConfig(cohort=True, cohort_convolution="triton").check_device(torch.device("cpu"))
    finally:
        client_conv.interpreter_fault.cache_clear()  # the real probe again for the other tests
    assert message == (f"grouped or matmul on cpu: Triton {triton.__version__}'s interpreter fails here "
                       "(TypeError('only 0-dimensional arrays can be converted to Python scalars'))")
    assert "0-dimensional" in str(error.value)


@pytest.mark.parametrize("compile_mode", [None, "default"])
def test_a_cohort_with_the_triton_convolution_equals_sequential_training(tiny_root, tmp_path, monkeypatch,
                                                                        compile_mode):
    """5 clients, 2 steps each, pixel-pattern poisoning, SDFC's calibration term in every
    step and its Fisher passes before and after training through the Triton kernels too
    (the sequential run's through torch's; a small server split and clients' pool: the
    passes run over all of a client's data in the interpreter); uncompiled, and compiled:
    the fused step, differentiating by autograd (torch.func cannot differentiate the
    operator), traced into the step's graph where this torch can (2.11 and later), else the
    autograd step."""
    from attacks.pixel_pattern import PixelPattern
    from defenses.sdfc import SDFC
    from fedbench.data import DataConfig
    from fedbench.experiment import FabricConfig
    from fedbench.models import ModelConfig
    from test_cohort import MODEL_TOLERANCE, UPDATE_TOLERANCE, both_ways, relative_gap

    if compile_mode and shutil.which("g++") is None and shutil.which("cc") is None:
        pytest.skip("NO C++ COMPILER: torch.compile on CPU needs one, so the compiled Triton cohort is untested here")
    import fedbench.fisher

    launched = counting_launches(monkeypatch)
    in_fisher_passes = []  # forward launches within each cohort Fisher pass (sequential training runs none)
    real_sums = fedbench.fisher._cohort_sums

    def counting_sums(*args, **kwargs):
        before = launched.count("client_conv_forward")
        sums = real_sums(*args, **kwargs)
        in_fisher_passes.append(launched.count("client_conv_forward") - before)
        return sums

    monkeypatch.setattr(fedbench.fisher, "_cohort_sums", counting_sums)
    torch._dynamo.reset()
    (seq, seq_sent, seq_rec), (coh, coh_sent, coh_rec) = both_ways(
        tiny_root, tmp_path, attack=PixelPattern(malicious_fraction=0.4),
        defense=SDFC(), data=DataConfig(root=str(tiny_root), download=False, server_size=8, train_subset=100),
        model=ModelConfig(name="test_client_conv.two_convolutions"), fabric=FabricConfig(tf32="none"),
        train=LocalTrainConfig(local_steps=2, batch_size=8, compile=compile_mode, cohort_convolution="triton"))
    assert coh.exp.train.cohort_convolution == "triton" and seq.exp.train.cohort_convolution == "grouped"
    from fedbench.compiling import traces_autograd

    fused = coh.cohort_trainer.fused is not None
    assert fused == (compile_mode is not None and traces_autograd()), "fused where compiled and traceable"
    # each step: two forward launches, the second convolution's input gradient, two weight gradients
    assert len(launched) >= 2 * 5
    # SDFC's passes on the clients' data and the server's, before training (first round) and after
    assert len(in_fisher_passes) == 4 and min(in_fisher_passes) > 0, (
        "the Fisher passes' convolutions are the Triton kernels", in_fisher_passes)
    assert set(launched) == {"client_conv_forward", "client_conv_input_grad", "client_conv_weight_grad"}
    assert coh_rec[0]["local_steps"] == seq_rec[0]["local_steps"]
    for client in seq_sent:
        assert relative_gap(seq_sent[client], coh_sent[client]) < UPDATE_TOLERANCE, client
    assert relative_gap(seq.global_params, coh.global_params) < MODEL_TOLERANCE
    assert coh_rec[0]["train_loss"] == pytest.approx(seq_rec[0]["train_loss"], rel=1e-4)


def test_the_kernels_compile_for_an_h100_without_one_in_full_float32_and_without_spills():
    """Triton's interpreter accepts code its compiler may not: here each kernel goes through
    Triton's whole compiler (to PTX and ptxas's binary) for an H100 (sm_90), with float32
    and with bf16 tensors, in a process with the interpreter off; no product may run on
    tensor cores (no ``mma``: full float32 fused multiply-adds, as the docstring says); no
    program may spill registers to local memory (``ptxas -v``: the forward pass spilled 72
    to 108 bytes a thread at simple_cnn's widths and 18,784 at 64 channels before its
    channel blocks); and the weight gradient, whose matrix products stage tiles in shared memory,
    must fit an H100 block's at the widest layer the operator takes (64 channels; the input
    gradient keeps its sums in registers, and compiling it that wide takes 12 s more)."""
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("TRITON HAS NO CUDA BACKEND HERE: the kernels' compilation for a GPU is untested")
    code = ("import json\nfrom fedbench.client_conv_kernels import compiled_for_gpu\n"
            "print(json.dumps({f'{dtype} {channels}': {name: [k.ptx.count('mma.sync') + k.ptx.count('wgmma'),"
            " k.ptx.count('fma.rn.f32'), k.shared_bytes, k.spilled_bytes, k.registers]"
            " for name, k in compiled_for_gpu(90, dtype, channels, names).items()}"
            " for dtype, channels, names in (('fp32', 6, None), ('bf16', 6, None),"
            " ('fp32', 64, ('client_conv_forward', 'client_conv_weight_grad')))}))")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    counts = json.loads(done.stdout.splitlines()[-1])
    assert set(counts) == {"fp32 6", "bf16 6", "fp32 64"}, "simple_cnn's layers, and the widest the operator takes"
    for setting, kernels in counts.items():
        assert set(kernels) == ({"client_conv_forward", "client_conv_weight_grad"} if setting == "fp32 64" else
                                {"client_conv_forward", "client_conv_input_grad", "client_conv_weight_grad"})
        for name, (tensor_core_products, fmas, shared, spilled, registers) in kernels.items():
            assert tensor_core_products == 0 and fmas > 0, (setting, name, tensor_core_products, fmas)
            assert shared <= 227 * 1024, (setting, name, shared, "an H100 block's shared memory: 227 KB")
            assert spilled == 0 and 0 < registers <= 255, (setting, name, spilled, registers)


def test_the_programs_an_sm_holds_by_hand():
    """benchmarks/perf/triton_resources.py's arithmetic, worked by hand for an H100 SM
    (65,536 registers in units of 8 a thread, at most 32 programs and 64 warps, 228 KB of
    shared memory and 1 KB reserved a program), 4 warps a program."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks" / "perf"))
    from triton_resources import programs_per_sm

    assert programs_per_sm(141, 0, 4) == 3  # 144 x 128 = 18,432 registers a program; 65,536 / 18,432 = 3.6
    assert programs_per_sm(255, 0, 4) == 2  # 256 x 128 = 32,768
    assert programs_per_sm(120, 0, 4) == 4  # 120 x 128 = 15,360: 4.3
    assert programs_per_sm(32, 0, 4) == 16  # 4,096 a program: 16
    assert programs_per_sm(40, 0, 4) == 12  # 5,120 a program: 12.8
    assert programs_per_sm(16, 0, 4) == 16  # 2,048 a program would allow 32; 64 warps allow 16 programs of 4
    assert programs_per_sm(64, 49152, 4) == 4  # registers allow 8; 233,472 / 50,176 = 4.7


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA ONLY: the compiled Triton kernels need a GPU")
def test_on_cuda_the_same_inputs_give_the_same_bits():
    """Fixed summation orders, no atomics: a second forward and backward pass repeats the
    first bit for bit (the tests above check the values on whichever device this is)."""
    gen = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 64, 3, 32, 32, generator=gen), torch.randn(3, 6, 3, 5, 5, generator=gen), torch.randn(3, 6)
    dy = torch.randn(3, 64, 6, 28, 28, generator=gen).cuda()
    passes = []
    for _ in range(2):
        xs, ws, bs = leaves(x, w, b)
        out = client_conv2d_of(xs, ws, bs, (1, 1), (0, 0), (1, 1))
        (out * dy).sum().backward()
        passes.append([out.detach(), xs.grad, ws.grad, bs.grad])
    for first, second in zip(*passes):
        assert torch.equal(first, second)


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA ONLY: CUDA graphs need a GPU")
def test_on_cuda_a_cuda_graph_replays_the_kernels_as_eager_computes_them():
    """The path a GPU grid takes: vmap over clients compiled with reduce-overhead (CUDA
    graphs), forward and backward, three calls with new inputs written in place between
    them; each equals the eager computation to float32 rounding."""
    torch.manual_seed(0)
    weights = torch.randn(4, 6, 3, 5, 5, device="cuda", requires_grad=True)
    images = torch.randn(4, 8, 3, 16, 16, device="cuda")

    def losses(w, x):
        return vmap(lambda wk, xk: F.relu(conv2d_per_client(xk, wk, None, padding=2)).square().mean())(w, x)

    torch._dynamo.reset()
    compiled = torch.compile(losses, mode="reduce-overhead", fullgraph=True)
    for call in range(3):
        with torch.no_grad():
            images.copy_(torch.randn(images.shape, device="cuda"))
        got = compiled(weights, images)
        grad, = torch.autograd.grad(got.sum(), [weights])
        want = losses(weights, images)
        want_grad, = torch.autograd.grad(want.sum(), [weights])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA ONLY: CUDA graphs need a GPU")
def test_on_cuda_sdfcs_fisher_passes_through_the_kernels_under_cuda_graphs_equal_explicit_loops():
    """The path an SDFC cell of a triton grid takes after training: 3 clients' published
    Fishers under ``reduce-overhead`` (batch gradients by autograd traced into CUDA graphs),
    two rounds (the second replays the graphs with other models), against the explicit
    per-batch loop on the CPU."""
    from fedbench import fisher
    from test_cohort_fisher import by_explicit_loops, papers_cnn, perturbed_copies, relative_gaps, uneven_streams

    models = perturbed_copies(papers_cnn(), 3)
    torch._dynamo.reset()
    for round_index in range(2):
        streams = uneven_streams([2, 1, 2], classes=10, dtype=torch.float32, side=32, seed=1 + round_index)
        want = [by_explicit_loops(model, stream, "published") for model, stream in zip(models, streams)]
        on_gpu = [copy.deepcopy(model).cuda() for model in models]
        with fisher.cohort_passes("reduce-overhead", "triton"):
            got = fisher.cohort_fishers(on_gpu, [[(x.cuda(), y.cuda()) for x, y in s] for s in streams], "published")
        assert relative_gaps([[g.cpu() for g in gs] for gs in got], want) < 1e-4, round_index
        with torch.no_grad():
            for model in models:
                for tensor in model.parameters():
                    tensor.mul_(1.01)
