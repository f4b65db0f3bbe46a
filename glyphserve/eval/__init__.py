"""Accuracy harness: seeded suites, LongBench/MRCR loaders, metrics, and rendering legibility.

``glyphserve eval`` drives it; the pieces are usable on their own::

    from glyphserve.eval import ExtractiveBackend, RenderSetting, evaluate, generate, summarize
    rows = summarize(evaluate(generate("niah", [4096], 5, seed=0), ExtractiveBackend(), RenderSetting()))
"""

from glyphserve.eval.backends import Backend, ExtractiveBackend, LocalBackend, OpenAIBackend
from glyphserve.eval.loaders import load_longbench, load_mrcr
from glyphserve.eval.ocr import LegibilityRow, legibility
from glyphserve.eval.runner import RenderSetting, SampleResult, SuiteRow, evaluate, score, summarize
from glyphserve.eval.suites import GENERATED_SUITES, Sample, generate

__all__ = [
    "GENERATED_SUITES",
    "Backend",
    "ExtractiveBackend",
    "LegibilityRow",
    "LocalBackend",
    "OpenAIBackend",
    "RenderSetting",
    "Sample",
    "SampleResult",
    "SuiteRow",
    "evaluate",
    "generate",
    "legibility",
    "load_longbench",
    "load_mrcr",
    "score",
    "summarize",
]
