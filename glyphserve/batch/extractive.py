"""``glyphserve batch --backend extractive``: no model; each question is answered with the best passages of its
document's text (BM25), cited with their pages, by the server's extractive backend, as ``glyphserve ask`` and
``glyphserve serve`` answer without a model. It is asked for by name, never a default: a rerun skips the questions
already in the results file, so passages written by a run that forgot --model would stay where the model's answers
belong."""

from __future__ import annotations

from typing import TYPE_CHECKING

from glyphserve.errors import ConfigError

if TYPE_CHECKING:
    from glyphserve.batch.prefetch import Item
    from glyphserve.engine import Answer


class ExtractiveAnswers:
    """What the batch runner answers with instead of an engine: ``answer_items`` reads the items' text, where an
    engine's ``answer_batch`` reads the pages of their requests."""

    name = "extractive"

    def __init__(self, top_k: int = 3):
        from glyphserve.serve.backends import ExtractiveBackend

        self.backend = ExtractiveBackend(store=None, top_k=top_k)

    def answer_items(self, items: list[Item]) -> list[Answer]:
        """Each item's answer, its ``pages_shown`` set to the pages holding the cited passages."""
        return [self._answer(item) for item in items]

    def _answer(self, item: Item) -> Answer:
        from glyphserve.engine import AnswerRequest
        from glyphserve.serve.backends import ChatJob
        from glyphserve.serve.retrieval import PageLayout

        prepared = item.prepared
        if not prepared.text.strip():
            raise ConfigError("the document has no text layer (scanned pages): --backend extractive searches the "
                              "text; read its pages with a model (--model PATH_OR_ID, or --endpoint URL)")
        pages = [PageLayout.from_manifest(manifest) for manifest in prepared.manifests]
        reply = self.backend.answer(ChatJob(AnswerRequest(pages=[], question=item.question), context=prepared.text,
                                            context_pages=pages))
        item.pages_shown = reply.pages_shown
        return reply.answer
