"""Pages to patches equal the Hugging Face image processor's output bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from glyphserve.engine.preprocess import PagePreprocessor, PreprocessParams, decode_pages, page_digest, page_keys
from glyphserve.engine.types import EncodedPage
from tests.engine.conftest import make_pages


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    return Glm4vImageProcessorPil.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize(
    "shapes",
    [
        [(112, 140), (112, 140)],  # multiples of 28: resize is the identity
        [(100, 150), (842, 595), (140, 112)],  # resized (PIL bicubic), mixed shapes
        [(30, 40)],  # below the minimum area: upscaled
    ],
)
def test_patches_equal_the_hf_processor(processor, shapes):
    params = PreprocessParams.from_image_processor(processor)
    pages = make_pages(shapes, seed=len(shapes))
    ref = processor(images=pages, return_tensors="pt")
    ours = PagePreprocessor(params, torch.device("cpu"), torch.float32)(pages)
    assert torch.equal(ours, ref["pixel_values"])
    assert [list(params.grid(*s)) for s in shapes] == ref["image_grid_thw"].tolist()


def test_vision_tokens_of_a_glyph_page(processor):
    params = PreprocessParams.from_image_processor(processor)
    assert params.resized_shape(842, 595) == (840, 588)
    assert params.vision_tokens(842, 595) == 60 * 42 // 4


def test_read_only_pages_are_accepted(processor):
    page = make_pages([(112, 140)])[0]
    page.flags.writeable = False
    pp = PagePreprocessor(PreprocessParams.from_image_processor(processor), torch.device("cpu"), torch.float32)
    assert pp([page]).shape == (80, 3 * 2 * 14 * 14)


def test_digests_depend_on_pixels_and_shape():
    a, b = make_pages([(112, 140), (112, 140)], seed=9)
    assert page_digest(a) == page_digest(a.copy())
    assert page_digest(a) != page_digest(b)
    flat = np.zeros((112, 140, 3), np.uint8)
    assert page_digest(flat) != page_digest(np.zeros((140, 112, 3), np.uint8))
    encoded = EncodedPage.from_bytes(_png(a))
    pixels = ["pixels:" + page_digest(p) for p in (a, b)]
    assert page_keys([a, b, encoded, a]) == [*pixels, encoded.key(), pixels[0]]


def test_a_forked_child_hashes_pages_with_threads_of_its_own():
    """The process's page threads do not survive a fork; a child that hashed with the parent's pool would wait for
    ever (a library user forking after a question, a fork-based DataLoader)."""
    import os
    import signal
    import threading

    from glyphserve.engine.preprocess import PAGE_THREADS, _page_pool

    pages = make_pages([(56, 70)] * 3, seed=4)
    keys = page_keys(pages)
    all_busy = threading.Barrier(PAGE_THREADS)  # every page thread started (each task waits for the others)
    list(_page_pool().map(lambda _: all_busy.wait(), range(PAGE_THREADS)))
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if it hashed the pages alike
        signal.alarm(20)
        os._exit(0 if page_keys(pages) == keys else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def _png(page: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(page).save(buffer, format="PNG")
    return buffer.getvalue()


def test_encoded_pages_patch_like_their_pixels(processor):
    pages = make_pages([(100, 150), (112, 140)], seed=4)
    encoded = [EncodedPage.from_bytes(_png(p)) for p in pages]
    assert [e.shape for e in encoded] == [p.shape for p in pages] and encoded[0].mime == "image/png"
    pp = PagePreprocessor(PreprocessParams.from_image_processor(processor), torch.device("cpu"), torch.float32)
    assert torch.equal(pp(encoded), pp(pages))
    assert all(np.array_equal(a, b) for a, b in zip(decode_pages([encoded[0], pages[1]]), pages, strict=True))


def test_unreadable_encoded_pages_are_refused():
    from glyphserve.errors import GlyphserveError

    with pytest.raises(GlyphserveError, match="not a readable image"):
        EncodedPage.from_bytes(b"not an image")
    data = _png(make_pages([(112, 140)])[0])
    with pytest.raises(GlyphserveError, match="not a readable image"):
        EncodedPage(data[: len(data) // 2], 112, 140).pixels()  # header intact, pixels cut off
    with pytest.raises(GlyphserveError, match="decodes to 140x112 px, not the 112x112"):
        EncodedPage(data, 112, 112).pixels()


def test_page_work_goes_on_while_the_page_threads_are_busy_and_reports_the_first_failure():
    """The calling thread takes pages itself: with every page thread busy elsewhere (another request's pages) a
    call still finishes, and does not wait for helpers that never started. A page that fails raises its error
    (the first failing page's, when several fail), and no page is begun after it."""
    import threading

    from glyphserve.engine.preprocess import PAGE_THREADS, _page_pool, _parallel

    release = threading.Event()
    started = threading.Barrier(PAGE_THREADS + 1)

    def hold(_):
        started.wait()
        release.wait(30)

    busy = [_page_pool().submit(hold, i) for i in range(PAGE_THREADS)]
    started.wait()  # every page thread is held
    try:
        assert _parallel(lambda x: x * 2, list(range(5))) == [0, 2, 4, 6, 8]
    finally:
        release.set()
        for f in busy:
            f.result()

    seen = []

    def fragile(x):
        seen.append(x)
        if x in (3, 7):
            raise ValueError(f"page {x}")
        return x

    with pytest.raises(ValueError, match="page 3"):  # one thread alone (the pool held): pages in order, 3 first
        release.clear()
        busy = [_page_pool().submit(hold, i) for i in range(PAGE_THREADS)]
        started.wait()
        try:
            _parallel(fragile, list(range(10)))
        finally:
            release.set()
            for f in busy:
                f.result()
    assert seen == [0, 1, 2, 3]  # nothing begun after the failure
    assert _parallel(lambda x: x + 1, list(range(40))) == list(range(1, 41))  # the pool works as before
