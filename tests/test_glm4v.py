"""The model facts module agrees with the Hugging Face processor it summarises."""

import random

import pytest

from glyphserve.glm4v import smart_resize, vision_tokens


def test_smart_resize_equals_hugging_face():
    hf = pytest.importorskip("transformers.models.glm4v.image_processing_pil_glm4v").smart_resize
    rng = random.Random(1)
    sizes = [(842, 595), (1123, 794), (27, 5000), (10, 10), (9000, 9000)]
    sizes += [(rng.randint(1, 9000), rng.randint(1, 9000)) for _ in range(3000)]
    for h, w in sizes:
        try:
            expected = hf(2, h, w, 2, 28, 112 * 112, 28 * 28 * 15000)
        except ValueError:
            with pytest.raises(ValueError):
                smart_resize(h, w)
            continue
        assert smart_resize(h, w) == expected


def test_page_costs():
    assert vision_tokens(842, 595) == 30 * 21  # the glyph-en page at 72 dpi: 840x588 px after resizing
    with pytest.raises(ValueError):
        vision_tokens(0, 10)


def test_vision_tokens_follow_the_hf_processor():
    from transformers.models.glm4v.image_processing_pil_glm4v import smart_resize as hf_smart_resize

    rng = random.Random(0)
    for _ in range(300):
        w, h = rng.randint(10, 8192), rng.randint(10, 8192)
        if max(w, h) / min(w, h) > 150:
            continue
        rh, rw = hf_smart_resize(2, h, w, temporal_factor=2, factor=28, min_pixels=112 * 112,
                                 max_pixels=28 * 28 * 15000)
        assert vision_tokens(h, w) == (rh // 28) * (rw // 28)
