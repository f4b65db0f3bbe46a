"""The openai backend against a real `glyphserve serve` process running the tiny model."""

from __future__ import annotations

import json

import pytest

from glyphserve.cli import main
from glyphserve.eval import LocalBackend, RenderSetting, evaluate, generate
from tests.servers import Server


@pytest.fixture(scope="module")
def server_url(tiny_model_dir, tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("serve") / "data", "--model", str(tiny_model_dir), "--device", "cpu",
                    "--no-ui").start()
    yield server.url
    server.stop()


def test_openai_backend_answers_like_the_local_model(server_url, tiny_model_dir, tmp_path):
    out = tmp_path / "remote"
    args = ["eval", "--suite", "niah", "--lengths", "1k", "--samples", "2", "--preset", "glyph-en", "--dpi", "72",
            "--max-new-tokens", "6", "--endpoint", server_url + "/v1", "-o", str(out)]
    assert main(args) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["backend"] == "openai"
    # what answered is in the report: the server and the model it names, the answer length
    assert data["meta"]["endpoint"] == server_url + "/v1" and data["meta"]["max_new_tokens"] == 6
    assert data["meta"]["model"] == tiny_model_dir.name
    remote = [s["prediction"] for s in data["samples"]]
    assert all(remote)  # the random tiny model still says something

    local = evaluate(generate("niah", [1024], 2, seed=0), LocalBackend(str(tiny_model_dir), max_new_tokens=6),
                     RenderSetting("glyph-en", 72))
    # greedy decoding of the same pages and question: the server and the in-process engine agree
    assert remote == [r.prediction for r in local]
    assert [s["vision_tokens"] for s in data["samples"]] == [r.vision_tokens for r in local]
