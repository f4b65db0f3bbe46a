"""What answers the questions during an eval: the embedded extractive search, a local model, or a remote one.

The harness needs only :class:`Backend`; the adapters wrap what the other packages already
provide (the serve package's BM25 backend, :class:`glyphserve.engine.Engine`, the remote
OpenAI-compatible client) instead of reimplementing them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from glyphserve.render import RenderedDocument


class Backend(Protocol):
    name: str
    # What counts the document's text tokens (anything ``glyphserve.render.count_text_tokens``
    # accepts); None = the renderer's documented estimate.
    tokenizer: object | None

    def answer(self, doc_text: str, rendered: "RenderedDocument", question: str) -> str:
        """The answer to ``question`` about the document (its text and its rendered pages)."""
        ...


class ExtractiveBackend:
    """The server's embedded default: the best BM25 passages of the source text, no model."""

    name = "extractive"
    tokenizer = None

    def __init__(self, top_k: int = 3):
        from glyphserve.serve.backends import ExtractiveBackend as _Extractive

        self._backend = _Extractive(store=None, top_k=top_k)

    def answer(self, doc_text: str, rendered: "RenderedDocument", question: str) -> str:
        from glyphserve.engine import AnswerRequest
        from glyphserve.serve.backends import ChatJob

        job = ChatJob(AnswerRequest(pages=[], question=question), context=doc_text)
        return self._backend.answer(job).answer.text


class _PageReadingBackend:
    """The model backends: the rendered pages and the question go to an ``Engine`` (or ``RemoteEngine``)."""

    def __init__(self, engine, max_new_tokens: int, tokenizer: object | None = None):
        from glyphserve.engine import GenerationSettings

        self.engine = engine
        self.tokenizer = tokenizer
        self._settings = GenerationSettings(max_tokens=max_new_tokens)

    def answer(self, doc_text: str, rendered: "RenderedDocument", question: str) -> str:
        from glyphserve.engine import AnswerRequest

        pages = [page.image for page in rendered.pages]
        return self.engine.answer(AnswerRequest(pages=pages, question=question, settings=self._settings)).text


class LocalBackend(_PageReadingBackend):
    """A model loaded in-process by :class:`glyphserve.engine.Engine`; text tokens come from its tokenizer."""

    name = "local"

    def __init__(self, model: str | None = None, random_weights: str | None = None, max_new_tokens: int = 1024,
                 max_context: int | None = None):
        from glyphserve.engine import Engine, EngineConfig

        engine = Engine.load(EngineConfig(model=model, random_weights=random_weights, max_context=max_context))
        super().__init__(engine, max_new_tokens, engine.tokenizer)


class OpenAIBackend(_PageReadingBackend):
    """A remote OpenAI-compatible server (e.g. ``vllm serve zai-org/Glyph``) reading the rendered pages."""

    name = "openai"

    def __init__(self, endpoint: str, model: str | None = None, api_key: str | None = None, max_new_tokens: int = 1024):
        from glyphserve.engine.remote import RemoteConfig, RemoteEngine

        remote = RemoteEngine.load(RemoteConfig(endpoints=[endpoint], model=model, api_key=api_key))
        super().__init__(remote, max_new_tokens)
