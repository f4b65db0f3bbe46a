"""OpenAI chat-completions requests and responses (the subset vLLM serves for Glyph)."""

from __future__ import annotations

import base64
import binascii
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from glyphserve.engine.types import EncodedPage
from glyphserve.errors import GlyphserveError
from glyphserve.serve.backends import ChatJob, ChatSettings, Reply, Turn
from glyphserve.serve.errors import NO_MODEL_HINT, InvalidRequestError, ModelNotLoadedError

MAX_IMAGE_PIXELS = 64_000_000


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown OpenAI parameters are accepted and ignored
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    ignore_eos: bool = False  # vLLM extension
    # glyphserve extensions: chat about a stored document; switch the caches off.
    document: str | None = None
    use_cache: bool = True


def encoded_image(url: str) -> EncodedPage:
    """The page in a ``data:image/...;base64,`` URL, as its encoded bytes: only the header is read here (size and
    format, checked against the pixel limit); the engine decodes it only if its vision features are not cached.
    Nothing is ever fetched or opened."""
    if not url.startswith("data:"):
        raise InvalidRequestError(
            "image_url must be a data: URL (data:image/png;base64,...); this server never fetches URLs or opens paths"
        )
    header, _, payload = url.partition(",")
    if ";base64" not in header or not header[5:].startswith("image/"):
        raise InvalidRequestError("image_url data URLs must be base64-encoded images (data:image/png;base64,...)")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError("image_url holds invalid base64") from None
    try:
        page = EncodedPage.from_bytes(raw)
    except GlyphserveError:
        raise InvalidRequestError("image_url does not hold a readable image") from None
    if page.width * page.height > MAX_IMAGE_PIXELS:
        raise InvalidRequestError(f"an image has more than {MAX_IMAGE_PIXELS} pixels")
    return page


def _texts(message: Message) -> list[str]:
    if message.content is None:
        return []
    if isinstance(message.content, str):
        return [message.content]
    return [part.text for part in message.content if part.type == "text" and part.text]


def _images(message: Message) -> list[str]:
    if isinstance(message.content, list):
        return [part.image_url.url for part in message.content if part.type == "image_url" and part.image_url]
    return []


def to_job(request: ChatCompletionRequest, *, has_model: bool) -> ChatJob:
    """Map messages to a job the way vLLM builds Glyph's prompt: the images are the pages
    (they belong to the first user turn), the last user message is the question and the
    earlier messages are the history. Without a model, the last text part is the question and
    all other text is what the extractive backend searches. Images stay encoded (see ``encoded_image``)."""
    *earlier, last = request.messages
    if last.role != "user":
        raise InvalidRequestError("the last message must come from the user")
    image_urls = [url for message in request.messages for url in _images(message)]
    if image_urls and not has_model:
        raise ModelNotLoadedError(
            "this request holds images, and reading page images needs a vision-language model. " + NO_MODEL_HINT
        )
    if image_urls and request.document:
        raise InvalidRequestError("send either image_url parts or a document id, not both")
    question_parts = _texts(last)
    if not question_parts:
        raise InvalidRequestError("the last user message has no text: ask a question")
    max_tokens = request.max_completion_tokens or request.max_tokens or ChatSettings.max_tokens
    settings = ChatSettings(
        max_tokens=max_tokens,
        temperature=request.temperature if request.temperature is not None else 0.0,
        top_p=request.top_p if request.top_p is not None else 1.0,
        use_cache=request.use_cache,
        seed=request.seed,
        ignore_eos=request.ignore_eos,
    )
    if has_model:
        history = [Turn(_role(m.role), "\n".join(_texts(m))) for m in earlier]
        job = ChatJob(question="\n".join(question_parts), history=history, settings=settings,
                      document_id=request.document)
        job.pages = [encoded_image(url) for url in image_urls]
        return job
    context = [text for m in earlier for text in _texts(m)] + question_parts[:-1]
    return ChatJob(question=question_parts[-1], settings=settings, document_id=request.document,
                   context="\n\n".join(context) if request.document is None else None)


def _role(role: str) -> str:
    return "system" if role == "developer" else role


class StopFilter:
    """Cuts streamed text at the first stop string, holding back what could be a stop's prefix."""

    def __init__(self, stops: str | list[str] | None):
        self.stops = [s for s in ([stops] if isinstance(stops, str) else stops or []) if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buffer = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        self.buffer += text
        cut = min((i for i in (self.buffer.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.buffer, self.stopped = self.buffer[:cut], "", True
            return out
        keep = min(self.hold, len(self.buffer))
        out, self.buffer = self.buffer[: len(self.buffer) - keep], self.buffer[len(self.buffer) - keep:]
        return out

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(reply: Reply) -> dict[str, int]:
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens}


def completion(reply: Reply, model: str, stop: str | list[str] | None) -> dict[str, Any]:
    stop_filter = StopFilter(stop)
    text = stop_filter.feed(reply.text) + stop_filter.flush()
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if reply.thinking:
        message["reasoning_content"] = reply.thinking
    return {
        "id": completion_id(), "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": message,
                     "finish_reason": "stop" if stop_filter.stopped else reply.finish_reason}],
        "usage": usage(reply),
    }


def chunk(cid: str, model: str, delta: dict, finish_reason: str | None = None) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
