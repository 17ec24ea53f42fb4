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
    assert kernels.kind_of("aten::im2col") == "convolution"  # the matmul variant's patches
    assert kernels.kind_of("cpp_fused_relu_3") == "inductor fused"
    # a fused kernel named after the convolution it sits beside is a fused kernel, not a convolution
    assert kernels.kind_of("triton_poi_fused_convolution_backward_relu_0") == "inductor fused"
    # train.cohort_convolution=triton's own kernels (fedbench.client_conv_kernels)
    for name in ("client_conv_forward", "client_conv_input_grad", "client_conv_weight_grad"):
        assert kernels.kind_of(name) == "convolution", name


def test_groups_summed_per_name_longest_first_and_shares_per_kind():
    events = [(CONV, 30.0), (FUSED, 5.0), (CONV, 20.0), (GEMM, 15.0), (FUSED, 5.0), (ELEMENTWISE, 25.0)]
    groups = kernels.grouped(events)
    assert [(g.name, g.calls, g.microseconds) for g in groups] == \
        [(CONV, 2, 50.0), (ELEMENTWISE, 1, 25.0), (GEMM, 1, 15.0), (FUSED, 2, 10.0)]
    # 100 microseconds in all: 50 convolution, 15 matrix product, 10 fused, 25 other
    assert kernels.kind_shares(groups) == pytest.approx(
        {"convolution": 50.0, "matrix product": 15.0, "inductor fused": 10.0, "other": 25.0})


def test_the_grid_gets_a_convolution_option_only_where_it_trained_5_percent_faster_than_its_settings(tmp_path):
    assert kernels.faster_convolution({"base": 200_000, "matmul": 250_000, "bf16": 300_000}) == "matmul"
    assert kernels.faster_convolution({"base": 200_000, "matmul": 150_000}) == "grouped"
    assert kernels.faster_convolution({"base": 200_000, "matmul": 209_000}) == "grouped", "4.5%: within noise"
    assert kernels.faster_convolution({"base": 200_000, "matmul": 211_000}) == "matmul", "5.5%"
    assert kernels.faster_convolution({"base": 200_000}) == "grouped", "matmul not measured (a timeout)"
    assert kernels.faster_convolution({"matmul": 150_000}) == "grouped", "nothing to compare with"
    # the faster of the two options, where it leads base by 5%
    assert kernels.faster_convolution({"base": 200_000, "matmul": 250_000, "triton": 600_000}) == "triton"
    assert kernels.faster_convolution({"base": 200_000, "matmul": 250_000, "triton": 240_000}) == "matmul"
    assert kernels.faster_convolution({"base": 200_000, "matmul": 150_000, "triton": 205_000}) == "grouped", "2.5%"
    assert kernels.faster_convolution({"base": 200_000, "triton": 300_000}) == "triton", "matmul not measured"
    measured = tmp_path / "kernels.json"
    measured.write_text('{"base": 1000, "matmul": 1200}')
    assert kernels.main(["--faster-convolution", str(measured)]) == "matmul"


def test_the_leases_grid_call_packs_32_cells_a_process_only_where_64_trained_1_5_times_16(tmp_path):
    # by hand: triton leads base (300k against 200k at 16 cells); at 64 cells 450k is 1.5x 300k
    assert kernels.grid_plan({"base": 200_000, "triton": 300_000, "triton@64": 450_000}) == ("triton", 32)
    assert kernels.grid_plan({"base": 200_000, "triton": 300_000, "triton@64": 449_000}) == ("triton", 16)
    assert kernels.grid_plan({"base": 200_000, "triton": 300_000}) == ("triton", 16), "64 not measured (a timeout)"
    # the gain that counts is the chosen convolution's: base's own at 64 cells when triton lost
    assert kernels.grid_plan({"base": 200_000, "triton": 201_000, "triton@64": 900_000,
                              "base@64": 250_000}) == ("grouped", 16)
    assert kernels.grid_plan({"base": 200_000, "triton": 201_000, "base@64": 300_000}) == ("grouped", 32)
    assert kernels.grid_plan({}) == ("grouped", 16), "the first call measured nothing"
    measured = tmp_path / "kernels.json"
    measured.write_text('{"base": 1000, "triton": 1200, "triton@64": 2000}')
    assert kernels.main(["--grid-plan", str(measured)]) == "triton 32"


def test_each_measured_variant_s_samples_per_second_are_written_as_soon_as_it_is_measured(tmp_path, monkeypatch):
    """The lease's grid reads this file: a stage cut short by its time limit keeps what it measured."""
    import json

    written = []

    def fake_measure(variant, cells, args, out, workload):
        if args.json.exists():
            written.append(json.loads(args.json.read_text()))
        return [variant, cells, {"base": 1000, "matmul": 1500}[variant], 1.0, 0, 0, 0, 0], "a table"

    monkeypatch.setattr(kernels, "measure_apart", fake_measure)
    path = tmp_path / "kernels.json"
    kernels.main(["--variants", "base", "matmul", "--json", str(path), "--device", "cpu", "--compile", "none"])
    assert written == [{"base": 1000}], "base on disk before matmul was measured"
    assert json.loads(path.read_text()) == {"base": 1000, "matmul": 1500}
    assert kernels.main(["--faster-convolution", str(path)]) == "matmul"


