"""Token accounting: what a page costs GLM-4.1V, and what the text would have cost as text."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

# GLM-4.1V's image processor (transformers.models.glm4v): 14 px patches merged 2x2, so one
# token per 28x28 block; the image is resized to multiples of 28 between these pixel
# bounds (its defaults; the temporal patch of 2 counts a still image twice).
PATCH = 14
MERGE = 2
FACTOR = PATCH * MERGE
TEMPORAL = 2
MIN_PIXELS = 112 * 112
MAX_PIXELS = 28 * 28 * 15000

TEXT_TOKEN_ESTIMATE = "estimate: 4 characters per token for non-CJK text, 1.5 CJK characters per token"
_CJK_RE = re.compile(r"[\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef\U00020000-\U0003ffff]")


def glm4v_vision_tokens(width: int, height: int) -> int:
    """Visual tokens GLM-4.1V spends on a ``width`` x ``height`` image (its ``smart_resize``)."""
    if width <= 0 or height <= 0:
        raise ValueError("image size must be positive")
    if height < FACTOR or width < FACTOR:
        scale = max(FACTOR / height, FACTOR / width)
        height, width = int(height * scale), int(width * scale)
    h_bar = round(height / FACTOR) * FACTOR
    w_bar = round(width / FACTOR) * FACTOR
    if TEMPORAL * h_bar * w_bar > MAX_PIXELS:
        beta = math.sqrt(TEMPORAL * height * width / MAX_PIXELS)
        h_bar = max(FACTOR, math.floor(height / beta / FACTOR) * FACTOR)
        w_bar = max(FACTOR, math.floor(width / beta / FACTOR) * FACTOR)
    elif TEMPORAL * h_bar * w_bar < MIN_PIXELS:
        beta = math.sqrt(MIN_PIXELS / (TEMPORAL * height * width))
        h_bar = math.ceil(height * beta / FACTOR) * FACTOR
        w_bar = math.ceil(width * beta / FACTOR) * FACTOR
    return (h_bar // FACTOR) * (w_bar // FACTOR)


Tokenizer = Callable[[str], Any] | Any


def count_text_tokens(text: str, tokenizer: Tokenizer | None = None) -> tuple[int, str]:
    """(token count, how it was counted). ``tokenizer`` may be a callable returning ids or a
    count, or an object with ``encode`` (e.g. a Hugging Face tokenizer); without one the
    count is the documented estimate."""
    if tokenizer is not None:
        if hasattr(tokenizer, "encode"):
            try:
                ids = tokenizer.encode(text, add_special_tokens=False)
            except TypeError:
                ids = tokenizer.encode(text)
            name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
        else:
            ids = tokenizer(text)
            name = getattr(tokenizer, "__name__", type(tokenizer).__name__)
        if isinstance(ids, dict) and "input_ids" in ids:
            ids = ids["input_ids"]
        count = ids if isinstance(ids, int) else len(ids)
        return int(count), f"tokenizer: {name}"
    cjk = len(_CJK_RE.findall(text))
    other = len(text) - cjk
    return math.ceil(other / 4 + cjk / 1.5), TEXT_TOKEN_ESTIMATE
