"""Greedy output of every fast path equals the plain Hugging Face path (processor + generate), token for token."""

from __future__ import annotations

import pytest
import torch

from glyphserve.engine import AnswerRequest, ChatMessage, GenerationSettings
from tests.engine.conftest import make_pages

N = 24
SHAPES = [(112, 140), (168, 196), (140, 112)]


def request(pages, question, history=(), n=N, **settings):
    return AnswerRequest(
        pages=pages,
        question=question,
        history=[ChatMessage(role, content) for role, content in history],
        settings=GenerationSettings(max_tokens=n, ignore_eos=True, **settings),
    )


@pytest.fixture(scope="module")
def pages():
    return make_pages(SHAPES, seed=1)


def test_prompt_ids_equal_the_processor(load_engine, reference, pages):
    from glyphserve.engine.prompt import conversation

    engine = load_engine()
    history = [ChatMessage("user", "Who is the wolf?"), ChatMessage("assistant", "<think>hm</think>The wolf.")]
    prompt = engine.prompts.build(
        conversation(history, "And the girl?", 3), [engine.params.grid(*p.shape[:2]) for p in pages]
    )
    ref = reference.inputs(pages, "And the girl?", [(m.role, m.content) for m in history])
    assert prompt.ids == ref["input_ids"][0].tolist()
    ids = ref["input_ids"][0].tolist()
    end = engine.model.config.image_end_token_id
    assert prompt.prefix_len == len(ids) - ids[::-1].index(end)


def test_tiny_model_output_is_not_degenerate(reference, pages):
    tokens, _ = reference.generate(pages, "Who is the wolf?", max_new_tokens=N, ignore_eos=True)
    assert len(set(tokens)) >= N // 2


def test_cold_request_static_cache_decode_matches_generate(load_engine, reference, pages):
    engine = load_engine()
    expected, logits = reference.generate(pages, "Who is the wolf?", max_new_tokens=N, ignore_eos=True)
    answer = engine.answer(request(pages, "Who is the wolf?"))
    assert answer.token_ids == expected
    assert answer.cache.vision_misses == 3 and answer.cache.prefix_reused_tokens == 0


def test_encoded_pages_answer_like_their_pixels(load_engine, reference, pages):
    import io

    from PIL import Image

    from glyphserve.engine import EncodedPage

    def encoded(page):
        buffer = io.BytesIO()
        Image.fromarray(page).save(buffer, format="PNG")
        return EncodedPage.from_bytes(buffer.getvalue())

    engine = load_engine()
    expected, _ = reference.generate(pages, "Who is the wolf?", max_new_tokens=N, ignore_eos=True)
    files = [encoded(p) for p in pages]
    cold = engine.answer(request(files, "Who is the wolf?"))
    assert cold.token_ids == expected and cold.cache.vision_misses == 3
    again = engine.answer(request(files, "Who is the wolf?"))
    assert again.token_ids == expected and again.cache.prefix_reused_tokens > 0
    # The caches are keyed by pixels: the same pages as arrays, in another order, hit them too.
    swapped = engine.answer(request(pages[::-1], "Who is the wolf?"))
    assert swapped.cache.vision_hits == 3 and swapped.cache.vision_misses == 0


def test_stop_tokens_end_generation_like_generate(load_engine, reference, pages):
    engine = load_engine()
    for question in ("Who?", "Where does the grandmother live?", "Why did the wolf run?"):
        expected, _ = reference.generate(pages[:1], question, max_new_tokens=40)
        answer = engine.answer(
            AnswerRequest(pages=pages[:1], question=question, settings=GenerationSettings(max_tokens=40))
        )
        assert answer.token_ids == expected
        assert answer.finish_reason == ("stop" if expected[-1] in engine.stop_ids else "length")


def test_first_decode_step_logits_match(load_engine, reference, pages):
    engine = load_engine()
    _, logits = reference.generate(pages, "Who is the wolf?", max_new_tokens=2, ignore_eos=True)
    engine.answer(request(pages, "Who is the wolf?", n=2))
    # HF's second raw logits are the first decode step's; ours carry -inf on the stop tokens (ignore_eos).
    ours = engine.runner.logits[0]
    kept = torch.isfinite(ours)
    assert (~kept).nonzero().flatten().tolist() == engine.stop_ids
    assert (ours[kept] - logits[1][0][kept]).abs().max().item() < 1e-4


