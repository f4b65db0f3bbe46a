"""The official Glyph API clients and the ``openai`` client against ``glyphserve serve MODEL --served-model-name
glyph``: their requests re-created here as they send them (``scripts/vlm_inference.py`` and the LongBench, MRCR and
RULER ``post_api`` scripts of github.com/thu-coai/Glyph), answered with every parameter honoured.

The official scripts send ``max_tokens: 8192``, more than the tiny model's 4096-token context holds (a server with
the real Glyph has room); here it is lowered to ``MAX_TOKENS``. Their ``stop_token_ids`` are ids of Glyph's
151,552-token vocabulary, which the engine refuses for a smaller one: here they are the same offsets from
``<|endoftext|>`` in the tiny vocabulary (which keeps the control tokens in the real order). Every other value is
theirs. The last tests check that the engine honours each parameter (penalties, top_k, stop tokens and strings,
logprobs) end to end.
"""

from __future__ import annotations

import base64
import io
import json
import math

import httpx
import openai
import pytest
from PIL import Image

from tests.serve.conftest import STORY, Server
from tests.serve.test_api import upload_text

MAX_TOKENS = 24
# The stop token ids the official scripts send (151329 is <|endoftext|> in Glyph's vocabulary), and where the same
# offsets from <|endoftext|> fall in the tiny model's.
OFFICIAL_STOP_IDS = [151329, 151348, 151336]


def tiny_stop_ids(model_dir) -> list[int]:
    from transformers import AutoTokenizer

    first = AutoTokenizer.from_pretrained(model_dir).convert_tokens_to_ids("<|endoftext|>")
    return [first + i - OFFICIAL_STOP_IDS[0] for i in OFFICIAL_STOP_IDS]


@pytest.fixture(scope="module")
def stop_ids(tiny_model_dir) -> list[int]:
    return tiny_stop_ids(tiny_model_dir)


@pytest.fixture(scope="module")
def glyph(tmp_path_factory, tiny_model_dir):
    server = Server(tmp_path_factory.mktemp("official") / "data", str(tiny_model_dir), "--served-model-name", "glyph",
                    "--device", "cpu", "--no-ui", "--max-num-seqs", "1", "--sse-keepalive", "0.2")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def page_files(glyph, tmp_path_factory) -> list[str]:
    """A rendered document's pages as files, as the official scripts read them."""
    folder = tmp_path_factory.mktemp("pages")
    with glyph.client() as client:
        document = upload_text(client, STORY)
        paths = []
        for number in range(1, document["document"]["pages"] + 1):
            path = folder / f"page_{number:03d}.png"
            path.write_bytes(client.get(f"/v1/documents/{document['id']}/pages/{number}.png").content)
            paths.append(str(path))
    return paths


