"""benchmarks/perf/kernels.py: a profiled round's kernels summed per name and per kind."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks" / "perf"))
import kernels  # noqa: E402

# Kernel names as CUDA's profiler reports them on an H100 (cuDNN, cuBLAS/CUTLASS, inductor, ATen)
CONV = "sm90_xmma_wgrad_implicit_gemm_f32f32_tf32f32_f32_nhwckrsc_nhwc_tilesize64x64x32"
GEMM = "void cutlass::Kernel2<cutlass_80_simt_sgemm_128x64_8x5_nn_align1>(Params)"
FUSED = "triton_poi_fused_add_mul_relu_0"
ELEMENTWISE = "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>"


def test_kinds_from_kernel_names():
    assert [kernels.kind_of(n) for n in (CONV, GEMM, FUSED, ELEMENTWISE)] == \
        ["convolution", "matrix product", "inductor fused", "other"]
    # cuBLAS's Hopper GEMMs say xmma as cuDNN's convolutions do; cuBLASLt's say nvjet; cuDNN's FFT ones neither
    assert kernels.kind_of("sm90_xmma_gemm_f32f32_f32f32_f32_tn_n_tilesize128x128x32_warpgroupsize1x1x1") == \
        "matrix product"
    assert kernels.kind_of("nvjet_tst_64x8_64x16_2x1_v_bz_TNT") == "matrix product"
    assert kernels.kind_of("void fft2d_r2c_32x32<float, false, 1u, false>(float2*, float const*)") == "convolution"
    # the CPU dry run's names
    assert kernels.kind_of("aten::convolution_backward") == "convolution"
    assert kernels.kind_of("aten::bmm") == "matrix product"
    assert kernels.kind_of("aten::im2col") == "convolution"  # the unfold variant's patches
    assert kernels.kind_of("cpp_fused_relu_3") == "inductor fused"
    # a fused kernel named after the convolution it sits beside is a fused kernel, not a convolution
    assert kernels.kind_of("triton_poi_fused_convolution_backward_relu_0") == "inductor fused"


def test_groups_summed_per_name_longest_first_and_shares_per_kind():
    events = [(CONV, 30.0), (FUSED, 5.0), (CONV, 20.0), (GEMM, 15.0), (FUSED, 5.0), (ELEMENTWISE, 25.0)]
    groups = kernels.grouped(events)
    assert [(g.name, g.calls, g.microseconds) for g in groups] == \
        [(CONV, 2, 50.0), (ELEMENTWISE, 1, 25.0), (GEMM, 1, 15.0), (FUSED, 2, 10.0)]
    # 100 microseconds in all: 50 convolution, 15 matrix product, 10 fused, 25 other
    assert kernels.kind_shares(groups) == pytest.approx(
        {"convolution": 50.0, "matrix product": 15.0, "inductor fused": 10.0, "other": 25.0})


def test_unfold_convolution_equals_each_clients_convolution_under_vmap():
    """The unfold variant's convolution, vmapped over 4 clients' weights and batches,
    against torch's convolution client by client: outputs and weight gradients."""
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    conv = kernels.UnfoldConv2d(3, 6, 5, padding=1, stride=2)
    weights, biases = torch.randn(4, 6, 3, 5, 5), torch.randn(4, 6)
    images = torch.randn(4, 8, 3, 32, 32).contiguous(memory_format=torch.channels_last_3d)

    def loss(weight, bias, x):
        return functional_call(conv, {"weight": weight, "bias": bias}, (x,)).square().sum()

    outputs = vmap(lambda w, b, x: functional_call(conv, {"weight": w, "bias": b}, (x,)))(weights, biases, images)
    gradients = vmap(grad(loss))(weights, biases, images)
    for k in range(4):
        reference = F.conv2d(images[k], weights[k], biases[k], padding=1, stride=2)
        assert outputs[k].shape == reference.shape == (8, 6, 15, 15)
        torch.testing.assert_close(outputs[k], reference, rtol=1e-5, atol=1e-4)
        w = weights[k].clone().requires_grad_()
        F.conv2d(images[k], w, biases[k], padding=1, stride=2).square().sum().backward()
        torch.testing.assert_close(gradients[k], w.grad, rtol=1e-4, atol=1e-3)  # sums over 1,800 positions