def test_vision_cache_hit_matches(load_engine, reference, pages):
    engine = load_engine(prefix_cache_bytes=0)
    engine.answer(request(pages, "Who is the wolf?"))
    expected, _ = reference.generate(pages, "What did the girl carry?", max_new_tokens=N, ignore_eos=True)
    answer = engine.answer(request(pages, "What did the girl carry?"))
    assert answer.cache.vision_hits == 3 and answer.cache.vision_misses == 0
    assert answer.cache.prefix_reused_tokens == 0
    assert answer.token_ids == expected


def test_prefix_kv_reuse_for_a_follow_up_question_matches(load_engine, reference, pages):
    engine = load_engine()
    engine.answer(request(pages, "Who is the wolf?"))
    expected, _ = reference.generate(pages, "What did the girl carry?", max_new_tokens=N, ignore_eos=True)
    answer = engine.answer(request(pages, "What did the girl carry?"))
    # [gMASK]<sop><|user|>\n, then per page <|begin_of_image|> + vision tokens + <|end_of_image|>
    prefix = 4 + sum(engine.vision_tokens(p.shape[:2]) + 2 for p in pages)
    assert answer.cache.prefix_reused_tokens == prefix
    assert answer.cache.vision_hits == answer.cache.vision_misses == 0  # no vision work at all
    assert answer.token_ids == expected


def test_multi_turn_continuation_reuses_the_prefix_and_matches(load_engine, reference, pages):
    engine = load_engine()
    first = engine.answer(request(pages, "Who is the wolf?"))
    history = [("user", "Who is the wolf?"), ("assistant", first.text)]
    expected, _ = reference.generate(pages, "And the grandmother?", history, max_new_tokens=N, ignore_eos=True)
    answer = engine.answer(request(pages, "And the grandmother?", history))
    assert answer.cache.prefix_reused_tokens > 0
    assert answer.token_ids == expected


def test_page_keys_select_the_prefix(load_engine, reference, pages):
    engine = load_engine()
    keyed = request(pages, "Who is the wolf?")
    keyed.page_keys = [f"doc-1:{n}" for n in range(1, len(pages) + 1)]
    engine.answer(keyed)
    follow = request(pages, "Where?")
    follow.page_keys = [f"doc-1:{n}" for n in range(1, len(pages) + 1)]
    expected, _ = reference.generate(pages, "Where?", max_new_tokens=N, ignore_eos=True)
    answer = engine.answer(follow)
    assert answer.cache.prefix_reused_tokens > 0
    assert answer.token_ids == expected


def test_use_cache_false_bypasses_both_caches(load_engine, reference, pages):
    engine = load_engine()
    engine.answer(request(pages, "Who is the wolf?"))
    expected, _ = reference.generate(pages, "Who is the wolf?", max_new_tokens=N, ignore_eos=True)
    answer = engine.answer(request(pages, "Who is the wolf?", use_cache=False))
    assert answer.cache.vision_hits == answer.cache.prefix_reused_tokens == 0
    assert answer.token_ids == expected


def test_batched_requests_match_one_by_one(load_engine, reference, pages):
    engine = load_engine()
    cases = [
        (pages[:1], "Who?"),
        (pages, "Who pretended to be the grandmother in the story?"),
        (pages[1:], "Where does the grandmother live, and why did the wolf run ahead of the girl?"),
    ]
    expected = [reference.generate(p, q, max_new_tokens=N, ignore_eos=True)[0] for p, q in cases]
    answers = engine.answer_batch([request(p, q) for p, q in cases])
    assert [a.token_ids for a in answers] == expected
    # the shared pages were encoded once for the whole batch
    assert sum(a.cache.vision_misses for a in answers) == 3


def test_batched_requests_with_stop_tokens_and_different_lengths(load_engine, reference, pages):
    engine = load_engine()
    cases = [
        (pages[:1], "Why did the wolf run?", 40),
        (pages[2:], "Where does the grandmother live?", 40),
        (pages, "Who?", 30),
    ]
    expected = [reference.generate(p, q, max_new_tokens=n)[0] for p, q, n in cases]
    answers = engine.answer_batch(
        [AnswerRequest(pages=p, question=q, settings=GenerationSettings(max_tokens=n)) for p, q, n in cases]
    )
    assert [a.token_ids for a in answers] == expected
    assert [a.finish_reason for a in answers] == ["stop", "stop", "length"]


def test_more_requests_than_rows_are_split(load_engine, reference, pages):
    engine = load_engine(max_batch_size=2)
    cases = [(pages[i : i + 1], f"Question number {i}?") for i in range(3)]
    expected = [reference.generate(p, q, max_new_tokens=8, ignore_eos=True)[0] for p, q in cases]
    answers = engine.answer_batch([request(p, q, n=8) for p, q in cases])
    assert [a.token_ids for a in answers] == expected


