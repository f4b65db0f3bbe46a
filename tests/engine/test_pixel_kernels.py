"""The preprocessing's Triton kernels (``pixel_kernels``) equal the torch path bit for bit, under Triton's CPU
interpreter (and on CUDA, where the preprocessor uses them, through ``test_resize`` and ``test_preprocess``)."""

from tests.engine.triton_interpreter import run_interpreted

INTERPRETED = """
import numpy as np
import torch
from PIL import Image
from glyphserve.engine.pixel_kernels import patchify
from glyphserve.engine.preprocess import PagePreprocessor, PreprocessParams
from glyphserve.engine.resize import _passes, _resample, _resize_columns, _resize_rows

rng = np.random.default_rng(0)
# The CUDA route of resize_bicubic (Pillow's pass order, each pass one launch) against Pillow itself, including
# pages over 100x taller than wide (height first when it shrinks) and passes skipped where a side stays.
for (h, w), (oh, ow) in [((84, 59), (84, 56)), ((1, 1), (28, 28)), ((9, 5), (9, 17)), ((57, 40), (28, 40)),
                         ((303, 2), (280, 3)), ((202, 2), (400, 3)), ((30, 7), (3, 2))]:
    for c in (1, 3):
        page = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
        want = np.array(Image.fromarray(page[..., 0] if c == 1 else page).resize((ow, oh), Image.Resampling.BICUBIC))
        got = _passes(torch.from_numpy(page), oh, ow, _resample).numpy()
        assert np.array_equal(got, want.reshape(oh, ow, c)), ("pillow", h, w, oh, ow, c)
for (h, w, c), (oh, ow) in [((45, 37, 3), (56, 28)), ((30, 70, 3), (28, 84)), ((9, 5, 1), (3, 17)),
                            ((200, 3, 3), (50, 2))]:
    pages = torch.from_numpy(rng.integers(0, 256, (2, h, w, c), dtype=np.uint8))
    want = _resize_columns(pages.to(torch.int32), ow).to(torch.uint8)
    got = _resample(pages, ow, -2)
    assert torch.equal(got, want), ("columns", h, w, oh, ow)
    want = _resize_rows(pages.to(torch.int32), oh).to(torch.uint8)
    got = _resample(pages, oh, -3)
    assert torch.equal(got, want), ("rows", h, w, oh, ow)

params = PreprocessParams()
pre = PagePreprocessor(params, torch.device("cpu"), torch.float32)
pages = [torch.from_numpy(rng.integers(0, 256, shape, dtype=np.uint8))
         for shape in [(112, 168, 3), (168, 112, 3), (112, 168, 3)]]  # at the processor's size
want = pre.patchify(pages)
for dtype in (torch.float32, torch.float16):
    out = torch.full((want.shape[0], want.shape[1]), float("nan"), dtype=dtype)
    starts = np.cumsum([0] + [params.grid(*p.shape[:2])[1] * params.grid(*p.shape[:2])[2] for p in pages])
    for idx in ([0, 2], [1]):
        batch = torch.stack([pages[i] for i in idx])
        patchify(batch, pre.lut, out, torch.tensor(starts[idx]), 14, 2, 2)
    assert torch.equal(out, want.to(dtype)), dtype
print("interpreted ok")
"""


def test_pixel_kernels_under_the_interpreter():
    run_interpreted(INTERPRETED)
