"""Bad input and failures: clear typed errors, and the engine stays usable."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from glyphserve.engine import AnswerRequest, ChatMessage, GenerationSettings
from glyphserve.errors import (
    ConfigError,
    ContextOverflowError,
    EngineOutOfMemoryError,
    GlyphserveError,
    ModelLoadError,
)
from tests.engine.conftest import make_pages

PAGES = make_pages([(112, 140)] * 6, seed=5)  # 20 vision tokens per page


@pytest.mark.parametrize("question", ["", "   \n"])
def test_empty_question(load_engine, question):
    engine = load_engine()
    with pytest.raises(GlyphserveError, match="question is empty"):
        engine.answer(AnswerRequest(pages=PAGES[:1], question=question))


@pytest.mark.parametrize(
    "page", [np.zeros((112, 140), np.uint8), np.zeros((112, 140, 3), np.float32), np.zeros((112, 140, 4), np.uint8)]
)
def test_malformed_page(load_engine, page):
    with pytest.raises(GlyphserveError, match="page 2 must be an HxWx3 uint8"):
        load_engine().answer(AnswerRequest(pages=[PAGES[0], page], question="Who?"))


def test_unknown_role_and_bad_settings(load_engine):
    engine = load_engine()
    with pytest.raises(GlyphserveError, match="unknown chat role"):
        engine.answer(AnswerRequest(pages=PAGES[:1], question="Who?", history=[ChatMessage("tool", "x")]))
    with pytest.raises(ConfigError, match="max_tokens"):
        engine.answer(AnswerRequest(pages=PAGES[:1], question="Who?", settings=GenerationSettings(max_tokens=0)))


def test_context_overflow_says_how_many_pages_fit_and_truncation_keeps_them(load_engine, reference):
    # 6 pages x 22 tokens + ~12 text tokens + 16 new tokens; a 100-token context holds 3 pages.
    engine = load_engine(max_context=100)
    settings = GenerationSettings(max_tokens=16, ignore_eos=True)
    with pytest.raises(ContextOverflowError, match=r"only the first 3 of 6 pages fit") as err:
        engine.answer(AnswerRequest(pages=PAGES, question="Who is the wolf?", settings=settings))
    assert err.value.http_status == 422 and "truncate_pages" in err.value.message
    settings.truncate_pages = True
    answer = engine.answer(AnswerRequest(pages=PAGES, question="Who is the wolf?", settings=settings))
    assert answer.pages_used == 3 and answer.prompt_tokens + 16 <= 100
    expected, _ = reference.generate(PAGES[:3], "Who is the wolf?", max_new_tokens=16, ignore_eos=True)
    assert answer.token_ids == expected


def test_no_page_fits(load_engine):
    engine = load_engine(max_context=30)
    settings = GenerationSettings(max_tokens=16, truncate_pages=True)
    with pytest.raises(ContextOverflowError, match="not even the first page fits"):
        engine.answer(AnswerRequest(pages=PAGES, question="Who is the wolf?", settings=settings))


def test_checkpoint_of_another_architecture(tmp_path):
    from glyphserve.engine import Engine, EngineConfig

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelLoadError, match="'gpt2' checkpoint; glyphserve needs a GLM-4.1V"):
        Engine.load(EngineConfig(model=str(tmp_path), device="cpu"))


def test_missing_checkpoint(tmp_path):
    from glyphserve.engine import Engine, EngineConfig

    with pytest.raises(ModelLoadError, match="cannot read the model config"):
        Engine.load(EngineConfig(model=str(tmp_path / "nowhere"), device="cpu"))
    with pytest.raises(ModelLoadError):
        Engine.load(EngineConfig(model=str(tmp_path), device="cpu"))  # a directory without config.json
    with pytest.raises(ModelLoadError, match="Hugging Face model 'zai-org/no-such-model'"):
        Engine.load(EngineConfig(model="zai-org/no-such-model", device="cpu"))  # offline in tests


def test_config_choices():
    from glyphserve.engine import Engine, EngineConfig

    with pytest.raises(ConfigError, match="exactly one"):
        Engine.load(EngineConfig())
    with pytest.raises(ConfigError, match="unknown random-weights preset"):
        Engine.load(EngineConfig(random_weights="glm-5", device="cpu"))
    with pytest.raises(ConfigError, match="unknown dtype"):
        Engine.load(EngineConfig(random_weights="glm-4.1v-9b", dtype="int3", device="cpu"))


@pytest.mark.parametrize(
    "layer, failing_call",
    [
        (lambda m: m.model.visual.blocks[1].mlp, 1),  # during the vision encode
        (lambda m: m.lm_head, 3),  # in the second decode step
    ],
    ids=["vision", "decode"],
)
def test_out_of_memory_inside_the_forward_is_recovered(load_engine, reference, layer, failing_call):
    engine = load_engine()
    pages = PAGES[:2]
    engine.answer(AnswerRequest(pages=pages, question="Who?"))
    assert engine.stats()["prefix_cache"]["entries"] == 1

    calls = {"n": 0}

    def fail_once(module, args, output):
        calls["n"] += 1
        if calls["n"] == failing_call:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    # A real layer of the real model raises from inside its forward pass.
    hook = layer(engine.model).register_forward_hook(fail_once)
    request = AnswerRequest(pages=pages, question="Who pretended?", settings=GenerationSettings(max_tokens=8))
    try:
        with pytest.raises(EngineOutOfMemoryError) as err:
            engine.answer(AnswerRequest(pages=pages, question="Where?", settings=GenerationSettings(use_cache=False)))
        assert err.value.http_status == 503
        stats = engine.stats()
        assert stats["oom_recoveries"] == 1
        assert stats["prefix_cache"]["entries"] == 0 and stats["vision_cache"]["device"]["entries"] == 0
        answer = engine.answer(request)  # the next request succeeds, and is right
    finally:
        hook.remove()
    expected, _ = reference.generate(pages, "Who pretended?", max_new_tokens=8)
    assert answer.token_ids == expected
