"""The remote engine against a real ``glyphserve serve`` process with the tiny model:
the same answers as the local engine, streamed and batched."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from glyphserve.engine import AnswerRequest, ChatMessage, Engine, EngineConfig, GenerationSettings
from glyphserve.engine.remote import RemoteConfig, RemoteEngine

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path_factory.mktemp("serve") / "serve.log", "w+")  # noqa: SIM115 (closed below)
    process = subprocess.Popen(
        [sys.executable, "-m", "glyphserve.cli", "serve", "--model", str(tiny_model_dir), "--no-ui",
         "--port", str(port), "--data-dir", str(tmp_path_factory.mktemp("serve-data")), "--max-batch", "4"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/v1/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"glyphserve serve did not start:\n{log.read()[-3000:]}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def test_same_answers_as_the_local_engine(served, tiny_model_dir):
    rng = np.random.default_rng(1)
    pages = [np.full((112, 140, 3), 255, np.uint8), rng.integers(0, 256, (84, 168, 3), dtype=np.uint8)]
    settings = GenerationSettings(max_new_tokens=12)
    requests = [
        AnswerRequest(pages, "What is it?", document_key="d", settings=settings),
        AnswerRequest(pages, "Who wrote it?", document_key="d", settings=settings),
        AnswerRequest(pages, "And then?", history=[ChatMessage("user", "First?"), ChatMessage("assistant", "Yes.")],
                      document_key="d", settings=settings),
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
    assert events[-1].result.text == expected[0].text and streamed.strip() == expected[0].text
    assert stats["image_cache"]["misses"] == 1 and stats["requests"] == 4 and stats["retries"] == 0
