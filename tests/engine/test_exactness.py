"""Greedy output of every fast path equals the plain Hugging Face path (processor + generate), token for token."""

from __future__ import annotations

import pytest
import torch

from glyphserve.engine import AnswerRequest, ChatMessage, GenerationSettings
from glyphserve.engine.model_runner import PAGED_CHUNK_TOKENS, PAGED_PREFIX_CHUNK_TOKENS, PROMPT_PAD_TOKENS
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


@pytest.mark.parametrize("pad", [PROMPT_PAD_TOKENS, 7, "the prompt's length"])
def test_a_prompt_padded_for_attention_answers_exactly(load_engine, reference, pages, pad):
    """A prompt's first chunk padded at its end for SDPA (on CUDA, so cuDNN plans a few lengths only; its q, k and
    v rotated into padded tensors) changes nothing: the padding keys come after every real query. A prompt whose
    length is a multiple of the padding fills its tensors exactly."""
    engine = load_engine(graph_prefill=False)  # the prompt through the eager pass, where it is padded
    expected, _ = reference.generate(pages, "Who is the wolf?", max_new_tokens=N, ignore_eos=True)
    if pad == "the prompt's length":
        pad = engine.answer(request(pages, "Who is the wolf?")).prompt_tokens
        engine.clear_caches()
    engine.runner.prompt_pad = pad
    answer = engine.answer(request(pages, "Who is the wolf?"))
    assert answer.token_ids == expected and bool(answer.prompt_tokens % pad) == (pad != answer.prompt_tokens)


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
    # The vision cache is keyed by page identity (here the files' bytes, so a hit decodes nothing): the same
    # files in another order hit it.
    swapped = engine.answer(request(files[::-1], "Who is the wolf?"))
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
    # HF's second raw logits are the first decode step's.
    ours = engine.runner.logits[0]
    assert (ours - logits[1][0]).abs().max().item() < 1e-4


def test_vision_cache_hit_matches(load_engine, reference, pages):
    engine = load_engine(enable_prefix_caching=False)
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
    before = engine.stats()["row_chunks"]
    answer = engine.answer(request(pages, "What did the girl carry?"))
    assert engine.stats()["row_chunks"] == before + 1  # the short prefill ran as rows of a (graph) step
    # [gMASK]<sop><|user|>\n, then per page <|begin_of_image|> + vision tokens + <|end_of_image|>: its full KV
    # blocks are shared; the last, partial one is recomputed (its page's features come from the vision cache)
    prefix = 4 + sum(engine.vision_tokens(p.shape[:2]) + 2 for p in pages)
    block = engine.pool.block_size
    assert answer.cache.prefix_reused_tokens == prefix // block * block
    assert answer.cache.vision_misses == 0 and answer.cache.vision_hits <= 1
    assert answer.token_ids == expected


def test_multi_turn_continuation_reuses_the_prefix_and_matches(load_engine, reference, pages):
    engine = load_engine()
    first = engine.answer(request(pages, "Who is the wolf?"))
    history = [("user", "Who is the wolf?"), ("assistant", first.text)]
    expected, _ = reference.generate(pages, "And the grandmother?", history, max_new_tokens=N, ignore_eos=True)
    answer = engine.answer(request(pages, "And the grandmother?", history))
    assert answer.cache.prefix_reused_tokens > 0
    assert answer.token_ids == expected


