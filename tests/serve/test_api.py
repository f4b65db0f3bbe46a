"""The HTTP API of a real server process with the embedded (extractive) backend."""

from __future__ import annotations

import io
import json
import re
import sqlite3
import subprocess
import sys

import httpx
import openai
import pytest
from PIL import Image

from tests.serve.conftest import REPO, STORY, Server, free_port, make_docx, make_pdf, make_png

MODEL = "glyphserve-extractive"  # the name an extractive server answers to by default


def upload_text(client: httpx.Client, text: str = STORY, **fields) -> dict:
    """Stored (201), or found stored before with the same settings (200)."""
    response = client.post("/v1/documents", json={"text": text, **fields})
    assert response.status_code in (200, 201), response.text
    assert response.json()["deduplicated"] == (response.status_code == 200)
    return response.json()


def sse_events(response: httpx.Response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


@pytest.fixture
def client(extractive_server):
    with extractive_server.client() as c:
        yield c


def test_health_and_models_say_no_model_is_loaded(extractive_server, client):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["backend"] == "extractive"
    assert "glyphserve serve zai-org/Glyph" in health["notice"]
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL]
    assert client.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    assert client.get("/version").json()["version"]
    oc = openai.OpenAI(base_url=f"{extractive_server.url}/v1", api_key="unused", max_retries=0)
    assert oc.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as info:
        oc.models.retrieve("gpt-4")
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError) as info:  # an unknown model is refused, not answered
        oc.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "Hi"}])
    assert info.value.code == "model_not_found" and info.value.type == "invalid_request_error"
    assert f"`{MODEL}`" in info.value.message


def test_document_lifecycle(client):
    created = upload_text(client, name="story.txt", preset="glyph-en", dpi=96, newline="marker")
    doc_id, manifest = created["id"], created["manifest"]
    assert len(doc_id) == 32 and manifest["pages"]
    info = created["document"]
    assert info["name"] == "story.txt" and info["characters"] == len(STORY)
    assert info["vision_tokens"] > 0 and info["text_tokens"] > 0 and info["compression_ratio"] > 0
    assert info["render"]["dpi"] == 96 and info["render"]["newline"] == "marker"

    assert client.get(f"/v1/documents/{doc_id}").json()["manifest"] == manifest
    assert doc_id in [d["id"] for d in client.get("/v1/documents").json()["documents"]]
    page = client.get(f"/v1/documents/{doc_id}/pages/1.png")
    assert page.status_code == 200 and page.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(page.content)).size[0] > 100

    # A name as typed, slashes and all (a file name's folders are dropped only from uploads), one line, bounded.
    for typed, kept in (("Q3/Q4 report", "Q3/Q4 report"), ("Sales 1/2\nfinal", "Sales 1/2 final")):
        assert client.patch(f"/v1/documents/{doc_id}", json={"name": typed}).json()["document"]["name"] == kept
    blank = client.patch(f"/v1/documents/{doc_id}", json={"name": "\u200b"})
    assert blank.status_code == 400 and "needs a visible character" in blank.json()["error"]["message"]
    typed = upload_text(client, "A second text with a typed name.", name="Plans/2025 draft")
    assert typed["document"]["name"] == "Plans/2025 draft"  # typed: not a path to cut
    unnamed = client.post("/v1/documents", json={"text": "A third text, sent without a name."}).json()
    assert unnamed["document"]["name"] == "pasted text"  # as the web UI calls it
    too_long = client.patch(f"/v1/documents/{doc_id}", json={"name": "n" * 201})
    assert too_long.status_code == 400 and "at most 200 characters, this one 201" in too_long.json()["error"]["message"]
    assert client.get(f"/v1/documents/{doc_id}").json()["document"]["name"] == "Sales 1/2 final"

    assert client.delete(f"/v1/documents/{doc_id}").json()["deleted"] is True
    assert client.get(f"/v1/documents/{doc_id}").status_code == 404
    assert "(deleted, or never stored)" in client.get(f"/v1/documents/{doc_id}").json()["error"]["message"]
    assert client.get(f"/v1/documents/{doc_id}/pages/1.png").status_code == 404


