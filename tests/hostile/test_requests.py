"""Cases 1 and 2 on the tiny model: one user's hostile chat request (images that decode to gigabytes, sampling
values the sampler cannot use, a page that cannot be decoded) gets its own 4xx or answer, bounded in time and
memory, while another user's streamed answer, decoding in the same batch, ends whole and equal to itself alone."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from glyphserve.bench import hostile_files
from tests.hostile.conftest import HTTP, IMAGE_ADDED_BYTES, UPLOAD_SECONDS, Watch, error
from tests.serve.conftest import STORY
from tests.servers import Server

QUESTION = "What happened in the winter of 1887?"


@pytest.fixture(scope="module")
def model(tmp_path_factory, tiny_model_dir):
    server = Server(tmp_path_factory.mktemp("hostile-model") / "data", "--model", str(tiny_model_dir),
                    "--device", "cpu", "--no-ui", "--served-model-name", "glyph").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def documents(model) -> list[str]:
    return [HTTP.post(f"{model.url}/v1/documents", json={"text": f"{STORY}\n\nCopy {i}."}).json()["id"]
            for i in range(3)]


def chat(server: Server, **body):
    return HTTP.post(f"{server.url}/v1/chat/completions",
                     json={"model": "glyph", "messages": [{"role": "user", "content": QUESTION}], **body})


def long_body(document_id: str) -> dict:
    return {"model": "glyph", "messages": [{"role": "user", "content": "Tell a long story"}],
            "document": document_id, "max_tokens": 200, "ignore_eos": True}


def _content(lines: Iterator[str]) -> str:
    """The answer text of an OpenAI-shaped SSE stream (fails on an error event)."""
    text = []
    for line in lines:
        if line.startswith("data: {"):
            event = json.loads(line[len("data: "):])
            assert "error" not in event, event
            text.extend(choice["delta"].get("content") or "" for choice in event["choices"])
    return "".join(text)


@contextmanager
def another_users_answer(server: Server, document_id: str) -> Iterator[dict]:
    """A long answer streaming while the block runs (it has started decoding when the block begins); after the
    block, ``result["streamed"]`` is its whole text and ``result["alone"]`` the same request answered alone."""
    alone = HTTP.post(f"{server.url}/v1/chat/completions", json=long_body(document_id))
    result = {"alone": alone.json()["choices"][0]["message"]["content"]}
    with HTTP.stream("POST", f"{server.url}/v1/chat/completions", json={**long_body(document_id), "stream": True}) \
            as response:
        lines = response.iter_lines()
        head = [next(lines) for _ in range(3)]
        yield result
        result["streamed"] = (_content(head) + _content(lines)).strip()


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def test_images_that_decode_to_gigabytes_are_refused_from_their_headers(model, documents):
    bombs = [data_url(hostile_files.bomb_png(8000, 8000, salt)) for salt in range(25)]  # 0.3 MB, 4.8 GB decoded
    images = [{"type": "image_url", "image_url": {"url": url}} for url in bombs]
    body = {"max_tokens": 4, "messages": [{"role": "user", "content": [*images, {"type": "text", "text": "Read"}]}]}
    with another_users_answer(model, documents[0]) as other:
        with Watch(model, "images") as watch:
            refused = chat(model, **body)
        ten = chat(model, **{**body, "messages": [{"role": "user", "content": [*images[:10], {"type": "text",
                                                                                            "text": "Read"}]}]})
    assert refused.status_code == 413 and error(refused)[0] == "images_too_large", refused.text
    assert "--max-image-mpx" in error(refused)[1] and ten.status_code == 413
    assert watch.seconds < UPLOAD_SECONDS and watch.added < IMAGE_ADDED_BYTES, (watch.seconds, watch.added)
    assert other["streamed"] == other["alone"]


def test_sampling_values_the_sampler_cannot_use_leave_the_running_answer_whole(model, documents):
    """vLLM's rules at the boundary: a tiny temperature is greedy, a tiny top_p keeps the top token, any 64-bit
    seed samples, and a seed past 2^64 - 1 is refused."""
    greedy = chat(model, document=documents[1], max_tokens=6).json()["choices"][0]["message"]["content"]
    with another_users_answer(model, documents[0]) as other:
        with Watch(model, "sampling") as watch:
            tiny_temperature = chat(model, document=documents[1], max_tokens=6, temperature=1e-300)
            tiny_top_p = chat(model, document=documents[1], max_tokens=6, temperature=1.0, top_p=1e-300)
            seeds = [chat(model, document=documents[1], max_tokens=6, temperature=1.0, seed=seed)
                     for seed in (2**63 + 5, 2**64 - 1)]
            past = chat(model, document=documents[1], max_tokens=6, temperature=1.0, seed=2**64)
    for response in (tiny_temperature, tiny_top_p, *seeds):
        assert response.status_code == 200, response.text
    assert [r.json()["choices"][0]["message"]["content"] for r in (tiny_temperature, tiny_top_p)] == [greedy] * 2
    assert past.status_code == 400 and error(past)[1] and "seed" in past.text
    assert other["streamed"] == other["alone"]
    assert watch.added < 300 * 2**20


def test_an_image_whose_pixels_do_not_decode_fails_alone(model, documents):
    png = bytearray(HTTP.get(f"{model.url}/v1/documents/{documents[2]}/pages/1.png").content)
    start = png.index(b"IDAT") + 10
    png[start:start + 200] = bytes(b ^ 0x5A for b in png[start:start + 200])  # the header still reads
    image = {"type": "image_url", "image_url": {"url": data_url(bytes(png))}}
    with another_users_answer(model, documents[0]) as other:
        damaged = chat(model, max_tokens=4, messages=[{"role": "user", "content": [image, {"type": "text",
                                                                                           "text": "Read it"}]}])
    assert damaged.status_code == 400 and "damaged" in error(damaged)[1]
    assert other["streamed"] == other["alone"]


def test_a_failure_in_one_row_of_a_running_batch_ends_only_that_request(model, documents):
    """The failure injected into one row: a stored page whose file is damaged on disk (its header reads, its
    pixels do not), asked about (caches off, so the page is decoded) while another user's answer decodes."""
    victim = HTTP.post(f"{model.url}/v1/documents", json={"text": f"{STORY}\n\nA damaged copy."}).json()["id"]
    page = Path(model.data_dir) / "docs" / victim / "page_001.png"
    deadline = time.monotonic() + 60
    while not page.exists():  # the store writes a document's files just after answering
        assert time.monotonic() < deadline
        time.sleep(0.05)
    png = bytearray(page.read_bytes())
    start = png.index(b"IDAT") + 10
    png[start:start + 200] = bytes(b ^ 0x5A for b in png[start:start + 200])
    page.write_bytes(bytes(png))
    with another_users_answer(model, documents[0]) as other:
        failed = HTTP.post(f"{model.url}/v1/documents/{victim}/chat",
                           json={"question": QUESTION, "max_tokens": 4, "use_cache": False})
    assert 400 <= failed.status_code < 600
    assert other["streamed"] == other["alone"]