def test_pages_needing_resize_match(load_engine, reference):
    engine = load_engine()
    pages = make_pages([(100, 150), (842, 595)], seed=3)
    expected, _ = reference.generate(pages, "Who is the wolf?", max_new_tokens=8, ignore_eos=True)
    assert engine.answer(request(pages, "Who is the wolf?", n=8)).token_ids == expected


def test_vision_features_equal_hf(load_engine, reference, pages):
    engine = load_engine()
    ref_inputs = reference.processor.image_processor(images=pages, return_tensors="pt")
    with torch.inference_mode():
        ref = reference.model.get_image_features(ref_inputs["pixel_values"], ref_inputs["image_grid_thw"]).pooler_output
    grids = [tuple(g) for g in ref_inputs["image_grid_thw"].tolist()]
    ours = engine.vision.encode(engine.preprocessor(pages), grids)
    for a, b in zip(ours, ref):
        assert (a - b).abs().max().item() < 1e-5


def test_text_only_question_matches(load_engine, reference):
    engine = load_engine()
    expected, _ = reference.generate([], "Tell me a story.", max_new_tokens=N, ignore_eos=True)
    assert engine.answer(request([], "Tell me a story.")).token_ids == expected


@pytest.mark.parametrize("prefix_cache_bytes", [2**30, 0])
def test_batch_of_questions_about_one_document_shares_its_prefix(load_engine, reference, pages, prefix_cache_bytes):
    engine = load_engine(prefix_cache_bytes=prefix_cache_bytes)
    questions = ["Who?", "Who pretended to be the grandmother?", "Where?"]
    expected = [reference.generate(pages, q, max_new_tokens=N, ignore_eos=True)[0] for q in questions]
    answers = engine.answer_batch([request(pages, q) for q in questions])
    assert [a.token_ids for a in answers] == expected
    first, *rest = [a.cache.prefix_reused_tokens for a in answers]
    assert first == 0
    assert all(r > 0 for r in rest) if prefix_cache_bytes else rest == [0, 0]
    assert sum(a.cache.vision_misses for a in answers) == 3


def test_requests_admitted_while_decoding_match_generate(load_engine, reference, pages):
    """Continuous batching: requests join rows freed or unused while others decode."""
    engine = load_engine(max_batch_size=2)
    first = (pages, "Who pretended to be the grandmother in the story?", 20)
    joining = [(pages[:1], "Who?", 6), (pages[1:], "Where does the grandmother live?", 12),
               (pages[2:], "Why did the wolf run?", 9)]
    expected = [reference.generate(p, q, max_new_tokens=n, ignore_eos=True)[0] for p, q, n in [first, *joining]]
    offered = list(joining)
    calls = []

    def admit(free: int) -> list[AnswerRequest]:
        calls.append(free)
        if len(calls) < 3 or not offered:  # join after a few decode steps
            return []
        taken, offered[:] = offered[:free], offered[free:]
        return [request(p, q, n=n) for p, q, n in taken]

    done_order, tokens = [], {}
    for index, event in engine.stream_batch([request(first[0], first[1], n=first[2])], admit=admit):
        if event.channel == "done":
            done_order.append(index)
            tokens[index] = event.result.token_ids
    assert [tokens[i] for i in range(4)] == expected
    assert calls[:3] == [1, 1, 1] and not offered  # one row was busy: the joiners took turns on the other
    # done events come per row: the 6-token joiner finished while the first request still decoded
    assert done_order.index(1) < done_order.index(0)


def test_an_admitted_request_that_cannot_run_gets_an_error_event(load_engine, reference, pages):
    engine = load_engine()
    expected, _ = reference.generate(pages[:1], "Who?", max_new_tokens=8, ignore_eos=True)
    offered = [request(pages[:1], "   ", n=8), request(pages[:1], "Who?", n=8)]

    def admit(free: int) -> list[AnswerRequest]:
        taken, offered[:] = offered[:free], offered[free:]
        return taken

    events = list(engine.stream_batch([request(pages[:1], "Who?", n=8)], admit=admit))
    errors = [(i, e.error) for i, e in events if e.channel == "error"]
    assert len(errors) == 1 and errors[0][0] == 1 and "question is empty" in str(errors[0][1])
    done = {i: e.result.token_ids for i, e in events if e.channel == "done"}
    assert done == {0: expected, 2: expected}


