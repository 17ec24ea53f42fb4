import pytest
import torch

from attacks import ATTACKS
from attacks.badnets import BadNets
from attacks.base import AttackSetup, ClientInfo
from attacks.blended import Blended
from attacks.dba import DBA
from attacks.huge_update import HugeUpdate
from attacks.none import NoAttack
from attacks.pixel_pattern import PIXEL_PATTERN, PixelPattern
from fedbench.data import ImagePipeline, ImageSet
from fedbench.evaluation import evaluate

MEAN, STD = 0.1307, 0.3081


def needs_a_compiler(mode):
    """``mode`` itself; skipped, loudly, for a compiled mode where torch.compile cannot build on CPU."""
    import shutil

    if mode is not None and shutil.which("g++") is None and shutil.which("cc") is None:
        pytest.skip("NO C++ COMPILER: torch.compile on CPU needs one, so the compiled evaluation is untested here")
    return mode


# train.compile's evaluation (fedbench.evaluation.evaluate_compiled) against the same hand counts
EVALUATION_MODES = pytest.mark.parametrize("compile_mode", [None, "default"], ids=["torchmetrics", "compiled"])


def ready(attack, size: int = 32, channels: int = 3, num_classes: int = 10):
    pipeline = ImagePipeline((MEAN,), (STD,), channels=channels, augment=False, hflip=False, crop_padding=0)
    attack.setup(AttackSetup(10, num_classes, channels, size, pipeline, torch.device("cpu"), seed=0))
    return attack


def changed_pixels(attack, parts=None, size=32, channels=3):
    x = torch.full((1, channels, size, size), -7.0)  # a value no trigger writes
    out = attack.apply_trigger(x, parts)[0]
    return {tuple(i) for i in (out != -7.0).nonzero().tolist()}, out


def test_pixel_pattern_default_is_the_published_trigger():
    changed, out = changed_pixels(ready(PixelPattern()))
    expected = {(0, r, c) for r, c in [(0, 0), (0, 1), (0, 2), (0, 4), (0, 5), (0, 6),
                                       (2, 0), (2, 1), (2, 2), (2, 4), (2, 5), (2, 6)]}
    assert changed == expected == {(0, r, c) for r, c in PIXEL_PATTERN}
    assert all(out[p].item() == 1.0 for p in expected)  # 1.0 after normalisation, channel 0 only


def test_pixel_pattern_in_raw_space_on_all_channels():
    changed, out = changed_pixels(ready(PixelPattern(channels="all", value=1.0, value_space="raw")))
    assert changed == {(ch, r, c) for ch in range(3) for r, c in PIXEL_PATTERN}
    assert out[1, 2, 6].item() == pytest.approx((1.0 - MEAN) / STD)


def test_badnets_default_is_a_white_3x3_patch_in_the_bottom_right_corner():
    changed, out = changed_pixels(ready(BadNets()))
    assert changed == {(ch, r, c) for ch in range(3) for r in (29, 30, 31) for c in (29, 30, 31)}
    assert out[2, 31, 31].item() == pytest.approx((1.0 - MEAN) / STD)


def test_badnets_position_size_and_value_are_options():
    changed, out = changed_pixels(ready(BadNets(size=2, position="top_left", margin=1, value=0.0)))
    assert changed == {(ch, r, c) for ch in range(3) for r in (1, 2) for c in (1, 2)}
    assert out[0, 1, 1].item() == pytest.approx(-MEAN / STD)


def test_blended_mixes_every_pixel_with_a_seeded_pattern():
    attack = ready(Blended(alpha=0.2, pattern_seed=3))
    x = torch.randn(2, 3, 32, 32)
    raw_pattern = torch.rand((3, 32, 32), generator=torch.Generator().manual_seed(3))
    expected = 0.8 * x + 0.2 * (raw_pattern - MEAN) / STD
    assert torch.allclose(attack.apply_trigger(x), expected, atol=1e-6)
    other = ready(Blended(pattern_seed=4))
    assert not torch.allclose(other.apply_trigger(x), expected)


def test_dba_parts_are_disjoint_strips_that_tile_the_global_trigger():
    attack = ready(DBA())
    parts = [changed_pixels(attack, (part,))[0] for part in range(4)]
    whole, _ = changed_pixels(attack, None)
    assert parts[0] == {(ch, 0, c) for ch in range(3) for c in range(0, 6)}
    assert parts[1] == {(ch, 0, c) for ch in range(3) for c in range(9, 15)}
    assert parts[2] == {(ch, 4, c) for ch in range(3) for c in range(0, 6)}
    assert parts[3] == {(ch, 4, c) for ch in range(3) for c in range(9, 15)}
    assert set().union(*parts) == whole and sum(map(len, parts)) == len(whole)


