"""Run samples through a backend: render, answer, score, and aggregate per suite and length."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from glyphserve.engine.commands import in_cli_words
from glyphserve.errors import ContextOverflowError, TooManyPagesError
from glyphserve.eval import metrics
from glyphserve.eval.backends import Backend, ShownPages
from glyphserve.eval.suites import Sample
from glyphserve.render import RenderConfig, RenderedDocument, has_cjk, render_text, resolve_config
from glyphserve.retrieve import DocumentPages, Selection, select_pages


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
    setting: str  # preset and dpi, e.g. "glyph-en 72dpi", and the page selection when one was asked for
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
    pages_shown: int | None = None  # pages in front of the model (None: the backend refused them all)
    prompt_tokens: int | None = None  # the prompt with those pages, as page selection counted it
    evidence_shown: bool | None = None  # whether every page holding the sample's evidence was shown


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
    evidence_shown: float | None = None  # share of samples whose evidence pages were all shown
    pages_shown: float | None = None  # mean pages in front of the model


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
    page_selection: Iterable[str] = (),
) -> list[SampleResult]:
    """Render each sample's document with ``setting``, ask the backend, score the answer.

    Without ``page_selection`` every page is shown, and a document too long for the backend's context is
    recorded with its error (its advice naming eval's flags: --max-new-tokens, --page-selection) and scored 0.
    With modes (``first``, ``retrieve``, ``all``) each sample is asked once per mode, showing the pages that mode
    selects for the backend's budget; a sample with ``documents`` is asked as that collection (each page labelled
    with its document). Every other error stops the run.
    """
    modes = list(page_selection)
    results = []
    for sample in samples:
        start = time.perf_counter()
        config, label = setting.resolve(sample.text)
        collection = sample.documents if modes and sample.documents else None
        texts = [text for _, text in collection] if collection else [sample.text]
        rendered = [render_text(text, config, tokenizer=backend.tokenizer) for text in texts]
        rendered_at = time.perf_counter()
        evidence = _evidence_pages(sample, texts, rendered)
        documents = [DocumentPages(text, r.pages) for text, r in zip(texts, rendered)]  # one index for every mode
        for mode in modes or [None]:
            selected_at = time.perf_counter()
            shown, selection, error = _show(sample, backend, mode, documents, texts, rendered, collection)
            prediction = ""
            if error is None:
                try:
                    prediction = backend.answer(sample.question, shown)
                except (ContextOverflowError, TooManyPagesError) as exc:
                    error = exc.message
            answered_at = time.perf_counter()
            on_view = {(p.document, p.number) for p in selection.pages} if selection and error is None else set()
            result = SampleResult(
                suite=sample.suite, length=sample.length, index=sample.index,
                setting=label if mode is None else f"{label} {mode}",
                score=score(sample, prediction), text_tokens=sum(r.stats.text_tokens for r in rendered),
                token_source=rendered[0].stats.text_token_method,
                vision_tokens=sum(r.stats.vision_tokens for r in rendered), pages=sum(len(r.pages) for r in rendered),
                render_s=rendered_at - start, answer_s=answered_at - selected_at,
                question=sample.question, answers=list(sample.answers), prediction=prediction,
                error=in_cli_words(error) if error is not None else None,
                pages_shown=len(on_view) if error is None else None,
                prompt_tokens=selection.prompt_tokens if selection and error is None else None,
                evidence_shown=evidence <= on_view if evidence else None,
            )
            results.append(result)
            if progress:
                progress(result)
    return results


def _show(sample: Sample, backend: Backend, mode: str | None, documents: list[DocumentPages], texts: list[str],
          rendered: list[RenderedDocument], collection) -> tuple[ShownPages, Selection | None, str | None]:
    """The pages a mode shows (every page without one), or why none could be."""
    titles = [title for title, _ in collection] if collection else None
    try:
        budget = backend.page_budget(sample.question) if mode not in (None, "all") else None
        selection = select_pages(documents, mode=mode if budget else "all", question=sample.question,
                                 budget=budget, titles=titles)
    except ContextOverflowError as exc:
        return ShownPages("", []), None, exc.message
    chosen = [(p.document, p.number) for p in selection.pages]
    if len(chosen) == sum(len(r.pages) for r in rendered):
        text = sample.text  # every page: the whole text, as it was written
    else:
        text = "\n\n".join(_runs_text(texts, rendered, chosen))
    images = [rendered[d].pages[n - 1].image for d, n in chosen]
    return ShownPages(text, images, selection.labels), selection, None


def _runs_text(texts: list[str], rendered: list[RenderedDocument], chosen: list[tuple[int, int]]) -> list[str]:
    """The text of each run of consecutive shown pages (a paragraph across two shown pages stays whole)."""
    runs: list[list[tuple[int, int]]] = []
    for d, n in chosen:
        if runs and runs[-1][-1] == (d, n - 1):
            runs[-1].append((d, n))
        else:
            runs.append([(d, n)])
    out = []
    for run in runs:
        d = run[0][0]
        start, end = rendered[d].pages[run[0][1] - 1].char_span[0], rendered[d].pages[run[-1][1] - 1].char_span[1]
        out.append(texts[d][start:end])
    return out


def _evidence_pages(sample: Sample, texts: list[str], rendered: list[RenderedDocument]) -> set[tuple[int, int]]:
    """(document, page) of every page that holds part of the sample's evidence sentences."""
    pages = set()
    for sentence in sample.evidence:
        d, start = next((d, t.find(sentence)) for d, t in enumerate(texts) if sentence in t)
        end = start + len(sentence)
        pages |= {(d, p.number) for p in rendered[d].pages if p.char_span[0] < end and start < p.char_span[1]}
    return pages


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
            evidence_shown=_mean([r.evidence_shown for r in group if r.evidence_shown is not None]),
            pages_shown=_mean([r.pages_shown or 0 for r in group]),
        ))
    order = {key: i for i, key in enumerate(dict.fromkeys((r.suite, r.setting) for r in rows))}
    return sorted(rows, key=lambda r: (order[(r.suite, r.setting)], r.length))


def _mean(values: list) -> float | None:
    return sum(values) / len(values) if values else None
