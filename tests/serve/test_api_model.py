"""The HTTP API of a real server process answering with the tiny random GLM-4.1V on the CPU."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import re
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.serve.conftest import Server
from tests.serve.test_api import sse_events, upload_text

TEXTS = [
    "Edwin Marsh kept the lighthouse at Carrow Point for thirty years.",
    "The schooner Albatross struck the rocks in the winter storm of 1887.",
    "Eleven sailors were rescued before dawn by a single rowing boat.",
    "The harbour master gave a silver compass engraved: for courage at sea.",
]
QUESTIONS = ["Who kept the lighthouse?", "What happened in 1887?"]


def wait_warm(client: httpx.Client, document_id: str) -> None:
    """Until the engine has warmed the document (its pages' features and prefix KV computed at upload)."""
    deadline = time.monotonic() + 120
    while client.get(f"/v1/documents/{document_id}").json()["warm"] != "warm":
        assert time.monotonic() < deadline, "the document was never warmed"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def documents(model_server) -> list[str]:
    """The four documents, warmed: background warming would otherwise add to the engine's counters mid-test."""
    with model_server.client() as client:
        ids = [upload_text(client, text)["id"] for text in TEXTS]
        for document_id in ids:
            wait_warm(client, document_id)
        return ids


@pytest.fixture
def client(model_server):
    with model_server.client() as c:
        yield c


def ask(client: httpx.Client, document_id: str, question: str, **settings) -> dict:
    response = client.post(f"/v1/documents/{document_id}/chat",
                           json={"question": question, "max_tokens": 12, **settings})
    assert response.status_code == 200, response.text
    return response.json()


def test_health_names_the_model(client, documents):
    health = client.get("/health").json()
    assert health["backend"] == "engine" and health["notice"] is None
    assert (health["dtype"], health["quantize"]) == ("float32", None)  # what the weights are, seen from outside
    before = health["engine"]
    ask(client, documents[3], QUESTIONS[0], max_tokens=5)
    after = client.get("/health").json()["engine"]
    assert after["requests"] == before["requests"] + 1 and after["new_tokens"] >= before["new_tokens"] + 4
    assert after["decode_steps"] > before["decode_steps"] and after["prefill_passes"] == before["prefill_passes"] + 1
    steps = client.get("/v1/engine/steps")  # kept only with --step-trace N (bench serve --step-trace)
    assert steps.status_code == 404 and "--step-trace N" in steps.json()["error"]["message"]


def test_streamed_answer_with_timings_and_cache(client, documents):
    doc_id = documents[0]
    with client.stream("POST", f"/v1/documents/{doc_id}/chat",
                       json={"question": "Who kept it?", "max_tokens": 10, "stream": True}) as response:
        assert response.status_code == 200
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    done = events[-2]
    assert done["type"] == "done" and done["backend"] == "engine" and done["notice"] is None
    streamed = "".join(e["text"] for e in events if isinstance(e, dict) and e.get("channel") == "answer")
    assert streamed == done["answer"]  # the deltas join to the answer exactly, edges included
    assert done["usage"]["completion_tokens"] <= 10 and done["usage"]["vision_tokens"] > 0
    for stage in ("prefill", "decode", "time_to_first_token", "total"):
        assert done["timings"][stage] > 0
    again = ask(client, doc_id, "Who kept it?", max_tokens=10)
    # its pages were encoded (or looked up), unless warming at upload had already put them in the KV pool
    assert done["cache"]["vision_misses"] + done["cache"]["vision_hits"] >= 1 or done["cache"]["prefix_reused_tokens"]
    # The document's pages are now a cached prefix: neither encoded nor prefilled again.
    assert again["cache"]["prefix_reused_tokens"] > 0 and again["cache"]["vision_misses"] == 0
    assert again["answer"] == done["answer"]
    metrics = client.get("/metrics").text
    assert metric(metrics, "vllm:prefix_cache_hits_total") > 0
    assert metric(metrics, "vllm:mm_cache_queries_total") > 0
    assert 'glyphserve_stage_seconds_count{stage="decode"}' in metrics


def metric(text: str, name: str) -> float:
    """The value of an unlabelled-but-model_name sample in a /metrics page."""
    match = re.search(rf'^{re.escape(name)}\{{model_name="glyph"\}} (\S+)$', text, re.M)
    assert match, name
    return float(match.group(1))


def test_metrics_a_vllm_dashboard_reads(client, documents):
    per_token = ("vllm:inter_token_latency_seconds_count", "vllm:time_per_output_token_seconds_count")
    per_answer = "vllm:request_time_per_output_token_seconds_count"
    before = {name: metric(client.get("/metrics").text, name) for name in (*per_token, per_answer)}
    ask(client, documents[0], QUESTIONS[0], max_tokens=6)
    text = client.get("/metrics").text
    # vLLM V1's names: per token after the first (time_per_output_token is inter_token_latency's old name), and
    # the answer's mean once
    assert [metric(text, name) - before[name] for name in (*per_token, per_answer)] == [5, 5, 1]
    for name in ("vllm:time_to_first_token_seconds_count", "vllm:e2e_request_latency_seconds_count",
                 "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total", "vllm:request_queue_time_seconds_count"):
        assert metric(text, name) > 0, name
    assert metric(text, "vllm:num_requests_running") == 0 and metric(text, "vllm:num_requests_waiting") == 0
    assert 'vllm:request_success_total{finished_reason="length",model_name="glyph"}' in text
    assert 'vllm:request_success_total{finished_reason="abort",model_name="glyph"}' in text  # at 0 from the start
    assert "process_resident_memory_bytes" in text and "_created" not in text
    # the engine's own: the KV pool's use (the documents' prefixes are cached, not in use, between requests)
    assert 0 <= metric(text, "vllm:kv_cache_usage_perc") < 1 and metric(text, "vllm:num_preemptions_total") >= 0


def test_a_request_answered_beside_a_running_one_no_longer_counts_as_running(model_server, client, documents):
    before = cancelled_count(client)
    with long_answer(model_server, documents[0], 3000, lines_read=3):
        ask(client, documents[1], QUESTIONS[0], max_tokens=4)  # joins the decoding batch and ends first
        assert metric(client.get("/metrics").text, "vllm:num_requests_running") == 1
    wait_for_cancel(client, before)


def test_openai_client_with_page_images(model_server, client, documents):
    png = client.get(f"/v1/documents/{documents[1]}/pages/1.png").content
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}}
    messages = [{"role": "user", "content": [image, {"type": "text", "text": "What struck the rocks?"}]}]
    oc = openai.OpenAI(base_url=f"{model_server.url}/v1", api_key="unused", max_retries=0)
    result = oc.chat.completions.create(model="glyph", messages=messages, max_tokens=8, temperature=0)
    assert result.usage.completion_tokens <= 8 and result.usage.prompt_tokens > 0
    chunks = list(oc.chat.completions.create(model="glyph", messages=messages, max_completion_tokens=8,
                                             stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == result.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == result.usage.completion_tokens
    # The same pages as a stored document give the same answer.
    by_document = oc.chat.completions.create(
        model="glyph", messages=[{"role": "user", "content": "What struck the rocks?"}], max_tokens=8,
        extra_body={"document": documents[1]})
    assert by_document.choices[0].message.content == result.choices[0].message.content
    with pytest.raises(openai.BadRequestError):
        oc.chat.completions.create(model="glyph", max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/page.png"}},
            {"type": "text", "text": "Read it"}]}])


