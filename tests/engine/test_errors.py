"""Bad input and failures: clear typed errors, and the engine stays usable."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from glyphserve.engine import AnswerRequest, ChatMessage, GenerationSettings
from glyphserve.errors import (
    ConfigError,
    ContextOverflowError,
    EngineOutOfMemoryError,
    GlyphserveError,
    ModelLoadError,
)
from tests.engine.conftest import make_pages

PAGES = make_pages([(112, 140)] * 6, seed=5)  # 20 vision tokens per page


@pytest.mark.parametrize("question", ["", "   \n"])
def test_empty_question(load_engine, question):
    engine = load_engine()
    with pytest.raises(GlyphserveError, match="question is empty") as err:
        engine.answer(AnswerRequest(pages=PAGES[:1], question=question))
    assert err.value.code == "invalid_request" and err.value.http_status == 400  # as the server's own checks


def test_a_page_too_elongated_for_the_model_is_refused_in_width_x_height():
    from glyphserve.engine.preprocess import check_page

    with pytest.raises(GlyphserveError, match=r"page 2 is too elongated \(5000x10 px; GLM-4.1V reads images whose "):
        check_page(np.zeros((10, 5000, 3), dtype=np.uint8), 1)
    check_page(np.zeros((10, 2000, 3), dtype=np.uint8), 0)  # 200:1 is read


@pytest.mark.parametrize(
    "page", [np.zeros((112, 140), np.uint8), np.zeros((112, 140, 3), np.float32), np.zeros((112, 140, 4), np.uint8)]
)
def test_malformed_page(load_engine, page):
    with pytest.raises(GlyphserveError, match="page 2 must be an HxWx3 uint8"):
        load_engine().answer(AnswerRequest(pages=[PAGES[0], page], question="Who?"))


def test_unknown_role_and_bad_settings(load_engine):
    engine = load_engine()
    with pytest.raises(GlyphserveError, match="unknown chat role"):
        engine.answer(AnswerRequest(pages=PAGES[:1], question="Who?", history=[ChatMessage("tool", "x")]))
    with pytest.raises(ConfigError, match="max_tokens"):
        engine.answer(AnswerRequest(pages=PAGES[:1], question="Who?", settings=GenerationSettings(max_tokens=0)))


def test_context_overflow_says_how_many_pages_fit_and_truncation_keeps_them(load_engine, reference):
    # 6 pages x 22 tokens + ~12 text tokens + 16 new tokens; a 100-token context holds 3 pages.
    engine = load_engine(max_context=100)
    settings = GenerationSettings(max_tokens=16, ignore_eos=True)
    with pytest.raises(ContextOverflowError, match=r"only the first 3 of 6 pages fit") as err:
        engine.answer(AnswerRequest(pages=PAGES, question="Who is the wolf?", settings=settings))
    assert err.value.http_status == 400 and "truncate_pages" in err.value.message
    settings.truncate_pages = True
    answer = engine.answer(AnswerRequest(pages=PAGES, question="Who is the wolf?", settings=settings))
    assert answer.pages_used == 3 and answer.prompt_tokens + 16 <= 100
    expected, _ = reference.generate(PAGES[:3], "Who is the wolf?", max_new_tokens=16, ignore_eos=True)
    assert answer.token_ids == expected


def test_no_page_fits(load_engine):
    engine = load_engine(max_context=30)
    settings = GenerationSettings(max_tokens=16, truncate_pages=True)
    with pytest.raises(ContextOverflowError, match="not even the first page fits"):
        engine.answer(AnswerRequest(pages=PAGES, question="Who is the wolf?", settings=settings))


def test_text_alone_overflowing_says_so(load_engine):
    # No pages at all: the error must not speak of a first page.
    engine = load_engine(max_context=30)
    with pytest.raises(ContextOverflowError, match=r"\(0 pages\).*the text alone does not fit") as err:
        engine.answer(AnswerRequest(pages=[], question="word " * 40, settings=GenerationSettings(max_tokens=4)))
    assert "first page" not in err.value.message


def test_a_max_tokens_past_the_context_is_not_written_out(load_engine):
    """A hostile-input trial: a max_tokens of 4,000 digits came back whole in the error (8 KB of message)."""
    engine = load_engine(max_context=64)
    with pytest.raises(ContextOverflowError, match="lower max_tokens to at most") as err:
        engine.answer(AnswerRequest(pages=[], question="Who?", settings=GenerationSettings(max_tokens=10**4000)))
    assert len(err.value.message) < 300


def test_checkpoint_of_another_architecture(tmp_path):
    from glyphserve.engine import Engine, EngineConfig

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelLoadError, match="'gpt2' checkpoint; glyphserve needs a GLM-4.1V"):
        Engine.load(EngineConfig(model=str(tmp_path), device="cpu"))


def test_missing_checkpoint(tmp_path):
    from glyphserve.engine import Engine, EngineConfig

    with pytest.raises(ModelLoadError, match="nowhere: no such folder, and not a Hugging Face id"):
        Engine.load(EngineConfig(model=str(tmp_path / "nowhere"), device="cpu"))  # (the Hub's "Repo id must be")
    with pytest.raises(ModelLoadError):
        Engine.load(EngineConfig(model=str(tmp_path), device="cpu"))  # a directory without config.json
    with pytest.raises(ModelLoadError, match="Hugging Face model 'zai-org/no-such-model'"):
        Engine.load(EngineConfig(model="zai-org/no-such-model", device="cpu"))  # offline in tests


def test_config_choices():
    from glyphserve.engine import Engine, EngineConfig

    with pytest.raises(ConfigError, match="exactly one"):
        Engine.load(EngineConfig())
    with pytest.raises(ConfigError, match="unknown random-weights preset"):
        Engine.load(EngineConfig(random_weights="glm-5", device="cpu"))
    with pytest.raises(ConfigError, match="unknown dtype"):
        Engine.load(EngineConfig(random_weights="glm-4.1v-9b", dtype="int3", device="cpu"))


@pytest.mark.parametrize(
    "layer, failing_call",
    [
        (lambda m: m.model.visual.merger, 1),  # during the vision encode
        (lambda m: m.model.language_model.rotary_emb, 3),  # in the second decode step
    ],
    ids=["vision", "decode"],
)
def test_out_of_memory_inside_the_forward_is_recovered(load_engine, reference, layer, failing_call):
    engine = load_engine()
    pages = PAGES[:2]
    engine.answer(AnswerRequest(pages=pages, question="Who?"))
    assert engine.stats()["kv_pool"]["cached"] > 0

    calls = {"n": 0}

    def fail_once(module, args, output):
        calls["n"] += 1
        if calls["n"] == failing_call:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    # A real layer of the real model raises from inside its forward pass.
    hook = layer(engine.model).register_forward_hook(fail_once)
    request = AnswerRequest(pages=pages, question="Who pretended?", settings=GenerationSettings(max_tokens=8))
    try:
        with pytest.raises(EngineOutOfMemoryError) as err:
            engine.answer(AnswerRequest(pages=pages, question="Where?", settings=GenerationSettings(use_cache=False)))
        assert err.value.http_status == 503
        stats = engine.stats()
        assert stats["oom_recoveries"] == 1
        assert stats["kv_pool"]["cached"] == 0 and stats["kv_pool"]["in_use"] == 0
        assert stats["vision_cache"]["device"]["entries"] == 0
        answer = engine.answer(request)  # the next request succeeds, and is right
    finally:
        hook.remove()
    expected, _ = reference.generate(pages, "Who pretended?", max_new_tokens=8)
    assert answer.token_ids == expected


@pytest.mark.parametrize("bad, message", [
    (dict(temperature=float("nan")), "temperature"), (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1e-300 * 0), "top_p"), (dict(top_k=-1), "top_k"),
    (dict(min_p=1.5), "min_p"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=1e-46), "repetition_penalty"),  # 0 in float32: 0 / 0 in the penalty
    (dict(presence_penalty=3.0), "presence_penalty"), (dict(frequency_penalty=float("inf")), "frequency_penalty"),
    (dict(logprobs=21), "logprobs"), (dict(seed=2**64), "seed"), (dict(stop_token_ids=(10**9,)), "stop_token_ids"),
    # wrong types, as a library's caller may pass them (a raw TypeError, or a top_k of 1.5 taken)
    (dict(temperature="hot"), "temperature"), (dict(top_k=1.5), "top_k"), (dict(seed="7"), "seed"),
    (dict(stop_token_ids=("a",)), "stop_token_ids"),
])
def test_settings_that_cannot_be_honoured_are_refused(load_engine, bad, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_engine().answer(AnswerRequest(pages=PAGES[:1], question="Who?", settings=GenerationSettings(**bad)))
    assert info.value.param == message  # the API's error body names the field


def test_extreme_but_valid_settings_answer(load_engine):
    """Tiny temperatures mean greedy; tiny top_p keeps the most likely token; the largest seed works."""
    engine = load_engine()
    greedy = engine.answer(AnswerRequest(pages=PAGES[:1], question="Who?",
                                         settings=GenerationSettings(max_tokens=6, ignore_eos=True)))
    import numpy as np

    for settings in (dict(temperature=1e-300), dict(temperature=1.0, top_p=1e-300), dict(temperature=1.0, seed=2**64 - 1),
                     dict(temperature=np.float32(1e-30), top_k=np.int64(5))):  # numpy's numbers count
        answer = engine.answer(AnswerRequest(pages=PAGES[:1], question="Who?",
                                             settings=GenerationSettings(max_tokens=6, ignore_eos=True, **settings)))
        assert len(answer.token_ids) == 6
        if "seed" not in settings:
            assert answer.token_ids == greedy.token_ids


def test_a_failure_in_one_row_ends_only_that_request(load_engine):
    """A request whose own code fails mid-answer (here its cancel callback raises) gets an error; the rows decoding
    beside it finish exactly as they would alone."""
    engine = load_engine()
    settings = GenerationSettings(max_tokens=16, ignore_eos=True)
    polls = []

    def broken() -> bool:
        polls.append(1)
        if len(polls) > 4:
            raise RuntimeError("the client's connection object is gone")
        return False

    requests = [AnswerRequest(pages=PAGES[:1], question="Who?", settings=settings),
                AnswerRequest(pages=PAGES[1:2], question="Where?", settings=settings, cancel=broken),
                AnswerRequest(pages=PAGES[2:3], question="Why?", settings=settings)]
    events = list(engine.stream_batch(requests))
    errors = {i: e.error for i, e in events if e.channel == "error"}
    done = {i: e.result for i, e in events if e.channel == "done"}
    assert list(errors) == [1] and "connection object is gone" in str(errors[1])
    assert (errors[1].http_status, errors[1].code) == (500, "internal_error")  # the program's fault, not the input's
    alone = [engine.answer(requests[i]) for i in (0, 2)]
    assert [done[0].token_ids, done[2].token_ids] == [a.token_ids for a in alone]
    assert engine.stats()["kv_pool"]["in_use"] == 0


def test_a_page_that_cannot_be_decoded_ends_only_its_own_request(load_engine):
    """A page file whose header reads but whose pixels do not (a damaged file on disk) fails its own request when
    it must be encoded; the request prefilled beside it in the same step answers as it would alone."""
    engine = load_engine()
    damaged = _damaged_page()
    settings = GenerationSettings(max_tokens=8, ignore_eos=True)
    good = AnswerRequest(pages=PAGES[:1], question="Who?", settings=settings)
    events = list(engine.stream_batch([good, AnswerRequest(pages=[damaged], question="Who?", settings=settings)]))
    errors = {i: e.error for i, e in events if e.channel == "error"}
    done = {i: e.result for i, e in events if e.channel == "done"}
    assert list(errors) == [1] and "not a readable image" in str(errors[1])
    assert done[0].token_ids == engine.answer(good).token_ids
    assert engine.stats()["kv_pool"]["in_use"] == 0


def _damaged_page():
    """A page file whose header reads but whose pixels do not (a damaged file on disk)."""
    import io

    from PIL import Image

    from glyphserve.engine import EncodedPage

    buffer = io.BytesIO()
    Image.fromarray(PAGES[3]).save(buffer, format="PNG")
    png = bytearray(buffer.getvalue())
    start = png.index(b"IDAT") + 10
    png[start : start + 200] = bytes(b ^ 0x5A for b in png[start : start + 200])
    return EncodedPage.from_bytes(bytes(png))


def test_a_damaged_page_alone_in_its_step_does_not_fail_the_requests_waiting(load_engine):
    """The step held only the damaged request's chunk (one slot: the other request waits for it); the request
    waiting is answered once the damaged one has ended, not failed as if the scheduler were stuck."""
    engine = load_engine(max_num_seqs=1)
    settings = GenerationSettings(max_tokens=8, ignore_eos=True)
    good = AnswerRequest(pages=PAGES[:1], question="Who?", settings=settings)
    events = list(engine.stream_batch([AnswerRequest(pages=[_damaged_page()], question="Who?", settings=settings),
                                       good]))
    errors = {i: e.error for i, e in events if e.channel == "error"}
    done = {i: e.result for i, e in events if e.channel == "done"}
    assert list(errors) == [0] and "not a readable image" in str(errors[0])
    assert done[1].token_ids == engine.answer(good).token_ids
    assert engine.stats()["kv_pool"]["in_use"] == 0


def test_a_damaged_page_leaves_no_unwritten_blocks_in_the_prefix_cache(load_engine):
    """The pages before a damaged one are in the damaged request's prompt blocks, which were scheduled (and offered
    for sharing) but never written: a question on those pages, in the same step or later, answers as it would
    alone, and a question on the damaged page again fails again."""
    settings = GenerationSettings(max_tokens=8, ignore_eos=True)
    good = AnswerRequest(pages=PAGES[:2], question="Who?", settings=settings)
    expected = load_engine().answer(good).token_ids
    engine = load_engine()
    damaged = AnswerRequest(pages=[*PAGES[:2], _damaged_page()], question="Who?", settings=settings)
    events = list(engine.stream_batch([damaged, good]))  # the good one is admitted onto the damaged one's blocks
    assert [i for i, e in events if e.channel == "error"] == [0]
    assert [e.result.token_ids for i, e in events if e.channel == "done"] == [expected]
    assert engine.stats()["preemptions"] == 0  # sent back out of a step that never ran: no work lost
    list(engine.stream_batch([damaged]))
    assert engine.answer(good).token_ids == expected
    again = AnswerRequest(pages=damaged.pages, question="Where?", settings=settings)
    assert [e.channel for _, e in engine.stream_batch([again]) if e.channel in ("done", "error")] == ["error"]
    assert engine.stats()["kv_pool"]["in_use"] == 0


@pytest.mark.parametrize("max_context, message", [(0, "at least 1"), (4097, "longer than the model's 4096 positions")])
def test_a_context_the_model_cannot_hold_is_refused_at_load(load_engine, max_context, message):
    with pytest.raises(ConfigError, match=message):
        load_engine(max_context=max_context)


def test_pages_encoded_a_batch_at_a_time_answer_alike_and_a_later_batch_s_damaged_page_fails_only_its_request(
        load_engine):
    """The vision encoder decodes, uploads and encodes a step's pages one tower batch at a time (the next batch's
    host work overlapping the device's encoding): in batches of one page the answers are the same tokens, and a
    damaged page in a later batch ends its own request after the earlier batches were encoded, not the other."""
    settings = GenerationSettings(max_tokens=8, ignore_eos=True)
    good = AnswerRequest(pages=PAGES[:3], question="Who?", settings=settings)
    expected = load_engine().answer(good).token_ids
    engine = load_engine(vision_batch_pages=1)
    assert engine.answer(good).token_ids == expected
    engine.clear_caches()
    damaged = AnswerRequest(pages=[*PAGES[3:5], _damaged_page()], question="Where?", settings=settings)
    events = list(engine.stream_batch([good, damaged]))
    assert [i for i, e in events if e.channel == "error"] == [1]
    assert [e.result.token_ids for i, e in events if e.channel == "done"] == [expected]
    assert engine.stats()["kv_pool"]["in_use"] == 0
