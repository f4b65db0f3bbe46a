"""Run samples through a backend: render, answer, score, and aggregate per suite and length."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from glyphserve.errors import ContextOverflowError, TooManyPagesError
from glyphserve.eval import metrics
from glyphserve.eval.backends import Backend
from glyphserve.eval.suites import Sample
from glyphserve.render import RenderConfig, has_cjk, render_text, resolve_config


@dataclass(frozen=True)
class RenderSetting:
    """How documents are rendered: a preset ("auto" picks by script) and an optional dpi override."""

    preset: str = "auto"
    dpi: int | None = None

    def resolve(self, text: str) -> tuple[RenderConfig, str]:
        """The config for ``text`` and its label, e.g. ``glyph-en 72dpi``."""
        config = resolve_config(text, preset=self.preset, dpi=self.dpi)
        name = self.preset if self.preset != "auto" else "glyph-zh" if has_cjk(text) else "glyph-en"
        return config, f"{name} {config.dpi:g}dpi"


@dataclass
class SampleResult:
    suite: str
    length: int
    index: int
    setting: str  # preset and dpi, e.g. "glyph-en 72dpi"
    score: float
    text_tokens: int
    token_source: str  # how text_tokens was counted (tokenizer name or the estimate)
    vision_tokens: int
    pages: int
    render_s: float
    answer_s: float
    question: str
    answers: list[str]
    prediction: str
    error: str | None = None  # why the backend could not answer (scored 0)


@dataclass
class SuiteRow:
    """Means over the samples of one suite, render setting and length."""

    suite: str
    setting: str
    length: int
    samples: int
    accuracy: float
    text_tokens: float
    vision_tokens: float
    compression: float  # text tokens per vision token
    latency_s: float  # mean answer time (rendering excluded)
    render_s: float
    errors: int  # samples the backend refused (e.g. more pages than its context holds), scored 0


def score(sample: Sample, prediction: str) -> float:
    """Score a prediction with the sample's metric (all in [0, 1])."""
    if sample.metric == "recall":
        return metrics.string_match_recall(prediction, sample.answers)
    if sample.metric == "any":
        return metrics.string_match_any(prediction, sample.answers)
    if sample.metric == "words":
        return metrics.word_recall(prediction, sample.answers)
    if sample.metric == "longbench":
        return metrics.longbench_score(prediction, sample.answers, sample.meta["dataset"], sample.meta["all_classes"])
    if sample.metric == "mrcr":
        return metrics.mrcr_score(prediction, sample.answers[0], sample.meta["prefix"])
    raise ValueError(f"unknown metric {sample.metric!r}")


def evaluate(
    samples: Iterable[Sample],
    backend: Backend,
    setting: RenderSetting,
    progress: Callable[[SampleResult], None] | None = None,
) -> list[SampleResult]:
    """Render each sample's document with ``setting``, ask the backend, score the answer.

    A document too long for the backend's context is recorded with its error and scored 0;
    every other error stops the run.
    """
    results = []
    for sample in samples:
        start = time.perf_counter()
        config, label = setting.resolve(sample.text)
        rendered = render_text(sample.text, config, tokenizer=backend.tokenizer)
        rendered_at = time.perf_counter()
        error = None
        try:
            prediction = backend.answer(sample.text, rendered, sample.question)
        except (ContextOverflowError, TooManyPagesError) as exc:
            prediction, error = "", exc.message
        answered_at = time.perf_counter()
        result = SampleResult(
            suite=sample.suite, length=sample.length, index=sample.index, setting=label,
            score=score(sample, prediction), text_tokens=rendered.stats.text_tokens,
            token_source=rendered.stats.text_token_method,
            vision_tokens=rendered.stats.vision_tokens, pages=len(rendered.pages),
            render_s=rendered_at - start, answer_s=answered_at - rendered_at,
            question=sample.question, answers=list(sample.answers), prediction=prediction, error=error,
        )
        results.append(result)
        if progress:
            progress(result)
    return results


def summarize(results: Iterable[SampleResult]) -> list[SuiteRow]:
    """One row per (suite, setting, length), in first-seen suite/setting order and increasing length."""
    groups: dict[tuple[str, str, int], list[SampleResult]] = defaultdict(list)
    for r in results:
        groups[(r.suite, r.setting, r.length)].append(r)
    rows = []
    for (suite, setting, length), group in groups.items():
        n = len(group)
        text = sum(r.text_tokens for r in group) / n
        vision = sum(r.vision_tokens for r in group) / n
        rows.append(SuiteRow(
            suite=suite, setting=setting, length=length, samples=n,
            accuracy=sum(r.score for r in group) / n, text_tokens=text, vision_tokens=vision,
            compression=text / vision if vision else 0.0,
            latency_s=sum(r.answer_s for r in group) / n, render_s=sum(r.render_s for r in group) / n,
            errors=sum(r.error is not None for r in group),
        ))
    order = {key: i for i, key in enumerate(dict.fromkeys((r.suite, r.setting) for r in rows))}
    return sorted(rows, key=lambda r: (order[(r.suite, r.setting)], r.length))
