"""Streaming, answers, statistics and cache bounds of the Engine API."""

from __future__ import annotations

import pytest

from glyphserve.engine import AnswerRequest, GenerationSettings
from glyphserve.engine.textstream import ReasoningParser
from tests.engine.conftest import make_pages

PAGES = make_pages([(112, 140), (140, 112)], seed=11)


def test_stream_yields_deltas_then_the_answer(load_engine):
    engine = load_engine()
    events = list(
        engine.stream(AnswerRequest(pages=PAGES, question="Who?", settings=GenerationSettings(max_tokens=30)))
    )
    assert events[-1].channel == "done" and all(e.channel in ("thinking", "answer") for e in events[:-1])
    answer = events[-1].result
    streamed = "".join(e.text for e in events[:-1] if e.channel == "answer")
    assert streamed == answer.text  # the deltas join to the answer exactly
    assert answer.new_tokens == len(answer.token_ids) <= 30
    assert answer.vision_tokens == 40 and answer.pages_used == 2
    assert answer.prompt_tokens == 4 + 2 * (20 + 2) + len(engine.tokenizer("Who?")["input_ids"]) + 2
    t = answer.timings
    assert 0 < t.time_to_first_token <= t.total and t.prefill > 0 and t.vision_encode > 0 and t.preprocess > 0
    # a prompt prefilled in one pass: its stages are spans inside the time to the first token, one after another
    # (read from their marks once it came)
    assert t.preprocess + t.vision_encode + t.prefill <= t.time_to_first_token
    assert answer.peak_gpu_bytes is None  # CPU
    # the answer text is what the reasoning parser makes of the decoded tokens
    parser = ReasoningParser()
    parser.feed(engine.tokenizer.decode(answer.token_ids, skip_special_tokens=True))
    parser.finish()
    assert parser.answer_text == answer.text


def test_sampling_is_seeded(load_engine):
    engine = load_engine()
    settings = GenerationSettings(max_tokens=12, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)
    a = engine.answer(AnswerRequest(pages=PAGES, question="Who?", settings=settings))
    b = engine.answer(AnswerRequest(pages=PAGES, question="Who?", settings=settings))
    assert a.token_ids == b.token_ids and len(a.token_ids) == 12
    greedy = engine.answer(
        AnswerRequest(pages=PAGES, question="Who?", settings=GenerationSettings(max_tokens=12, ignore_eos=True))
    )
    assert greedy.token_ids != a.token_ids


def test_stats_and_byte_bounded_vision_cache(load_engine):
    feature_bytes = 20 * 128 * 4  # one page: 20 tokens x hidden 128 x float32
    engine = load_engine(vision_cache_bytes=feature_bytes * 2, enable_prefix_caching=False)
    pages = make_pages([(112, 140)] * 3, seed=12)
    engine.answer(AnswerRequest(pages=pages, question="Who?", settings=GenerationSettings(max_tokens=2)))
    stats = engine.stats()
    assert stats["vision_cache"]["device"]["entries"] == 2 and stats["vision_cache"]["device"]["evictions"] == 1
    assert stats["vision_cache"]["device"]["bytes"] <= feature_bytes * 2
    assert stats["kv_pool"]["cached"] == 0 and stats["kv_pool"]["in_use"] == 0
    assert stats["requests"] == 1 and stats["device"] == "cpu" and stats["dtype"] == "float32"
    again = engine.answer(
        AnswerRequest(pages=pages[1:], question="Who?", settings=GenerationSettings(max_tokens=2))
    )
    assert (again.cache.vision_hits, again.cache.vision_misses) == (2, 0)