@pytest.mark.parametrize("rows", [True, False])  # as graph rows, or eagerly through the paged kernel (not SDPA)
def test_a_later_turn_longer_than_a_follow_up_matches(load_engine, reference, pages, rows):
    engine = load_engine(graph_prefill=rows)
    engine.answer(request(pages, "Who is the wolf?"))
    history = [("user", "Who is the wolf?"), ("assistant", "The wolf met the girl in the forest, " * 12)]
    expected, _ = reference.generate(pages, "And the grandmother?", history, max_new_tokens=N, ignore_eos=True)
    before = engine.stats()["row_chunks"]
    answer = engine.answer(request(pages, "And the grandmother?", history))
    chunk = answer.prompt_tokens - answer.cache.prefix_reused_tokens
    assert PAGED_CHUNK_TOKENS < 100 < chunk <= PAGED_PREFIX_CHUNK_TOKENS  # more than a follow-up's chunk
    assert engine.stats()["row_chunks"] == before + rows
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
    engine = load_engine(max_num_seqs=2)
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


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_batch_of_questions_about_one_document_shares_its_prefix(load_engine, reference, pages, prefix_caching):
    engine = load_engine(enable_prefix_caching=prefix_caching)
    questions = ["Who?", "Who pretended to be the grandmother?", "Where?"]
    expected = [reference.generate(pages, q, max_new_tokens=N, ignore_eos=True)[0] for q in questions]
    answers = engine.answer_batch([request(pages, q) for q in questions])
    assert [a.token_ids for a in answers] == expected
    first, *rest = [a.cache.prefix_reused_tokens for a in answers]
    assert first == 0
    assert all(r > 0 for r in rest) if prefix_caching else rest == [0, 0]
    assert sum(a.cache.vision_misses for a in answers) == 3


def test_requests_admitted_while_decoding_match_generate(load_engine, reference, pages):
    """Continuous batching: requests join rows freed or unused while others decode."""
    engine = load_engine(max_num_seqs=2)
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


@pytest.mark.parametrize("captured", [False, True])  # the pass as captured: see the test below
def test_follow_ups_on_cached_documents_are_prefilled_together_and_match(load_engine, reference, pages, captured):
    from glyphserve.engine.pass_graphs import PassGraphs

    engine = load_engine(graph_prefill=not captured)  # (this step's rows fit a graph step)
    if captured:
        engine.core.passes = PassGraphs(engine.runner, 256, engine.config.max_num_seqs)
    docs = [pages[:1], pages[1:], pages]
    for doc in docs:  # cache each document's prefix
        engine.answer(request(doc, "What is this?", n=2))
    cases = [(docs[0], "Who?"), (docs[1], "Where does the grandmother live?"), (docs[2], "Why did the wolf run?"),
             ([], "Tell me a story.")]
    expected = [reference.generate(p, q, max_new_tokens=N, ignore_eos=True)[0] for p, q in cases]
    before = engine.stats()
    answers = engine.answer_batch([request(p, q) for p, q in cases])
    assert [a.token_ids for a in answers] == expected
    after = engine.stats()
    assert after["prefill_passes"] - before["prefill_passes"] == 1  # one pass over the weights for all four
    assert after["graph_passes"] - before["graph_passes"] == captured
    assert all(a.cache.prefix_reused_tokens > 0 for a in answers[:3])


# One row per prompt token (a graph step on CUDA), the eager pass, the pass as captured (on CUDA a graph per token
# bucket; here its body runs eagerly, padded to its bucket, attention's programs from a list of tiles)
@pytest.mark.parametrize("mode", ["rows", "eager", "captured pass"])
def test_follow_ups_joining_decoding_rows_match_as_rows_and_eagerly(load_engine, reference, pages, monkeypatch, mode):
    """Short prefills (follow-ups after cached prefixes, vision tokens of a partial block among them) run in the
    same step as other rows' decoding, one row per token, eagerly (``graph_prefill=False``) or as a captured
    pass."""
    from glyphserve.engine.startup import graph_buckets
    from glyphserve.engine.pass_graphs import PassGraphs

    engine = load_engine(max_num_seqs=4, graph_prefill=mode == "rows")
    if mode == "captured pass":
        engine.core.passes = PassGraphs(engine.runner, 512, 4)
    # Steps padded to a bucket with padding rows, as on CUDA (no graph here: the padded step runs eagerly).
    monkeypatch.setattr(engine.runner, "buckets", graph_buckets(4, engine.runner.max_rows))
    docs = [pages[:1], pages[1:], pages]
    for doc in docs:
        engine.answer(request(doc, "What is this?", n=2))
    first = (pages, "Who pretended to be the grandmother in the story?", 20)
    joining = [(docs[0], "Who?", 6), (docs[1], "Where does the grandmother live?", 12), (docs[2], "Why?", 9)]
    expected = [reference.generate(p, q, max_new_tokens=n, ignore_eos=True)[0] for p, q, n in [first, *joining]]
    offered, calls = list(joining), []

    def admit(free: int) -> list[AnswerRequest]:
        calls.append(free)
        if len(calls) < 3:  # join after a few decode steps
            return []
        taken, offered[:] = offered[:free], offered[free:]
        return [request(p, q, n=n) for p, q, n in taken]

    before = engine.stats()
    done = {i: e.result for i, e in engine.stream_batch([request(*first[:2], n=first[2])], admit=admit)
            if e.channel == "done"}
    assert [done[i].token_ids for i in range(4)] == expected
    assert all(done[i].cache.prefix_reused_tokens > 0 for i in range(4))
    after = engine.stats()
    assert after["prefill_passes"] - before["prefill_passes"] == 2  # the first question, then the three joiners
    assert after["row_chunks"] - before["row_chunks"] == (4 if mode == "rows" else 0)
    assert after["graph_passes"] - before["graph_passes"] == (2 if mode == "captured pass" else 0)


