"""Clipping text to the token estimate (the extractive answers' max_tokens)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from glyphserve.render import clip_to_tokens, count_text_tokens


def test_a_clipped_text_ends_at_a_word_within_the_estimate():
    assert clip_to_tokens("hello world " * 50, 10) == "hello world hello world hello world"
    assert clip_to_tokens("中文" * 100, 10) == "中文" * 7 + "中"  # 15 CJK characters: 10 tokens
    assert clip_to_tokens("x" * 9, 2) == "x" * 8  # no whitespace: cut inside the word
    assert clip_to_tokens("short", 5) == "short"


@given(text=st.text(alphabet=st.sampled_from("ab 中\n"), max_size=200), limit=st.integers(1, 60))
def test_clipping_keeps_the_longest_fitting_start_it_can(text, limit):
    clipped = clip_to_tokens(text, limit)
    assert text.startswith(clipped) and count_text_tokens(clipped)[0] <= limit
    if count_text_tokens(text)[0] <= limit:
        assert clipped == text
    else:  # no more than a word short of the longest start that fits
        longest = max(n for n in range(len(text) + 1) if count_text_tokens(text[:n])[0] <= limit)
        assert len(clipped) >= longest // 2 or clipped == text[:longest].rstrip()