def test_an_upload_is_the_same_document_when_its_applied_settings_are(client):
    text = "The settings an upload gets decide what is a duplicate. " * 20
    first = upload_text(client, text=text)
    assert first["deduplicated"] is False and first["document"]["render"]["dpi"] == 72
    for fields in ({"preset": "glyph-en"}, {"dpi": 72, "newline": "br"}, {"preset": "auto", "dpi": 72.0}):
        again = upload_text(client, text=text, **fields)  # what "auto" and the preset's defaults give anyway
        assert again["deduplicated"] is True and again["id"] == first["id"], fields
    other = upload_text(client, text=text, dpi=96)
    assert other["deduplicated"] is False and other["id"] != first["id"]


def test_the_document_list_pages_newest_first(client):
    ids = [upload_text(client, text=f"Listed document number {i}. " * 30)["id"] for i in range(3)]
    everything = client.get("/v1/documents").json()
    assert [d["id"] for d in everything["documents"][:3]] == ids[::-1] and everything["total"] >= 3
    assert all(d["warm"] == "cold" for d in everything["documents"])  # no model: nothing is read ahead
    page = client.get("/v1/documents", params={"limit": 2, "offset": 1}).json()
    assert [d["id"] for d in page["documents"]] == ids[::-1][1:3] and page["total"] == everything["total"]
    for bad in ({"limit": 0}, {"limit": "abc"}, {"offset": -1}):
        refused = client.get("/v1/documents", params=bad)
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_request", bad