def test_images_kept_by_truncate_pages_are_named_in_the_reply(client):
    """Three pages of ~1,500 vision tokens each in a 4,096-token context: the first two are read, and the reply
    says so (the images dropped were not visible in the reply before)."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (1176, 1036), "white").save(out, format="PNG")  # 42 x 37 merged patches: 1,554 tokens
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(out.getvalue())
                                                .decode()}}
    body = {"model": "glyph", "max_tokens": 8, "truncate_pages": True,
            "messages": [{"role": "user", "content": [image, image, image, {"type": "text", "text": "Read it"}]}]}
    reply = client.post("/v1/chat/completions", json=body).json()
    assert reply["pages_shown"] == [1, 2] and reply["usage"]["prompt_tokens"] > 3000
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    assert [c["pages_shown"] for c in chunks if "pages_shown" in c] == [[1, 2]]
    refused = client.post("/v1/chat/completions", json={**body, "truncate_pages": False})
    assert refused.status_code == 400 and "first 2 of 3 pages" in refused.json()["error"]["message"]


def test_an_image_too_large_for_the_context_is_told_to_be_sent_smaller(client):
    """The image, not the question, is what does not fit (the advice was to shorten the question)."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (2000, 2000), "white").save(out, format="PNG")
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(out.getvalue())
                                                .decode()}}
    refused = client.post("/v1/chat/completions", json={"model": "glyph", "max_tokens": 8, "messages": [
        {"role": "user", "content": [image, {"type": "text", "text": "hi"}]}]})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded"
    assert "send a smaller image of it" in refused.json()["error"]["message"], refused.text


