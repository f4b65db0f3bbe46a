"""Documents longer than the context and questions over collections, through a real server's API: the extractive
default and the tiny random GLM-4.1V on the CPU (its context holds about 7 rendered pages)."""

from __future__ import annotations

import httpx
import pytest

from tests.serve.test_api import sse_events, upload_text

PARAGRAPH = "Paragraph {n} describes the fields, the rivers and the weather of the valley in spring."


def long_text(needle: str, at: float, paragraphs: int = 1000) -> str:
    """About 12 rendered pages of filler with ``needle`` at the fraction ``at`` of it."""
    parts = [PARAGRAPH.format(n=n) for n in range(paragraphs)]
    parts.insert(int(at * paragraphs), needle)
    return "\n\n".join(parts)


def page_of(document: dict, text: str, needle: str) -> int:
    start = text.index(needle)
    return next(p["number"] for p in document["manifest"]["pages"] if p["char_span"][0] <= start < p["char_span"][1])


def chat(client: httpx.Client, document_id: str, question: str, **fields) -> httpx.Response:
    return client.post(f"/v1/documents/{document_id}/chat", json={"question": question, "max_tokens": 4, **fields})


# -- extractive ------------------------------------------------------------------------------


@pytest.fixture
def extractive(extractive_server):
    with extractive_server.client() as c:
        yield c


def test_extractive_answers_over_a_collection_cite_each_document(extractive):
    a = upload_text(extractive, "The lighthouse keeper was Edwin Marsh.\n\nHe rowed out in 1887.", name="marsh.txt")
    b = upload_text(extractive, "The schooner Albatross sank in 1887.\n\nEleven sailors lived.", name="albatross.txt")
    # (no max_tokens: the helper's 4 would cut the passages, as it cuts a model's answer)
    body = chat(extractive, a["id"], "What happened in 1887?", documents=[b["id"]], max_tokens=None).json()
    cited = {c["document"] for c in body["citations"]}
    assert cited == {a["id"], b["id"]}
    assert "[marsh.txt, page 1]" in body["answer"] and "[albatross.txt, page 1]" in body["answer"]
    assert body["pages_shown"] == [{"document": a["id"], "page": 1}, {"document": b["id"], "page": 1}]
    crop = next(c for c in body["citations"] if c["document"] == b["id"])["crop_url"]
    assert crop.startswith(f"/v1/documents/{b['id']}/pages/1.png?top=") and extractive.get(crop).status_code == 200
    single = chat(extractive, b["id"], "Which schooner sank?", max_tokens=None).json()
    assert single["pages_shown"] == [1] and single["citations"][0]["document"] == b["id"]

    completion = extractive.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Who was the keeper?"}], "documents": [a["id"], b["id"]]}).json()
    assert "Edwin Marsh" in completion["choices"][0]["message"]["content"]
    assert {"document": a["id"], "page": 1} in completion["pages_shown"]


def test_bad_collections_are_refused(extractive):
    a = upload_text(extractive, "Alpha text.")["id"]
    missing = "0" * 32
    assert chat(extractive, a, "Why?", documents=[missing]).status_code == 404
    refused = chat(extractive, a, "Why?", documents=["../etc"])
    assert refused.status_code == 400 and "32 lowercase hex" in refused.json()["error"]["message"]
    assert chat(extractive, a, "Why?", documents=[]).status_code == 400
    assert chat(extractive, a, "Why?", page_selection="best").status_code == 400
    both = extractive.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Why?"}], "document": a, "documents": [a]})
    assert both.status_code == 400 and "not both" in both.json()["error"]["message"]


# -- the model --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_document(model_server):
    needle = "The harbour code of the lighthouse is LANTERN-42."
    text = long_text(needle, 0.7)
    with model_server.client() as c:
        created = upload_text(c, text, name="valley.txt")
    assert len(created["manifest"]["pages"]) >= 10  # more than the tiny model's 4,096-token context holds
    return created, page_of(created, text, needle)


@pytest.fixture
def model(model_server):
    with model_server.client() as c:
        yield c


def test_a_document_longer_than_the_context_shows_the_matching_pages(model, long_document):
    created, needle_page = long_document
    doc_id, pages = created["id"], len(created["manifest"]["pages"])
    body = chat(model, doc_id, "What is the harbour code of the lighthouse?").json()
    shown = body["pages_shown"]
    assert needle_page in shown and shown == sorted(shown) and len(shown) < pages
    assert body["usage"]["prompt_tokens"] <= 4096 - 4
    first = chat(model, doc_id, "What is the harbour code of the lighthouse?", page_selection="first").json()
    assert first["pages_shown"] == list(range(1, len(first["pages_shown"]) + 1)) and needle_page not in first[
        "pages_shown"]
    refused = chat(model, doc_id, "What is the harbour code?", page_selection="all")
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded"
    # Every page handed over, the engine keeping the first that fit: the reply names the pages the model read.
    truncated = chat(model, doc_id, "What is the harbour code?", page_selection="all", truncate_pages=True).json()
    assert truncated["pages_shown"] == first["pages_shown"]
    assert truncated["usage"]["prompt_tokens"] == chat(model, doc_id, "What is the harbour code?",
                                                       page_selection="first").json()["usage"]["prompt_tokens"]
    assert refused.json()["error"]["message"].endswith(
        "let the pages that match the question be chosen (page_selection retrieve)")

    # A follow-up that selects the same pages reuses them: no page is encoded again, the page prefix is reused.
    again = chat(model, doc_id, "Which harbour code does the lighthouse have?").json()
    assert again["pages_shown"] == shown
    assert again["cache"]["vision_misses"] == 0
    assert again["cache"]["prefix_reused_tokens"] > 0.9 * again["usage"]["prompt_tokens"]

    with model.stream("POST", f"/v1/documents/{doc_id}/chat", json={
            "question": "What is the harbour code of the lighthouse?", "max_tokens": 4, "stream": True}) as r:
        done = [e for e in sse_events(r) if isinstance(e, dict) and e["type"] == "done"]
    assert done[0]["pages_shown"] == shown


def test_a_collection_through_the_openai_route_names_document_and_page(model, long_document):
    created, needle_page = long_document
    other = upload_text(model, "The mill by the river grinds barley.", name="mill.txt")["id"]
    body = {"messages": [{"role": "user", "content": "What is the harbour code of the lighthouse?"}],
            "documents": [other, created["id"]], "max_tokens": 4}
    completion = model.post("/v1/chat/completions", json=body).json()
    shown = completion["pages_shown"]
    assert {"document": created["id"], "page": needle_page} in shown
    assert all(set(p) == {"document", "page"} for p in shown) and completion["usage"]["prompt_tokens"] <= 4096 - 4
    with model.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        chunks = [e for e in sse_events(r) if isinstance(e, dict)]
    assert chunks[-1]["pages_shown"] == shown and chunks[-1]["choices"][0]["finish_reason"]