def encode_image_with_max_pixels(path: str, max_pixels: int) -> str:
    """What every official client does to a page: RGB, shrunk past ``max_pixels``, PNG, base64."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        w, h = image.size
        if w * h > max_pixels:
            scale = math.sqrt(max_pixels / (w * h))
            image = image.resize((max(1, int(w * scale)), max(1, int(h * scale))), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        image.save(out, format="PNG")
        return base64.b64encode(out.getvalue()).decode("utf-8")


def image_parts(paths: list[str], max_pixels: int = 36_000_000) -> list[dict]:
    return [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{encode_image_with_max_pixels(p, max_pixels)}"}}
            for p in paths]


def post(server: Server, payload: dict) -> httpx.Response:
    """As the scripts post: ``requests.post(url, headers={'Content-Type': ...}, data=json.dumps(payload))``."""
    return httpx.post(f"{server.url}/v1/chat/completions", headers={"Content-Type": "application/json"},
                      content=json.dumps(payload), timeout=300)


def vlm_inference_payload(question: str, pages: list[str], stop_ids: list[int]) -> dict:
    """scripts/vlm_inference.py (its "model" line is commented out)."""
    return {"messages": [{"role": "user", "content": image_parts(pages) + [{"type": "text", "text": question}]}],
            "max_tokens": MAX_TOKENS, "top_p": 1.0, "top_k": 1, "temperature": 0.0001, "repetition_penalty": 1.1,
            "skip_special_tokens": False, "stop_token_ids": stop_ids, "include_stop_str_in_output": True}


def longbench_payload(prompt: str, pages: list[str], stop_ids: list[int]) -> dict:
    """evaluation/longbench/scripts/post_api_longbench.py with --use_image."""
    return {"model": "glyph", "messages": [{"role": "user", "content": image_parts(pages) + [
                {"type": "text", "text": prompt.strip()}]}],
            "max_tokens": MAX_TOKENS, "top_p": 1.0, "top_k": 1, "temperature": 0.0001, "repetition_penalty": 1.1,
            "skip_special_tokens": False, "stop_token_ids": stop_ids, "include_stop_str_in_output": True}


def mrcr_payload(question: str, pages: list[str], stop_ids: list[int]) -> dict:
    """evaluation/mrcr/scripts/post_api_mrcr.py (the question after a newline; logprobs false)."""
    return {"model": "glyph", "messages": [{"role": "user", "content": image_parts(pages) + [
                {"type": "text", "text": "\n" + question}]}],
            "skip_special_tokens": False, "include_stop_str_in_output": True, "logprobs": False,
            "max_tokens": MAX_TOKENS, "top_p": 1.0, "top_k": 50, "temperature": 0.0001, "repetition_penalty": 1.1,
            "stop_token_ids": stop_ids}


def ruler_payload(question: str, pages: list[str], stop_ids: list[int]) -> dict:
    """evaluation/ruler/scripts/post_api_ruler.py (no top_p; greedy by temperature 0)."""
    return {"model": "glyph", "messages": [{"role": "user", "content": image_parts(pages) + [
                {"type": "text", "text": question}]}],
            "skip_special_tokens": False, "include_stop_str_in_output": True, "logprobs": False,
            "max_tokens": MAX_TOKENS, "top_k": 50, "temperature": 0.0, "repetition_penalty": 1.1,
            "stop_token_ids": stop_ids}


@pytest.mark.parametrize("build", [vlm_inference_payload, longbench_payload, mrcr_payload, ruler_payload],
                         ids=["vlm_inference", "longbench", "mrcr", "ruler"])
def test_the_official_clients_requests_are_answered(glyph, page_files, stop_ids, build):
    response = post(glyph, build("Who rescued the sailors?", page_files, stop_ids))
    assert response.status_code == 200, response.text
    result = response.json()
    # What the scripts read: choices[0].message.content, and usage.prompt_tokens (LongBench, MRCR).
    assert isinstance(result["choices"][0]["message"]["content"], str)
    assert result["usage"]["prompt_tokens"] > 0 and 0 < result["usage"]["completion_tokens"] <= MAX_TOKENS
    assert result["model"] == "glyph" and result["choices"][0]["finish_reason"] in ("stop", "length")
    assert "cached_tokens" in result["usage"]["prompt_tokens_details"]


def test_the_openai_client_unchanged(glyph, page_files, stop_ids):
    oc = openai.OpenAI(base_url=f"{glyph.url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in oc.models.list().data] == ["glyph"]
    messages = [{"role": "user", "content": image_parts(page_files) + [{"type": "text", "text": "Who?"}]}]
    vllm_extras = {"top_k": 1, "repetition_penalty": 1.1, "skip_special_tokens": False,
                   "stop_token_ids": stop_ids, "include_stop_str_in_output": True}
    first = oc.chat.completions.create(model="glyph", messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                       extra_body=vllm_extras)
    again = oc.chat.completions.create(model="glyph", messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                       extra_body=vllm_extras)
    assert again.choices[0].message.content == first.choices[0].message.content
    # The second time the pages' prefix came from the prefix cache, and usage says so as OpenAI does.
    assert again.usage.prompt_tokens_details.cached_tokens > 0
    streamed = list(oc.chat.completions.create(model="glyph", messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                               stream=True, stream_options={"include_usage": True},
                                               extra_body=vllm_extras))
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == \
        first.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as info:
        oc.chat.completions.create(model="glyph", messages=messages, max_tokens=4, n=2)
    assert info.value.code == "invalid_request" and "n must be 1" in info.value.message


def test_a_context_overflow_is_a_400_that_names_max_tokens(glyph, page_files, stop_ids):
    response = post(glyph, {**longbench_payload("Who?", page_files, stop_ids), "max_tokens": 100_000})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "context_length_exceeded"
    assert "max_tokens 100000" in error["message"] and "lower max_tokens" in error["message"]


def test_a_waiting_stream_gets_keep_alive_comments(glyph, page_files):
    """--max-num-seqs 1 and a long answer running: a second stream waits, and hears keep-alives meanwhile."""
    document = {"messages": [{"role": "user", "content": "Tell a long story"}], "ignore_eos": True,
                "max_tokens": 2000, "stream": True}
    with httpx.Client(base_url=glyph.url, timeout=300) as client:
        with client.stream("POST", "/v1/chat/completions", json=document) as running:
            lines = running.iter_lines()
            next(lines), next(lines), next(lines)  # it is decoding
            with httpx.stream("POST", f"{glyph.url}/v1/chat/completions", timeout=300,
                              json={**document, "max_tokens": 4}) as waiting:
                assert waiting.status_code == 200
                lines = list(waiting.iter_lines())
    assert ": keep-alive" in lines and lines[-2] == "data: [DONE]"


def document_answer(server: Server, document_id: str, **settings) -> dict:
    with server.client() as client:
        response = client.post(f"/v1/documents/{document_id}/chat", json={
            "question": "Tell the story", "max_tokens": MAX_TOKENS, "ignore_eos": True, **settings})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def story(glyph) -> str:
    with glyph.client() as client:
        return upload_text(client, STORY)["id"]


def test_logprobs_come_back_per_token(glyph, story):
    answer = document_answer(glyph, story, logprobs=2)
    assert len(answer["logprobs"]) == answer["usage"]["completion_tokens"]
    assert all(len(t["top"]) == 2 and t["logprob"] <= 0 for t in answer["logprobs"])
    with glyph.client() as client:
        result = client.post("/v1/chat/completions", json={
            "model": "glyph", "messages": [{"role": "user", "content": "Tell the story"}], "document": story,
            "max_tokens": 6, "ignore_eos": True, "logprobs": True, "top_logprobs": 3}).json()
    content = result["choices"][0]["logprobs"]["content"]
    assert len(content) == 6 and all(len(t["top_logprobs"]) == 3 for t in content)
    for entry in [*content, *(top for t in content for top in t["top_logprobs"])]:  # each token's own bytes
        assert entry["bytes"] and all(0 <= b < 256 for b in entry["bytes"])
        if "\ufffd" not in entry["token"]:
            assert bytes(entry["bytes"]).decode("utf-8") == entry["token"]
    assert all(len(t["top"][0]) == 4 for t in answer["logprobs"])  # (id, text, logprob, bytes)


def test_repetition_penalty_changes_a_repetitive_answer(glyph, story):
    plain = document_answer(glyph, story, max_tokens=64)
    penalised = document_answer(glyph, story, max_tokens=64, repetition_penalty=1.5)
    assert penalised["answer"] != plain["answer"]


def test_top_k_one_samples_the_greedy_answer(glyph, story):
    greedy = document_answer(glyph, story)
    assert document_answer(glyph, story, temperature=1.0, top_k=1, seed=3)["answer"] == greedy["answer"]


def test_a_stop_token_id_ends_the_answer_and_is_reported(glyph, story):
    tokens = document_answer(glyph, story, logprobs=0)["logprobs"]
    stop = tokens[2]["token_id"]
    ended = document_answer(glyph, story, ignore_eos=False, stop_token_ids=[stop], skip_special_tokens=False,
                            include_stop_str_in_output=True)
    assert ended["finish_reason"] == "stop" and ended["stop_reason"] == stop
    assert ended["usage"]["completion_tokens"] <= 3


def test_a_stop_string_cuts_the_answer(glyph, story):
    full = document_answer(glyph, story)["answer"]
    marker = full[len(full) // 2:len(full) // 2 + 3]
    cut = document_answer(glyph, story, ignore_eos=False, stop=[marker])
    assert marker not in cut["answer"] and cut["stop_reason"] == marker and cut["finish_reason"] == "stop"
    kept = document_answer(glyph, story, ignore_eos=False, stop=[marker], include_stop_str_in_output=True)
    assert kept["answer"].endswith(marker)
