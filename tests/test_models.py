import pytest
import torch

from fedbench.models import MODELS, build_model


def test_simple_cnn_matches_the_published_backbone():
    model = build_model("simple_cnn", 10, 3, 32)
    # conv(3,6,5) conv(6,16,5) fc 400-120 fc 120-84 l1 84-84 l2 84-256 cls 256-10, weights + biases:
    by_hand = (3 * 6 * 25 + 6) + (6 * 16 * 25 + 16) + (400 * 120 + 120) + (120 * 84 + 84) + (84 * 84 + 84) \
        + (84 * 256 + 256) + (256 * 10 + 10)
    assert sum(p.numel() for p in model.parameters()) == by_hand == 92626
    assert model(torch.randn(4, 3, 32, 32)).shape == (4, 10)


def test_simple_cnn_follows_the_configured_input():
    model = build_model("simple_cnn", 100, 1, 28)
    assert model.fc1.in_features == 16 * 4 * 4
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 100)


def test_resnet18_for_32x32():
    model = build_model("resnet18", 10, 3, 32)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    model.eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert 11_000_000 < sum(p.numel() for p in model.parameters()) < 11_300_000


def test_a_user_can_register_a_model():
    @MODELS.register("tiny_linear_for_test")
    def tiny(num_classes, in_channels, image_size):
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(in_channels * image_size**2, num_classes))

    assert build_model("tiny_linear_for_test", 3, 1, 8)(torch.randn(5, 1, 8, 8)).shape == (5, 3)
    with pytest.raises(KeyError, match="simple_cnn"):
        build_model("no_such_model", 10, 3, 32)
