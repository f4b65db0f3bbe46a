"""Generated tokens to text: complete UTF-8 only, stop strings cut (and never half shown), logprobs kept."""

from __future__ import annotations

import pytest

from glyphserve.engine.output import OutputState
from glyphserve.engine.types import GenerationSettings, TokenLogprob


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def run(tok, text, **settings):
    state = OutputState(tok, GenerationSettings(**settings), frozenset({tok.convert_tokens_to_ids("<|user|>")}))
    deltas, stop = [], None
    for token in tok(text, add_special_tokens=False)["input_ids"]:
        outcome = state.push(token)
        deltas += outcome.deltas
        if outcome.stop_reason is not None:
            stop = outcome.stop_reason
            break
    deltas += state.finish()
    return state, deltas, stop


def test_text_is_released_only_as_complete_utf8(tok):
    text = "Grand-mère 奶奶 🐺 said so."
    state, deltas, stop = run(tok, text)
    assert "".join(d.text for d in deltas) == text and stop is None
    assert all("\ufffd" not in d.text for d in deltas)
    assert state.answer_text == text


def test_an_answer_that_ends_inside_a_character_shows_its_bytes_as_a_whole_decode_does(tok):
    """Cut off by max_tokens (or a stop token) part-way through a character: the held-back bytes come out as
    U+FFFD at the end, as ``tokenizer.decode`` of the answer's tokens shows them (they were dropped)."""
    ids = tok("Le loup 🐺", add_special_tokens=False)["input_ids"]
    partial = next(n for n in range(1, len(ids)) if tok.decode(ids[:n]).endswith("\ufffd"))
    state = OutputState(tok, GenerationSettings(), frozenset())
    deltas = [d for i in ids[:partial] for d in state.push(i).deltas] + state.finish()
    assert "".join(d.text for d in deltas) == state.answer_text == tok.decode(ids[:partial])
    assert sum(len(d.tokens) for d in deltas) == partial
    stop = tok.convert_tokens_to_ids("<|user|>")
    for include in (False, True):
        state = OutputState(tok, GenerationSettings(include_stop_str_in_output=include), frozenset({stop}))
        deltas = [d for i in [*ids[:partial], stop] for d in state.push(i).deltas] + state.finish()
        assert "".join(d.text for d in deltas) == tok.decode(ids[:partial])  # (a special token's text is skipped)


def test_a_stop_string_ends_the_answer_and_is_never_shown(tok):
    text = "The wolf ran. STOP here and more"
    state, deltas, stop = run(tok, text, stop=("STOP", "never"))
    assert stop == "STOP"
    shown = "".join(d.text for d in deltas)
    assert shown == state.answer_text == "The wolf ran."  # the space before the stop string is an edge: trimmed
    _, deltas, _ = run(tok, text, stop=("STOP",), include_stop_str_in_output=True)
    assert "".join(d.text for d in deltas) == "The wolf ran. STOP"


def test_stop_tokens_end_the_answer(tok):
    state = OutputState(tok, GenerationSettings(), frozenset({7}))
    assert state.push(7).stop_reason == 7
    ids = tok("The wolf ran", add_special_tokens=False)["input_ids"]
    for include in (False, True):  # vLLM's rule: a stop token's text is kept with include_stop_str_in_output
        state = OutputState(tok, GenerationSettings(include_stop_str_in_output=include), frozenset({ids[-1]}))
        deltas = [d for i in ids for d in state.push(i).deltas] + state.finish()
        assert "".join(d.text for d in deltas) == ("The wolf ran" if include else tok.decode(ids[:-1]))


def test_logprobs_ride_with_the_text_they_made(tok):
    state = OutputState(tok, GenerationSettings(logprobs=2), frozenset())
    ids = tok("Hello there", add_special_tokens=False)["input_ids"]
    delivered = []
    for i in ids:
        for delta in state.push(i, TokenLogprob(i, tok.decode([i]), -0.5, [])).deltas:
            delivered += delta.logprobs
    for delta in state.finish():
        delivered += delta.logprobs
    assert [lp.token_id for lp in state.logprobs] == ids
    assert [lp.token_id for lp in delivered] == ids


def test_a_tokens_bytes_are_its_own_also_inside_a_character(tok):
    state = OutputState(tok, GenerationSettings(logprobs=1), frozenset())
    text = "Grand-mère 奶奶 🐺 <|user|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = [state.token_bytes(t) for t in ids]
    assert b"".join(bytes(p) for p in pieces) == text.encode("utf-8")  # the bytes rebuild the text, as OpenAI's do
    split = [p for t, p in zip(ids, pieces) if "\ufffd" in state.token_text(t)]
    assert split and all(p != list("\ufffd".encode()) for p in split)  # part of a character: its own bytes
    assert state.token_bytes(tok.convert_tokens_to_ids("<|user|>")) == list(b"<|user|>")


def test_a_resumed_state_owes_the_text_its_tokens_released_that_the_caller_missed(tok):
    """One token can release text of both channels: the first delta carries the token, the second none. A caller
    that got only the first (its replica died between them) resumes with the token and the characters it was shown:
    the resumed state releases the rest before anything new."""
    stop_token = tok.convert_tokens_to_ids("<|user|>")
    settings = GenerationSettings(stop=("a stop string that never comes",))
    ids = tok("<think>So the wolf</think><answer>It ran", add_special_tokens=False)["input_ids"] + [stop_token]
    first = OutputState(tok, settings, frozenset({stop_token}))
    deltas = [d for i in ids for d in first.push(i).deltas]
    assert [(d.channel, d.tokens[-1:]) for d in deltas[-2:]] == [("thinking", [stop_token]), ("answer", [])]
    got = deltas[:-1]
    shown = {c: sum(len(d.text) for d in got if d.channel == c) for c in ("thinking", "answer")}
    resumed = OutputState(tok, settings, frozenset({stop_token}))
    assert [resumed.push(i).stop_reason for i in ids][-1] == stop_token
    resumed.delivered(shown)
    assert [(d.channel, d.text, d.tokens) for d in resumed.finish()] == [("answer", "It ran", [])]
    assert (resumed.thinking_text, resumed.answer_text) == ("So the wolf", "It ran")
