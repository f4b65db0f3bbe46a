"""The OpenAI-compatible remote engine against a real HTTP server on loopback."""

from __future__ import annotations

import base64
import io
import json
import socket
import time

import numpy as np
import pytest
from PIL import Image

from glyphserve.engine.remote import RemoteConfig, RemoteEngine
from glyphserve.glm4v import STOP_TOKENS as STOP_SEQUENCES
from glyphserve.engine.types import AnswerRequest, ChatMessage, GenerationSettings
from glyphserve.errors import ContextOverflowError, EngineOutOfMemoryError, GlyphserveError, RemoteBackendError
from tests.batch.chat_server import ChatServer


@pytest.fixture
def server():
    chat = ChatServer()
    yield chat
    chat.close()


def _engine(*urls, **overrides) -> RemoteEngine:
    settings = {"backoff_s": 0.01, "max_backoff_s": 0.05, "connect_timeout_s": 2.0, "read_timeout_s": 5.0} | overrides
    return RemoteEngine.load(RemoteConfig(list(urls), **settings))


def _pages(n: int = 2, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(56 + 28 * i, 84, 3), dtype=np.uint8) for i in range(n)]


def _free_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_stream_sends_pages_and_splits_thinking(server):
    pages = _pages()
    request = AnswerRequest(pages, "Who signed?", page_keys=[f"doc-1:{n}" for n in range(1, len(pages) + 1)],
                            settings=GenerationSettings(max_tokens=64, temperature=0.5, top_p=0.9))
    with _engine(server.url + "/v1") as engine:
        events = list(engine.stream(request))
    body = server.requests[0]
    assert body["model"] == "stub-glyph" and body["stream"] is True
    assert body["max_tokens"] == 64 and body["temperature"] == 0.5 and body["top_p"] == 0.9
    assert body["stop"] == list(STOP_SEQUENCES)
    [message] = body["messages"]
    *images, text = message["content"]
    assert text == {"type": "text", "text": "Who signed?"}
    for page, part in zip(pages, images, strict=True):
        url = part["image_url"]["url"]
        assert url.startswith("data:image/png;base64,")
        decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))
        assert np.array_equal(decoded, page)  # lossless
    assert "".join(e.text for e in events if e.channel == "thinking") == "2 pages to read"
    assert "".join(e.text for e in events if e.channel == "answer") == "answer to: Who signed?"
    result = events[-1].result
    assert events[-1].channel == "done" and result.text == "answer to: Who signed?"
    assert result.thinking == "2 pages to read" and result.finish_reason == "stop"
    assert result.prompt_tokens == 100 and result.new_tokens > 0 and result.pages_used == 2
    assert result.vision_tokens > 0 and result.timings.total >= result.timings.time_to_first_token > 0


def test_reasoning_content_and_history(server):
    server.plan.append("reasoning")
    history = [ChatMessage("user", "First?"), ChatMessage("assistant", "One.")]
    with _engine(server.url) as engine:
        answer = engine.answer(AnswerRequest(_pages(1), "Second?", history=history))
    user, assistant, last = server.requests[0]["messages"]
    assert [p["type"] for p in user["content"]] == ["image_url", "text"]  # pages in the first user turn
    assert assistant == {"role": "assistant", "content": "One."} and last == {"role": "user", "content": "Second?"}
    assert answer.thinking == "1 pages to read" and answer.text == "answer to: Second?"


def test_encoded_pages_are_sent_as_they_are(server):
    from glyphserve.engine.types import EncodedPage

    buffer = io.BytesIO()
    Image.fromarray(_pages(1)[0]).convert("L").save(buffer, format="PNG", optimize=True)
    page = EncodedPage.from_bytes(buffer.getvalue())
    with _engine(server.url) as engine:
        answer = engine.answer(AnswerRequest([page], "Who?", page_keys=["file-doc:1"]))
    [part, _] = server.requests[0]["messages"][0]["content"]
    assert part["image_url"]["url"] == "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    assert answer.pages_used == 1 and answer.vision_tokens > 0


def test_pages_encoded_once_per_document(server):
    pages = _pages(3)
    with _engine(server.url) as engine:
        keys = [f"same:{n}" for n in range(len(pages))]
        engine.answer_batch([AnswerRequest(pages, q, page_keys=keys) for q in ("A?", "B?", "C?")])
        cache = engine.stats()["image_cache"]
    assert cache["misses"] == 1 and cache["hits"] == 2 and cache["documents"] == 1
    urls = [[p["image_url"]["url"] for p in r["messages"][0]["content"][:-1]] for r in server.requests]
    assert urls[0] == urls[1] == urls[2]


