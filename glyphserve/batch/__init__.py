"""Batch analysis: many documents, a list of questions each, answered into a resumable JSONL file.

Rendering runs in worker processes ahead of the engine; questions are answered in batches
across documents; every result is fsynced as one JSON line, so reruns skip what is done.
"""

from glyphserve.batch.inputs import BatchDocument, collect_documents, load_questions
from glyphserve.batch.prefetch import ItemError, PreparedDocument, Prefetcher, RenderOptions, prepare_document
from glyphserve.batch.results import ResultLog, read_results
from glyphserve.batch.runner import BatchOptions, BatchRunner, BatchSummary

__all__ = [
    "BatchDocument",
    "BatchOptions",
    "BatchRunner",
    "BatchSummary",
    "ItemError",
    "PreparedDocument",
    "Prefetcher",
    "RenderOptions",
    "ResultLog",
    "collect_documents",
    "load_questions",
    "prepare_document",
    "read_results",
]