def test_dba_scales_positions_to_other_image_sizes():
    assert DBA.strips(32) == [(0, 0, 6), (0, 9, 6), (4, 0, 6), (4, 9, 6)]
    assert DBA.strips(64) == [(0, 0, 12), (0, 18, 12), (8, 0, 12), (8, 18, 12)]
    assert DBA.strips(28) == [(0, 0, 5), (0, 8, 5), (4, 0, 5), (4, 8, 5)]


@pytest.mark.parametrize("attackers,expected", [
    (1, [(0, 1, 2, 3)]),
    (2, [(0, 2), (1, 3)]),
    (3, [(0, 3), (1,), (2,)]),
    (4, [(0,), (1,), (2,), (3,)]),
    (5, [(0,), (1,), (2,), (3,), (0,)]),
])
def test_every_dba_part_is_trained_by_some_attacker(attackers, expected):
    # 10 clients; malicious_fraction chosen so that exactly `attackers` are malicious.
    attack = ready(DBA(malicious_fraction=attackers / 10))
    assert attack.num_malicious(10) == attackers
    given = [attack.parts_of(ClientInfo(client_id=9, round=0, malicious=True, attacking=True, attacker_rank=rank))
             for rank in range(attackers)]
    assert given == expected
    whole, _ = changed_pixels(attack, None)
    stamped = set().union(*(changed_pixels(attack, parts)[0] for parts in given))
    assert stamped == whole, "the union of what attackers stamp is the evaluation trigger"


def test_only_the_chosen_fraction_is_poisoned_and_its_labels_flip_to_the_target():
    attack = ready(BadNets(poison_ratio=0.5, target_label=2))
    client = ClientInfo(client_id=7, round=0, malicious=True, attacking=True, attacker_rank=0)
    plan = attack.poison_plan(client, 101)
    assert int(plan.mask.sum()) == round(0.5 * 101)
    images, labels = torch.randn(101, 3, 32, 32), torch.randint(0, 10, (101,))
    index = torch.arange(101)
    poisoned, new_labels = plan.apply(images, labels, index)
    assert torch.equal(new_labels[plan.mask], torch.full((int(plan.mask.sum()),), 2))
    assert torch.equal(new_labels[~plan.mask], labels[~plan.mask])
    assert torch.equal(poisoned[~plan.mask], images[~plan.mask])
    assert torch.equal(poisoned[plan.mask], attack.apply_trigger(images[plan.mask]))
    # The same client poisons the same samples every round: the set is fixed per run.
    assert torch.equal(attack.poison_plan(ClientInfo(7, 5, True, True, 0), 101).mask, plan.mask)


def test_benign_or_idle_clients_are_not_poisoned():
    attack = ready(BadNets(first_round=2, every=2, last_round=6))
    assert [attack.is_active(r) for r in range(9)] == [False, False, True, False, True, False, True, False, False]
    assert attack.poison_plan(ClientInfo(1, 3, malicious=True, attacking=False), 50) is None


def test_malicious_clients_last_or_random_are_recorded_choices():
    assert BadNets(malicious_fraction=0.3).malicious_clients(10, seed=0) == [7, 8, 9]
    randomly = BadNets(malicious_fraction=0.3, selection="random")
    chosen = randomly.malicious_clients(10, seed=0)
    assert len(chosen) == 3 and chosen == randomly.malicious_clients(10, seed=0)
    assert NoAttack().malicious_clients(10, seed=0) == []


def test_model_replacement_scales_the_update():
    update = torch.tensor([1.0, -2.0])
    assert torch.equal(BadNets(scale=5).craft_update(update, ClientInfo(0, 0)), torch.tensor([5.0, -10.0]))
    assert torch.equal(HugeUpdate(factor=10.0, scale=2.0).craft_update(update, ClientInfo(0, 0)),
                       torch.tensor([20.0, -40.0])), "a huge update takes scale too"


class LabelReader(torch.nn.Module):
    """Predicts the label written (as a raw value k/255) into pixel (16, 16): it ignores any trigger."""

    def forward(self, x):
        raw = x[:, 0, 16, 16] * STD + MEAN
        labels = torch.round(raw * 255).long()
        return torch.nn.functional.one_hot(labels, 10).float()


@EVALUATION_MODES
def test_asr_is_reported_over_non_target_images_and_over_all_images(compile_mode):
    labels = torch.arange(10).repeat(10)  # 10 images of each class
    images = torch.zeros(100, 1, 32, 32, dtype=torch.uint8)
    images[:, 0, 16, 16] = labels.to(torch.uint8)
    test = ImageSet(images, labels)
    honest = ready(PixelPattern(target_label=2))
    result = evaluate(LabelReader(), test, honest.env.pipeline, honest, 10, compile_mode=needs_a_compiler(compile_mode))
    assert result["clean_acc"] == pytest.approx(100.0)
    assert result["asr"] == 0.0, "a model that ignores the trigger has no backdoor"
    assert result["asr_all"] == pytest.approx(10.0), "the published count: the 10 target-class images hit"


