"""The remote engine against a real ``glyphserve serve`` process with the tiny model:
the same answers as the local engine, streamed and batched."""

from __future__ import annotations


import numpy as np
import pytest

from glyphserve.engine import AnswerRequest, ChatMessage, Engine, EngineConfig, GenerationSettings
from glyphserve.engine.remote import RemoteConfig, RemoteEngine
from tests.servers import Server


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("serve") / "data", "--model", str(tiny_model_dir), "--device", "cpu",
                    "--no-ui", "--max-batch", "4").start()
    yield server.url
    server.stop()


def test_same_answers_as_the_local_engine(served, tiny_model_dir):
    rng = np.random.default_rng(1)
    pages = [np.full((112, 140, 3), 255, np.uint8), rng.integers(0, 256, (84, 168, 3), dtype=np.uint8)]
    settings = GenerationSettings(max_tokens=12)
    requests = [
        AnswerRequest(pages, "What is it?", page_keys=[f"d:{n}" for n in range(len(pages))], settings=settings),
        AnswerRequest(pages, "Who wrote it?", page_keys=[f"d:{n}" for n in range(len(pages))], settings=settings),
        AnswerRequest(pages, "And then?", history=[ChatMessage("user", "First?"), ChatMessage("assistant", "Yes.")],
                      page_keys=[f"d:{n}" for n in range(len(pages))], settings=settings),
        # A collection's labelled pages: each label goes as a text part just before its page, read back as one.
        AnswerRequest(pages, "Which one?", page_labels=["Passage 1:\na.txt (page 1 of 1)\n", "Passage 2:\nb\n"],
                      page_keys=[f"d:{n}" for n in range(len(pages))], settings=settings),
    ]
    local = Engine.load(EngineConfig(model=str(tiny_model_dir)))
    expected = [local.answer(r) for r in requests]
    with RemoteEngine.load(RemoteConfig([served + "/v1"])) as remote:
        batched = remote.answer_batch(requests)
        events = list(remote.stream(requests[0]))
        stats = remote.stats()
    for want, got in zip(expected, batched, strict=True):
        assert got.text == want.text and got.thinking == want.thinking
        assert got.new_tokens == want.new_tokens and got.prompt_tokens == want.prompt_tokens
        assert got.finish_reason == want.finish_reason and got.vision_tokens == want.vision_tokens
    streamed = "".join(e.text for e in events if e.channel == "answer")
    assert events[-1].result.text == expected[0].text and streamed == expected[0].text
    assert stats["image_cache"]["misses"] == 1 and stats["requests"] == 5 and stats["retries"] == 0
    assert expected[3].prompt_tokens > expected[0].prompt_tokens  # the labels are in the prompt
