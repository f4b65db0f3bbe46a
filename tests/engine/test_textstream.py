"""The thinking / answer split, however the text is cut into deltas."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from glyphserve.engine.textstream import ReasoningParser


def run(chunks):
    parser = ReasoningParser()
    events = []
    for chunk in chunks:
        events += parser.feed(chunk)
    events += parser.finish()
    thinking = "".join(t for c, t in events if c == "thinking")
    answer = "".join(t for c, t in events if c == "answer")
    return parser, thinking, answer


def split(text, cuts):
    cuts = sorted(set(c % (len(text) + 1) for c in cuts))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


CASES = {
    "<think>Grandma's house, the wolf...</think><answer>The wolf.</answer>": (
        "Grandma's house, the wolf...",
        "The wolf.",
    ),
    "<think>a < b</think>\n<answer>x</answer>\n": ("a < b", "x"),
    "<answer>only</answer>": ("", "only"),
    "plain answer with <b>html</b>": ("", "plain answer with <b>html</b>"),
    "  <think>unfinished": ("unfinished", ""),
    "<think>t</think>no answer tags": ("t", "no answer tags"),
    "<th": ("", "<th"),
    "<think>\n plan \n\n</think>\n<answer>\n a  b \t\n</answer>": ("plan", "a  b"),
    " \n spaced out\n\nanswer \n": ("", "spaced out\n\nanswer"),
}


@given(st.sampled_from(sorted(CASES)), st.lists(st.integers(0, 200), max_size=12))
@settings(max_examples=300, deadline=None)
def test_split_is_independent_of_chunking(text, cuts):
    parser, thinking, answer = run(split(text, cuts))
    want_thinking, want_answer = CASES[text]
    assert (parser.thinking_text, parser.answer_text) == (want_thinking, want_answer)
    assert (thinking, answer) == (want_thinking, want_answer)  # the pieces join to the final text, edges too


def test_nothing_is_emitted_before_it_is_certain():
    parser = ReasoningParser()
    assert parser.feed("<thi") == []
    assert parser.feed("nk>abc</th") == [("thinking", "abc")]
    assert parser.feed("ink><answer>Hi") == [("answer", "Hi")]


def test_separate_reasoning_is_trimmed_like_tagged_text():
    """A server that sends the thinking apart (``emit``) gets the same edges as one that tags it."""
    parser = ReasoningParser()
    shown = parser.emit("thinking", "\n First") + parser.emit("thinking", " step \n") + parser.emit("thinking", "\n")
    shown += parser.feed("\nDone.\n") + parser.finish()
    assert shown == [("thinking", "First"), ("thinking", " step"), ("answer", "Done.")]
    assert (parser.thinking_text, parser.answer_text) == ("First step", "Done.")