def test_follow_ups_on_cached_documents_are_prefilled_together_and_match(load_engine, reference, pages):
    engine = load_engine()
    docs = [pages[:1], pages[1:], pages]
    for doc in docs:  # cache each document's prefix
        engine.answer(request(doc, "What is this?", n=2))
    cases = [(docs[0], "Who?"), (docs[1], "Where does the grandmother live?"), (docs[2], "Why did the wolf run?"),
             ([], "Tell me a story.")]
    expected = [reference.generate(p, q, max_new_tokens=N, ignore_eos=True)[0] for p, q in cases]
    passes = []
    prefill_rows = engine.runner.prefill_rows
    engine.runner.prefill_rows = lambda rows, *rest: passes.append(list(rows)) or prefill_rows(rows, *rest)
    answers = engine.answer_batch([request(p, q) for p, q in cases])
    assert [a.token_ids for a in answers] == expected
    assert passes == [[0, 1, 2, 3]]  # one pass for all four
    assert all(a.cache.prefix_reused_tokens > 0 for a in answers[:3])


def test_a_prompt_prefilled_in_chunks_matches(load_engine, reference, pages, monkeypatch):
    """Long prompts are prefilled in chunks, each attending to the cache before it (lower-right causal)."""
    import glyphserve.engine.runner as runner

    engine = load_engine(prefix_cache_bytes=0)
    expected, _ = reference.generate(pages, "Who is the wolf?", max_new_tokens=N, ignore_eos=True)
    monkeypatch.setattr(runner, "PREFILL_CHUNK", 37)  # several chunks, cut inside the pages' tokens
    assert engine.answer(request(pages, "Who is the wolf?")).token_ids == expected


def test_a_long_prompt_joining_running_rows_is_prefilled_in_slices_between_their_steps(
        load_engine, reference, pages, monkeypatch):
    import glyphserve.engine.engine as engine_module

    engine = load_engine(max_batch_size=2)
    running = (pages[:1], "Who?", 24)
    joiner = (pages, "Who pretended to be the grandmother in the story?", 12)
    expected = [reference.generate(p, q, max_new_tokens=n, ignore_eos=True)[0] for p, q, n in (running, joiner)]
    monkeypatch.setattr(engine_module, "INTERLEAVED_PREFILL_TOKENS", 29)
    calls: list[str] = []
    for name in ("prefill", "step"):
        original = getattr(engine.runner, name)
        monkeypatch.setattr(engine.runner, name,
                            lambda *a, _name=name, _f=original, **k: calls.append(_name) or _f(*a, **k))
    offered = [request(*joiner[:2], n=joiner[2])]
    asked = []

    def admit(free: int) -> list[AnswerRequest]:
        asked.append(free)
        if len(asked) < 3 or not offered:  # join once the running row decodes
            return []
        return [offered.pop()]

    tokens = {i: e.result.token_ids for i, e in engine.stream_batch([request(*running[:2], n=running[2])], admit=admit)
              if e.channel == "done"}
    assert [tokens[0], tokens[1]] == expected
    joined_at = calls.index("prefill", 1)  # the first prefill is the running request's own
    pattern = calls[joined_at:]
    n_slices = pattern.count("prefill")
    assert n_slices >= 3  # the joiner's prompt went in several slices...
    assert pattern[: 2 * n_slices] == ["prefill", "step"] * n_slices  # ...each followed by a step of the running row


def test_a_long_prompt_cancelled_between_its_slices_frees_its_row(load_engine, reference, pages, monkeypatch):
    import glyphserve.engine.engine as engine_module

    engine = load_engine(max_batch_size=2)
    expected, _ = reference.generate(pages[:1], "Who?", max_new_tokens=24, ignore_eos=True)
    monkeypatch.setattr(engine_module, "INTERLEAVED_PREFILL_TOKENS", 29)
    joiner = request(pages, "Who pretended to be the grandmother in the story?", n=12)
    before = engine.stats()["prefill_passes"]
    joiner.cancel = lambda: engine.stats()["prefill_passes"] - before >= 3  # after two slices of its prompt
    offered, asked = [joiner], []

    def admit(free: int) -> list[AnswerRequest]:
        asked.append(free)
        return [offered.pop()] if len(asked) >= 3 and offered else []  # once the first row decodes

    events = list(engine.stream_batch([request(pages[:1], "Who?", n=24)], admit=admit))
    done = {i: e.result for i, e in events if e.channel == "done"}
    assert done[0].token_ids == expected
    assert done[1].finish_reason == "cancelled" and done[1].token_ids == []