def cancelled_count(client: httpx.Client) -> float:
    match = re.search(r"^glyphserve_requests_cancelled_total (\S+)", client.get("/metrics").text, re.M)
    return float(match.group(1))


def wait_for_cancel(client: httpx.Client, before: float, seconds: float = 60) -> None:
    """The worker counts a cancellation when it stops the generation (at the next streamed text)."""
    deadline = time.monotonic() + seconds
    while cancelled_count(client) <= before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cancelled_count(client) > before


@contextlib.contextmanager
def long_answer(server: Server, document_id: str, max_tokens: int, lines_read: int) -> Iterator[Iterator[str]]:
    """A streamed answer of ``max_tokens`` tokens, open once ``lines_read`` SSE lines arrived; yields the rest."""
    body = {"model": "glyph", "messages": [{"role": "user", "content": "Tell a long story"}],
            "document": document_id, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, timeout=120) as streaming:
        with streaming.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            for _ in range(lines_read):
                next(lines)
            yield lines


def test_client_disconnect_stops_the_generation(model_server, client, documents):
    before = cancelled_count(client)
    with long_answer(model_server, documents[2], 3000, lines_read=3):
        pass  # the client goes away mid-answer
    wait_for_cancel(client, before)
    assert ask(client, documents[2], "Who was rescued?", max_tokens=4)["answer"] is not None


