"""A cohort's Fisher matrices (SDFC's client hook for clients trained together), and the
hook batches built several at a time."""

import copy

import pytest
import torch

from attacks.base import AttackSetup, PoisonPlan
from attacks.pixel_pattern import PixelPattern
from fedbench.client import iterate_batches
from fedbench.data import ImagePipeline, ImageSet
from fedbench import fisher
from fedbench.fisher import cohort_fishers
from fedbench.models import build_model
from test_cohort import reference_indexed_batches, stamped_reference
from test_sdfc import fisher_by_batch_loop_as_published, fisher_by_per_sample_loop


def small_bn_net() -> torch.nn.Module:
    # no bias before BatchNorm: in training mode its gradient is zero but for rounding
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))


def perturbed_copies(model: torch.nn.Module, count: int, seed: int = 0) -> list[torch.nn.Module]:
    """``count`` copies of ``model``, each parameter and running statistic moved at random,
    as clients' models differ after local training."""
    generator = torch.Generator().manual_seed(seed)
    copies = []
    for _ in range(count):
        clone = copy.deepcopy(model)
        with torch.no_grad():
            for tensor in clone.parameters():
                tensor.add_(0.02 * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype))
            for tensor in (b for b in clone.buffers() if b.is_floating_point()):  # variances stay positive
                tensor.add_(0.05 * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype).abs())
        copies.append(clone)
    return copies


def papers_cnn() -> torch.nn.Module:
    torch.manual_seed(0)  # the same starting model whatever ran before
    return build_model("simple_cnn", 10, 3, 32)


def uneven_streams(counts: list[int], classes: int, dtype: torch.dtype, side: int = 8, seed: int = 1) -> list[list]:
    """Per model, ``counts[k]`` batches of 6 images, and for the second model a short batch
    of 4 first: the models run out of batches at different steps and the first step splits
    by shape (the second model alone, the others together)."""
    generator = torch.Generator().manual_seed(seed)

    def batch(size):
        return (torch.randn(size, 3, side, side, generator=generator, dtype=dtype),
                torch.randint(0, classes, (size,), generator=generator))

    streams = [[batch(6) for _ in range(count)] for count in counts]
    if len(streams) > 1:
        streams[1].insert(0, batch(4))
    return streams


def by_explicit_loops(model: torch.nn.Module, batches: list, estimator: str) -> list[torch.Tensor]:
    model = copy.deepcopy(model)  # the loops move BatchNorm's running statistics
    if estimator == "empirical":
        model.eval()
        return fisher_by_per_sample_loop(model, torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))
    return fisher_by_batch_loop_as_published(model, batches)


def relative_gaps(got: list[list[torch.Tensor]], want: list[list[torch.Tensor]]) -> float:
    return max(float((g - w).abs().max() / w.abs().max()) for gs, ws in zip(got, want) for g, w in zip(gs, ws))


@pytest.mark.parametrize("estimator", ["published", "empirical"])
@pytest.mark.parametrize("variant", ["plain", "batchnorm_as_on_cuda", "per_sample_in_turns"])
def test_cohort_fishers_of_batchnorm_models_equal_explicit_loops_in_float64(estimator, variant, monkeypatch):
    """Three BatchNorm nets, 3, 1 and 2 batches (the second also a short one first); as on
    CPU, with BatchNorm in tensor operations as on CUDA, and with the per-sample gradients
    of one model at a time (a model bigger than the memory cap)."""
    if variant == "per_sample_in_turns":
        monkeypatch.setattr(fisher, "PER_SAMPLE_BYTES", 1)
    models = [m.double() for m in perturbed_copies(small_bn_net(), 3)]
    streams = uneven_streams([3, 1, 2], classes=3, dtype=torch.float64)
    got = cohort_fishers(models, streams, estimator, explicit_batch_norm=variant == "batchnorm_as_on_cuda")
    want = [by_explicit_loops(model, stream, estimator) for model, stream in zip(models, streams)]
    assert [[g.shape for g in gs] for gs in got] == [[w.shape for w in ws] for ws in want]
    assert relative_gaps(got, want) < 1e-10