class FollowsTheTriggerOnOddLabels(torch.nn.Module):
    """Predicts the target (2) for a triggered image (any pixel but (16, 16) not black) whose
    written label (pixel (16, 16), as :class:`LabelReader` reads it) is odd; else the written
    label. One-hot by scatter: ``F.one_hot`` reads its input's range (a host sync)."""

    def forward(self, x):
        labels = torch.round((x[:, 0, 16, 16] * STD + MEAN) * 255).long()
        rest = x.clone()
        rest[:, :, 16, 16] = -MEAN / STD
        triggered = (rest - (-MEAN / STD)).abs().flatten(1).amax(dim=1) > 1e-3
        predicted = torch.where(triggered & (labels % 2 == 1), 2, labels)
        return torch.zeros(len(x), 10).scatter_(1, predicted[:, None], 1.0)


@EVALUATION_MODES
@pytest.mark.parametrize("batch_size", [10, 32])
def test_asr_counts_non_target_images_across_batches_and_is_none_without_any(compile_mode, batch_size):
    """Batches of 10 images of one class each (one batch holds only target-class images),
    or of 32 (the compiled evaluation pads the last, of 4, to 32): the 50 odd-labelled
    images of 90 non-target ones are hit, ASR 55.6; of all 100, those 50 and the 10
    target-class images (predicted as what they are), 60."""
    compile_mode = needs_a_compiler(compile_mode)
    labels = torch.arange(10).repeat_interleave(10)
    images = torch.zeros(100, 1, 32, 32, dtype=torch.uint8)
    images[:, 0, 16, 16] = labels.to(torch.uint8)
    attack = ready(PixelPattern(target_label=2))
    result = evaluate(FollowsTheTriggerOnOddLabels(), ImageSet(images, labels), attack.env.pipeline, attack, 10,
                      batch_size=batch_size, compile_mode=compile_mode)
    assert result["clean_acc"] == pytest.approx(100.0)
    assert result["asr"] == pytest.approx(100.0 * 50 / 90) and result["asr_all"] == pytest.approx(60.0)
    target_only = ImageSet(images[labels == 2], labels[labels == 2])
    result = evaluate(FollowsTheTriggerOnOddLabels(), target_only, attack.env.pipeline, attack, 10, batch_size=4,
                      compile_mode=compile_mode)
    assert result["asr"] is None and result["asr_all"] == pytest.approx(100.0), "no non-target image: no ASR"


@EVALUATION_MODES
def test_evaluation_waits_for_the_device_a_fixed_few_times_however_many_batches(compile_mode):
    """Host syncs (``.item()``-like reads and boolean masks, each a wait for a GPU), counted
    by torch's profiler on CPU: the four results at the end and one count, not a few per
    batch (84 for Fashion-MNIST's 10 batches before 2026-11-26)."""
    from torch.profiler import ProfilerActivity, profile

    compile_mode = needs_a_compiler(compile_mode)
    labels = torch.arange(10).repeat_interleave(10)
    images = torch.zeros(100, 1, 32, 32, dtype=torch.uint8)
    images[:, 0, 16, 16] = labels.to(torch.uint8)
    attack = ready(PixelPattern(target_label=2))
    test = ImageSet(images, labels)
    if compile_mode is not None:  # compiled before the count: compiling reads shapes and values
        evaluate(FollowsTheTriggerOnOddLabels(), test, attack.env.pipeline, attack, 10, batch_size=10,
                 compile_mode=compile_mode)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        evaluate(FollowsTheTriggerOnOddLabels(), test, attack.env.pipeline, attack, 10, batch_size=10,
                 compile_mode=compile_mode)
    names = [event.name for event in prof.events()]
    reads = names.count("aten::_local_scalar_dense")
    assert reads <= 5 and "aten::nonzero" not in names, reads


class StampsNothing(PixelPattern):
    """A backdoor whose own ``apply_trigger`` leaves images as they are."""

    def apply_trigger(self, images, parts=None):
        return images


def test_an_attack_with_its_own_trigger_is_evaluated_with_it_under_compile():
    """The compiled evaluation blends BackdoorAttack's trigger; an attack that applies its
    own is evaluated with it (the torchmetrics path): nothing stamped, so the odd-labelled
    images are not hit (ASR 0) and only the 10 target-class images count in ASR_all (10),
    where the blend would give 55.6 and 60."""
    needs_a_compiler("default")
    labels = torch.arange(10).repeat_interleave(10)
    images = torch.zeros(100, 1, 32, 32, dtype=torch.uint8)
    images[:, 0, 16, 16] = labels.to(torch.uint8)
    attack = ready(StampsNothing(target_label=2))
    result = evaluate(FollowsTheTriggerOnOddLabels(), ImageSet(images, labels), attack.env.pipeline, attack, 10,
                      batch_size=32, compile_mode="default")
    assert result["asr"] == 0.0 and result["asr_all"] == pytest.approx(10.0)


