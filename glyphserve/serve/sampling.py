"""The sampling parameters both chat routes take, under vLLM's names (those of the engine's
``GenerationSettings``), and what becomes of them: a ``GenerationSettings`` with every value given.

Checked at the boundary with vLLM's rules, so a value the engine cannot sample with never reaches it:

- ``temperature`` in [0, 2]; below 1e-5 it means greedy (0), and a positive one below 0.01 is raised to 0.01
  (vLLM's floor: smaller ones overflow the softmax to inf/nan).
- ``top_p`` in (0, 1]; below 1e-6 it is raised to 1e-6, which keeps only the most likely token exactly as any
  smaller value does (that token's probability is at least 1/vocabulary > 1e-6), without underflowing float32.
- ``seed`` in [0, 2**64 - 1]; ``max_tokens`` at least 1; ``repetition_penalty`` in [0.001, 1000] (the engine's
  range); no NaN or infinity anywhere.
- ``stop``: at most 16 strings of at most 1,000 characters (each streamed delta is searched for every one).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Annotated

from pydantic import AfterValidator, BaseModel, Field

from glyphserve.engine.types import (GREEDY_BELOW, MAX_SEED, MAX_TEMPERATURE, PENALTY_RANGE, REPETITION_PENALTY_RANGE,
                                     GenerationSettings)

MIN_TEMPERATURE = 1e-2
MIN_TOP_P = 1e-6
MAX_STOPS = 16
MAX_STOP_CHARS = 1000


def _temperature(value: float) -> float:
    return 0.0 if value < GREEDY_BELOW else max(value, MIN_TEMPERATURE)


Temperature = Annotated[float, Field(ge=0, le=MAX_TEMPERATURE, allow_inf_nan=False),
                       AfterValidator(_temperature)]
TopP = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False), AfterValidator(lambda value: max(value, MIN_TOP_P))]
StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]
Stop = StopString | Annotated[list[StopString], Field(max_length=MAX_STOPS)]

# GenerationSettings fields a request sets under the same name (logprobs differs per route: see the routes).
_PASSED = tuple(f.name for f in fields(GenerationSettings) if f.name != "logprobs")


class SamplingParams(BaseModel):
    """Unset parameters keep ``GenerationSettings``' defaults (greedy, 512 tokens, caches on)."""

    max_tokens: int | None = Field(None, ge=1)
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: int | None = Field(None, ge=-1)  # -1 or 0: all tokens (vLLM takes both)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, ge=REPETITION_PENALTY_RANGE[0], le=REPETITION_PENALTY_RANGE[1],
                                             allow_inf_nan=False)
    presence_penalty: float | None = Field(None, ge=PENALTY_RANGE[0], le=PENALTY_RANGE[1])
    frequency_penalty: float | None = Field(None, ge=PENALTY_RANGE[0], le=PENALTY_RANGE[1])
    stop: Stop | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    ignore_eos: bool | None = None  # vLLM's extension: stop tokens are suppressed until max_tokens
    use_cache: bool | None = None  # glyphserve's: vision-feature and prefix caches
    truncate_pages: bool | None = None  # glyphserve's: keep the first pages that fit instead of failing

    def generation_settings(self, *, logprobs: int | None = None, max_tokens: int | None = None) -> GenerationSettings:
        """The settings of the engine's request; ``max_tokens`` replaces the field (OpenAI's
        ``max_completion_tokens``), ``logprobs`` is the engine's (None, 0 or the number of alternatives)."""
        values = {name: getattr(self, name) for name in _PASSED if getattr(self, name, None) is not None}
        if max_tokens is not None:
            values["max_tokens"] = max_tokens
        if values.get("top_k", 0) < 0:
            values["top_k"] = 0
        if "stop" in values:
            values["stop"] = (values["stop"],) if isinstance(values["stop"], str) else tuple(values["stop"])
        if "stop_token_ids" in values:
            values["stop_token_ids"] = tuple(values["stop_token_ids"])
        return GenerationSettings(**values, logprobs=logprobs)