@pytest.mark.parametrize("estimator", ["published", "empirical"])
def test_cohort_fishers_of_the_papers_cnn_equal_explicit_loops_in_float32(estimator):
    models = perturbed_copies(papers_cnn(), 3)
    streams = uneven_streams([2, 1, 2], classes=10, dtype=torch.float32, side=32)
    got = cohort_fishers(models, streams, estimator)
    want = [by_explicit_loops(model, stream, estimator) for model, stream in zip(models, streams)]
    assert relative_gaps(got, want) < 1e-5


@pytest.mark.parametrize("estimator, explicit_batch_norm", [("published", False), ("empirical", True)])
def test_compiled_cohort_fishers_equal_explicit_loops_and_compile_once(estimator, explicit_batch_norm):
    """Inside ``cohort_passes`` (a compiled cohort's hooks) the steps of full batches run
    compiled, those over fewer models too: float64 BatchNorm nets as in the uncompiled
    test, to 1e-10. By hand, with 3 models of 3, 1 (after a short one) and 2 batches of 6:
    step 1 computes models 0 and 2 (2 rows: a bucket of ceil(3/2)) and model 1's short
    batch uncompiled, step 2 all 3, step 3 model 0 alone (1 row: ceil(3/4)); so three
    graphs, compiled in the first round and kept for the next round's models (the
    cohort's same copies, other values)."""
    import shutil

    from torch._dynamo.utils import counters

    if shutil.which("g++") is None and shutil.which("cc") is None:
        pytest.skip("NO C++ COMPILER: torch.compile on CPU needs one, so the compiled Fisher pass is untested here")
    models = [m.double() for m in perturbed_copies(small_bn_net(), 3)]
    graphs_before = counters["stats"]["unique_graphs"]
    for round_index in range(2):
        streams = uneven_streams([3, 1, 2], classes=3, dtype=torch.float64, seed=1 + round_index)
        want = [by_explicit_loops(model, stream, estimator) for model, stream in zip(models, streams)]
        with fisher.cohort_passes("default"):
            got = cohort_fishers(models, streams, estimator, explicit_batch_norm=explicit_batch_norm)
        assert relative_gaps(got, want) < 1e-10, round_index
        assert counters["stats"]["unique_graphs"] - graphs_before == 3, "rows 2, 3 and 1, compiled in the first round"
        with torch.no_grad():  # the next round's clients: other values in the same models
            for model in models:
                for tensor in model.parameters():
                    tensor.mul_(1.01)


def test_compiled_steps_over_fewer_models_carry_riders_whose_sums_are_dropped():
    """Five models of 4, 1 (after a short one), 3, 2 and 2 batches, compiled. By hand, with
    rows of 5, 3 or 2 (K, ceil(K/2), ceil(K/4)): step 1 computes models 0, 2, 3, 4 in 5 rows
    (model 1, whose batch is short, rides along on model 0's; its short batch goes
    uncompiled), step 2 all 5, step 3 models 0 and 2 in 2 rows, step 4 model 0 in 2 rows
    (model 1 rides along): two graphs, and every model's Fisher as its explicit loop's. (The
    riders are the same for both estimators: the published one, as SDFC runs it.)"""
    import shutil

    from torch._dynamo.utils import counters

    if shutil.which("g++") is None and shutil.which("cc") is None:
        pytest.skip("NO C++ COMPILER: torch.compile on CPU needs one, so the compiled Fisher pass is untested here")
    torch._dynamo.reset()  # a graph of 5 or 2 rows left by an earlier test would hide one compiled here
    models = [m.double() for m in perturbed_copies(small_bn_net(), 5, seed=3)]
    streams = uneven_streams([4, 1, 3, 2, 2], classes=3, dtype=torch.float64, seed=4)
    want = [by_explicit_loops(model, stream, "published") for model, stream in zip(models, streams)]
    graphs_before = counters["stats"]["unique_graphs"]
    with fisher.cohort_passes("default"):
        got = cohort_fishers(models, streams, "published")
    assert counters["stats"]["unique_graphs"] - graphs_before == 2, "rows 5 and 2"
    assert relative_gaps(got, want) < 1e-10