def test_a_client_gone_before_a_plain_reply_stops_its_generation(model_server, client, documents):
    """A non-streaming answer whose client hangs up (here: its read times out) is cancelled in the engine, not
    decoded to its last token; the server notices through the connection's disconnect, not by polling."""
    before = cancelled_count(client)
    body = {"model": "glyph", "messages": [{"role": "user", "content": "Tell a long story"}],
            "document": documents[2], "max_tokens": 3000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{model_server.url}/v1/chat/completions", json=body, timeout=1.5)
    wait_for_cancel(client, before)
    assert ask(client, documents[2], "Who was rescued?", max_tokens=4)["answer"] is not None


def running(client: httpx.Client) -> float:
    return float(re.search(r"^vllm:num_requests_running\S* (\S+)", client.get("/metrics").text, re.M).group(1))


def test_stopping_the_server_ends_the_answers_in_flight_with_an_error_they_can_tell(tmp_path, tiny_model_dir):
    """Ctrl-C: answers in flight get --shutdown-timeout to finish, then a stream's last event is a 503 error
    (the connection used to be dropped mid-stream, which a client can take for a whole answer), and a waiting
    non-streaming request gets its 503."""
    server = Server(tmp_path / "data", str(tiny_model_dir), "--served-model-name", "glyph", "--device", "cpu",
                    "--no-ui", "--shutdown-timeout", "1").start()
    try:
        with server.client() as c:
            doc_id = upload_text(c, TEXTS[0])["id"]
            body = {"model": "glyph", "messages": [{"role": "user", "content": "Go on"}], "document": doc_id,
                    "max_tokens": 3000, "ignore_eos": True}
            with ThreadPoolExecutor(1) as pool:
                plain = pool.submit(lambda: httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60))
                with long_answer(server, doc_id, 3000, lines_read=2) as lines:
                    deadline = time.monotonic() + 60
                    while running(c) < 2:
                        assert time.monotonic() < deadline and not plain.done()
                        time.sleep(0.05)
                    stopped = time.monotonic()
                    server.process.send_signal(signal.SIGINT)
                    rest = [line for line in lines if line]
                cut = plain.result()
            assert server.process.wait(timeout=30) in (0, 130)  # 130: the shell's code for an end by Ctrl-C
    finally:
        server.stop()
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2].removeprefix("data: "))["error"]
    assert error["code"] == "shutting_down" and error["type"] == "server_error" and "cut off" in error["message"]
    assert cut.status_code == 503 and cut.json()["error"]["code"] == "shutting_down"
    assert time.monotonic() - stopped < 20
    # the log says so, and every line of it has its time
    log = server.log()
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ WARNING: .*2 request\(s\) still unanswered after 1 s "
                     r"were cut off$", log, re.M), log[-2000:]
    assert re.search(r'^\d{4}-\d\d-\d\d [\d:,]+ INFO: .* "POST /v1/documents HTTP/1.1" 201', log, re.M)


def decoded_with_others(client: httpx.Client) -> float:
    """Requests that started in a batch of several or joined one already decoding (from /metrics)."""
    text = client.get("/metrics").text
    value = {name: float(re.search(rf"^{name} (\S+)", text, re.M).group(1))
             for name in ("glyphserve_batch_size_count", "glyphserve_requests_joined_total")}
    singles = float(re.search(r'^glyphserve_batch_size_bucket\{le="1.0"\} (\S+)', text, re.M).group(1))
    return value["glyphserve_batch_size_count"] - singles + value["glyphserve_requests_joined_total"]


