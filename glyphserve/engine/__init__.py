"""Pages + questions to tokens: GLM-4.1V (Glyph) inference.

Heavy dependencies (torch, transformers) load on first use of ``Engine`` or ``make_tiny_model``.
"""

from __future__ import annotations

from glyphserve.engine.types import (
    Answer,
    AnswerRequest,
    CacheReport,
    ChatMessage,
    EncodedPage,
    EngineConfig,
    GenerationSettings,
    Page,
    StageTimings,
    StepRecord,
    StreamEvent,
    TokenLogprob,
    engine_page,
)

__all__ = [
    "Answer",
    "AnswerRequest",
    "CacheReport",
    "ChatMessage",
    "EncodedPage",
    "Engine",
    "EngineConfig",
    "GenerationSettings",
    "Page",
    "StageTimings",
    "StepRecord",
    "StreamEvent",
    "TokenLogprob",
    "engine_page",
    "make_tiny_model",
]


def __getattr__(name: str):
    if name == "Engine":
        from glyphserve.engine.engine import Engine

        return Engine
    if name == "make_tiny_model":
        from glyphserve.engine.tiny import make_tiny_model

        return make_tiny_model
    raise AttributeError(f"module 'glyphserve.engine' has no attribute {name!r}")