def test_cancel_stops_one_row_of_a_batch_and_spares_the_others(load_engine):
    engine = load_engine()
    settings = GenerationSettings(max_tokens=20, ignore_eos=True)
    polls = []

    def stop_after_five_steps() -> bool:
        polls.append(1)
        return len(polls) > 5

    cancelled, kept = engine.answer_batch(
        [
            AnswerRequest(pages=PAGES, question="Who?", settings=settings, cancel=stop_after_five_steps),
            AnswerRequest(pages=PAGES, question="Where?", settings=settings),
        ]
    )
    # polled once a step: it stops at the step after the sixth poll, its tokens so far those of its full answer
    full = engine.answer(AnswerRequest(pages=PAGES, question="Who?", settings=settings))
    assert cancelled.finish_reason == "cancelled" and 1 <= len(cancelled.token_ids) <= 6
    assert cancelled.token_ids == full.token_ids[: len(cancelled.token_ids)]
    alone = engine.answer(AnswerRequest(pages=PAGES, question="Where?", settings=settings))
    assert kept.finish_reason == "length" and kept.token_ids == alone.token_ids


def test_fp8_weights_answer_end_to_end(load_engine):
    """``quantize="fp8"``: the language model's projections and head are held as e4m3, its embedding table as int8
    rows (the 16-bit copies released), and a whole answer runs through them (on the CPU by dequantizing; on CUDA by
    the weight-streaming kernel)."""
    import torch

    engine = load_engine(quantize="fp8")
    weights = engine.runner.layer_weights[0]
    assert weights[0].dtype == torch.float8_e4m3fn and weights[1].dtype == torch.float32  # qkv and its scales
    assert engine.model.model.language_model.layers[0].mlp.down_proj.weight.numel() == 0
    assert engine.model.lm_head.qweight.dtype == torch.float8_e4m3fn
    embedding = engine.model.model.language_model.embed_tokens
    assert engine.runner.embed is embedding and embedding.qweight.dtype == torch.int8
    assert not any(p.numel() for p in embedding.parameters())
    answer = engine.answer(AnswerRequest(pages=PAGES, question="Who?",
                                         settings=GenerationSettings(max_tokens=12, ignore_eos=True)))
    assert len(answer.token_ids) == 12 and engine.stats()["quantize"] == "fp8"


def test_planned_positions_equal_hf_rope_index(load_engine):
    """The planner keeps a document prefix's M-RoPE positions for its next questions and counts the text after
    it on: every prompt's positions and delta still equal HF's ``get_rope_index`` over the whole prompt."""
    import torch

    from glyphserve.engine import ChatMessage

    engine = load_engine()
    image_id = engine.model.config.image_token_id
    other = make_pages([(168, 196)], seed=3)
    history = [ChatMessage("user", "Who?"), ChatMessage("assistant", "The wolf, then the hunter.")]
    cases = [(PAGES, "Who?", []), (PAGES, "Where did they go, and why?", []), (PAGES, "And then?", history),
             (other + PAGES, "Who?", history), ([], "What is a wolf?", []), (PAGES, "Who?", [])]
    for pages, question, past in cases:
        seq = engine.planner.plan(AnswerRequest(pages=pages, question=question, history=past))
        ids = torch.tensor([seq.prompt.ids])
        grids = torch.tensor(seq.prompt.image_grids) if seq.prompt.image_grids else None
        hf, delta = engine.model.model.get_rope_index(ids, (ids == image_id).long(), image_grid_thw=grids)
        assert torch.equal(seq.positions, hf[:, 0]) and seq.rope_delta == int(delta[0, 0])
    assert len(engine.planner._heads) == 3  # PAGES, other + PAGES, and no pages


def test_warming_without_pages_is_refused(load_engine):
    import pytest

    from glyphserve.errors import GlyphserveError

    with pytest.raises(GlyphserveError, match="pages"):
        load_engine().planner.plan(AnswerRequest(pages=[], question="", warm=True))


