"""The sampling parameters both chat routes take, under vLLM's names (those of the engine's
``GenerationSettings``), and what becomes of them: a ``GenerationSettings`` with every value given."""

from __future__ import annotations

from dataclasses import fields

from pydantic import BaseModel, Field

from glyphserve.engine.types import GenerationSettings

# GenerationSettings fields a request sets under the same name (logprobs differs per route: see the routes).
_PASSED = tuple(f.name for f in fields(GenerationSettings) if f.name != "logprobs")


class SamplingParams(BaseModel):
    """Unset parameters keep ``GenerationSettings``' defaults (greedy, 512 tokens, caches on)."""

    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # -1 or 0: all tokens (vLLM takes both)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    seed: int | None = Field(None, ge=0, lt=2**64)
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