def test_cohort_fishers_leave_every_model_as_it_was():
    models = perturbed_copies(small_bn_net(), 2)
    for model in models:
        model[1].eval()  # a BatchNorm in eval mode inside a model in training mode
    before = [copy.deepcopy(m.state_dict()) for m in models]
    for estimator in ("published", "empirical"):
        cohort_fishers(models, uneven_streams([2, 2], classes=3, dtype=torch.float32), estimator)
    for model, saved in zip(models, before):
        assert all(torch.equal(value, model.state_dict()[name]) for name, value in saved.items())
        assert [m.training for m in model.modules()] == [True, True, False, True, True, True, True]


def test_the_published_fisher_of_models_in_eval_mode_keeps_their_mode():
    """As the published code does: the model's own mode (here eval: BatchNorm normalises
    with its running statistics); models in different modes go one by one."""
    models = [m.double().eval() for m in perturbed_copies(small_bn_net(), 3)]
    streams = uneven_streams([2, 1, 2], classes=3, dtype=torch.float64)
    want = [by_explicit_loops(model, stream, "published") for model, stream in zip(models, streams)]
    assert relative_gaps(cohort_fishers(models, streams, "published"), want) < 1e-10
    models[2].train()
    want[2] = by_explicit_loops(models[2], streams[2], "published")
    assert relative_gaps(cohort_fishers(models, streams, "published"), want) < 1e-10


def test_a_cohorts_fisher_runs_one_forward_pass_per_step_for_all_models():
    models = perturbed_copies(papers_cnn(), 5)
    streams = [stream[-2:] for stream in uneven_streams([2] * 5, classes=10, dtype=torch.float32, side=32)]
    calls = []
    for model in models:
        model.register_forward_pre_hook(lambda module, inputs: calls.append(inputs[0].shape))
    cohort_fishers(models, streams, "published")
    assert len(calls) == 2, "one vmapped pass per step (2 steps), not one per model and step (10)"


def test_a_model_with_dropout_gets_its_fisher_alone():
    """In training mode (the published estimator) Dropout draws random numbers, which a
    vmapped pass cannot: each model goes alone, drawing what it draws alone."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.5), torch.nn.Linear(3 * 8 * 8, 3))
    models = perturbed_copies(model, 2)
    streams = uneven_streams([2, 1], classes=3, dtype=torch.float32)
    torch.manual_seed(5)
    got = cohort_fishers(models, streams, "published")
    torch.manual_seed(5)
    want = [by_explicit_loops(m, s, "published") for m, s in zip(models, streams)]
    assert relative_gaps(got, want) < 1e-6


@pytest.mark.parametrize("chunk", [3, 16])
def test_hook_batches_built_in_chunks_equal_an_explicit_loop_bit_for_bit(chunk):
    """70 images of 8x8, batches of 8, crop and flip, half the samples carrying the pixel
    pattern: built ``chunk`` batches at a time, every batch equals the explicit reference
    loop's (whole batches); with the short last batch kept, equal to batch by batch."""
    generator = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randint(0, 256, (70, 1, 8, 8), generator=generator, dtype=torch.uint8),
                    torch.randint(0, 10, (70,), generator=generator))
    pipeline = ImagePipeline((0.5,), (0.25,), channels=3, augment=True, hflip=True, crop_padding=2)
    attack = PixelPattern(poison_ratio=0.5)
    attack.setup(AttackSetup(3, 10, 3, 8, pipeline, torch.device("cpu"), seed=0))
    plan = PoisonPlan(attack, torch.rand(70, generator=generator) < 0.5, None)

    def batches(chunk_size: int, drop_last: bool):
        epoch = torch.Generator().manual_seed(7)
        return list(iterate_batches(data, pipeline, 8, epoch, poison=plan, chunk=chunk_size, drop_last=drop_last))

    expected = stamped_reference(reference_indexed_batches(data, torch.Generator().manual_seed(7), 8, 1, size=8), plan)
    chunked = batches(chunk, drop_last=True)
    assert len(chunked) == len(expected) == 8
    for (x, y), (ex, ey) in zip(chunked, expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)
    alone, chunked = batches(1, drop_last=False), batches(chunk, drop_last=False)
    assert [x.shape[0] for x, _ in chunked] == [8] * 8 + [6]
    for (x, y), (cx, cy) in zip(alone, chunked):
        assert torch.equal(x, cx) and torch.equal(y, cy)


