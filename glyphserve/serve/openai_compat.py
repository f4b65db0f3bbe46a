"""OpenAI chat-completions requests and responses, as vLLM serves them for Glyph (its sampling extensions,
``stop_reason``, ``reasoning_content`` for Glyph's thinking)."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from glyphserve.engine.types import MAX_LOGPROBS, Answer, AnswerRequest, ChatMessage, TokenLogprob
from glyphserve.serve.backends import ChatJob, Reply
from glyphserve.serve.errors import NO_MODEL_HINT, InvalidRequestError, ModelNotLoadedError
from glyphserve.serve.images import ImageLimits, read_images
from glyphserve.serve.sampling import SamplingParams


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
    continuous_usage_stats: bool = False  # vLLM's usage in every chunk: refused (``unsupported``)


class ChatCompletionRequest(SamplingParams):
    """OpenAI's request with vLLM's sampling extensions. Unknown parameters that change nothing about the
    answer (``user``, ``metadata``, ...) are accepted and ignored; those that would change it and cannot be
    honoured are refused (``unsupported``)."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int | None = Field(1, ge=1)  # null as OpenAI takes it: 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # glyphserve's extensions: chat about a stored document, or a collection of them; which pages the model
    # sees when they do not fit (default: the server's --page-selection).
    document: str | None = None
    documents: list[str] | None = Field(None, min_length=1, max_length=32)
    page_selection: Literal["retrieve", "first", "all"] | None = None

    def engine_logprobs(self) -> int | None:
        """OpenAI's ``logprobs``/``top_logprobs`` as the engine's: None, or how many alternatives per token."""
        if not self.logprobs:
            if self.top_logprobs:
                raise InvalidRequestError("top_logprobs needs logprobs: true", param="top_logprobs")
            return None
        return self.top_logprobs or 0

    def unsupported(self) -> None:
        """Refuse values this server cannot honour, rather than answer as if they were not there."""
        extra = self.model_extra or {}
        modalities = extra.get("modalities") or ["text"]
        refusals = [
            ("n", (self.n or 1) > 1, "one choice per request is generated: n must be 1"),
            ("best_of", (extra.get("best_of") or 1) > 1, "best_of must be 1"),
            ("use_beam_search", bool(extra.get("use_beam_search")), "beam search is not supported"),
            ("min_tokens", bool(extra.get("min_tokens")), "min_tokens is not supported (ignore_eos is)"),
            ("logit_bias", bool(extra.get("logit_bias")), "logit_bias is not supported"),
            ("echo", bool(extra.get("echo")), "echo is not supported"),
            ("prompt_logprobs", extra.get("prompt_logprobs") is not None, "prompt_logprobs is not supported"),
            ("tools", bool(extra.get("tools")), "tool calls are not supported"),
            ("functions", bool(extra.get("functions")), "function calls are not supported"),
            ("function_call", isinstance(extra.get("function_call"), dict), "function calls are not supported"),
            ("response_format", (extra.get("response_format") or {"type": "text"}).get("type") != "text",
             "only response_format {\"type\": \"text\"} is supported"),
            *((name, extra.get(name) is not None, "structured output (guided decoding) is not supported")
              for name in _GUIDED),
            ("allowed_token_ids", bool(extra.get("allowed_token_ids")), "allowed_token_ids is not supported"),
            ("bad_words", bool(extra.get("bad_words")), "bad_words is not supported"),
            ("modalities", modalities != ["text"], "the answer is text only: modalities must be [\"text\"]"),
            ("audio", extra.get("audio") is not None, "the answer is text only: audio is not supported"),
            ("reasoning_effort", extra.get("reasoning_effort") is not None, "reasoning_effort is not supported"),
            ("web_search_options", extra.get("web_search_options") is not None, "web search is not supported"),
            ("chat_template", extra.get("chat_template") is not None,
             "the chat template is the model's (GLM-4.1V's): chat_template is not taken"),
            ("chat_template_kwargs", bool(extra.get("chat_template_kwargs")),
             "the chat template (GLM-4.1V's) takes no arguments: chat_template_kwargs is not supported"),
            ("mm_processor_kwargs", bool(extra.get("mm_processor_kwargs")),
             "pages are processed as the model was trained: mm_processor_kwargs is not supported"),
            ("add_generation_prompt", extra.get("add_generation_prompt") is False,
             "the prompt always ends with the assistant's turn: add_generation_prompt must be true"),
            ("continue_final_message", bool(extra.get("continue_final_message")),
             "continue_final_message is not supported (the last message must come from the user)"),
            ("truncate_prompt_tokens", extra.get("truncate_prompt_tokens") is not None,
             "truncate_prompt_tokens is not supported (truncate_pages keeps the first pages that fit)"),
            ("return_tokens_as_token_ids", bool(extra.get("return_tokens_as_token_ids")),
             "return_tokens_as_token_ids is not supported (logprobs carry each token's bytes)"),
            ("stream_options", bool(self.stream_options and self.stream_options.continuous_usage_stats),
             "continuous_usage_stats is not supported: the usage comes in the last chunk (include_usage)"),
        ]
        for param, refused, message in refusals:
            if refused:
                raise InvalidRequestError(message, param=param)


