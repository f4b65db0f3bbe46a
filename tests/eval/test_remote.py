"""The openai backend against a real `glyphserve serve` process running the tiny model."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from glyphserve.cli import main
from glyphserve.eval import LocalBackend, RenderSetting, evaluate, generate

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server_url(tiny_model_dir, tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "glyphserve.cli", "serve", "--model", str(tiny_model_dir), "--no-ui",
             "--port", str(port), "--data-dir", str(tmp_path_factory.mktemp("serve-data"))],
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
                pytest.fail(f"glyphserve serve did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_openai_backend_answers_like_the_local_model(server_url, tiny_model_dir, tmp_path):
    out = tmp_path / "remote"
    args = ["eval", "--suite", "niah", "--lengths", "1k", "--samples", "2", "--preset", "glyph-en", "--dpi", "72",
            "--max-new-tokens", "6", "--endpoint", server_url + "/v1", "-o", str(out)]
    assert main(args) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["backend"] == "openai"
    remote = [s["prediction"] for s in data["samples"]]
    assert all(remote)  # the random tiny model still says something

    local = evaluate(generate("niah", [1024], 2, seed=0), LocalBackend(str(tiny_model_dir), max_new_tokens=6),
                     RenderSetting("glyph-en", 72))
    # greedy decoding of the same pages and question: the server and the in-process engine agree
    assert remote == [r.prediction for r in local]
    assert [s["vision_tokens"] for s in data["samples"]] == [r.vision_tokens for r in local]
