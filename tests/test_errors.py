"""Bad input gets an error that names the input and what was expected."""

import pytest
import torch

import videomt_fast
from videomt_fast import VideomtConfig, VideomtForUniversalSegmentation

from helpers import TINY, video


@pytest.fixture(scope="module")
def model():
    return VideomtForUniversalSegmentation(VideomtConfig(**TINY))


@pytest.mark.parametrize(
    "make,error,pattern",
    [
        (lambda: torch.randn(1, 3, 48, 48), ValueError, r"pixel_values_videos must be 5-D"),
        (lambda: torch.randn(1, 2, 4, 48, 48), ValueError, r"has 4 channels .* expected 3"),
        (lambda: torch.randn(1, 2, 3, 40, 48), ValueError, r"40x48; height and width must be positive multiples of the patch size 16x16"),
        (lambda: torch.randn(1, 0, 3, 48, 48), ValueError, r"is empty"),
        (lambda: torch.randn(0, 2, 3, 48, 48), ValueError, r"is empty"),
        (lambda: torch.randint(0, 255, (1, 2, 3, 48, 48), dtype=torch.uint8), TypeError, r"dtype torch.uint8; expected a floating dtype"),
        (lambda: "frames", TypeError, r"must be a torch.Tensor"),
    ],
)
def test_bad_pixel_values(model, make, error, pattern):
    with pytest.raises(error, match=pattern):
        model(pixel_values_videos=make())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_pixels(model, bad):
    x = video()
    x[0, 1, 2, 5, 7] = bad
    with pytest.raises(ValueError, match=r"pixel_values_videos contains \d+ NaN and \d+ infinite values"):
        model(pixel_values_videos=x)
    model.check_finite = False  # the scan can be turned off for trusted inputs
    try:
        model(pixel_values_videos=x)
    finally:
        model.check_finite = True


def test_missing_input_and_wrong_keyword(model):
    with pytest.raises(ValueError, match="pixel_values_videos is required"):
        model()
    with pytest.raises(ValueError, match="not `pixel_values`"):
        model(pixel_values=video()[:, 0])
    with pytest.raises(ValueError, match="chunk_size must be a positive"):
        model(pixel_values_videos=video(), chunk_size=0)


def test_invalid_configs():
    with pytest.raises(ValueError, match="divisible by num_attention_heads"):
        VideomtConfig(hidden_size=64, num_attention_heads=3)
    with pytest.raises(ValueError, match="num_blocks"):
        VideomtConfig(num_hidden_layers=2, num_blocks=3)
    with pytest.raises(ValueError, match="does not match id2label"):
        VideomtConfig(num_labels=3, id2label={0: "a"})
    with pytest.raises(TypeError, match="needs a VideomtConfig"):
        VideomtForUniversalSegmentation(videomt_fast.EomtConfig(**TINY))