def test_the_same_content_uploaded_many_times_at_once_is_stored_once(extractive_server, client):
    """A double click, a client's retry: uploads of one content at the same time wait for the one storing it (12
    at once stored 12 documents)."""
    from concurrent.futures import ThreadPoolExecutor

    text = "Sent twelve times at once, stored once. " * 400
    before = len(client.get("/v1/documents").json()["documents"])

    def send(_):
        with httpx.Client(base_url=extractive_server.url, timeout=60) as c:
            return c.post("/v1/documents", files={"file": ("same.txt", text.encode(), "text/plain")})

    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(send, range(12)))
    assert sorted(r.status_code for r in responses) == [200] * 11 + [201], [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    assert len(client.get("/v1/documents").json()["documents"]) == before + 1


@pytest.mark.parametrize("name, data, kind", [
    ("story.txt", STORY.encode(), "txt"),
    ("story.md", ("# The keeper\n\n" + STORY).encode(), "markdown"),
    ("story.pdf", make_pdf(STORY), "pdf"),
    ("story.docx", make_docx(STORY), "docx"),
])
def test_upload_each_format_and_ask(client, name, data, kind):
    response = client.post("/v1/documents", files={"file": (name, data)}, data={"preset": "auto"})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["document"]["kind"] == kind and body["document"]["pages"] >= 1
    answer = client.post(f"/v1/documents/{body['id']}/chat", json={"question": "What did the harbour master give?"})
    assert answer.status_code == 200, answer.text
    assert "silver compass" in answer.json()["answer"]


@pytest.mark.parametrize("preset, dpi", [("auto", None), ("glyph-zh", 96)])
def test_a_scanned_pdf_is_stored_as_the_pages_of_its_scans(client, scanned_pdf, preset, dpi):
    """Its scans become page files as the parser sends them: the pages stored are those rendered from all their
    pixels at once."""
    from glyphserve.ingest import ingest_bytes
    from glyphserve.render import render_document, resolve_config

    pdf = scanned_pdf
    settings = {"preset": preset, **({"dpi": str(dpi)} if dpi else {})}
    response = client.post("/v1/documents", files={"file": ("scans.pdf", pdf)}, data=settings)
    assert response.status_code in (200, 201), response.text
    body = response.json()
    document = ingest_bytes(pdf, "scans.pdf")
    expected = render_document(document, resolve_config(document.text, preset=preset, dpi=dpi))
    assert body["document"]["pages"] == body["document"]["scan_pages"] == len(expected.pages) == 3
    for number, page in enumerate(expected.pages, 1):
        assert client.get(f"/v1/documents/{body['id']}/pages/{number}.png").content == page.png()


def test_extractive_chat_cites_pages_with_crops(client):
    doc_id = upload_text(client)["id"]
    body = client.post(f"/v1/documents/{doc_id}/chat", json={"question": "Which schooner hit the rocks?"}).json()
    assert body["backend"] == "extractive" and "no vision-language model" in body["notice"].lower()
    top = body["citations"][0]
    assert "schooner Albatross" in top["text"] and top["page"] == 1
    assert body["answer"].startswith("[page 1] In the winter of 1887")
    page = Image.open(io.BytesIO(client.get(f"/v1/documents/{doc_id}/pages/1.png").content))
    crop = client.get(top["crop_url"])
    assert crop.status_code == 200
    crop_image = Image.open(io.BytesIO(crop.content))
    assert crop_image.width == page.width and 0 < crop_image.height < page.height
    assert body["timings"]["total"] >= 0


def test_extractive_answers_keep_to_max_tokens(extractive_server, client):
    """A client's max_tokens bounds the passages as it would a model's answer: cut at a word, ``length``; without
    it, the passages whole."""
    doc_id = upload_text(client)["id"]
    oc = openai.OpenAI(base_url=f"{extractive_server.url}/v1", api_key="unused", max_retries=0)
    ask = {"model": MODEL, "messages": [{"role": "user", "content": "Which schooner hit the rocks?"}],
           "extra_body": {"document": doc_id}}
    whole = oc.chat.completions.create(**ask)
    assert whole.choices[0].finish_reason == "stop" and whole.usage.completion_tokens > 16
    cut = oc.chat.completions.create(**ask, max_tokens=16)
    text = cut.choices[0].message.content
    assert cut.choices[0].finish_reason == "length" and 0 < cut.usage.completion_tokens <= 16
    assert whole.choices[0].message.content.startswith(text) and text.startswith("[page 1] In the winter")
    streamed = oc.chat.completions.create(**ask, max_tokens=16, stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    body = client.post(f"/v1/documents/{doc_id}/chat", json={"question": "Which schooner hit the rocks?",
                                                            "max_tokens": 16}).json()
    assert body["answer"] == text and body["finish_reason"] == "length"
    assert len(body["citations"]) == 1 and body["pages_shown"] == [1]
    unbounded = client.post(f"/v1/documents/{doc_id}/chat", json={"question": "Which schooner hit the rocks?"}).json()
    assert unbounded["answer"] == whole.choices[0].message.content and unbounded["finish_reason"] == "stop"
    for limit in range(1, 40):  # no answer ends in a page label whose passage was cut away
        answer = client.post(f"/v1/documents/{doc_id}/chat", json={"question": "Which schooner hit the rocks?",
                                                                    "max_tokens": limit}).json()
        assert not answer["answer"].rstrip().endswith("]"), (limit, answer["answer"])
        assert len(answer["citations"]) == answer["answer"].count("[page "), limit


def test_extractive_answers_have_no_token_latencies(client):
    """Passages are not generated a token at a time: no inter-token or per-token observations (239 zeros pulled a
    dashboard's quantiles to 0), the request's own latencies and token counts as before."""
    def count(name):
        text = client.get("/metrics").text
        return sum(float(v) for v in re.findall(rf'^{re.escape(name)}{{model_name="{MODEL}"}} (\S+)$', text, re.M))

    names = ("vllm:inter_token_latency_seconds_count", "vllm:time_per_output_token_seconds_count",
             "vllm:request_time_per_output_token_seconds_count", "vllm:e2e_request_latency_seconds_count")
    before = [count(name) for name in names]
    doc_id = upload_text(client)["id"]
    client.post(f"/v1/documents/{doc_id}/chat", json={"question": "Which schooner hit the rocks?"})
    assert [count(name) - b for name, b in zip(names, before)] == [0, 0, 0, 1]


def test_streamed_document_chat(client):
    doc_id = upload_text(client)["id"]
    with client.stream("POST", f"/v1/documents/{doc_id}/chat",
                       json={"question": "How many steps did Edwin Marsh climb?", "stream": True,
                             "history": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
                       ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    deltas = [e for e in events[:-1] if e["type"] == "delta"]
    done = events[-2]
    assert done["type"] == "done" and "ninety-seven steps" in done["answer"]
    assert "".join(d["text"] for d in deltas) == done["answer"]
    assert all(d["channel"] == "answer" for d in deltas)


def test_openai_client_works_unchanged(extractive_server, client):
    oc = openai.OpenAI(base_url=f"{extractive_server.url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in oc.models.list()] == ["glyphserve-extractive"]
    messages = [{"role": "user", "content": [{"type": "text", "text": STORY},
                                             {"type": "text", "text": "What was engraved on the compass?"}]}]
    result = oc.chat.completions.create(model=MODEL, messages=messages, max_tokens=64, temperature=0)
    assert "for courage at sea" in result.choices[0].message.content
    assert result.choices[0].finish_reason == "stop"
    chunks = list(oc.chat.completions.create(model=MODEL, messages=messages, stream=True,
                                             stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == result.choices[0].message.content
    assert chunks[-1].usage is not None

    # A stored document, through the `document` extension field.
    doc_id = upload_text(client)["id"]
    by_document = oc.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Who was rescued by Marsh?"}],
        extra_body={"document": doc_id})
    assert "eleven sailors" in by_document.choices[0].message.content

    # Page images cannot be read without a model: a clear 400 (nothing a client should retry).
    data_url = "data:image/png;base64," + __import__("base64").b64encode(make_png()).decode()
    with pytest.raises(openai.APIStatusError) as info:
        oc.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url}}, {"type": "text", "text": "What is here?"}]}])
    assert info.value.status_code == 400 and "glyphserve serve zai-org/Glyph" in info.value.message
    assert info.value.code == "model_not_loaded" and info.value.type == "invalid_request_error"

    # A lone question has nothing to search: the error says where the text goes.
    with pytest.raises(openai.BadRequestError, match="as a text part before the question's or in an earlier message"):
        oc.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Alice sailed. Where to?"}])


