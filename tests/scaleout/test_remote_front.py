"""A glyphserve front answering through OpenAI-compatible servers (``--backend openai``): stub servers on loopback
(answers computed from the request), so the front's routing, concurrency and failover are what is tested."""

from __future__ import annotations

import json
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.batch.chat_server import ChatServer
from tests.serve.conftest import STORY
from tests.servers import Server

pytestmark = pytest.mark.timeout(180)


def _dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def _front(tmp_path, *endpoints: str) -> Server:
    return Server(tmp_path / "data", "--backend", "openai", *[a for url in endpoints for a in ("--endpoint", url)],
                  "--replica-concurrency", "4", "--no-ui").start()


@pytest.fixture
def stubs():
    stubs = [ChatServer(delay_s=0.2), ChatServer(delay_s=0.2)]
    yield stubs
    for stub in stubs:
        stub.close()


def _chat(server: Server, document_id: str, question: str, stream: bool) -> dict:
    body = {"question": question, "max_tokens": 32, "stream": stream}
    with server.client() as client:
        if not stream:
            response = client.post(f"/v1/documents/{document_id}/chat", json=body)
            assert response.status_code == 200, response.text
            return response.json()
        answer, done = [], None
        with client.stream("POST", f"/v1/documents/{document_id}/chat", json=body) as response:
            assert response.status_code == 200, response.read()
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line[6:])
                    assert event["type"] != "error", event
                    if event["type"] == "delta" and event["channel"] == "answer":
                        answer.append(event["text"])
                    elif event["type"] == "done":
                        done = event
        assert done is not None and "".join(answer) == done["answer"]
        return done


def test_concurrent_chats_spread_over_the_servers_past_a_dead_one(stubs, tmp_path):
    dead = _dead_url()  # nothing listens there: requests sent to it go to the others
    server = _front(tmp_path, dead, *(stub.url for stub in stubs))
    try:
        _spread(server, stubs, dead)
    finally:
        server.stop()


def _spread(server: Server, stubs: list[ChatServer], dead: str) -> None:
    with server.client() as client:
        document_id = client.post("/v1/documents", json={"text": STORY}).json()["id"]
        pages = client.get(f"/v1/documents/{document_id}").json()["document"]["pages"]
    questions = [f"Question {i}?" for i in range(12)]
    with ThreadPoolExecutor(12) as pool:
        replies = list(pool.map(lambda iq: _chat(server, document_id, iq[1], iq[0] % 2 == 0), enumerate(questions)))
    assert [r["answer"] for r in replies] == [f"answer to: {q}" for q in questions]
    assert all(r["thinking"] == f"{pages} pages to read" for r in replies)  # the stored pages were sent
    assert all(stub.requests for stub in stubs) and max(stub.max_active for stub in stubs) > 1
    health = httpx.get(f"{server.url}/health", timeout=10).json()
    assert health["backend"] == "openai" and health["capacity"] == 3 * 4
    by_url = {e["url"]: e for e in health["endpoints"]}
    assert by_url[dead + "/v1/chat/completions"]["failures"] >= 1  # tried, failed, passed over


def test_an_answer_cut_mid_stream_is_finished_by_another_server(stubs, tmp_path):
    server = _front(tmp_path, *(stub.url for stub in stubs))
    try:
        with server.client() as client:
            document_id = client.post("/v1/documents", json={"text": STORY}).json()["id"]
        for stub in stubs:  # each server sends "<think>" and hangs up once: the answer is cut twice
            stub.plan.append("partial")
        reply = _chat(server, document_id, "Who kept the lighthouse?", stream=True)
        health = httpx.get(f"{server.url}/health", timeout=10).json()
    finally:
        server.stop()
    assert reply["answer"] == "answer to: Who kept the lighthouse?"  # streamed once, nothing repeated
    assert reply["thinking"].endswith("pages to read") and health["resumed"] == 2


def test_a_front_selects_pages_for_the_least_context_its_servers_report(tmp_path):
    """Behind a front no tokenizer counts the prompt: pages are chosen against an upper bound of it for the
    least max_model_len the servers report, and the front reports that length in its own /v1/models."""
    stubs = [ChatServer(max_model_len=4000), ChatServer(max_model_len=2500)]
    front = _front(tmp_path, *(stub.url for stub in stubs))
    try:
        with front.client() as client:
            assert [m["max_model_len"] for m in client.get("/v1/models").json()["data"]] == [2500]
            text = "\n\n".join(f"Part {i}: the lantern at the mill burned until the river rose. " * 8
                               for i in range(240))
            document = client.post("/v1/documents", json={"text": text}).json()
            pages = document["document"]["pages"]
            done = _chat(front, document["id"], "What burned at the mill?", stream=False)
        sent = [part for stub in stubs for body in stub.requests
                for part in body["messages"][0]["content"] if part["type"] == "image_url"]
        assert pages >= 4 and 1 <= len(sent) == len(done["pages_shown"]) < pages
    finally:
        front.stop()
        for stub in stubs:
            stub.close()