def test_concurrent_clients_get_their_own_answers(model_server, client, documents):
    """64 concurrent clients over 4 documents with the default flags: nothing lost, nothing mixed up, and they
    really decode together."""
    reference = {(d, q): ask(client, d, q)["answer"] for d in documents for q in QUESTIONS}
    work = [(documents[i % 4], QUESTIONS[(i // 4) % 2], i % 4 == 3) for i in range(64)]
    before = client.get("/health").json()["engine"]
    barrier = threading.Barrier(len(work))

    def one(item):
        doc_id, question, stream = item
        with httpx.Client(base_url=model_server.url, timeout=180) as c:
            barrier.wait(timeout=30)
            payload = {"question": question, "max_tokens": 12, "stream": stream}
            if not stream:
                response = c.post(f"/v1/documents/{doc_id}/chat", json=payload)
                assert response.status_code == 200, response.text
                return response.json()["answer"]
            with c.stream("POST", f"/v1/documents/{doc_id}/chat", json=payload) as response:
                assert response.status_code == 200
                return sse_events(response)[-2]["answer"]

    started = time.monotonic()
    with ThreadPoolExecutor(len(work)) as pool:
        answers = list(pool.map(one, work, timeout=240))
    assert len(answers) == 64
    for (doc_id, question, _), answer in zip(work, answers):
        assert answer == reference[(doc_id, question)]
    assert time.monotonic() - started < 240
    after = client.get("/health").json()["engine"]
    rows = after["decode_rows"] - before["decode_rows"]
    steps = after["decode_steps"] - before["decode_steps"]
    assert rows / steps > 16  # rows busy per decode step
    # every question came planned from the request threads, none on the engine's
    assert after["planned_ahead"] - before["planned_ahead"] == after["requests"] - before["requests"] == 64


def test_flood_past_the_queue_gets_429_then_recovers(tmp_path, tiny_model_dir):
    server = Server(tmp_path / "data", str(tiny_model_dir), "--served-model-name", "glyph", "--device", "cpu", "--no-ui",
                    "--queue-size", "2", "--max-batch", "1", "--request-timeout", "2").start()
    try:
        with server.client() as c:
            doc_id = upload_text(c, TEXTS[0])["id"]
            ask(c, doc_id, "Who?", max_tokens=4)  # warm the vision cache

            def one(_):
                with httpx.Client(base_url=server.url, timeout=60) as fresh:
                    return fresh.post(f"/v1/documents/{doc_id}/chat", json={"question": "Who?", "max_tokens": 4})

            with ThreadPoolExecutor(24) as pool:
                responses = list(pool.map(one, range(24)))
            statuses = [r.status_code for r in responses]
            assert set(statuses) <= {200, 429} and statuses.count(429) > 0 and statuses.count(200) >= 3
            refused = next(r for r in responses if r.status_code == 429)
            assert int(refused.headers["Retry-After"]) >= 1 and refused.json()["error"]["code"] == "queue_full"
            assert refused.json()["error"]["type"] == "rate_limit_error"
            assert ask(c, doc_id, "Who?", max_tokens=4)["answer"] is not None

            # Past --request-timeout: 504, and the generation is stopped, not left running.
            before = cancelled_count(c)
            slow = c.post("/v1/chat/completions", json={
                "model": "glyph", "messages": [{"role": "user", "content": "Go on"}], "document": doc_id,
                "max_tokens": 3000, "ignore_eos": True})
            assert slow.status_code == 504 and slow.json()["error"]["code"] == "timeout"
            wait_for_cancel(c, before)
            assert ask(c, doc_id, "Who?", max_tokens=4)["answer"] is not None
    finally:
        server.stop()


def test_concurrent_streams_are_decoded_together(model_server, client, documents):
    """Streaming clients are batched too, and each stream carries its own answer."""

    reference = {d: ask(client, d, QUESTIONS[0])["answer"] for d in documents}
    before = decoded_with_others(client)
    barrier = threading.Barrier(8)

    def one(doc_id):
        with httpx.Client(base_url=model_server.url, timeout=180) as c:
            barrier.wait(timeout=30)
            payload = {"question": QUESTIONS[0], "max_tokens": 12, "stream": True}
            with c.stream("POST", f"/v1/documents/{doc_id}/chat", json=payload) as response:
                assert response.status_code == 200
                events = sse_events(response)
        deltas = [e for e in events[:-1] if e["type"] == "delta" and e["channel"] == "answer"]
        streamed = "".join(e["text"] for e in deltas)
        return streamed, events[-2]["answer"]

    work = [documents[i % 4] for i in range(8)]
    with ThreadPoolExecutor(len(work)) as pool:
        results = list(pool.map(one, work, timeout=240))
    for doc_id, (streamed, final) in zip(work, results):
        assert final == reference[doc_id] and streamed == final.strip()
    assert decoded_with_others(client) > before


def test_a_short_question_joins_a_long_answer_and_finishes_first(model_server, client, documents):
    """Continuous batching: a request arriving mid-generation does not wait for the running answer."""
    reference = ask(client, documents[1], QUESTIONS[1], max_tokens=4)["answer"]
    before = decoded_with_others(client)
    with long_answer(model_server, documents[0], 400, lines_read=6) as lines:  # the long answer is decoding
        short = ask(client, documents[1], QUESTIONS[1], max_tokens=4)
        assert short["answer"] == reference
        rest = list(lines)  # the long answer was still streaming after the short one finished
    assert sum(line.startswith("data: {") for line in rest) > 20 and "data: [DONE]" in rest
    assert decoded_with_others(client) > before


def test_a_question_too_long_for_the_context_is_refused_without_harming_the_running_answer(
        model_server, client, documents):
    reference = ask(client, documents[1], QUESTIONS[1], max_tokens=4)["answer"]
    with long_answer(model_server, documents[0], 300, lines_read=6) as lines:  # joins the running decode
        refused = client.post(f"/v1/documents/{documents[1]}/chat",
                              json={"question": "why " * 6000, "max_tokens": 4})
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert error["code"] == "context_length_exceeded" and error["type"] == "invalid_request_error"
        rest = list(lines)
    assert sum(line.startswith("data: {") for line in rest) > 20 and "data: [DONE]" in rest
    assert not any('"error"' in line for line in rest)
    assert ask(client, documents[1], QUESTIONS[1], max_tokens=4)["answer"] == reference


def test_ask_with_an_endpoint_asks_the_running_server(model_server, tmp_path, capsys):
    from glyphserve.cli import main

    story = tmp_path / "story.txt"
    story.write_text(TEXTS[1], encoding="utf-8")
    assert main(["ask", str(story), "What struck the rocks?", "--endpoint", f"{model_server.url}/v1",
                 "--max-new-tokens", "4", "--ignore-eos", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["new_tokens"] == 4 and result["engine"]["endpoints"][0]["model"] == "glyph"


def test_a_document_is_warmed_at_upload_and_its_first_question_reuses_it(model_server, client):
    """Ready at upload: the upload answers at once, the engine computes the pages' features and prefix KV in the
    background, and the first question then prefills only its own tokens; its answer is the cold answer."""
    text = "The harbour of Carrow Point froze in the winter of 1891; the keeper walked to the mainland."
    requests = metric(client.get("/metrics").text, "vllm:e2e_request_latency_seconds_count")
    created = upload_text(client, text)
    assert created["warm"] in ("warming", "warm")
    doc_id = created["id"]
    wait_warm(client, doc_id)
    # the warm-up is no request in the metrics a vLLM dashboard reads
    assert metric(client.get("/metrics").text, "vllm:e2e_request_latency_seconds_count") == requests
    first = ask(client, doc_id, QUESTIONS[0])
    assert first["cache"]["prefix_reused_tokens"] > 0 and first["cache"]["vision_misses"] == 0
    # an upload deleted while it warms is gone (its warming cancelled); a new upload answers the same
    other = upload_text(client, text + " ")
    client.delete(f"/v1/documents/{other['id']}")
    assert client.get(f"/v1/documents/{other['id']}").status_code == 404
    again = upload_text(client, text + " ")
    assert ask(client, again["id"], QUESTIONS[0])["answer"] == first["answer"]


def test_warmth_after_a_restart_comes_from_a_question_or_an_upload_again(tmp_path, tiny_model_dir):
    """A restarted server has read nothing: its documents are cold (listed so too); a question about all of a
    document's pages leaves it warm, and an upload of one again warms it (both stayed "cold" for good)."""
    server = Server(tmp_path / "data", str(tiny_model_dir), "--served-model-name", "glyph", "--device", "cpu",
                    "--no-ui").start()
    try:
        with server.client() as c:
            first, second = (upload_text(c, text)["id"] for text in TEXTS[:2])
            wait_warm(c, first)
            wait_warm(c, second)
        server.stop()
        server.start()
        with server.client() as c:
            listed = c.get("/v1/documents").json()
            assert {d["id"]: d["warm"] for d in listed["documents"]} == {first: "cold", second: "cold"}
            assert listed["total"] == 2
            assert ask(c, first, "Who?", max_tokens=4)["pages_shown"] == [1]
            assert c.get(f"/v1/documents/{first}").json()["warm"] == "warm"
            again = c.post("/v1/documents", json={"text": TEXTS[1]}).json()
            assert again["deduplicated"] and again["warm"] in ("warming", "warm")
            wait_warm(c, second)
    finally:
        server.stop()
