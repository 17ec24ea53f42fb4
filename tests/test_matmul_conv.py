"""Convolutions as matrix products over unfolded patches (train.cohort_convolution=matmul)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

import fedbench.matmul_conv
from attacks.pixel_pattern import PixelPattern
from defenses.fedavg import FedAvg
from defenses.sdfc import SDFC
from fedbench.client import LocalTrainConfig
from fedbench.cohort import convolutions_as_matmul
from fedbench.matmul_conv import conv2d_as_matmul
from test_cohort import MODEL_TOLERANCE, UPDATE_TOLERANCE, both_ways, relative_gap


def convolution_by_loops(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride, padding, dilation) -> np.ndarray:
    """out[n, o, i, j] = b[o] + sum_{c,u,v} x_padded[n, c, i*s0 + u*d0, j*s1 + v*d1] * w[o, c, u, v]."""
    padded = np.pad(x, ((0, 0), (0, 0), (padding[0],) * 2, (padding[1],) * 2))
    n, _, height, width = padded.shape
    outs, channels, kh, kw = w.shape
    rows = (height - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    cols = (width - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    out = np.zeros((n, outs, rows, cols))
    for i in range(rows):
        for j in range(cols):
            for u in range(kh):
                for v in range(kw):
                    values = padded[:, :, i * stride[0] + u * dilation[0], j * stride[1] + v * dilation[1]]
                    out[:, :, i, j] += values @ w[:, :, u, v].T
    return out + b[None, :, None, None]


def test_a_convolution_as_matmul_equals_the_sum_written_out_by_hand():
    """Non-square kernel, different strides, padding and dilation per side, float64."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 9, 11, generator=gen, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 2, generator=gen, dtype=torch.float64)
    b = torch.randn(4, generator=gen, dtype=torch.float64)
    out = conv2d_as_matmul(x, w, b, stride=(2, 1), padding=(1, 2), dilation=(1, 3))
    expected = convolution_by_loops(x.numpy(), w.numpy(), b.numpy(), (2, 1), (1, 2), (1, 3))
    assert out.shape == expected.shape == (2, 4, 5, 12)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=1e-12)
    # one-element tuples mean both sides, as F.conv2d reads them
    both = conv2d_as_matmul(x, w, b, stride=(2,), padding=(1,), dilation=(2,))
    np.testing.assert_allclose(both.numpy(), convolution_by_loops(x.numpy(), w.numpy(), b.numpy(), (2, 2), (1, 1), (2, 2)),
                               rtol=1e-12, atol=1e-12)
    # one image without its batch dimension, and no bias
    single = conv2d_as_matmul(x[1], w, None, stride=(2, 1), padding=(1, 2), dilation=(1, 3))
    np.testing.assert_allclose(single.numpy(), expected[1] - b.numpy()[:, None, None], rtol=1e-12, atol=1e-12)


def test_under_vmap_each_client_gets_its_own_convolution_and_weight_gradient():
    """4 clients' weights and batches (channels-last images, padding 1, stride 2) vmapped
    against torch's convolution client by client: outputs and weight gradients."""
    torch.manual_seed(0)
    weights, biases = torch.randn(4, 6, 3, 5, 5), torch.randn(4, 6)
    images = torch.randn(4, 8, 3, 32, 32).contiguous(memory_format=torch.channels_last_3d)

    def conv(w, b, x):
        return conv2d_as_matmul(x, w, b, stride=2, padding=1)

    outputs = vmap(conv)(weights, biases, images)
    gradients = vmap(grad(lambda w, b, x: conv(w, b, x).square().sum()))(weights, biases, images)
    for k in range(4):
        reference = F.conv2d(images[k], weights[k], biases[k], padding=1, stride=2)
        assert outputs[k].shape == reference.shape == (8, 6, 15, 15)
        torch.testing.assert_close(outputs[k], reference, rtol=1e-5, atol=1e-4)
        w = weights[k].clone().requires_grad_()
        F.conv2d(images[k], w, biases[k], padding=1, stride=2).square().sum().backward()
        torch.testing.assert_close(gradients[k], w.grad, rtol=1e-4, atol=1e-3)  # sums over 1,800 positions


