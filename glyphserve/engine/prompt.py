"""Conversation to prompt tokens, the way Glyph is used: the pages open the first user turn, then the text."""

from __future__ import annotations

import threading
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from glyphserve.engine.types import ChatMessage
from glyphserve.errors import ContextOverflowError, GlyphserveError
from glyphserve.glm4v import MESSAGE_TOKENS, PAGE_MARKER_TOKENS, PROMPT_TOKENS
from glyphserve.retrieve import PromptBudget


@dataclass
class PromptTokens:
    ids: list[int]
    prefix_len: int  # tokens up to the last page's <|end_of_image|> (0 without pages): the document prefix
    image_grids: list[tuple[int, int, int]]


def conversation(history: list[ChatMessage], question: str, n_pages: int,
                 labels: Sequence[str] | None = None) -> list[dict]:
    """Messages in the HF chat format; the pages belong to the first user turn, each after its label (a text
    part, e.g. which document of a collection it comes from) when ``labels`` gives one (the first ``n_pages``)."""
    if labels is not None and len(labels) < n_pages:
        raise GlyphserveError(f"{n_pages} pages but {len(labels)} page labels: give one label per page")
    images: list[dict] = []
    for i in range(n_pages):
        if labels is not None and labels[i]:
            images.append({"type": "text", "text": labels[i]})
        images.append({"type": "image"})
    messages: list[dict] = []
    placed = False
    for msg in history:
        if msg.role not in ("system", "user", "assistant"):
            raise GlyphserveError(f"unknown chat role {msg.role!r} (use system, user or assistant)")
        if msg.role == "user" and not placed:
            messages.append({"role": "user", "content": [*images, {"type": "text", "text": msg.content}]})
            placed = True
        else:
            messages.append({"role": msg.role, "content": msg.content})
    last = [] if placed else images
    messages.append({"role": "user", "content": [*last, {"type": "text", "text": question}]})
    return messages


# Tokens of rendered conversations kept (8 bytes each): a question's prompt is counted while its pages are chosen,
# then built from the same text (it was tokenized three times a question, on the threads that also serve
# requests). A text of more than a sixteenth of them is not kept.
ENCODED_TOKENS = 1 << 20
# A rendered conversation of more than CHARS_PER_TOKEN characters a token of the context (and more than a piece)
# is counted a piece of PIECE_CHARS at a time first, and refused once the pieces need more than the context:
# tokenized whole, a 2 MB question took 3.4 s of a request thread and a 10 MB one 20 s and 1.6 GB before its
# refusal, and questions behind them waited. A cut between two pieces may change a few tokens near it:
# SEAM_TOKENS a cut are not counted.
CHARS_PER_TOKEN = 4
PIECE_CHARS = 1 << 16
SEAM_TOKENS = 8


