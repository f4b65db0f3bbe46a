"""What answers the questions during an eval: the embedded extractive search, a local model, or a remote one.

The harness needs only :class:`Backend`; the adapters wrap what the other packages already
provide (the serve package's BM25 backend, :class:`glyphserve.engine.Engine`, the remote
OpenAI-compatible client) instead of reimplementing them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import numpy as np

    from glyphserve.retrieve import PromptBudget

@dataclass
class ShownPages:
    """What a backend is given for a question: the pages in front of the model (their images, and the label before
    each one for a collection) and the text they hold, which the extractive backend searches."""

    text: str
    images: list["np.ndarray"]
    labels: list[str] | None = None


class Backend(Protocol):
    name: str
    # What counts the document's text tokens (anything ``glyphserve.render.count_text_tokens``
    # accepts); None = the renderer's documented estimate.
    tokenizer: object | None
    context: int | None  # tokens of prompt + answer the pages are selected for (None: no limit known)

    def page_budget(self, question: str) -> "PromptBudget | None":
        """What the pages may cost for this question (None: no context to fit, every page is shown)."""
        ...

    def answer(self, question: str, shown: ShownPages) -> str:
        """The answer to ``question`` about the pages shown."""

    def describe(self) -> dict:
        """What answered, for the report: the model, where it ran, the answer's length at most."""
        ...


def estimated_budget(question: str, context: int, max_tokens: int) -> "PromptBudget":
    """A budget counted with the renderer's text-token estimate, for backends without a tokenizer here."""
    from glyphserve.glm4v import MESSAGE_TOKENS, PAGE_MARKER_TOKENS, PROMPT_TOKENS
    from glyphserve.render import count_text_tokens
    from glyphserve.retrieve import PromptBudget

    def tokens(text: str) -> int:
        return count_text_tokens(text)[0]

    return PromptBudget(
        context, max_tokens,
        lambda labels: PROMPT_TOKENS + MESSAGE_TOKENS + tokens(question)
        + sum(PAGE_MARKER_TOKENS + tokens(x) for x in labels),
        tokens,
    )


class ExtractiveBackend:
    """The server's embedded default: the best BM25 passages of the shown pages' text, no model. With a
    ``context`` the pages are selected as for a model with that context (token counts estimated)."""

    name = "extractive"
    tokenizer = None

    def __init__(self, top_k: int = 3, context: int | None = None, max_tokens: int = 1024):
        from glyphserve.serve.backends import ExtractiveBackend as _Extractive

        self._backend = _Extractive(store=None, top_k=top_k)
        self.context, self.max_tokens = context, max_tokens

    def page_budget(self, question: str) -> "PromptBudget | None":
        return estimated_budget(question, self.context, self.max_tokens) if self.context else None

    def describe(self) -> dict:
        return {"passages": self._backend.top_k}

    def answer(self, question: str, shown: ShownPages) -> str:
        """The best passages; with a ``context``, pages that would not fit it are refused as a model with that
        context refuses them (``all`` and no page selection show every page)."""
        from glyphserve.engine import AnswerRequest
        from glyphserve.errors import ContextOverflowError
        from glyphserve.glm4v import vision_tokens
        from glyphserve.serve.backends import ChatJob

        budget = self.page_budget(question)
        if budget is not None:
            labels = shown.labels or [""] * len(shown.images)
            need = budget.count_prompt(labels) + sum(vision_tokens(*i.shape[:2]) for i in shown.images)
            if need > budget.limit:
                raise ContextOverflowError(f"the prompt needs about {need:,} tokens; {budget.limit:,} fit the "
                                           f"{self.context:,}-token context with a {self.max_tokens:,}-token answer")
        if not shown.text.strip():
            return ""
        job = ChatJob(AnswerRequest(pages=[], question=question), context=shown.text)
        return self._backend.answer(job).answer.text


class _PageReadingBackend:
    """The model backends: the shown pages and the question go to an ``Engine`` (or ``RemoteEngine``)."""

    def __init__(self, engine, max_new_tokens: int, tokenizer: object | None = None):
        from glyphserve.engine import GenerationSettings

        self.engine = engine
        self.tokenizer = tokenizer
        self._settings = GenerationSettings(max_tokens=max_new_tokens)

    def answer(self, question: str, shown: ShownPages) -> str:
        from glyphserve.engine import AnswerRequest

        request = AnswerRequest(pages=shown.images, question=question, page_labels=shown.labels,
                                settings=self._settings)
        return self.engine.answer(request).text

    def describe(self) -> dict:
        return {"max_new_tokens": self._settings.max_tokens}


class LocalBackend(_PageReadingBackend):
    """A model loaded in-process by :class:`glyphserve.engine.Engine`; text tokens come from its tokenizer, and
    page selection counts with its tokenizer and chat template."""

    name = "local"

    def __init__(self, model: str | None = None, random_weights: str | None = None, max_new_tokens: int = 1024,
                 max_context: int | None = None, device: str = "auto", dtype: str = "auto",
                 quantize: str | None = None):
        from glyphserve.engine import Engine, EngineConfig

        engine = Engine.load(EngineConfig(model=model, random_weights=random_weights, max_context=max_context,
                                          device=device, dtype=dtype, quantize=quantize))
        super().__init__(engine, max_new_tokens, engine.tokenizer)
        self.context = engine.max_context

    def describe(self) -> dict:
        engine = self.engine
        quantize = {"quantize": engine.config.quantize} if engine.config.quantize else {}  # (its scores are its own)
        return {"model": engine.name, "device": str(engine.device), "dtype": str(engine.dtype).removeprefix("torch."),
                **quantize, **super().describe()}

    def page_budget(self, question: str) -> "PromptBudget | None":
        from glyphserve.engine.prompt import page_budget

        return page_budget(self.engine, [], question, self._settings.max_tokens)


class OpenAIBackend(_PageReadingBackend):
    """A remote OpenAI-compatible server (e.g. ``vllm serve zai-org/Glyph``) reading the shown pages, selected for
    ``context`` or the context length the server reports, against an upper bound of the prompt
    (``glyphserve.engine.prompt.page_budget``)."""

    name = "openai"

    def __init__(self, endpoint: str, model: str | None = None, api_key: str | None = None,
                 max_new_tokens: int = 1024, context: int | None = None):
        from glyphserve.engine.remote import RemoteConfig, RemoteEngine

        remote = RemoteEngine.load(RemoteConfig(endpoints=[endpoint], model=model, api_key=api_key,
                                                max_context=context))
        super().__init__(remote, max_new_tokens)
        self.context = remote.max_context
        self.endpoint = endpoint

    def describe(self) -> dict:
        served = [e["model"] for e in self.engine.stats()["endpoints"] if e["model"]]
        return {"endpoint": self.endpoint, "model": served[0] if served else None, **super().describe()}

    def page_budget(self, question: str) -> "PromptBudget | None":
        from glyphserve.engine.prompt import page_budget

        return page_budget(self.engine, [], question, self._settings.max_tokens)