def test_openai_requests_never_fetch_urls(client):
    for url in ("http://127.0.0.1:1/x.png", "file:///etc/passwd", "/etc/passwd"):
        response = client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Read it"}]}]})
        assert response.status_code == 400
    response = client.post("/v1/chat/completions", json={"model": MODEL, "messages": [
        {"role": "user", "content": "What is the capital?"}]})
    assert response.status_code == 400 and "text to search" in response.json()["error"]["message"]


BAD_UPLOADS = [
    ("corrupt.pdf", b"%PDF-1.7\n1 0 obj << /Type /Catalog >>\n" + b"\x00garbage" * 50, 400, "corrupt_file"),
    ("locked.pdf", make_pdf(STORY, password="secret"), 400, "encrypted_file"),
    ("empty.txt", b"", 400, "empty_document"),
    ("program.bin", b"\x7fELF\x02\x01\x01" + bytes(range(256)) * 8, 400, "unsupported_type"),
    ("picture.png", make_png(), 400, "unsupported_type"),
]


@pytest.mark.parametrize("name, data, status, code", BAD_UPLOADS, ids=[b[0] for b in BAD_UPLOADS])
def test_bad_uploads_get_clear_errors(client, name, data, status, code):
    response = client.post("/v1/documents", files={"file": (name, data)})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["type"] == "invalid_request_error" and error["message"]
    assert "Traceback" not in response.text
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize("field, value", [("preset", "glyph-fr"), ("newline", "crlf"), ("dpi", "0")])
def test_bad_render_settings_name_their_field(client, field, value):
    """Pasted (JSON) or beside a file (form fields): the error's param names the field, in the API's words."""
    for response in (client.post("/v1/documents", json={"text": STORY, field: value if field != "dpi" else 0}),
                     client.post("/v1/documents", files={"file": ("story.txt", STORY.encode())}, data={field: value})):
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == field and error["type"] == "invalid_request_error"
        assert "--" not in error["message"]  # not the command line's flags