def test_a_request_planned_ahead_answers_like_any_and_runs_once(load_engine):
    from glyphserve.errors import GlyphserveError

    engine = load_engine()
    ask = lambda question: AnswerRequest(pages=PAGES, question=question,  # noqa: E731
                                         settings=GenerationSettings(max_tokens=8, ignore_eos=True))
    expected = [engine.answer(ask(q)).token_ids for q in ("Who?", "Where?")]
    planned = [engine.plan(ask(q)) for q in ("Who?", "Where?")]
    before = engine.counters()
    offered = [planned[1]]
    done = {i: e.result.token_ids for i, e in engine.stream_batch(planned[:1], admit=lambda n: offered[:n] and
                                                                  [offered.pop()]) if e.channel == "done"}
    assert [done[0], done[1]] == expected  # one given to stream_batch, one admitted into its batch
    after = engine.counters()
    assert after["planned_ahead"] - before["planned_ahead"] == 2 and after["plan_s"] == before["plan_s"]
    with pytest.raises(GlyphserveError, match="only once"):
        list(engine.stream_batch(planned[:1]))


def test_a_request_planned_ahead_is_timed_from_when_the_engine_takes_it(load_engine):
    """A server plans before its queue: the answer's timings leave the queue's wait out (serve's own queue-time
    metric is what is left of the request's time)."""
    import time

    engine = load_engine()
    planned = engine.plan(AnswerRequest(pages=PAGES, question="Who?", settings=GenerationSettings(max_tokens=4)))
    planned_at = time.perf_counter()
    time.sleep(1.0)  # queued
    answer = next(e.result for _, e in engine.stream_batch([planned]) if e.channel == "done")
    assert answer.timings.total <= time.perf_counter() - planned_at - 1.0


def test_a_top_k_beyond_the_vocabulary_keeps_every_token(load_engine):
    engine = load_engine()
    ask = lambda k: engine.answer(AnswerRequest(pages=PAGES, question="Who?", settings=GenerationSettings(  # noqa
        max_tokens=8, ignore_eos=True, temperature=0.9, top_k=k, seed=5))).token_ids
    assert ask(10**9) == ask(0)


def test_the_engine_times_its_decode_steps(load_engine):
    """Counters for comparing an engine alone with a served one: each decode step from one read-back to the
    next while busy (prompt steps and idle gaps left out), seconds in steps and blocked on the device."""
    engine = load_engine()
    before = engine.counters()
    engine.answer(AnswerRequest(pages=PAGES, question="Who?", settings=GenerationSettings(max_tokens=12,
                                                                                          ignore_eos=True)))
    engine.answer(AnswerRequest(pages=PAGES, question="Where?", settings=GenerationSettings(max_tokens=5,
                                                                                            ignore_eos=True)))
    after = engine.counters()
    assert after["timed_decode_steps"] - before["timed_decode_steps"] == 11 + 4  # every token after the first
    assert after["decode_step_s"] > before["decode_step_s"] and after["step_s"] > before["step_s"]
    assert after["gpu_wait_s"] == before["gpu_wait_s"] == 0  # the CPU has no device to wait for