def test_fdcr_uploads_of_a_cohort_round_equal_sequential_trainings(tiny_root, tmp_path, monkeypatch):
    from defenses.fdcr import FISHER, FDCR, FDCRClientHook
    from test_cohort import both_ways

    uploaded, aggregate = [], FDCR.aggregate
    monkeypatch.setattr(FDCR, "aggregate", lambda self, updates, num_samples, ctx:
                        uploaded.append(ctx.uploads[FISHER].clone()) or aggregate(self, updates, num_samples, ctx))
    together, computed = [], FDCRClientHook.after_training_together
    monkeypatch.setattr(FDCRClientHook, "after_training_together",
                        lambda hook, calls: together.append(len(calls)) or computed(hook, calls))
    both_ways(tiny_root, tmp_path, attack=PixelPattern(malicious_fraction=0.4), defense=FDCR())
    sequential, cohort = uploaded
    assert together == [1] * 5 + [5], "one by one sequentially, together in the cohort"
    assert sequential.shape[0] == 5 and bool((sequential.sum(dim=1) > 0).all())
    assert float((sequential - cohort).abs().max() / sequential.abs().max()) < 1e-4


@pytest.mark.parametrize("estimator", ["published", "empirical"])
def test_fisher_passes_compute_convolutions_as_the_cohorts_training_does(estimator, monkeypatch):
    """Inside ``cohort_passes(None, "triton")`` the published estimator's convolutions are the
    Triton kernels, one launch per vmapped pass for every model; by hand, with 3 models of
    2, 1 (after a short one) and 2 batches: step 1 has two groups (models 0 and 2; model 1's
    short batch), step 2 one, so 3 passes x 2 convolutions = 6 forward launches (10 model
    by model). The empirical estimator's per-sample gradients stay torch's (0 launches).
    ``matmul``: each pass's convolutions through ``conv2d_as_matmul``, both estimators. All
    equal to the explicit loops."""
    from conftest import triton_launches, triton_unavailable
    from fedbench import matmul_conv

    models = perturbed_copies(papers_cnn(), 3)
    streams = uneven_streams([2, 1, 2], classes=10, dtype=torch.float32, side=32)
    want = [by_explicit_loops(model, stream, estimator) for model, stream in zip(models, streams)]
    as_matmul = []
    real = matmul_conv.conv2d_as_matmul
    monkeypatch.setattr(matmul_conv, "conv2d_as_matmul", lambda *a, **k: as_matmul.append(1) or real(*a, **k))
    with fisher.cohort_passes(None, "matmul"):
        assert relative_gaps(cohort_fishers(models, streams, estimator), want) < 1e-5
    assert len(as_matmul) == 6
    if triton_unavailable() is not None:
        pytest.skip(f"THE TRITON CONVOLUTION IS UNTESTED HERE: {triton_unavailable()}")
    launched = triton_launches(monkeypatch)
    with fisher.cohort_passes(None, "triton"):
        assert relative_gaps(cohort_fishers(models, streams, estimator), want) < 1e-5
    forward = launched.count("client_conv_forward")
    assert forward == (6 if estimator == "published" else 0), launched
    assert set(launched) <= {"client_conv_forward", "client_conv_input_grad", "client_conv_weight_grad"}