def test_limits(client):
    too_big = client.post("/v1/documents", files={"file": ("big.txt", b"word " * 300_000)})
    assert too_big.status_code == 413 and "1 MiB" in too_big.json()["error"]["message"]
    too_big_json = client.post("/v1/documents", json={"text": "word " * 300_000})
    assert too_big_json.status_code == 413 and too_big.json()["error"]["code"] == "file_too_large"
    too_big_chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "w " * 600_000}]})
    error = too_big_chat.json()["error"]
    assert too_big_chat.status_code == 413 and error["code"] == "request_too_large"
    assert "upload limit" not in error["message"]
    assert too_big_chat.content.startswith(b'{"error":{"message":')  # encoded as every other error
    many_pages = client.post("/v1/documents", json={"text": "\n".join(f"line {i}" for i in range(40 * 90))})
    assert many_pages.status_code == 400 and many_pages.json()["error"]["code"] == "too_many_pages"
    # how far over: the parts it would take, by its lines (3,600 lines of ~82 a page, 30 pages a document)
    assert many_pages.json()["error"]["message"] == ("the document renders to more than 30 pages, this server's limit "
                                                     "(--max-pages): split it into smaller documents (about 2: it "
                                                     "fills about 44 pages, by a guess from its lines)")
    upload_text(client)  # still serving