def test_plain_greedy_rows_beside_sampled_penalised_and_logprob_rows_answer_as_alone(load_engine, monkeypatch):
    """Steps whose rows all take the greedy token keep the step's own tokens without calling the sampler; rows
    that sample, take penalties or want logprobs go through it, in the same batch, all as they would alone."""
    engine = load_engine()
    cases = [("Who?", dict(max_tokens=14)), ("What is it?", dict(max_tokens=3, logprobs=2)),
             ("Where?", dict(max_tokens=5, temperature=0.8, seed=3)),
             ("Why?", dict(max_tokens=9, repetition_penalty=1.3)), ("When?", dict(max_tokens=11))]
    requests = [AnswerRequest(pages=PAGES, question=q, settings=GenerationSettings(ignore_eos=True, **kw))
                for q, kw in cases]
    alone = [engine.answer(r) for r in requests]
    sampler = type(engine.core.sampler)
    calls = []
    original = sampler.__call__
    monkeypatch.setattr(sampler, "__call__", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    together = engine.answer_batch(requests)
    assert [a.token_ids for a in together] == [a.token_ids for a in alone]
    assert [len(a.logprobs or []) for a in together] == [0, 3, 0, 0, 0]
    assert 0 < len(calls) < 14  # the steps after the special rows' last token skip it


def test_an_answer_says_when_each_token_was_read_back(load_engine):
    engine = load_engine()
    answer = engine.answer(AnswerRequest(pages=PAGES, question="Who?", settings=GenerationSettings(
        max_tokens=5, ignore_eos=True)))
    times = answer.token_times
    assert len(times) == answer.new_tokens == 5 and times == sorted(times)
    assert times[0] == pytest.approx(answer.timings.time_to_first_token, abs=1e-3)
    assert times[-1] <= answer.timings.total


def test_the_step_trace_records_what_each_step_ran(load_engine):
    engine = load_engine(step_trace=200)
    assert engine.step_trace() == []
    settings = GenerationSettings(max_tokens=6, ignore_eos=True)
    answers = engine.answer_batch([AnswerRequest(pages=PAGES, question=q, settings=settings) for q in ("Who?", "Why?")])
    steps = engine.step_trace()
    computed = sum(a.prompt_tokens - a.cache.prefix_reused_tokens for a in answers)
    assert sum(s.chunk_tokens for s in steps) == computed and sum(s.chunks for s in steps) >= 2
    assert sum(s.decode_rows for s in steps) == sum(a.new_tokens - 1 for a in answers)  # the first from the prompt
    assert {s.kind for s in steps} <= {"rows", "pass", "none"}  # the CPU captures no graphs
    assert all(s.seconds >= s.wait_s == 0 for s in steps)
    assert all(0 <= s.cpu_s <= s.seconds + 0.01 for s in steps) and sum(s.cpu_s for s in steps) > 0
    assert [s.started for s in steps] == sorted(s.started for s in steps)
    short = load_engine(step_trace=3)
    short.answer(AnswerRequest(pages=PAGES, question="Who?", settings=settings))
    assert len(short.step_trace()) == 3 and short.step_trace()[-1].kind == "none"  # the last: reads the last back
    assert load_engine().step_trace() == []  # off by default


def test_a_stop_token_asked_for_ends_the_answer_under_ignore_eos(load_engine):
    """ignore_eos suppresses the model's stop tokens, not those the request names in stop_token_ids (vLLM's
    rule); the tokens that release no text still reach the stream, with their logprobs."""
    engine = load_engine()
    page = make_pages([(112, 112)], seed=0)
    natural = engine.answer(AnswerRequest(pages=page, question="What?", settings=GenerationSettings(max_tokens=40)))
    assert natural.finish_reason == "stop" and len(natural.token_ids) < 40  # ended by a model stop token
    stop = natural.token_ids[-1]
    # vLLM reports no stop_reason for the tokenizer's end-of-text token, the id of any other stop token
    assert natural.stop_reason == (None if stop == engine.tokenizer.eos_token_id else stop)
    ignored = engine.answer(AnswerRequest(pages=page, question="What?",
                                          settings=GenerationSettings(max_tokens=40, ignore_eos=True)))
    assert ignored.finish_reason == "length" and len(ignored.token_ids) == 40
    events = list(engine.stream(AnswerRequest(pages=page, question="What?", settings=GenerationSettings(
        max_tokens=40, ignore_eos=True, stop_token_ids=(stop,), logprobs=0))))
    asked = events[-1].result
    assert (asked.token_ids, asked.finish_reason, asked.stop_reason) == (natural.token_ids, "stop", stop)
    # an answer that ended at the end-of-text token (resumed from its tokens: the model does not emit it here)
    eos = engine.tokenizer.eos_token_id
    for last, reported in ((eos, None), (stop, stop)):
        ended = engine.answer(AnswerRequest(pages=page, question="What?", settings=GenerationSettings(max_tokens=40),
                                            resume_tokens=[*natural.token_ids[:-1], last]))
        assert (ended.finish_reason, ended.stop_reason) == ("stop", reported)
    streamed = [e for e in events[:-1]]
    assert [t for e in streamed for t in e.tokens] == asked.token_ids  # the stop token included
    assert [lp.token_id for e in streamed for lp in e.logprobs] == asked.token_ids


def test_one_stop_string_is_one_string():
    assert GenerationSettings(stop="END").stop == ("END",)


def test_an_unset_max_tokens_answers_to_the_end_of_the_context(load_engine):
    """vLLM's default for a chat request without max_tokens: the answer may take what the prompt leaves."""
    from glyphserve.errors import ContextOverflowError

    engine = load_engine(max_context=160)
    request = AnswerRequest(pages=PAGES[:1], question="Go on",
                            settings=GenerationSettings(max_tokens=None, ignore_eos=True))
    answer = engine.answer(request)
    assert answer.finish_reason == "length" and answer.prompt_tokens + answer.new_tokens == 160
    fixed = engine.answer(AnswerRequest(pages=PAGES[:1], question="Go on",
                                        settings=GenerationSettings(max_tokens=answer.new_tokens, ignore_eos=True)))
    assert fixed.token_ids == answer.token_ids
    # Pages dropped to fit (truncate_pages) leave an unset answer the room a page choice keeps (ANSWER_ROOM, at most
    # half the context: with a 160-token context that was all of it, and one page that fitted was refused).
    from glyphserve.engine.prompt import ANSWER_ROOM

    small = engine.answer(AnswerRequest(pages=PAGES[:1], question="Go on", settings=GenerationSettings(
        max_tokens=None, ignore_eos=True, truncate_pages=True)))
    assert small.pages_used == 1 and small.prompt_tokens + small.new_tokens == 160
    wide = load_engine(max_context=2 * ANSWER_ROOM + 150)
    kept = wide.answer(AnswerRequest(pages=PAGES * 30, question="Go on", settings=GenerationSettings(
        max_tokens=None, ignore_eos=True, truncate_pages=True)))
    assert 0 < kept.pages_used < 60 and kept.new_tokens >= ANSWER_ROOM and kept.finish_reason == "length"
    with pytest.raises(ContextOverflowError, match="the answer at least one, but the context holds 160"):
        engine.answer(AnswerRequest(pages=PAGES[:1], question="Go on " * 200,
                                    settings=GenerationSettings(max_tokens=None)))


def test_a_question_far_past_the_context_is_refused_before_it_is_tokenized_whole(load_engine):
    """A 1 MB question against a 160-token context: counted a piece at a time and refused within the first pieces
    (tokenized whole, a 10 MB question took 20 s and 1.6 GB of a server before its refusal)."""
    from glyphserve.engine.prompt import PIECE_CHARS
    from glyphserve.errors import ContextOverflowError

    engine = load_engine(max_context=160)
    real = engine.prompts.tokenizer
    seen: list[int] = []

    class Counting:  # the real tokenizer, with the length of each text it tokenizes written down
        def __call__(self, text, **kwargs):
            seen.append(len(text))
            return real(text, **kwargs)

        def __getattr__(self, name):
            return getattr(real, name)

    engine.prompts.tokenizer = Counting()
    with pytest.raises(ContextOverflowError, match="needs more than 160 tokens .*1,000,0"):
        engine.answer(AnswerRequest(pages=PAGES[:1], question="word " * 200_000,
                                    settings=GenerationSettings(max_tokens=4)))
    assert seen and max(seen) <= PIECE_CHARS and sum(seen) <= 2 * PIECE_CHARS
    # a question that fits is tokenized as before
    assert engine.answer(AnswerRequest(pages=PAGES[:1], question="Who?",
                                       settings=GenerationSettings(max_tokens=2, ignore_eos=True))).new_tokens == 2


def test_a_second_stream_from_the_thread_holding_the_first_is_refused_not_a_deadlock(load_engine):
    """One stream runs at a time; the thread whose stream is open opening another (zipping two streams) waited
    on itself for good."""
    from glyphserve.errors import GlyphserveError

    engine = load_engine()
    settings = GenerationSettings(max_tokens=4, ignore_eos=True)
    first = engine.stream(AnswerRequest(pages=PAGES[:1], question="Who?", settings=settings))
    next(first)
    with pytest.raises(GlyphserveError, match="still open"):
        next(engine.stream(AnswerRequest(pages=PAGES[:1], question="Why?", settings=settings)))
    with pytest.raises(GlyphserveError, match="still open"):
        engine.clear_caches()
    first.close()
    assert engine.answer(AnswerRequest(pages=PAGES[:1], question="Why?", settings=settings)).new_tokens == 4
    engine.clear_caches()


def test_a_closed_engine_gives_its_model_back_and_refuses_what_follows(load_engine):
    """A library user loading one engine after another (two configurations in one evaluation) had no way to give
    the first one's weights, KV pool and graphs back but to drop every reference and hope."""
    import gc
    import threading
    import weakref

    from glyphserve.errors import GlyphserveError

    settings = GenerationSettings(max_tokens=4, ignore_eos=True)
    request = AnswerRequest(pages=PAGES[:1], question="Who?", settings=settings)
    with load_engine() as engine:
        first = engine.answer(request)
        model = weakref.ref(engine.model)
        stream = engine.stream(request)
        next(stream)
        with pytest.raises(GlyphserveError, match="still open"):
            engine.close()  # this thread's own stream is open: it would wait on itself
        closer = threading.Thread(target=engine.close)
        closer.start()
        closer.join(timeout=0.5)
        assert closer.is_alive()  # waits for the stream in flight, which ends whole
        assert [e for e in stream if e.channel == "done"][0].result.token_ids == first.token_ids
        closer.join(timeout=30)
        assert not closer.is_alive()
    gc.collect()
    assert model() is None
    for call in (lambda: engine.answer(request), lambda: engine.plan(request), engine.stats, engine.counters,
                 engine.clear_caches):
        with pytest.raises(GlyphserveError, match="closed"):
            call()
    engine.close()  # again: nothing to do
    assert load_engine().answer(request).token_ids == first.token_ids


def test_a_closed_cuda_engine_gives_the_device_memory_back(tiny_model_dir):
    """On a GPU: the captured graphs, compiled layers and caches hold nothing after ``close``."""
    import torch

    from glyphserve.engine import Engine, EngineConfig

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    settings = GenerationSettings(max_tokens=4, ignore_eos=True)

    def held_and_left() -> tuple[int, int]:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        with Engine.load(EngineConfig(model=str(tiny_model_dir), device="cuda", dtype="bfloat16", max_context=2048,
                                      num_kv_blocks=400)) as engine:
            assert engine.answer(AnswerRequest(pages=PAGES[:1], question="Who?", settings=settings)).new_tokens == 4
            held = torch.cuda.memory_allocated() - before
        return held, torch.cuda.memory_allocated() - before

    held_and_left()  # what the process keeps once a GPU has been used (its own state, not an engine's)
    held, left = held_and_left()
    assert left < max(held // 20, 1 << 20), (held, left)


def test_prompt_passes_are_captured_only_as_large_as_a_step_can_be():
    """A captured pass bigger than any step never replays, and its graph's memory is held for good: an engine of one
    sequence never prefills beside a decode, so its prompt budget bounds its passes; with more, the larger budget."""
    from glyphserve.engine import EngineConfig
    from glyphserve.engine.pass_graphs import PASS_GRAPH_TOKENS
    from glyphserve.engine.startup import pass_graph_tokens

    one = EngineConfig(model="m", max_num_seqs=1, max_prefill_tokens=1024, max_num_batched_tokens=2048)
    assert pass_graph_tokens(one, max_context=8192) == 1024
    assert pass_graph_tokens(one, max_context=512) == 512  # a prompt step holds at most a context
    many = EngineConfig(model="m", max_num_seqs=8, max_prefill_tokens=1024, max_num_batched_tokens=1536)
    assert pass_graph_tokens(many, max_context=8192) == 1536
    assert pass_graph_tokens(EngineConfig(model="m"), max_context=16384) == PASS_GRAPH_TOKENS