# Chunks after the first through the paged kernel (short; up to PAGED_PREFIX_CHUNK_TOKENS after the first), or
# through SDPA over gathered blocks (longer; with 700 the last chunk too, whose last layer runs its last row only)
@pytest.mark.parametrize("chunk", [37, 100, PAGED_PREFIX_CHUNK_TOKENS + 1, 700])
def test_a_prompt_prefilled_in_chunks_matches(load_engine, reference, chunk):
    """A prompt longer than a step's token budget is prefilled in chunks, each attending to the blocks before it."""
    pages = make_pages([(840, 588), (588, 840)], seed=3)  # 630 vision tokens each
    engine = load_engine(enable_prefix_caching=False, max_prefill_tokens=chunk)
    expected, _ = reference.generate(pages, "Who is the wolf?", max_new_tokens=N, ignore_eos=True)
    answer = engine.answer(request(pages, "Who is the wolf?"))
    assert answer.token_ids == expected
    passes = -(-answer.prompt_tokens // chunk)
    assert passes >= 2 and engine.stats()["prefill_passes"] >= passes
    if chunk == 700:  # the last chunk attends through SDPA
        assert answer.prompt_tokens - (passes - 1) * chunk > PAGED_PREFIX_CHUNK_TOKENS


def record_steps(engine, monkeypatch) -> list[tuple[int, list[int]]]:
    """Each launched step as (decoding rows, [prompt tokens of each chunk])."""
    steps: list[tuple[int, list[int]]] = []
    launch = engine.core._launch

    def recorded(plan, events):
        steps.append((len(plan.decode), [c.end - c.start for c in plan.chunks]))
        return launch(plan, events)

    monkeypatch.setattr(engine.core, "_launch", recorded)
    return steps


def test_a_long_prompt_joining_running_rows_is_prefilled_in_slices_between_their_steps(
        load_engine, reference, pages, monkeypatch):
    engine = load_engine(max_num_seqs=2, max_num_batched_tokens=29)
    running = (pages[:1], "Who?", 24)
    joiner = (pages, "Who pretended to be the grandmother in the story?", 12)
    expected = [reference.generate(p, q, max_new_tokens=n, ignore_eos=True)[0] for p, q, n in (running, joiner)]
    steps = record_steps(engine, monkeypatch)
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
    mixed = [chunks for decoding, chunks in steps[1:] if chunks]
    assert len(mixed) >= 3  # the joiner's prompt went in several slices...
    assert all(decoding == 1 and sum(chunks) <= 28 for decoding, chunks in steps[1:] if chunks)  # ...beside the row


def test_a_long_prompt_sliced_beside_a_decoding_row_through_sdpa_matches(load_engine, reference, monkeypatch):
    """Steps of a decoding row (paged) and a long slice (SDPA) that samples only at the prompt's end: the last
    layer runs for the wanted rows only, the paged row and, at the end, the slice's last row."""
    engine = load_engine(max_num_seqs=2, max_num_batched_tokens=600, graph_prefill=False)
    big = make_pages([(840, 588), (588, 840)], seed=3)
    running = (big[:1], "Who?", 40)
    joiner = (big, "Who pretended to be the grandmother in the story?", 12)
    expected = [reference.generate(p, q, max_new_tokens=n, ignore_eos=True)[0] for p, q, n in (running, joiner)]
    steps = record_steps(engine, monkeypatch)
    offered = [request(*joiner[:2], n=joiner[2])]

    def admit(free: int) -> list[AnswerRequest]:
        return [offered.pop()] if offered and len(steps) >= 3 else []

    tokens = {i: e.result.token_ids for i, e in engine.stream_batch([request(*running[:2], n=running[2])], admit=admit)
              if e.channel == "done"}
    assert [tokens[0], tokens[1]] == expected
    sliced = [chunks for decoding, chunks in steps if decoding and chunks]
    assert len(sliced) >= 2 and all(c[0] > PAGED_PREFIX_CHUNK_TOKENS for c in sliced[:-1])


def test_two_long_prompts_in_one_pass_one_sampling_match(load_engine, reference):
    """One pass holding a whole prompt (it samples) and the start of another (it does not)."""
    engine = load_engine(max_prefill_tokens=1500, enable_prefix_caching=False, graph_prefill=False)
    docs = [make_pages([(840, 588), (588, 840)], seed=s) for s in (3, 4)]
    questions = ["Who is the wolf?", "Where does the grandmother live?"]
    expected = [reference.generate(d, q, max_new_tokens=N, ignore_eos=True)[0] for d, q in zip(docs, questions)]
    answers = engine.answer_batch([request(d, q) for d, q in zip(docs, questions)])
    assert [a.token_ids for a in answers] == expected
    assert engine.stats()["prefill_passes"] == 2 and answers[0].prompt_tokens > 750


def test_a_long_prompt_cancelled_between_its_slices_frees_its_blocks(load_engine, reference, pages):
    engine = load_engine(max_num_seqs=2, max_num_batched_tokens=29)
    expected, _ = reference.generate(pages[:1], "Who?", max_new_tokens=24, ignore_eos=True)
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
    assert engine.stats()["kv_pool"]["in_use"] == 0


def test_rows_preempted_when_blocks_run_out_are_recomputed_and_match(load_engine, reference, pages):
    # 20 usable blocks of 16 tokens: four ~100-token prompts fit, their answers of 120 tokens do not all fit.
    engine = load_engine(num_kv_blocks=41, max_num_seqs=4, max_context=320)
    cases = [(pages[i % 3 : i % 3 + 1], f"Tell me about part {i} of the story.") for i in range(4)]
    expected = [reference.generate(p, q, max_new_tokens=120, ignore_eos=True)[0] for p, q in cases]
    answers = engine.answer_batch([request(p, q, n=120) for p, q in cases])
    assert engine.stats()["preemptions"] > 0
    assert [a.token_ids for a in answers] == expected
    assert engine.stats()["kv_pool"]["in_use"] == 0


def test_a_penalised_row_preempted_and_recomputed_keeps_its_answer_tokens_counted(load_engine, reference, pages):
    """Recomputed after a preemption, a row with a repetition penalty still counts the tokens it generated before
    (Hugging Face's rule penalises every token seen, prompt and answer)."""
    engine = load_engine(num_kv_blocks=41, max_num_seqs=4, max_context=320)
    cases = [(pages[i % 3 : i % 3 + 1], f"Tell me about part {i} of the story.") for i in range(4)]
    expected = []
    for p, q in cases:
        inputs = reference.inputs(p, q)
        with torch.inference_mode():
            out = reference.model.generate(**inputs, max_new_tokens=120, min_new_tokens=120, do_sample=False,
                                           repetition_penalty=1.5)
        expected.append(out[0, inputs["input_ids"].shape[1]:].tolist())
    answers = engine.answer_batch([request(p, q, n=120, repetition_penalty=1.5) for p, q in cases])
    assert engine.stats()["preemptions"] > 0
    assert [a.token_ids for a in answers] == expected


def test_evicted_prefix_blocks_are_rebuilt_and_match(load_engine, reference, pages):
    engine = load_engine(num_kv_blocks=12, max_context=160)  # room for about two documents' prefixes
    first = engine.answer(request(pages[:1], "Who?", n=4))
    for seed in range(2, 7):
        engine.answer(request(make_pages([(168, 196)], seed=seed), "Who?", n=4))  # pushing the first one out
    expected, _ = reference.generate(pages[:1], "Where?", max_new_tokens=N, ignore_eos=True)
    again = engine.answer(request(pages[:1], "Where?"))
    assert first.cache.prefix_reused_tokens == 0 and again.cache.prefix_reused_tokens == 0
    assert engine.stats()["kv_pool"]["evictions"] > 0
    assert again.token_ids == expected


def test_sessions_on_one_document_hold_its_prefix_once(load_engine, reference, pages):
    engine = load_engine(max_num_seqs=16)
    questions = [f"Question {i}: who is the wolf?" for i in range(16)]
    blocks_in_use = []
    for sessions in (1, 16):
        engine.clear_caches()
        peak = 0

        def watch(free: int) -> list[AnswerRequest]:
            nonlocal peak
            peak = max(peak, engine.stats()["kv_pool"]["in_use"])
            return []

        for _ in engine.stream_batch([request(pages, q, n=2) for q in questions[:sessions]], admit=watch):
            pass
        blocks_in_use.append(peak)
    prompt = len(engine.planner.plan(request(pages, questions[0])).prompt.ids)
    block = engine.pool.block_size
    shared = (4 + sum(engine.vision_tokens(p.shape[:2]) + 2 for p in pages)) // block
    # one session: its whole prompt; sixteen: the shared prefix once plus each session's own tail
    assert blocks_in_use[0] == -(-prompt // block)
    assert blocks_in_use[1] <= shared + 16 * (blocks_in_use[0] - shared + 1)
    assert blocks_in_use[1] < 4 * blocks_in_use[0]


def test_a_batch_of_64_matches(load_engine, reference, pages):
    engine = load_engine(max_num_seqs=64)
    cases = [(pages[:1], "Who?"), (pages[1:], "Where does the grandmother live?"), ([], "Tell me a story."),
             (pages, "Why did the wolf run?")]
    expected = [reference.generate(p, q, max_new_tokens=12, ignore_eos=True)[0] for p, q in cases]
    answers = engine.answer_batch([request(*cases[i % 4], n=12) for i in range(64)])
    assert [a.token_ids for a in answers] == [expected[i % 4] for i in range(64)]
    stats = engine.stats()
    assert stats["decode_rows"] / stats["decode_steps"] > 32  # they really decoded together


def test_repetition_penalty_matches_hugging_face(load_engine, reference, pages):
    engine = load_engine()
    inputs = reference.inputs(pages[:1], "Who is the wolf?")
    with torch.inference_mode():
        out = reference.model.generate(**inputs, max_new_tokens=N, min_new_tokens=N, do_sample=False,
                                       repetition_penalty=2.0)
    expected = out[0, inputs["input_ids"].shape[1]:].tolist()
    plain = engine.answer(request(pages[:1], "Who is the wolf?"))
    penalised = engine.answer(request(pages[:1], "Who is the wolf?", repetition_penalty=2.0))
    assert penalised.token_ids == expected and plain.token_ids != expected


def test_a_warmed_document_is_answered_like_a_follow_up_and_exactly(load_engine, reference, pages):
    """Ready at upload: a warm request computes the pages' features and prefix blocks and answers nothing; the
    first question then reuses them (the same tokens as a cold question)."""
    engine = load_engine()
    warmed = engine.answer(AnswerRequest(pages=pages, question="", warm=True))
    assert warmed.token_ids == [] and warmed.cache.vision_misses == 3
    expected, _ = reference.generate(pages, "Who is the wolf?", max_new_tokens=N, ignore_eos=True)
    first = engine.answer(request(pages, "Who is the wolf?"))
    assert first.token_ids == expected
    block = engine.pool.block_size
    prefix = 4 + sum(engine.vision_tokens(p.shape[:2]) + 2 for p in pages)
    assert first.cache.prefix_reused_tokens == prefix // block * block and first.cache.vision_misses == 0


def test_warming_waits_for_questions_and_can_be_cancelled(load_engine, reference, pages):
    engine = load_engine()
    expected, _ = reference.generate(pages[:1], "Who?", max_new_tokens=N, ignore_eos=True)
    events = []
    answered = lambda: any(i == 1 and e.channel == "done" for i, e in events)  # noqa: E731
    cancelled = AnswerRequest(pages=pages[1:], question="", warm=True, cancel=answered)  # deleted meanwhile
    warm = AnswerRequest(pages=pages[2:], question="", warm=True)
    for index, event in engine.stream_batch([warm, request(pages[:1], "Who?"), cancelled]):
        events.append((index, event))
    done = {i: e.result for i, e in events if e.channel == "done"}
    assert done[1].token_ids == expected
    assert done[2].finish_reason == "cancelled"
    assert [i for i, e in events if e.channel == "done"].index(1) < [i for i, e in events if e.channel == "done"].index(0)
    assert engine.stats()["kv_pool"]["in_use"] == 0


def test_a_question_takes_the_only_slot_from_a_warming_document(load_engine, reference, pages):
    """With room for one sequence, a document being warmed gives its slot to a question that arrives, and resumes
    after it (its blocks written so far stay cached)."""
    engine = load_engine(max_num_seqs=1, max_prefill_tokens=32)  # the warming takes several steps
    expected, _ = reference.generate(pages[:1], "Who?", max_new_tokens=N, ignore_eos=True)
    offered = [request(pages[:1], "Who?")]
    steps = []

    def admit(room: int) -> list[AnswerRequest]:
        steps.append(room)
        return [offered.pop()] if len(steps) == 2 and offered else []  # once the warming has begun

    events = list(engine.stream_batch([AnswerRequest(pages=pages, question="", warm=True)], admit=admit))
    done = {i: e.result for i, e in events if e.channel == "done"}
    assert done[1].token_ids == expected and done[0].finish_reason == "stop"
    assert [i for i, e in events if e.channel == "done"] == [1, 0]
    assert engine.stats()["preemptions"] >= 1


def test_a_question_about_a_document_half_warmed_does_not_wait_for_it(load_engine, reference, pages):
    """The warming of a document pauses when a question comes; a question about that very document must not wait
    for blocks the paused warming would write: it computes them itself."""
    engine = load_engine(max_prefill_tokens=16)  # the warming publishes its blocks and writes one a step
    expected, _ = reference.generate(pages, "Who?", max_new_tokens=N, ignore_eos=True)
    offered = [request(pages, "Who?")]
    steps = []

    def admit(room: int) -> list[AnswerRequest]:
        steps.append(room)
        return [offered.pop()] if len(steps) == 2 and offered else []

    events = list(engine.stream_batch([AnswerRequest(pages=pages, question="", warm=True)], admit=admit))
    done = {i: e.result for i, e in events if e.channel == "done"}
    assert done[1].token_ids == expected and done[0].finish_reason == "stop"


@pytest.mark.parametrize("settings", [{}, {"temperature": 1.0, "seed": 7, "repetition_penalty": 1.3,
                                          "logprobs": 2}])
def test_an_answer_resumed_from_its_delivered_tokens_continues_exactly(load_engine, reference, pages, settings):
    """A request carrying the tokens an earlier attempt delivered (its replica died) computes them as context and
    streams only what follows: the whole answer, and the text of both parts, equal one uninterrupted attempt."""
    engine = load_engine()
    whole = list(engine.stream(request(pages, "Who is the wolf?", **settings)))
    deltas, done = whole[:-1], whole[-1].result
    if not settings:
        assert done.token_ids == reference.generate(pages, "Who is the wolf?", max_new_tokens=N, ignore_eos=True)[0]
    cut = len(deltas) // 2
    delivered = [t for e in deltas[:cut] for t in e.tokens]
    assert 0 < len(delivered) < N and sum(len(e.tokens) for e in deltas) <= N
    resumed = request(pages, "Who is the wolf?", **settings)
    resumed.resume_tokens = delivered
    if "logprobs" in settings:
        resumed.resume_logprobs = [lp for e in deltas[:cut] for lp in e.logprobs]
    rest = [e for _, e in engine.stream_batch([engine.plan(resumed)])]  # planned ahead, as a server plans
    assert rest[-1].result.token_ids == done.token_ids and rest[-1].result.text == done.text
    for channel in ("thinking", "answer"):
        assert "".join(e.text for e in rest[:-1] if e.channel == channel) == \
            "".join(e.text for e in deltas[cut:] if e.channel == channel)
    if "logprobs" in settings:
        assert [lp.token_id for lp in rest[-1].result.logprobs] == done.token_ids


@pytest.mark.parametrize("end", ["length", "stop"])
def test_an_answer_resumed_from_all_its_tokens_ends_before_anything_runs(load_engine, pages, end):
    """The replica died between an answer's last delta and its reply: sent again with every token it streamed
    (ending at max_tokens, or at a stop string), the answer ends at once as the first attempt did, nothing sent
    twice."""
    engine = load_engine()
    settings = {}
    if end == "stop":
        text = engine.answer(request(pages, "Who is the wolf?")).text
        settings["stop"] = (text[len(text) // 2 : len(text) // 2 + 3],)
    whole = list(engine.stream(request(pages, "Who is the wolf?", **settings)))
    deltas, done = whole[:-1], whole[-1].result
    assert done.finish_reason == end
    resumed = request(pages, "Who is the wolf?", **settings)
    resumed.resume_tokens = [t for e in deltas for t in e.tokens]
    assert resumed.resume_tokens == done.token_ids
    resumed.resume_shown = {c: sum(len(e.text) for e in deltas if e.channel == c) for c in ("thinking", "answer")}
    rest = list(engine.stream(resumed))
    assert [e.channel for e in rest] == ["done"]
    answer = rest[-1].result
    assert (answer.token_ids, answer.text, answer.finish_reason, answer.stop_reason, answer.new_tokens) == \
        (done.token_ids, done.text, done.finish_reason, done.stop_reason, done.new_tokens)


def test_unwritten_pool_memory_never_reaches_an_answer(load_engine, reference, pages):
    """The KV pool is allocated uninitialised: slots past a sequence's length (the rest of its last block, the
    trash block) may hold anything, NaN included. Rows of different lengths decoding together must not read it
    into their answers (0 * NaN is NaN); filling the pool with NaN makes any such read fail the answer."""
    engine = load_engine()
    for cache in engine.runner.k + engine.runner.v:
        cache.fill_(float("nan"))
    cases = [(pages[:1], "Who?"), (pages, "Who pretended to be the grandmother?"), (pages[1:], "Why?")]
    expected = [reference.generate(p, q, max_new_tokens=N, ignore_eos=True)[0] for p, q in cases]
    assert [a.token_ids for a in engine.answer_batch([request(p, q) for p, q in cases])] == expected


@pytest.mark.parametrize("batch_pages", [1, 2, 3, 8])
def test_pages_of_mixed_grids_in_one_batch_encode_like_hf(load_engine, reference, batch_pages):
    """Pages of several grids, repeated and interleaved, go through the tower ``batch_pages`` at a time (runs of
    one grid attending apart, one of them planned for cuDNN, which the CPU does not have): every page's features
    are HF's, in the order given."""
    from glyphserve.engine.vision import VisionRunner

    engine = load_engine()
    a, b, c = (112, 140), (168, 196), (140, 112)
    pages = make_pages([a, b, a, c, a, b, c], seed=5)
    ref_inputs = reference.processor.image_processor(images=pages, return_tensors="pt")
    with torch.inference_mode():
        ref = reference.model.get_image_features(ref_inputs["pixel_values"], ref_inputs["image_grid_thw"]).pooler_output
    grids = [tuple(g) for g in ref_inputs["image_grid_thw"].tolist()]
    runner = VisionRunner(engine.model, batch_pages, False, planned_grids=[grids[0]])
    patches = grids[0][0] * grids[0][1] * grids[0][2]
    assert runner.planned == {(n, patches) for n in range(1, batch_pages + 1)}
    runner.plan_attention()  # one attention call a planned shape (on the CPU: no plan to build)
    ours = runner.encode(engine.preprocessor(pages), grids)
    for page, (got, want) in enumerate(zip(ours, ref)):
        assert got.shape == want.shape and (got - want).abs().max().item() < 1e-5, page
