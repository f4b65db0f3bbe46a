"""The device resize equals Pillow's bicubic ``Image.resize`` bit for bit (on CUDA too, where one is present)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from glyphserve.engine.resize import resize_bicubic

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pillow(page: np.ndarray, height: int, width: int) -> np.ndarray:
    image = Image.fromarray(page[..., 0] if page.shape[2] == 1 else page)
    return np.array(image.resize((width, height), Image.Resampling.BICUBIC)).reshape(height, width, -1)


def ours(page: np.ndarray, height: int, width: int, device: str) -> np.ndarray:
    return resize_bicubic(torch.from_numpy(page).to(device), height, width).cpu().numpy()


def noise(height: int, width: int, seed: int, channels: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "shape, size",
    [
        ((842, 595), (840, 588)),  # a glyph-en page (595x842 pt at 72 dpi) to GLM-4.1V's multiples of 28
        ((1123, 794), (1120, 784)),  # the same page at 96 dpi
        ((30, 40), (112, 140)),  # upscaled to the minimum area
        ((100, 150), (112, 140)),  # up in one direction, down in the other
        ((1, 1), (28, 28)),
        ((1, 9), (3, 1)),
        ((3, 3), (1, 1)),
        ((2, 400), (1, 3)),
        ((500, 37), (500, 28)),  # one pass only (width)
        ((57, 40), (28, 40)),  # one pass only (height)
        ((1500, 10), (1400, 28)),  # over 100x taller than wide, shrinking in height: Pillow goes vertical first
        ((1010, 10), (2000, 14)),  # as tall, growing: the usual order
    ],
)
def test_equals_pillow(device, shape, size):
    page = noise(*shape, seed=shape[0] * 7 + size[1])
    assert np.array_equal(ours(page, *size, device), pillow(page, *size))


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=120, deadline=None)
@given(
    height=st.integers(1, 96),
    width=st.integers(1, 96),
    out_height=st.integers(1, 128),
    out_width=st.integers(1, 128),
    channels=st.sampled_from([1, 3]),
    seed=st.integers(0, 2**16),
)
def test_random_sizes_equal_pillow(device, height, width, out_height, out_width, channels, seed):
    page = noise(height, width, seed, channels)
    assert np.array_equal(ours(page, out_height, out_width, device), pillow(page, out_height, out_width))


@pytest.mark.parametrize("device", DEVICES)
def test_very_tall_pages_equal_pillow(device):
    rng = np.random.default_rng(5)
    for _ in range(12):
        width = int(rng.integers(1, 6))
        height = int(rng.integers(100 * width + 1, 200 * width + 1))
        size = int(rng.integers(1, height)), int(rng.integers(1, 30))
        page = noise(height, width, int(rng.integers(1 << 16)))
        assert np.array_equal(ours(page, *size, device), pillow(page, *size))


def test_pages_of_one_shape_resize_together():
    pages = np.stack([noise(842, 595, seed) for seed in range(3)])
    batch = resize_bicubic(torch.from_numpy(pages), 840, 588).numpy()
    assert batch.shape == (3, 840, 588, 3)
    for page, resized in zip(pages, batch, strict=True):
        assert np.array_equal(resized, pillow(page, 840, 588))


def test_the_same_size_is_left_alone():
    page = torch.from_numpy(noise(56, 84, 1))
    assert resize_bicubic(page, 56, 84) is page


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="uint8"):
        resize_bicubic(torch.zeros(4, 4, 3), 2, 2)
    with pytest.raises(ValueError, match="cannot resize to 0x2"):
        resize_bicubic(torch.zeros(4, 4, 3, dtype=torch.uint8), 0, 2)