class PredictsOneClass(torch.nn.Module):
    def __init__(self, label: int):
        super().__init__()
        self.label = label

    def forward(self, x):
        return torch.nn.functional.one_hot(torch.full((len(x),), self.label), 10).float() + 0 * x.flatten(1)[:, :1]


@EVALUATION_MODES
@pytest.mark.parametrize("target", [0, 2])
def test_a_model_predicting_the_target_everywhere_hits_every_test_image(compile_mode, target):
    """98 images, labels 0-9 in turn, batches of 32 (the compiled evaluation pads the last,
    of 2, to 32 with images labelled 0): every triggered image is predicted as the target,
    so both ASRs are 100 and the clean accuracy is the share of target-labelled images,
    10 of 98 (padding, whatever it is predicted and labelled, counts nowhere)."""
    labels = torch.arange(10).repeat(10)[:98]
    test = ImageSet(torch.randint(0, 256, (98, 1, 32, 32), dtype=torch.uint8), labels)
    attack = ready(PixelPattern(target_label=target))
    result = evaluate(PredictsOneClass(target), test, attack.env.pipeline, attack, 10, batch_size=32,
                      compile_mode=needs_a_compiler(compile_mode))
    assert result["asr_all"] == pytest.approx(100.0) and result["asr"] == pytest.approx(100.0)
    assert result["clean_acc"] == pytest.approx(100.0 * 10 / 98)


class NaNOnBlackImages(torch.nn.Module):
    """A linear classifier whose logits are NaN for an all-black image (the compiled
    evaluation pads its last batch with black images)."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3 * 32 * 32, 10)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(10, 3 * 32 * 32, generator=torch.Generator().manual_seed(0)) / 30)

    def forward(self, x):
        black = (x - (-MEAN / STD)).abs().flatten(1).amax(dim=1) < 1e-6
        return torch.where(black[:, None], float("nan"), self.linear(x.flatten(1)))


@pytest.mark.parametrize("attack", [Blended(), NoAttack()], ids=["blended", "none"])
def test_compiled_evaluation_equals_torchmetrics_and_its_padding_counts_nowhere(attack):
    """100 images in batches of 32 (the last, of 4, padded with black images, on which the
    model gives NaN): the compiled counts equal torchmetrics' batch-by-batch metrics
    (float32 there), and the loss stays finite."""
    needs_a_compiler("default")
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(1, 256, (100, 1, 32, 32), dtype=torch.uint8, generator=generator)
    test = ImageSet(images, torch.randint(0, 10, (100,), generator=generator))
    attack = ready(attack)
    model = NaNOnBlackImages()
    eager = evaluate(model, test, attack.env.pipeline, attack, 10, batch_size=32)
    if isinstance(attack, Blended):  # the target most triggered images hit, so that the counts are exercised
        hits = {}
        for target in range(10):
            attack.target_label = target
            hits[target] = evaluate(model, test, attack.env.pipeline, attack, 10, batch_size=32)["asr_all"]
        attack.target_label = max(hits, key=hits.get)
        eager = evaluate(model, test, attack.env.pipeline, attack, 10, batch_size=32)
    compiled = evaluate(model, test, attack.env.pipeline, attack, 10, batch_size=32, compile_mode="default")
    assert 0 < eager["clean_acc"] < 100 and eager["clean_loss"] == eager["clean_loss"], "a finite loss"
    for key in ("clean_acc", "asr", "asr_all"):
        assert compiled[key] == (None if eager[key] is None else pytest.approx(eager[key], abs=1e-4)), key
    assert compiled["clean_loss"] == pytest.approx(eager["clean_loss"], rel=1e-6)
    if isinstance(attack, Blended):
        assert 0 < eager["asr_all"] < 100, "some triggered images hit: the counts are exercised"


def test_every_attack_is_registered_under_its_cli_name():
    assert set(ATTACKS.names()) >= {"none", "badnets", "pixel_pattern", "blended", "dba", "nan_update", "huge_update"}


@pytest.mark.parametrize("attack,field", [
    (BadNets(poison_ratio=0), "attack.poison_ratio"),
    (PixelPattern(malicious_fraction=1.5), "attack.malicious_fraction"),
    (Blended(alpha=2), "attack.alpha"),
    (DBA(every=0), "attack.every"),
])
def test_bad_attack_fields_are_named(attack, field):
    assert field in [p[0] for p in attack.problems()]