def test_retries_before_the_first_token(server):
    server.plan.extend(["status:503", "drop", "status:429", "ok"])
    with _engine(server.url, max_retries=3) as engine:
        answer = engine.answer(AnswerRequest(_pages(1), "Q?"))
        stats = engine.stats()
    assert answer.text == "answer to: Q?"
    assert len(server.requests) == 4 and stats["retries"] == 3 and stats["failures"] == 3


def test_gives_up_with_the_servers_typed_error(server):
    oom = '{"error": "out_of_memory", "message": "GPU out of memory"}'
    server.plan.extend([f"status:503:{oom}"] * 3)
    with _engine(server.url, max_retries=2) as engine, pytest.raises(EngineOutOfMemoryError, match="GPU out of memory"):
        engine.answer(AnswerRequest(_pages(1), "Q?"))
    assert len(server.requests) == 3


def test_client_errors_are_not_retried(server):
    message = "This model's maximum context length is 8192 tokens."
    vllm = json.dumps({"object": "error", "message": message, "type": "BadRequestError", "code": 400})
    server.plan.append(f"status:400:{vllm}")
    with _engine(server.url) as engine, pytest.raises(ContextOverflowError):
        engine.answer(AnswerRequest(_pages(1), "Q?"))
    assert len(server.requests) == 1
    # any other 400 of the server is the request's fault too (a 400 of ours, not a retryable 502 backend_error)
    bad = json.dumps({"object": "error", "message": "temperature must be in [0, 2]", "type": "BadRequestError",
                      "code": 400})
    server.plan.append(f"status:400:{bad}")
    with _engine(server.url) as engine, pytest.raises(GlyphserveError, match="temperature must be") as refused:
        engine.answer(AnswerRequest(_pages(1), "Q?"))
    assert refused.value.http_status == 400 and refused.value.code == "invalid_request"
    assert len(server.requests) == 2


def test_no_retry_once_tokens_arrived(server):
    server.plan.append("partial")
    with _engine(server.url) as engine:
        events = engine.stream(AnswerRequest(_pages(1), "Q?"))
        with pytest.raises(RemoteBackendError, match="mid-answer"):
            list(events)
    assert len(server.requests) == 1


def test_read_timeout(server):
    server.plan.append("sleep:3")
    started = time.monotonic()
    with _engine(server.url, read_timeout_s=0.5) as engine, pytest.raises(RemoteBackendError, match="read timeout"):
        engine.answer(AnswerRequest(_pages(1), "Q?"))
    assert time.monotonic() - started < 2.5
    assert len(server.requests) == 1  # a slow server is not sent the same work again


def test_answer_batch_is_concurrent_and_ordered():
    slow = ChatServer(delay_s=0.3)
    try:
        questions = [f"Q{i}?" for i in range(6)]
        with _engine(slow.url) as engine:
            answers = engine.answer_batch([AnswerRequest(_pages(1, seed=i), q) for i, q in enumerate(questions)])
        assert [a.text for a in answers] == [f"answer to: {q}" for q in questions]
        assert slow.max_active > 1
    finally:
        slow.close()


def test_spreads_over_endpoints_and_skips_a_dead_one(server):
    other = ChatServer()
    dead = _free_port_url()
    try:
        with _engine(dead, server.url, other.url) as engine:
            answers = engine.answer_batch([AnswerRequest(_pages(1), f"Q{i}?") for i in range(8)])
            stats = engine.stats()
        assert all(a.text.startswith("answer to: Q") for a in answers)
        assert server.requests and other.requests
        assert stats["endpoints"][0]["requests"] == stats["endpoints"][0]["failures"]
    finally:
        other.close()
    with pytest.raises(RemoteBackendError, match="no endpoint can be used"):
        _engine(dead)


def test_a_refused_api_key_and_a_missing_model_list_are_named_as_such(server):
    keyed = ChatServer(api_key="sekrit")
    try:
        with pytest.raises(RemoteBackendError) as err:
            _engine(keyed.url, api_key="wrong")
        assert err.value.message == (f"no endpoint can be used: {keyed.url}/v1 refused the API key "
                                     "(401 Unauthorized): give the key it was started with")
        with _engine(keyed.url, api_key="sekrit") as engine:
            assert engine.answer(AnswerRequest(_pages(1), "Q?")).text == "answer to: Q?"
    finally:
        keyed.close()
    with pytest.raises(RemoteBackendError) as err:
        _engine(server.url + "/elsewhere/v1")  # answers, but has no model list there
    assert err.value.message == (f"no endpoint can be used: {server.url}/elsewhere/v1/models did not name a model "
                                 "(404 Not Found); pass --remote-model")


