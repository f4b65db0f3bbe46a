"""Token accounting: what the text would have cost as text (a page's cost is ``glm4v.vision_tokens``)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

TEXT_TOKEN_ESTIMATE = "estimate: 4 characters per token for non-CJK text, 1.5 CJK characters per token"
_CJK_RE = re.compile(r"[\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef\U00020000-\U0003ffff]")


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


def clip_to_tokens(text: str, max_tokens: int) -> str:
    """The longest start of ``text`` that the estimate counts at most ``max_tokens`` for, cut after its last
    whitespace where it has some in its second half (whole words), else inside a word; ``text`` itself if it fits."""
    if count_text_tokens(text)[0] <= max_tokens:
        return text
    budget, end = 6 * max_tokens, 0  # in sixths of a token: 1.5 for a non-CJK character, 4 for a CJK one
    for end, char in enumerate(text):
        budget -= 4 if _CJK_RE.match(char) else 1.5
        if budget < 0:
            break
    cut = max(text.rfind(" ", 0, end + 1), text.rfind("\n", 0, end + 1))
    return text[: cut if cut > end // 2 else end].rstrip()