class PromptBuilder:
    def __init__(self, tokenizer, chat_template: str, image_token_id: int, image_end_token_id: int, merge_size: int,
                 max_context: int | None = None):
        self.tokenizer = tokenizer
        self.max_context = max_context  # texts that need more tokens are refused before they are tokenized whole
        self.chat_template = chat_template
        self.image_token_id = image_token_id
        self.image_end_token_id = image_end_token_id
        self.merge_size = merge_size
        self._encoded: OrderedDict[str, array] = OrderedDict()
        self._encoded_tokens = 0
        self._lock = threading.Lock()  # prompts are built on the callers' threads

    def text(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
        )

    def encode(self, messages: list[dict]) -> array:
        """The rendered template's tokens (no special tokens added); the latest texts' are kept."""
        text = self.text(messages)
        with self._lock:
            raw = self._encoded.get(text)
            if raw is not None:
                self._encoded.move_to_end(text)
                return raw
        self._refuse_past_context(text)
        raw = array("q", self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(raw) <= ENCODED_TOKENS // 16:
            with self._lock:
                if text not in self._encoded:
                    self._encoded[text] = raw
                    self._encoded_tokens += len(raw)
                while self._encoded_tokens > ENCODED_TOKENS:
                    self._encoded_tokens -= len(self._encoded.popitem(last=False)[1])
        return raw

    def _refuse_past_context(self, text: str) -> None:
        """Count a long text a piece at a time, and refuse it as soon as the pieces need more than the context."""
        if self.max_context is None or len(text) <= max(CHARS_PER_TOKEN * self.max_context, PIECE_CHARS):
            return  # (tokenized whole at once: the planner then says exactly how many tokens it needs)
        counted = 0
        for start in range(0, len(text), PIECE_CHARS):
            piece = text[start : start + PIECE_CHARS]
            counted += len(self.tokenizer(piece, add_special_tokens=False)["input_ids"]) - SEAM_TOKENS
            if counted > self.max_context:
                raise ContextOverflowError(
                    f"the prompt needs more than {self.max_context} tokens (its text: {len(text):,} characters), "
                    f"but the context holds {self.max_context}: shorten the question or the conversation")

    def count(self, messages: list[dict]) -> int:
        """Tokens of the rendered template, each page's <|image|> counting 0 (its vision tokens are the page's)."""
        return sum(1 for t in self.encode(messages) if t != self.image_token_id)

    def build(self, messages: list[dict], grids: list[tuple[int, int, int]]) -> PromptTokens:
        """Tokenise the rendered template and expand each <|image|> into one token per merged patch."""
        raw = self.encode(messages)
        if sum(1 for t in raw if t == self.image_token_id) != len(grids):
            raise GlyphserveError("the conversation text contains the reserved image marker <|image|>")
        ids: list[int] = []
        images = iter(grids)
        for t in raw:
            if t == self.image_token_id:
                _, gh, gw = next(images)
                ids.extend([t] * (gh * gw // self.merge_size**2))
            else:
                ids.append(t)
        prefix_len = 0
        if grids:
            prefix_len = len(ids) - ids[::-1].index(self.image_end_token_id)
        return PromptTokens(ids=ids, prefix_len=prefix_len, image_grids=list(grids))


# Tokens the choice of pages leaves for an answer whose max_tokens is unset (it may then take all the prompt leaves).
ANSWER_ROOM = 512


def answer_room(context: int) -> int:
    """The room a choice of pages keeps for an answer whose max_tokens is unset: ``ANSWER_ROOM``, at most half the
    context (a 512-token context kept all of it, and refused one page that fitted with room to spare)."""
    return min(ANSWER_ROOM, context // 2)


def page_budget(engine, history: list[ChatMessage], question: str, max_tokens: int | None) -> PromptBudget | None:
    """What the pages may cost in ``engine``'s context for this question and answer length (``answer_room`` when
    unset), counted by its tokenizer and chat template. For an engine without them that knows its context (a remote
    one) the prompt is bounded from above, so pages that fit the bound fit a server that counts GLM-4.1V's tokens;
    the bound is loose for long conversations (a token per byte, where English text takes ~4 bytes a token), and
    when the text alone exceeds it the server judges. None when neither."""
    prompts: PromptBuilder | None = getattr(engine, "prompts", None)
    context = getattr(engine, "max_context", None)  # (an engine with a tokenizer knows its context)
    if context is None:
        return None
    unset = max_tokens is None
    max_tokens = answer_room(context) if unset else max_tokens
    if prompts is None:
        # GLM-4.1V's byte-level BPE spends at most a token per UTF-8 byte of text; the template's own tokens are
        # doubled, in case the server's template adds a few.
        text = sum(len(m.content.encode()) for m in history) + len(question.encode())
        fixed = 2 * (PROMPT_TOKENS + MESSAGE_TOKENS * (len(history) + 1)) + text
        if fixed >= context - max_tokens:  # the bound could refuse what the server would answer: let it judge
            return None
        return PromptBudget(
            context=context,
            max_tokens=max_tokens,
            count_prompt=lambda labels: fixed + sum(PAGE_MARKER_TOKENS + len(label.encode()) for label in labels),
            count_label=lambda label: len(label.encode()),
            max_tokens_unset=unset,
        )
    return PromptBudget(
        context=context,
        max_tokens=max_tokens,
        count_prompt=lambda labels: prompts.count(conversation(history, question, len(labels), labels)),
        count_label=lambda text: len(prompts.tokenizer(text, add_special_tokens=False)["input_ids"]),
        max_tokens_unset=unset,
    )