def test_the_openapi_document_describes_the_bodies_and_errors_as_sent(client):
    """/docs (Swagger) can send each route's body: the JSON models (a file as multipart for uploads), every $ref
    resolving; errors as the API sends them (400, OpenAI's body), never FastAPI's 422."""
    doc = client.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    bodies = {(path, method): op["requestBody"]["content"] for path, ops in doc["paths"].items()
              for method, op in ops.items() if "requestBody" in op}
    assert {key: sorted(content) for key, content in bodies.items()} == {
        ("/v1/documents", "post"): ["application/json", "multipart/form-data"],
        ("/v1/documents/{document_id}", "patch"): ["application/json"],
        ("/v1/documents/{document_id}/chat", "post"): ["application/json"],
        ("/v1/chat/completions", "post"): ["application/json"]}
    assert bodies[("/v1/documents", "post")]["multipart/form-data"]["schema"]["required"] == ["file"]
    page = doc["paths"]["/v1/documents/{document_id}/pages/{page}.png"]["get"]["responses"]["200"]["content"]
    assert list(page) == ["image/png"]
    chat = schemas["ChatCompletionRequest"]["properties"]
    assert {"messages", "max_tokens", "stream", "temperature"} <= set(chat)

    def refs(node):
        if isinstance(node, dict):
            yield from ([node["$ref"]] if "$ref" in node else [])
            for value in node.values():
                yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    assert all(ref.removeprefix("#/components/schemas/") in schemas for ref in refs(doc))
    responses = [op["responses"] for ops in doc["paths"].values() for op in ops.values()]
    assert all("422" not in r and r["400"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Error"} for r in responses)
    # each example body, sent as Swagger's "Try it out" sends it, is answered
    example = {key: content["application/json"]["example"] for key, content in bodies.items()}
    created = client.post("/v1/documents", json=example[("/v1/documents", "post")])
    assert created.status_code in (200, 201), created.text
    doc_id = created.json()["id"]
    for (path, method), body in example.items():
        if path != "/v1/documents":
            answered = client.request(method.upper(), path.replace("{document_id}", doc_id), json=body)
            assert answered.status_code == 200, (path, answered.text)
    completion = client.post("/v1/chat/completions", json=example[("/v1/chat/completions", "post")]).json()
    assert "west basin" in completion["choices"][0]["message"]["content"]
    wrong = client.post("/v1/chat/completions", json={"messages": "nope"})
    assert wrong.status_code == 400 and set(wrong.json()["error"]) == set(schemas["Error"]["properties"]["error"][
        "properties"])


def test_ids_and_routes_are_validated(client):
    assert client.get("/v1/documents/0123456789abcdef0123456789abcdef").status_code == 404
    for bad in ("..%2F..%2Fetc%2Fpasswd", "ABC", "0123456789abcdef0123456789abcdeg", "%2e%2e"):
        response = client.get(f"/v1/documents/{bad}")
        assert response.status_code in (400, 404), bad
        assert response.headers["content-type"].startswith("application/json")
    assert client.get("/v1/documents/../../etc/passwd").status_code in (400, 404)
    assert client.get("/v1/documents/0123456789abcdef0123456789abcdef/pages/x.png").status_code in (400, 404)
    assert client.get("/v1/nothing-here").json()["error"]["code"] == "not_found"
    # A route that exists, asked with a method it does not take: 405 naming those it does (it was "no API route").
    wrong = client.put("/v1/documents", json={})
    assert wrong.status_code == 405 and wrong.headers["allow"] == "GET, HEAD, POST"
    assert wrong.json()["error"] == {"message": "PUT is not a method of /v1/documents: it takes GET, HEAD, POST",
                                     "type": "invalid_request_error", "param": None, "code": "method_not_allowed"}
    assert client.get("/v1/chat/completions").headers["allow"] == "POST"
    assert client.post("/v1/documents/0123456789abcdef0123456789abcdef").headers["allow"] == "DELETE, GET, HEAD, PATCH"
    # HEAD wherever GET is (the headers, no body), and OPTIONS answered by the API, not the web UI's plain 404
    for path in ("/health", "/metrics", "/v1/models", "/v1/documents", "/version", "/docs"):
        head, get = client.head(path), client.get(path)
        assert head.status_code == 200 and head.content == b"", path
        assert head.headers["content-type"] == get.headers["content-type"], path
    assert client.head("/v1/nothing-here").status_code == 404
    # /health and /metrics beside the web UI (which serves every other path): 405 as the API's
    for method, path, allow in (("POST", "/health", "GET, HEAD"), ("OPTIONS", "/health", "GET, HEAD"),
                                ("DELETE", "/metrics", "GET, HEAD"), ("OPTIONS", "/v1/chat/completions", "POST"),
                                ("OPTIONS", "/v1/models", "GET, HEAD")):
        wrong = client.request(method, path)
        assert wrong.status_code == 405 and wrong.headers["allow"] == allow, (method, path)
        assert wrong.json()["error"]["code"] == "method_not_allowed"


def test_malformed_requests(client):
    doc_id = upload_text(client)["id"]
    cases = [
        ("/v1/documents", b"{not json", {"content-type": "application/json"}),
        ("/v1/documents", b'{"text": 5}', {"content-type": "application/json"}),
        ("/v1/documents", b'{"text": "x", "dpi": 300}', {"content-type": "application/json"}),
        (f"/v1/documents/{doc_id}/chat", b"[1, 2", {"content-type": "application/json"}),
        (f"/v1/documents/{doc_id}/chat", b'{"question": ""}', {"content-type": "application/json"}),
        (f"/v1/documents/{doc_id}/chat", b'{"question": "q", "max_tokens": -1}', {"content-type": "application/json"}),
        ("/v1/chat/completions", b'{"messages": []}', {"content-type": "application/json"}),
        ("/v1/chat/completions", b"\xff\xfe", {"content-type": "application/json"}),
        ("/v1/documents", b"--x\r\n", {"content-type": "multipart/form-data; boundary=x"}),
    ]
    for path, body, headers in cases:
        response = client.post(path, content=body, headers=headers)
        assert response.status_code == 400, (path, body, response.text)
        error = response.json()["error"]  # OpenAI's error shape on every route
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert error["type"] == "invalid_request_error"
    assert client.post(f"/v1/documents/{doc_id}/chat", json={"question": "Who kept the lighthouse?"}).status_code == 200


def test_a_document_id_that_cannot_exist_is_not_found(client):
    """In a URL path an id that is not one (not 32 hex digits) is a missing resource, as an unknown one is; in a
    request body it is a malformed request."""
    for method, path in [("GET", "/v1/documents/nope"), ("GET", "/v1/documents/nope/pages/1.png"),
                         ("DELETE", "/v1/documents/ABC"), ("PATCH", "/v1/documents/nope"),
                         ("POST", "/v1/documents/nope/chat"), ("GET", "/v1/documents/" + "f" * 32)]:
        response = client.request(method, path, json={"name": "x"} if method == "PATCH" else {"question": "q"})
        assert response.status_code == 404, (method, path, response.text)
        assert response.json()["error"]["code"] == "not_found"
    body = client.post("/v1/chat/completions",
                       json={"messages": [{"role": "user", "content": "q"}], "document": "nope"})
    assert body.status_code == 400 and "32 lowercase hex digits" in body.json()["error"]["message"]


def test_metrics_count_requests_errors_and_stages(client):
    upload_text(client)
    client.get("/v1/documents/ffffffffffffffffffffffffffffffff")
    text = client.get("/metrics").text
    assert 'glyphserve_http_requests_total{method="POST",route="/v1/documents",status="201"}' in text
    assert 'glyphserve_http_errors_total{code="not_found",route="/v1/documents/{document_id}",status="404"}' in text
    assert 'glyphserve_stage_seconds_count{stage="render"}' in text
    assert "glyphserve_documents_stored" in text


def test_api_key_is_enforced(tmp_path):
    server = Server(tmp_path / "data", "--no-ui", api_key="s3cret").start()
    try:
        assert httpx.get(f"{server.url}/health").status_code == 200
        assert httpx.get(f"{server.url}/v1/documents").status_code == 401
        wrong = httpx.get(f"{server.url}/v1/documents", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{server.url}/metrics").status_code == 401
        with server.client() as c:
            assert c.get("/v1/documents").status_code == 200
            oc = openai.OpenAI(base_url=f"{server.url}/v1", api_key="s3cret", max_retries=0)
            assert oc.models.list().data
    finally:
        server.stop()


def test_non_local_bind_requires_an_api_key(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "glyphserve.cli", "serve", "--host", "0.0.0.0", "--port", str(free_port()),
         "--data-dir", str(tmp_path)],
        cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "--api-key" in result.stderr and "Traceback" not in result.stderr


def test_documents_survive_a_restart(tmp_path):
    server = Server(tmp_path / "data", "--no-ui").start()
    try:
        with server.client() as c:
            doc_id = upload_text(c)["id"]
            page = c.get(f"/v1/documents/{doc_id}/pages/1.png").content
    finally:
        server.stop()
    # As a store written before uploads were keyed by the settings applied: keyed by the settings as sent.
    from glyphserve.serve.intake import RenderOptions, sent_settings_hash

    with sqlite3.connect(tmp_path / "data" / "index.sqlite3") as db:
        db.execute("UPDATE documents SET content_hash = ?",
                   (sent_settings_hash(b"text\x00" + STORY.encode(), RenderOptions()),))
    server = Server(tmp_path / "data", "--no-ui").start()
    try:
        with server.client() as c:
            assert [d["id"] for d in c.get("/v1/documents").json()["documents"]] == [doc_id]
            assert c.get(f"/v1/documents/{doc_id}/pages/1.png").content == page
            answer = c.post(f"/v1/documents/{doc_id}/chat", json={"question": "What was engraved?"}).json()
            assert "for courage at sea" in answer["answer"]
            assert upload_text(c)["id"] == doc_id  # found by its old key
    finally:
        server.stop()


def test_the_uis_named_endpoints_take_the_values_their_schema_lists(extractive_server):
    """Gradio's client reads each endpoint's schema; a radio's choices there are what it accepts."""
    from gradio_client import Client

    ui = Client(extractive_server.url + "/", verbose=False)
    endpoint = ui.view_api(return_format="dict", print_info=False)["named_endpoints"]["/render_text"]
    dpi = next(p for p in endpoint["parameters"] if p["parameter_name"] == "dpi")
    assert dpi["python_type"]["type"] == "Literal['72', '96']"
    gallery, *_ = ui.predict("The lantern at the mill.", "auto", "96", "br", api_name="/render_text")
    assert gallery[0]["caption"] == "page 1"


def test_mounted_under_a_prefix_the_api_asks_for_its_key_and_keeps_its_routes(tmp_path):
    """An app embedding the service under /glyph (or a proxy's root path): the API's checks saw /glyph/v1/... as
    a web UI path, so its key was never asked for, and a wrong method was a 404."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from glyphserve.serve.app import create_app
    from glyphserve.serve.config import ServeConfig

    inner = create_app(ServeConfig(data_dir=tmp_path / "data", ui=False, api_key="s3cret"))
    outer = FastAPI()
    outer.mount("/glyph", inner)
    key = {"Authorization": "Bearer s3cret"}
    try:
        with TestClient(outer, base_url="http://127.0.0.1") as client:
            assert client.get("/glyph/v1/documents").status_code == 401
            assert client.get("/glyph/metrics").status_code == 401
            assert client.get("/glyph/v1/documents", headers=key).json()["total"] == 0
            wrong = client.put("/glyph/v1/documents", headers=key)
            assert wrong.status_code == 405 and wrong.headers["allow"] == "GET, HEAD, POST"
            assert client.get("/glyph/health").status_code == 200
            assert client.head("/glyph/health").status_code == 200
    finally:
        inner.state.service.close()


def test_a_pasted_text_and_a_questions_pages_wait_for_no_file_being_read_or_rendered(tmp_path, tiny_model_dir):
    """A hostile-input trial: 4 PDFs taking the whole ingest timeout held a pasted text back 58 s (one pool read
    both), and two uploads rendering held every question back 22 s (its pages were chosen on the render threads).
    Here every thread reading files, and every rendering thread, is held while a text is pasted and a question is
    asked."""
    import threading

    from fastapi.testclient import TestClient

    from glyphserve.engine import Engine, EngineConfig
    from glyphserve.serve.app import create_app
    from glyphserve.serve.config import ServeConfig

    engine = Engine.load(EngineConfig(model=str(tiny_model_dir), device="cpu", dtype="float32"))
    app = create_app(ServeConfig(data_dir=tmp_path / "data", ui=False), engine)
    service = app.state.service
    gate = threading.Event()
    try:
        with TestClient(app, base_url="http://127.0.0.1") as client:
            stored = client.post("/v1/documents", json={"text": "The keeper was given a lamp."}).json()["id"]
            held = [service.intake.parses._pool.submit(gate.wait) for _ in range(service.intake.parses.limits.threads)]
            pasted = client.post("/v1/documents", json={"text": "The miller kept the lantern."})
            assert pasted.status_code == 201
            held += [service.intake.renders._pool.submit(gate.wait) for _ in range(service.intake.renders.limits.threads)]
            answer = client.post(f"/v1/documents/{stored}/chat", json={"question": "What was given?",
                                                                        "max_tokens": 4})
            assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] > 0
            assert not any(h.done() for h in held)  # (they were held all along)
    finally:
        gate.set()
        service.close()
        engine.close()