def test_several_cell_counts_measure_every_variant_at_each_and_the_grid_choice_reads_the_first(tmp_path, monkeypatch):
    import json

    calls = []

    def fake_measure(variant, cells, args, out, workload):
        calls.append((variant, cells))
        # triton gains with more cells, base does not
        rate = {("base", 16): 1000, ("triton", 16): 1040, ("base", 48): 1000, ("triton", 48): 2500}[variant, cells]
        return [variant, cells, rate, 1.0, 0, 0, 0], f"{variant} {cells}"

    monkeypatch.setattr(kernels, "measure_apart", fake_measure)
    path = tmp_path / "kernels.json"
    text = kernels.main(["--cells", "16", "48", "--variants", "base", "triton", "--json", str(path),
                         "--device", "cpu", "--compile", "none"])
    assert calls == [("base", 16), ("triton", 16), ("base", 48), ("triton", 48)], "the first count's variants first"
    assert json.loads(path.read_text()) == {"base": 1000, "triton": 1040, "base@48": 1000, "triton@48": 2500}
    assert kernels.main(["--faster-convolution", str(path)]) == "grouped", "4% at 16 cells: the 48s are not compared"
    assert "| triton | 48 | 2500 |" in text and "16 or 48 cells" in text


def test_per_step_time_is_the_longer_round_s_extra_steps_over_their_extra_time():
    # a round of 10 steps in 1.0 s and one of 20 in 1.8 s: the 10 extra steps took 0.8 s,
    # so 0.08 s a step, and the short round's other 0.2 s are its fixed part
    step, fixed = kernels.per_step(1.0, 1.8, 10)
    assert step == pytest.approx(0.08)
    assert fixed == pytest.approx(0.2)


@pytest.mark.parametrize("variant, precision, tf32, convolution", [
    ("base", "32-true", "convolutions", "grouped"), ("tf32", "32-true", "all", "grouped"),
    ("conv_fp32", "32-true", "none", "grouped"), ("cudnn_benchmark", "32-true", "convolutions", "grouped"),
    ("bf16", "bf16-mixed", "convolutions", "grouped"), ("matmul", "32-true", "convolutions", "matmul"),
    ("matmul_tf32", "32-true", "all", "matmul"), ("triton", "32-true", "convolutions", "triton")])
def test_each_variant_s_runs_carry_its_training_options(variant, precision, tf32, convolution, monkeypatch, tmp_path):
    assert set(kernels.VARIANTS) == {"base", "tf32", "conv_fp32", "cudnn_benchmark", "bf16", "matmul", "matmul_tf32",
                                     "triton"}
    made = []
    monkeypatch.setattr(kernels, "make_run", lambda *args: made.append(args))
    kernels.make_runs(variant, 2, 5, "cpu", tmp_path, kernels.Workload())
    assert len(made) == 2
    for model, cohort, steps, run_precision, device, out, workload, train, fabric in made:
        assert (model, cohort, steps, run_precision) == ("simple_cnn", True, 5, precision)
        assert train == {"cohort_convolution": convolution} and fabric == {"tf32": tf32}


def test_the_long_round_reuses_the_runs_with_twice_the_steps(tiny_root, tmp_path):
    """kernels.py times a round of n steps and one of 2n on the same runs: a run must read
    train.local_steps as each round opens, not once when it is built."""
    from conftest import tiny_experiment
    from fedbench.engine import FederatedRun, train_in_one_cohort

    runs = [FederatedRun(tiny_experiment(tiny_root, tmp_path / str(i))) for i in range(2)]
    for run in runs:
        run.cohort = True  # as kernels.py's packed round trains them
    assert [r.exp.train.local_steps for r in runs] == [4, 4]  # tiny_experiment's
    for steps in (4, 9):
        kernels.set_local_steps(runs, steps)
        results = train_in_one_cohort(runs, [run.open_round(0).clients for run in runs])
        assert [[c.steps for c in mine] for mine in results] == [[steps] * 5, [steps] * 5]


def test_cudnn_s_autotuner_is_on_for_its_variant_only_and_put_back_after_an_error():
    import torch

    before = torch.backends.cudnn.benchmark
    for variant, on in (("cudnn_benchmark", True), ("base", False)):
        with pytest.raises(RuntimeError, match="inside"):
            with kernels.autotuned(variant):
                assert torch.backends.cudnn.benchmark is on
                raise RuntimeError("inside")
        assert torch.backends.cudnn.benchmark is before


def test_a_measurement_apart_runs_in_another_process_and_returns_its_result():
    import os

    from common import in_fresh_process

    assert in_fresh_process(os.getpid) != os.getpid()
    assert in_fresh_process(divmod, 17, 5) == (3, 2)