def test_under_bf16_autocast_the_output_is_bf16_as_torchs_convolution_is():
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3), torch.randn(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, reference = conv2d_as_matmul(x, w, b, padding=1), F.conv2d(x, w, b, padding=1)
    assert out.dtype == reference.dtype == torch.bfloat16
    exact = F.conv2d(x.double(), w.double(), b.double(), padding=1)
    # both within bf16's rounding (8 bits of mantissa) of the float64 convolution
    for result in (out, reference):
        assert float((result.double() - exact).abs().max() / exact.abs().max()) < 2e-2


def test_only_inside_the_context_do_modules_convolve_as_matmul_and_what_it_cannot_do_stays_torchs():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    plain = nn.Conv2d(4, 6, 3, padding=1).double()
    grouped = nn.Conv2d(4, 6, 3, groups=2).double()
    same = nn.Conv2d(4, 6, 3, padding="same").double()
    calls = []
    real_unfold = F.unfold
    with pytest.MonkeyPatch.context() as patch:  # unfolding patches is what only the matmul path does
        patch.setattr(F, "unfold", lambda *a, **k: calls.append(1) or real_unfold(*a, **k))
        with convolutions_as_matmul(True):
            for module in (plain, grouped, same):
                module(x)
        plain(x)  # outside the context
    assert len(calls) == 1, "only the plain convolution, inside the context, unfolded"
    assert F.conv2d is fedbench.matmul_conv.TORCH_CONV2D, "torch's own conv2d is back"
    with convolutions_as_matmul(True):
        outputs = [module(x) for module in (plain, grouped, same)]
    with convolutions_as_matmul(False):
        assert F.conv2d is fedbench.matmul_conv.TORCH_CONV2D
    for module, out in zip((plain, grouped, same), outputs):
        torch.testing.assert_close(out, module(x), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError), convolutions_as_matmul(True):
        raise ValueError("a failure inside the context")
    assert F.conv2d is fedbench.matmul_conv.TORCH_CONV2D, "restored after an error too"


@pytest.mark.parametrize("compile_mode", [None, "default"])
def test_a_cohort_with_matmul_convolutions_equals_sequential_training(tiny_root, tmp_path, compile_mode):
    """simple_cnn with poisoning; uncompiled with SDFC's calibration and clients of
    different step counts, and compiled (the path a GPU takes; 3 steps a client, to compile
    one step's graph only)."""
    if compile_mode and shutil.which("g++") is None and shutil.which("cc") is None:
        pytest.skip("NO C++ COMPILER: torch.compile on CPU needs one, so the compiled matmul cohort is untested here")
    calls = []
    real = fedbench.matmul_conv.conv2d_as_matmul
    train = (LocalTrainConfig(local_steps=3, batch_size=32, compile=compile_mode, cohort_convolution="matmul")
             if compile_mode else
             LocalTrainConfig(local_epochs=2, local_steps=None, batch_size=32, cohort_convolution="matmul"))
    with pytest.MonkeyPatch.context() as patch:
        # each call says whether torch.compile was tracing it: the compiled step, not an eager probe
        patch.setattr(fedbench.matmul_conv, "conv2d_as_matmul",
                      lambda *a, **k: calls.append(torch.compiler.is_compiling()) or real(*a, **k))
        torch._dynamo.reset()
        (seq, seq_sent, seq_rec), (coh, coh_sent, coh_rec) = both_ways(
            tiny_root, tmp_path, attack=PixelPattern(malicious_fraction=0.4), train=train,
            defense=SDFC() if compile_mode is None else FedAvg())
    assert coh.exp.train.cohort_convolution == "matmul" and seq.exp.train.cohort_convolution == "grouped"
    assert calls, "the cohort's convolutions went through conv2d_as_matmul"
    assert any(calls) == bool(compile_mode), "compiled: the compiled step traced conv2d_as_matmul"
    assert compile_mode or len(set(seq_rec[0]["local_steps"])) > 1, "clients of different step counts"
    assert coh_rec[0]["local_steps"] == seq_rec[0]["local_steps"]
    for client in seq_sent:
        assert relative_gap(seq_sent[client], coh_sent[client]) < UPDATE_TOLERANCE, client
    assert relative_gap(seq.global_params, coh.global_params) < MODEL_TOLERANCE
    assert coh_rec[0]["train_loss"] == pytest.approx(seq_rec[0]["train_loss"], rel=1e-4)


@pytest.mark.parametrize("train, allowed", [
    (LocalTrainConfig(cohort_convolution="im2col"), "one of: grouped, matmul"),
    (LocalTrainConfig(cohort=False, cohort_convolution="matmul"), "grouped when train.cohort=false"),
])
def test_bad_cohort_convolution_names_the_field_and_what_is_allowed(train, allowed):
    problems = train.problems()
    assert [field for field, _, _ in problems] == ["train.cohort_convolution"]
    assert allowed in problems[0][2]


def test_the_autocast_cast_by_hand_follows_autocast_s_own_policy_for_conv2d():
    """What CPU autocast does to a plain F.conv2d (float32 and bf16 tensors to bf16, float64
    left alone, no bias allowed, stride and padding by keyword) is what the hand cast does
    under vmap, where CPU autocast does not reach; and the matmul variant's fallback (here
    a grouped convolution) casts too."""
    from fedbench.matmul_conv import conv2d_in_autocast_dtype

    x, w, b = torch.randn(2, 4, 4, 9, 9), torch.randn(2, 6, 4, 3, 3), torch.randn(2, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for dtype in (torch.float32, torch.float64):
            plain = F.conv2d(x[0].to(dtype), w[0].to(dtype), None, stride=2, padding=1)
            mine = vmap(lambda xi, wi: conv2d_in_autocast_dtype(xi, wi, None, stride=2, padding=1))(x.to(dtype),
                                                                                                   w.to(dtype))
            assert plain.dtype == mine.dtype == (torch.bfloat16 if dtype == torch.float32 else torch.float64)
        grouped = vmap(lambda xi, wi, bi: conv2d_as_matmul(xi, wi[:, :2], bi, groups=2))(x, w, b)
        assert grouped.dtype == torch.bfloat16
    assert vmap(conv2d_in_autocast_dtype)(x, w, b).dtype == torch.float32, "no autocast: no cast"