def test_a_greedy_answer_cut_mid_stream_is_finished_by_another_endpoint(server):
    other = ChatServer()
    server.plan.append("partial")  # "<think>", then the connection drops
    try:
        with _engine(server.url, other.url, resume_greedy=True) as engine:  # the least busy: the first
            events = list(engine.stream(AnswerRequest(_pages(1), "Q?")))
            stats = engine.stats()
        thinking = "".join(e.text for e in events if e.channel == "thinking")
        assert thinking == "1 pages to read" and events[-1].result.text == "answer to: Q?"  # nothing twice
        assert stats["resumed"] == 1 and len(server.requests) == len(other.requests) == 1
    finally:
        other.close()


def test_a_server_down_at_load_reports_its_context_once_it_answers():
    long = ChatServer(model="glyph", max_model_len=32768)
    url = _free_port_url()
    revived = None
    try:
        engine = _engine(long.url, url, model="glyph", down_s=0.0)
        assert engine.max_context is None  # the second server, down, might hold less
        revived = ChatServer(model="glyph", max_model_len=8192, port=int(url.rsplit(":", 1)[1]))
        for _ in range(4):  # the least busy endpoint first: both get questions
            assert engine.answer(AnswerRequest(_pages(1), "Q?")).text == "answer to: Q?"
        assert revived.requests and engine.max_context == 8192
        engine.close()
    finally:
        long.close()
        if revived is not None:
            revived.close()


def test_the_context_is_the_least_every_server_reports():
    """Pages are chosen for ``max_context``: known only when every server says its max_model_len (one that does
    not, or could not be reached, might hold less), capped by the configured one."""
    from glyphserve.engine.prompt import page_budget

    long, short, silent = ChatServer(max_model_len=32768), ChatServer(max_model_len=8192), ChatServer()
    try:
        assert _engine(long.url).max_context == 32768
        assert _engine(long.url, short.url).max_context == 8192
        assert _engine(long.url, silent.url).max_context is None
        assert _engine(long.url, _free_port_url(), model="glyph").max_context is None  # one down at load
        assert _engine(long.url, silent.url, max_context=4096).max_context == 4096
        assert _engine(short.url, max_context=16384).max_context == 8192
        engine = _engine(short.url)
        budget = page_budget(engine, [], "Who?", max_tokens=512)
        assert budget.limit == 8192 - 512 and budget.count_prompt(["", ""]) >= 6 + 4 + 4  # template, text, markers
        history = [ChatMessage("user", "x" * 8000)]  # over the bound: the server judges (every page goes)
        assert page_budget(engine, history, "Who?", max_tokens=512) is None
    finally:
        for chat in (long, short, silent):
            chat.close()


def test_a_servers_logprob_bytes_are_kept():
    from glyphserve.engine.remote import _logprobs
    from glyphserve.serve.openai_compat import logprobs

    chunk = {"logprobs": {"content": [{"token": "\ufffd", "logprob": -0.5, "bytes": [232],
                                       "top_logprobs": [{"token": "\ufffd", "logprob": -0.5, "bytes": [232]},
                                                        {"token": "a", "logprob": -2.0}]}]}}
    (token,) = _logprobs(chunk)
    assert token.bytes == [232] and [t[3] for t in token.top] == [[232], None]
    sent = logprobs([token])["content"][0]  # passed on as they came; text's UTF-8 where the server gave none
    assert sent["bytes"] == [232] and [t["bytes"] for t in sent["top_logprobs"]] == [[232], [97]]


def test_ignore_eos_sends_no_turn_markers_as_stop_strings_but_the_requests_own(server):
    """``ask --endpoint URL --ignore-eos``: the server still stopped at the model's turn markers, sent as stop
    strings, so the answer was not the max_tokens it asked for."""
    settings = GenerationSettings(max_tokens=8, ignore_eos=True, stop=("END",))
    with _engine(server.url + "/v1") as engine:
        engine.answer(AnswerRequest(_pages(1), "Who?", settings=settings))
    body = server.requests[0]
    assert body["stop"] == ["END"] and body["ignore_eos"] is True
