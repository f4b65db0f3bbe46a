"""The sampler's noise stays inside (0, 1), greedy rows that go through the sampling path take none of it, and a
row's masks do not depend on the other rows of its step."""

from __future__ import annotations

import numpy as np
import torch

from glyphserve.engine import AnswerRequest, GenerationSettings
from glyphserve.engine.sampler import _GOLDEN, _MIX1, _MIX2, Sampler, uniform_noise
from tests.engine.conftest import make_pages

MASK = (1 << 64) - 1


def _unxorshift(y: int, bits: int) -> int:
    x = y
    for _ in range(64 // bits + 1):
        x = y ^ (x >> bits)
    return x


def seed_with_top_noise(position: int, token: int) -> int:
    """A seed whose hash at (``position``, ``token``) has every bit set: the largest noise the sampler can draw
    (splitmix64's finaliser run backwards)."""
    x = _unxorshift(MASK, 31)
    x = x * pow(_MIX2 & MASK, -1, 1 << 64) & MASK
    x = _unxorshift(x, 27)
    x = x * pow(_MIX1 & MASK, -1, 1 << 64) & MASK
    x = _unxorshift(x, 30)
    return (x - position * (_MIX1 & MASK) - token) * pow(_GOLDEN & MASK, -1, 1 << 64) & MASK


def test_the_largest_noise_is_below_one_and_its_gumbel_draw_finite():
    seed = seed_with_top_noise(position=5, token=9)
    signed = torch.tensor([seed - (1 << 64) if seed >= 1 << 63 else seed])
    u = uniform_noise(signed, torch.tensor([5]), 16)
    assert u[0, 9].item() == 1 - 2**-24  # the top of the range, every hash bit set
    assert ((u > 0) & (u < 1)).all()
    assert torch.isfinite(-torch.log(-torch.log(u))).all()


def test_a_greedy_penalised_row_takes_no_noise(load_engine, reference):
    """A repetition penalty sends a greedy row through the sampling path; a seed whose noise is largest at some
    token's first draw must not choose that token (noise times zero was NaN there, and argmax took the NaN)."""
    pages = make_pages([(112, 140)], seed=3)
    inputs = reference.inputs(pages, "Who is the wolf?")
    with torch.inference_mode():
        out = reference.model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                       repetition_penalty=1.3)
    expected = out[0, inputs["input_ids"].shape[1]:].tolist()
    token = (expected[0] + 1) % reference.model.config.text_config.vocab_size
    settings = GenerationSettings(max_tokens=8, ignore_eos=True, repetition_penalty=1.3,
                                  seed=seed_with_top_noise(position=0, token=token))
    answer = load_engine().answer(AnswerRequest(pages=pages, question="Who is the wolf?", settings=settings))
    assert answer.token_ids == expected


GLYPH_VOCAB = 151552


def sampling(**settings) -> GenerationSettings:
    return GenerationSettings(temperature=1.0, **settings)


def test_a_row_without_top_k_or_top_p_keeps_every_token_beside_one_with_them():
    """The float32 sum of a 151k-token softmax reaches 1 before its last tokens: a top-p cut at 1 dropped them
    for every row of a step in which some row used top-k or top-p."""
    sampler = Sampler(GLYPH_VOCAB, slots=3, stop_ids=[0], device=torch.device("cpu"))
    for slot, settings in enumerate([sampling(), sampling(top_k=50), sampling(top_p=0.9)]):
        sampler.admit(slot, settings, prompt_ids=[1, 2], seed=slot, greedy=False)
    slots = torch.arange(3)
    logits = torch.randn(3, GLYPH_VOCAB, generator=torch.Generator().manual_seed(0)) * 3
    assert sampler.rows(slots.numpy()).sorted_masks
    masked = sampler._top_k_top_p(logits.clone(), slots)
    assert torch.isfinite(masked[0]).all()
    assert torch.isfinite(masked[1]).sum() == 50 and 1 < torch.isfinite(masked[2]).sum() < GLYPH_VOCAB


def test_a_top_k_of_the_whole_vocabulary_keeps_every_token():
    sampler = Sampler(GLYPH_VOCAB, slots=1, stop_ids=[0], device=torch.device("cpu"))
    sampler.admit(0, sampling(top_k=10**6), prompt_ids=[1], seed=0, greedy=False)
    assert not sampler.rows(np.array([0])).sorted_masks
