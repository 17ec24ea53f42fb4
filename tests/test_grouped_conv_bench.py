"""benchmarks/perf/grouped_conv.py: every variant times the same computation."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks" / "perf"))
import grouped_conv  # noqa: E402
from conftest import triton_launches, triton_unavailable  # noqa: E402


def numpy_convolution(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """One client's valid, stride-1 convolution as explicit sums: x [B,C,H,W], w [O,C,k,k]."""
    batch, _, side, _ = x.shape
    out_channels, _, k, _ = w.shape
    out = np.empty((batch, out_channels, side - k + 1, side - k + 1))
    for i in range(side - k + 1):
        for j in range(side - k + 1):
            patch = x[:, :, i:i + k, j:j + k]  # [B,C,k,k]
            out[:, :, i, j] = np.einsum("bcuv,ocuv->bo", patch, w) + b
    return out


def float_variants_and_shapes() -> list:
    """Every float variant with each shape; the Triton kernels (float32 only, float64 goes to
    torch's convolution) on conv1 only: Triton's interpreter, which runs them without a GPU,
    takes seconds per call for conv2's 400 output-channel taps (tests/test_client_conv.py
    checks its input gradient on smaller shapes)."""
    return [pytest.param(shape, name) for name in grouped_conv.VARIANTS if not name.endswith("bf16")
            for shape in grouped_conv.SHAPES if name != "triton" or shape == "conv1"]


@pytest.mark.parametrize("shape, name", float_variants_and_shapes())
def test_each_float_variant_is_every_client_s_convolution_with_the_gradients_a_step_takes(shape, name, monkeypatch):
    variant = grouped_conv.VARIANTS[name]
    triton = variant.convolution == "triton"
    if triton and triton_unavailable():
        pytest.skip(f"THE TRITON VARIANT IS UNTESTED HERE: {triton_unavailable()}")
    clients = 2 if triton else 3
    dtype = torch.float32 if triton else torch.float64
    x, w, b = (t.detach().to(dtype).requires_grad_(t.requires_grad)
               for t in grouped_conv.inputs(shape, clients=clients, batch=2, device="cpu"))
    launched = triton_launches(monkeypatch)
    with grouped_conv.settings(variant):
        out, *grads = grouped_conv.forward_backward(variant, x, w, b)
    assert len(launched) == (2 if triton else 0), "the Triton variant's forward pass and weight gradient"
    tolerance = dict(rtol=1e-5, atol=1e-4) if triton else dict(rtol=1e-10, atol=1e-10)
    xs, ws, bs = (t.detach().double().numpy() for t in (x, w, b))
    expected = np.stack([numpy_convolution(xs[k], ws[k], bs[k]) for k in range(clients)])
    np.testing.assert_allclose(out.numpy(), expected, **tolerance)
    # d sum(out) / d b[k, o] = the number of output pixels of each image in client k's batch
    pixels = expected.shape[1] * expected.shape[3] * expected.shape[4]
    np.testing.assert_allclose(grads[-1].numpy(), np.full(bs.shape, pixels), rtol=1e-6 if triton else 1e-12)
    # d sum(out) / d w[k,o,c,u,v] = the sum over images and output pixels of the input under (u, v)
    side = expected.shape[-1]
    grad_w = np.stack([[[[xs[k, :, c, u:u + side, v:v + side].sum() for v in range(5)] for u in range(5)]
                        for c in range(ws.shape[2])] for k in range(clients)])  # [K,C,5,5], the same for every o
    np.testing.assert_allclose(grads[-2].numpy(), np.broadcast_to(grad_w[:, None], ws.shape), **tolerance)
    assert len(grads) == (3 if x.requires_grad else 2), "conv2's input gradient, as a step needs it"
    if x.requires_grad:  # d sum(out) / d x[k,b,c,p,q] = the weights of every (o, u, v) that reads pixel (p, q)
        grad_x = np.zeros(xs.shape[:1] + xs.shape[2:])  # [K,C,H,W], the same for every image
        for u in range(5):
            for v in range(5):
                grad_x[:, :, u:u + side, v:v + side] += ws[:, :, :, u, v].sum(axis=1)[:, :, None, None]
        np.testing.assert_allclose(grads[0].numpy(), np.broadcast_to(grad_x[:, None], xs.shape), rtol=1e-10)


def test_a_variant_s_switches_hold_inside_and_are_put_back_after_an_error():
    cudnn = torch.backends.cudnn
    before = cudnn.allow_tf32, torch.get_float32_matmul_precision(), cudnn.benchmark
    with pytest.raises(RuntimeError, match="inside"):
        with grouped_conv.settings(grouped_conv.VARIANTS["grouped_fp32_autotuned"]):
            assert (cudnn.allow_tf32, torch.get_float32_matmul_precision(), cudnn.benchmark) == (False, "highest", True)
            raise RuntimeError("inside")
    assert (cudnn.allow_tf32, torch.get_float32_matmul_precision(), cudnn.benchmark) == before


def test_the_bf16_variant_convolves_in_bf16_under_vmap():
    """CPU autocast does not cast vmap's convolution; the variant casts as the cohort does."""
    variant = grouped_conv.VARIANTS["grouped_bf16"]
    x, w, b = grouped_conv.inputs("conv2", clients=3, batch=2, device="cpu")
    with grouped_conv.settings(variant):
        out, *grads = grouped_conv.forward_backward(variant, x, w, b)
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in grads), "gradients of float32 leaves"
    xs, ws, bs = (t.detach().double().numpy() for t in (x, w, b))
    expected = np.stack([numpy_convolution(xs[k], ws[k], bs[k]) for k in range(3)])
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=0, atol=0.05 * np.abs(expected).max())