# vLLM's structured-output parameters (older names and the current one).
_GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "guided_whitespace_pattern",
           "structural_tag", "structured_outputs")


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


def _labelled(message: Message) -> tuple[list[str], list[str]]:
    """The text directly before each image of ``message`` (a page's label, placed there in the prompt as the
    chat template would), and the text parts after its last image."""
    labels: list[str] = []
    pending: list[str] = []
    for part in message.content if isinstance(message.content, list) else []:
        if part.type == "image_url" and part.image_url:
            labels.append("".join(pending))
            pending = []
        elif part.type == "text" and part.text:
            pending.append(part.text)
    return labels, pending


def to_job(request: ChatCompletionRequest, *, has_model: bool, images: ImageLimits = ImageLimits()) -> ChatJob:
    """Map messages to a job the way vLLM builds Glyph's prompt: the images are the pages
    (they belong to the first user turn), the last user message is the question and the
    earlier messages are the history. Without a model, the last text part is the question and
    all other text is what the extractive backend searches. Images stay encoded, checked against ``images``
    from their headers (see ``glyphserve.serve.images``)."""
    request.unsupported()
    *earlier, last = request.messages
    if last.role != "user":
        raise InvalidRequestError("the last message must come from the user", param="messages")
    image_urls = [url for message in request.messages for url in _images(message)]
    if image_urls and not has_model:
        raise ModelNotLoadedError(
            "this request holds images, and reading page images needs a vision-language model. " + NO_MODEL_HINT
        )
    if request.document and request.documents:
        raise InvalidRequestError("send either document (one id) or documents (a list), not both", param="documents")
    if image_urls and (request.document or request.documents):
        raise InvalidRequestError("send either image_url parts or document ids, not both", param="document")
    if request.page_selection and not (request.document or request.documents):
        raise InvalidRequestError("page_selection chooses among a stored document's pages: send it with document "
                                  "or documents (truncate_pages keeps the first image_url pages that fit)",
                                  param="page_selection")
    collection = list(dict.fromkeys(request.documents or []))
    document_id = request.document or (collection[0] if len(collection) == 1 else None)
    documents = collection if len(collection) > 1 else None
    question_parts = _texts(last)
    if not question_parts:
        raise InvalidRequestError("the last user message has no text: ask a question", param="messages")
    settings = request.generation_settings(logprobs=request.engine_logprobs(),
                                           max_tokens=request.max_completion_tokens)
    if request.max_tokens is None and request.max_completion_tokens is None:
        settings.max_tokens = None  # as vLLM: the answer may take what the prompt leaves of the context
    if has_model:
        # Text before an image is that page's label (a collection's "Passage N:") when the turn's own text
        # follows the images; a turn whose text all comes first keeps it as its text (the question).
        labels, texts = [], []
        for message in request.messages:
            before, after = _labelled(message)
            if after or not before:
                labels += before
                texts.append(after if before else _texts(message))
            else:
                labels += [""] * len(before)
                texts.append(_texts(message))
        history = [ChatMessage(_role(m.role), "\n".join(t)) for m, t in zip(earlier, texts)]
        engine_request = AnswerRequest(pages=read_images(image_urls, images),
                                       question="\n".join(texts[-1]), history=history, settings=settings,
                                       page_labels=labels if any(labels) else None)
        # With truncate_pages the reply says which images the model read (the first that fit: their numbers among
        # the request's images, from 1).
        shown = list(range(1, len(image_urls) + 1)) if image_urls and settings.truncate_pages else None
        return ChatJob(engine_request, document_id=document_id, documents=documents, pages_shown=shown)
    context = [text for m in earlier for text in _texts(m)] + question_parts[:-1]
    return ChatJob(AnswerRequest(pages=[], question=question_parts[-1], settings=settings),
                   document_id=document_id, documents=documents, answer_tokens=settings.max_tokens,
                   context="\n\n".join(context) if document_id is None and documents is None else None)


def _role(role: str) -> str:
    return "system" if role == "developer" else role


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(answer: Answer) -> dict[str, Any]:
    """OpenAI's usage, with the prompt tokens whose KV came from the prefix cache as ``cached_tokens``."""
    return {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.new_tokens,
            "total_tokens": answer.prompt_tokens + answer.new_tokens,
            "prompt_tokens_details": {"cached_tokens": answer.cache.prefix_reused_tokens}}


def logprobs(tokens: list[TokenLogprob] | None) -> dict[str, Any] | None:
    """OpenAI's ``choices[].logprobs``; -inf is sent as -9999.0, as vLLM does (JSON has no infinity). ``bytes`` are
    the token's own (``TokenLogprob.bytes``), which rebuild a character split across tokens; vLLM sends its text's
    UTF-8, U+FFFD's three bytes for such a token."""
    if tokens is None:
        return None

    def entry(text: str, logprob: float, raw: list[int] | None) -> dict[str, Any]:
        return {"token": text, "logprob": max(logprob, -9999.0),
                "bytes": list(text.encode("utf-8")) if raw is None else raw}

    return {"content": [{**entry(t.token, t.logprob, t.bytes),
                         "top_logprobs": [entry(text, lp, raw) for _, text, lp, raw in t.top]} for t in tokens]}


def completion(reply: Reply, model: str) -> dict[str, Any]:
    answer = reply.answer
    message: dict[str, Any] = {"role": "assistant", "content": answer.text}
    if answer.thinking:
        message["reasoning_content"] = answer.thinking
    choice = {"index": 0, "message": message, "logprobs": logprobs(answer.logprobs),
              "finish_reason": answer.finish_reason, "stop_reason": answer.stop_reason}
    return _with_pages({"id": completion_id(), "object": "chat.completion", "created": int(time.time()),
                        "model": model, "choices": [choice], "usage": usage(answer)}, reply.pages_shown)


def chunk(cid: str, model: str, delta: dict, finish_reason: str | None = None, *,
          tokens: list[TokenLogprob] | None = None, stop_reason: str | int | None = None,
          pages_shown: list | None = None) -> dict[str, Any]:
    """A streamed chunk; the last one (with the finish reason) also names the pages shown."""
    choice = {"index": 0, "delta": delta, "logprobs": logprobs(tokens), "finish_reason": finish_reason,
              "stop_reason": stop_reason}
    return _with_pages({"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
                        "choices": [choice]}, pages_shown)


def _with_pages(body: dict[str, Any], pages_shown: list | None) -> dict[str, Any]:
    """glyphserve's extension: which stored pages the answer read (for images sent with truncate_pages, which of
    them, numbered from 1; else absent for images)."""
    if pages_shown is not None:
        body["pages_shown"] = pages_shown
    return body


def usage_chunk(cid: str, model: str, answer: Answer) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [], "usage": usage(answer)}
