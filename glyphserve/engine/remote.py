"""An engine that answers through OpenAI-compatible chat-completions servers.

``RemoteEngine`` has the same public methods and result types as ``Engine``
(``answer``, ``stream``, ``answer_batch``, ``stats``), so batch, serve and eval can run
against ``vllm serve zai-org/Glyph``, SGLang or another glyphserve instead of a local model.
Pages travel as PNG data URLs, encoded once per set of page keys; answers stream over SSE.
Requests that fail before any token arrived (connection errors, 429 and 5xx replies) are
retried with exponential backoff, on the least busy endpoint that has not just failed (one that
could not be reached is passed over for ``down_s``); with
``resume_greedy`` a greedy answer cut off mid-stream is finished by another endpoint, the part
already passed on dropped from its stream.
"""

from __future__ import annotations

import base64
import json
import random
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx

from glyphserve.engine.textstream import ReasoningParser
from glyphserve.engine.types import (
    Answer,
    AnswerRequest,
    CacheReport,
    ChatMessage,
    EncodedPage,
    GenerationSettings,
    Page,
    StageTimings,
    StreamEvent,
    TokenLogprob,
)
from glyphserve.errors import ContextOverflowError, GlyphserveError, RemoteBackendError
from glyphserve.glm4v import STOP_TOKENS, vision_tokens

# Answers a later try may get: rate limits and servers down or overloaded.
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_JSON = {"content-type": "application/json"}
# Stands in for the pages' content parts until the body is serialized (unique, so no text can contain it).
_PAGES = f"glyphserve-pages-{secrets.token_hex(16)}"
_PAGES_JSON = json.dumps(_PAGES)
_TEXT_FIELDS = ("content", "reasoning_content", "reasoning")
# Settings sent under their own name (vLLM's extensions and OpenAI's), when not at their defaults.
_FORWARDED = ("top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "stop_token_ids",
              "include_stop_str_in_output", "skip_special_tokens", "seed", "ignore_eos")


@dataclass
class RemoteConfig:
    """Where and how to reach the servers."""

    # Base URLs (``http://host:8000``, ``.../v1`` or the full ``.../v1/chat/completions``).
    endpoints: list[str]
    # Model name sent with each request; None asks each server's /v1/models once.
    model: str | None = None
    api_key: str | None = None
    connect_timeout_s: float = 10.0
    # Longest silence allowed while waiting for the next streamed chunk (the first one included).
    read_timeout_s: float = 600.0
    max_retries: int = 3
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    # Requests in flight at once over all endpoints (answer_batch concurrency).
    max_concurrency: int = 16
    # Budget for cached PNG data URLs (per set of page keys).
    image_cache_bytes: int = 256 * 2**20
    # Finish a greedy (temperature 0) answer whose stream broke on another endpoint: greedy
    # decoding of the same model repeats the part already sent, which is checked and dropped.
    resume_greedy: bool = False
    # An endpoint that could not be reached is passed over for this long (unless all are), then tried again.
    down_s: float = 5.0
    # Tokens of context to fit pages into (``max_context``); None: the least max_model_len the servers report.
    max_context: int | None = None


@dataclass
class _Endpoint:
    url: str  # .../v1/chat/completions
    model: str | None
    max_model_len: int | None = None  # as its /v1/models reports it for the model (glyphserve's and vLLM's do)
    probed: bool = False  # /v1/models answered (until then each request to it asks first: down at load, say)
    in_flight: int = 0
    requests: int = 0
    failures: int = 0
    down_until: float = 0.0  # time.monotonic() before which it is passed over

    @property
    def base(self) -> str:
        return self.url.removesuffix("/chat/completions")


@dataclass
class _EncodedPages:
    signature: tuple
    urls: list[str] = field(default_factory=list)
    # The pages as JSON content parts, comma-separated: spliced into each request body as is (encoding
    # megabytes of data URLs per question would cost the front more than the rest of the request).
    parts_json: str = ""
    nbytes: int = 0
    ready: threading.Event = field(default_factory=threading.Event)

    def encode(self, pages: list[Page]) -> None:
        self.urls = [page_data_url(page) for page in pages]
        self.parts_json = ", ".join(json.dumps({"type": "image_url", "image_url": {"url": url}}) for url in self.urls)

    def labelled(self, labels: list[str]) -> str:
        """The pages' content parts with each page's label as a text part just before it."""
        return ", ".join(
            (json.dumps({"type": "text", "text": label}) + ", " if label else "")
            + json.dumps({"type": "image_url", "image_url": {"url": url}})
            for label, url in zip(labels, self.urls, strict=True)
        )


def chat_completions_url(endpoint: str) -> str:
    url = endpoint.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


def page_data_url(page: Page) -> str:
    """A ``data:`` URL of the page: an encoded page's own bytes, pixels as PNG."""
    if not isinstance(page, EncodedPage):
        page = EncodedPage.from_pixels(page)
    return f"data:{page.mime};base64," + base64.b64encode(page.data).decode("ascii")


class RemoteEngine:
    """Client for one or more OpenAI-compatible chat-completions servers."""

    kind = "openai"  # what serve calls this backend

    def __init__(self, config: RemoteConfig):
        if not config.endpoints:
            raise GlyphserveError("the openai backend needs at least one --endpoint URL")
        self.config = config
        self._endpoints = [_Endpoint(chat_completions_url(e), config.model) for e in config.endpoints]
        timeout = httpx.Timeout(config.read_timeout_s, connect=config.connect_timeout_s)
        limits = httpx.Limits(max_connections=config.max_concurrency, max_keepalive_connections=config.max_concurrency)
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self._client = httpx.Client(timeout=timeout, limits=limits, headers=headers)
        self._pool = ThreadPoolExecutor(config.max_concurrency, thread_name_prefix="remote-engine")
        self._lock = threading.Lock()
        self._images: OrderedDict[str, _EncodedPages] = OrderedDict()
        self._image_bytes = 0
        self._counters = {"requests": 0, "retries": 0, "resumed": 0, "failures": 0, "prompt_tokens": 0,
                          "new_tokens": 0}
        self._image_hits = 0
        self._image_misses = 0

    @classmethod
    def load(cls, config: RemoteConfig) -> RemoteEngine:
        """Connect, learn each server's model name, and fail early if no endpoint can be used."""
        engine = cls(config)
        errors = []
        for endpoint in engine._endpoints:
            try:
                engine._model_for(endpoint, probe=True)
            except (RemoteBackendError, httpx.HTTPError) as exc:
                errors.append(getattr(exc, "message", None) or f"{endpoint.base}: {exc or type(exc).__name__}")
        if len(errors) == len(engine._endpoints):
            engine.close()
            raise RemoteBackendError("no endpoint can be used: " + "; ".join(errors))
        return engine

    @property
    def max_context(self) -> int | None:
        """Tokens of context a request may fill on any server: the least of ``config.max_context`` and the
        servers' max_model_len; None when neither is known for every server (one that did not say, or has been
        down since the engine connected, might hold less)."""
        lengths = [e.max_model_len for e in self._endpoints]
        known = [] if None in lengths else lengths
        if self.config.max_context is not None:
            known.append(self.config.max_context)
        return min(known, default=None)

    @property
    def models(self) -> list[str]:
        """The model names requests go out with: ``config.model``, or those the servers' /v1/models named (one
        not reached since the engine connected has not said)."""
        return sorted({e.model for e in self._endpoints if e.model is not None})

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    def __enter__(self) -> RemoteEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- public surface (same as Engine) --------------------------------------------------

    def answer(self, request: AnswerRequest) -> Answer:
        for event in self.stream(request):
            if event.channel == "done":
                return event.result
        raise RemoteBackendError("the stream ended without a result")  # stream() always ends with "done"

    def answer_batch(self, requests: list[AnswerRequest]) -> list[Answer]:
        """Answers concurrently (the servers batch them); raises the first failure, like ``Engine``."""
        futures = [self._pool.submit(self.answer, request) for request in requests]
        return [future.result() for future in futures]

    def stream(self, request: AnswerRequest) -> Iterator[StreamEvent]:
        start = time.perf_counter()
        pages = self._encoded_pages(request)
        encoded = time.perf_counter()
        payload = self._payload(request, bool(pages.urls))
        # For servers that send <think>…</think> inside the content, and those that send the thinking apart
        # (vLLM/SGLang reasoning parsers, glyphserve): both go through one parser, which trims the channels' edges.
        parser = ReasoningParser()
        usage: dict = {}
        finish_reason, stop_reason = "stop", None
        logprobs: list[TokenLogprob] | None = [] if request.settings.logprobs is not None else None
        first_token_at = None
        parts_json = pages.parts_json if not request.page_labels else pages.labelled(request.page_labels)
        for chunk in self._chunks(payload, parts_json):
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                thinking = delta.get("reasoning_content") or delta.get("reasoning") or ""
                tokens = _logprobs(choice) if logprobs is not None else None
                if tokens:
                    logprobs += tokens
                for channel, text in parser.emit("thinking", thinking) + parser.feed(delta.get("content") or ""):
                    first_token_at = first_token_at or time.perf_counter()
                    yield StreamEvent(channel, text, logprobs=tokens)
                    tokens = None  # each token's logprob goes out once
                if choice.get("finish_reason"):
                    finish_reason = "length" if choice["finish_reason"] == "length" else "stop"
                    stop_reason = choice.get("stop_reason")
        for channel, text in parser.finish():
            yield StreamEvent(channel, text)
        end = time.perf_counter()
        first_token_at = first_token_at or end
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        new_tokens = int(usage.get("completion_tokens") or 0)
        with self._lock:
            self._counters["prompt_tokens"] += prompt_tokens
            self._counters["new_tokens"] += new_tokens
        result = Answer(
            text=parser.answer_text,
            thinking=parser.thinking_text,
            token_ids=[],  # servers return text, not ids
            finish_reason=finish_reason,
            timings=StageTimings(
                preprocess=encoded - start,
                time_to_first_token=first_token_at - start,
                decode=end - first_token_at,
                total=end - start,
            ),
            prompt_tokens=prompt_tokens,
            new_tokens=new_tokens,
            vision_tokens=_vision_tokens(request.pages),
            pages_used=len(request.pages),
            cache=CacheReport(prefix_reused_tokens=int((usage.get("prompt_tokens_details") or {}).get(
                "cached_tokens") or 0)),
            stop_reason=stop_reason,
            logprobs=logprobs,
        )
        yield StreamEvent("done", result=result)

    def stats(self) -> dict:
        with self._lock:
            return {
                "backend": "openai",
                **self._counters,
                "endpoints": [
                    {
                        "url": e.url,
                        "model": e.model,
                        "in_flight": e.in_flight,
                        "requests": e.requests,
                        "failures": e.failures,
                    }
                    for e in self._endpoints
                ],
                "image_cache": {
                    "documents": len(self._images),
                    "bytes": self._image_bytes,
                    "hits": self._image_hits,
                    "misses": self._image_misses,
                },
            }

    # -- requests -------------------------------------------------------------------------

    def _payload(self, request: AnswerRequest, has_pages: bool) -> dict:
        """The request body, the pages' content parts stood in for by ``_PAGES`` (see ``_body``)."""
        history = list(request.history) + [ChatMessage("user", request.question)]
        messages = []
        for message in history:
            content: str | list = message.content
            if has_pages and message.role == "user":  # the pages belong to the first user turn
                content = [_PAGES, {"type": "text", "text": message.content}]
                has_pages = False
            messages.append({"role": message.role, "content": content})
        settings = request.settings
        payload = {
            "messages": messages,
            "max_tokens": settings.max_tokens,
            "temperature": settings.temperature,
            "top_p": settings.top_p,
            # The model's turn markers end an answer unless ignore_eos asks for all of max_tokens (as the engine's
            # own stop tokens then wait; the request's own stop strings still end it, as on vLLM).
            "stop": ([] if settings.ignore_eos else list(STOP_TOKENS)) + list(settings.stop),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        # The other settings only where they differ from the default: a server that does not know vLLM's
        # extensions (top_k, repetition_penalty, ...) is asked for them only when the request needs them.
        defaults = GenerationSettings()
        for name in _FORWARDED:
            value = getattr(settings, name)
            if value != getattr(defaults, name):
                payload[name] = list(value) if isinstance(value, tuple) else value
        if settings.logprobs is not None:
            payload["logprobs"] = True
            payload["top_logprobs"] = settings.logprobs
        return payload

    @staticmethod
    def _body(payload: dict, model: str, parts_json: str) -> bytes:
        body = json.dumps({"model": model, **payload})
        return (body.replace(_PAGES_JSON, parts_json, 1) if parts_json else body).encode()

    def _chunks(self, payload: dict, parts_json: str) -> Iterator[dict]:
        """The parsed SSE chunks of one completion, retrying while no token has arrived (or, for
        greedy answers with ``resume_greedy``, after tokens arrived too)."""
        failed: set[int] = set()
        attempt = 0
        resume = _Resume() if self.config.resume_greedy and payload["temperature"] == 0 else None
        while True:
            endpoint = self._acquire(failed)
            got_token = False
            retry_after = None
            if resume is not None:
                resume.restart()
            try:
                model = self._model_for(endpoint)
                body = self._body(payload, model, parts_json)
                with self._client.stream("POST", endpoint.url, content=body, headers=_JSON) as response:
                    if response.status_code != 200:
                        body = response.read().decode("utf-8", "replace")
                        error = _http_error(response.status_code, body, endpoint.url)
                        if response.status_code not in _RETRY_STATUSES or attempt >= self.config.max_retries:
                            raise error
                        self._failed(endpoint)
                        failed.add(id(endpoint))
                        retry_after = _retry_after(response.headers.get("retry-after"))
                    else:
                        complete = False
                        for chunk in _sse_chunks(response):
                            if chunk is None:  # [DONE]
                                complete = True
                                break
                            got_token = got_token or _has_token(chunk)
                            complete = complete or any(c.get("finish_reason") for c in chunk.get("choices") or [])
                            if resume is not None:
                                resume.trim(chunk, endpoint.url)
                            yield chunk
                        if not complete:
                            raise httpx.RemoteProtocolError("the stream ended before the answer was complete")
                        return
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError) as exc:
                self._failed(endpoint, down=True)
                if got_token and resume is None:
                    raise RemoteBackendError(f"{endpoint.url}: the connection broke mid-answer ({exc})") from None
                if got_token:
                    with self._lock:
                        self._counters["resumed"] += 1
                if attempt >= self.config.max_retries:
                    raise RemoteBackendError(
                        f"{endpoint.url} is unreachable after {attempt + 1} attempts: {exc or type(exc).__name__}"
                    ) from None
                failed.add(id(endpoint))
            except httpx.TimeoutException:
                self._failed(endpoint)
                raise RemoteBackendError(
                    f"{endpoint.url} sent nothing for {self.config.read_timeout_s:g} s (read timeout)"
                ) from None
            except GlyphserveError:
                self._failed(endpoint)
                raise
            finally:
                with self._lock:
                    endpoint.in_flight -= 1
            attempt += 1
            with self._lock:
                self._counters["retries"] += 1
            delay = min(self.config.max_backoff_s, self.config.backoff_s * 2 ** (attempt - 1))
            time.sleep(retry_after if retry_after is not None else delay * random.uniform(0.5, 1.0))

    def _acquire(self, failed: set[int]) -> _Endpoint:
        with self._lock:
            now = time.monotonic()
            untried = [e for e in self._endpoints if id(e) not in failed] or self._endpoints
            candidates = [e for e in untried if e.down_until <= now] or untried
            endpoint = min(candidates, key=lambda e: (e.in_flight, e.requests))
            endpoint.in_flight += 1
            endpoint.requests += 1
            self._counters["requests"] += 1
            return endpoint

    def _failed(self, endpoint: _Endpoint, down: bool = False) -> None:
        with self._lock:
            endpoint.failures += 1
            self._counters["failures"] += 1
            if down:
                endpoint.down_until = time.monotonic() + self.config.down_s

    def _model_for(self, endpoint: _Endpoint, probe: bool = False) -> str:
        """The model name to send, asked from /v1/models until it has answered once, with the context length it
        reports (an endpoint down at load is asked when it is next used; connection errors propagate)."""
        if endpoint.model is None or probe or not endpoint.probed:
            response = self._client.get(endpoint.base + "/models")
            # Asked again after a server error or a 429 (a proxy in front of a server still starting, say);
            # a refusal or a missing route is its answer.
            endpoint.probed = response.status_code < 500 and response.status_code != 429
            if response.is_success:
                endpoint.max_model_len = _max_model_len(response, endpoint.model)
            if endpoint.model is not None:
                return endpoint.model  # reachable; the name was given, whatever /models says
            if response.status_code in (401, 403):
                raise RemoteBackendError(f"{endpoint.base} refused the API key ({response.status_code} "
                                         f"{response.reason_phrase}): give the key it was started with")
            try:
                if response.is_error:
                    raise ValueError(f"{response.status_code} {response.reason_phrase}")
                served = response.json()["data"][0]["id"]
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                raise RemoteBackendError(
                    f"{endpoint.base}/models did not name a model ({exc}); pass --remote-model"
                ) from None
            endpoint.model = served
        return endpoint.model

    # -- page images ------------------------------------------------------------------------

    def _encoded_pages(self, request: AnswerRequest) -> _EncodedPages:
        """The pages as PNG data URLs, encoded once per set of page keys (concurrent askers wait)."""
        key = request.pages_key()
        signature = tuple(page.shape for page in request.pages)
        if key is None:
            fresh = _EncodedPages(signature)
            fresh.encode(request.pages)
            return fresh
        with self._lock:
            entry = self._images.get(key)
            owner = entry is None or entry.signature != signature
            if owner:
                if entry is not None:
                    self._image_bytes -= entry.nbytes
                entry = self._images[key] = _EncodedPages(signature)
                self._image_misses += 1
            else:
                self._images.move_to_end(key)
                self._image_hits += 1
        if not owner:
            entry.ready.wait()
            if entry.urls or not request.pages:
                return entry
            fresh = _EncodedPages(signature)  # the owner failed to encode
            fresh.encode(request.pages)
            return fresh
        try:
            entry.encode(request.pages)
        finally:
            entry.ready.set()
        with self._lock:
            entry.nbytes = sum(len(url) for url in entry.urls) + len(entry.parts_json)
            if self._images.get(key) is entry:
                self._image_bytes += entry.nbytes
                while self._image_bytes > self.config.image_cache_bytes and len(self._images) > 1:
                    _, evicted = self._images.popitem(last=False)
                    self._image_bytes -= evicted.nbytes
        return entry


class _Resume:
    """The text of one answer already passed on, per delta field, and what a retried stream
    must repeat before its text is new."""

    def __init__(self):
        self.sent: dict[str, str] = {}
        self.pending: dict[str, str] = {}

    def restart(self) -> None:
        self.pending = dict(self.sent)

    def trim(self, chunk: dict, url: str) -> None:
        """Drop from ``chunk`` (in place) what was already sent; record the rest."""
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            for name in _TEXT_FIELDS:
                text = delta.get(name)
                if not text:
                    continue
                pending = self.pending.get(name, "")
                if pending.startswith(text):
                    self.pending[name] = pending[len(text):]
                    delta[name] = ""
                    continue
                if not text.startswith(pending):
                    raise RemoteBackendError(
                        f"{url}: the connection broke mid-answer and the retried answer differs from the part "
                        "already sent (are the servers running the same model?)"
                    )
                self.pending[name] = ""
                delta[name] = text[len(pending):]
                self.sent[name] = self.sent.get(name, "") + delta[name]


def _vision_tokens(pages: list[Page]) -> int:
    return sum(vision_tokens(*page.shape[:2]) for page in pages)


def _sse_chunks(response: httpx.Response) -> Iterator[dict | None]:
    """The JSON chunks of a server-sent event stream, then None for ``data: [DONE]``."""
    for line in response.iter_lines():
        if not line.startswith("data:"):
            continue  # comments, event names, keep-alives
        data = line[5:].strip()
        if data == "[DONE]":
            yield None
            return
        try:
            chunk = json.loads(data)
        except json.JSONDecodeError:
            raise RemoteBackendError(f"{response.url} sent a malformed stream chunk: {data[:200]!r}") from None
        if "error" in chunk and "choices" not in chunk:
            raise _error_from_body(chunk, 502, str(response.url))
        yield chunk


def _logprobs(choice: dict) -> list[TokenLogprob]:
    """OpenAI's ``choices[].logprobs.content`` of a chunk (servers send text, not token ids: id -1)."""
    content = (choice.get("logprobs") or {}).get("content") or []
    return [TokenLogprob(-1, item["token"], item["logprob"],
                         [(-1, top["token"], top["logprob"], top.get("bytes"))
                          for top in item.get("top_logprobs") or []], item.get("bytes"))
            for item in content]


def _has_token(chunk: dict) -> bool:
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") or {}
        if delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning"):
            return True
    return False


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _http_error(status: int, body: str, url: str) -> GlyphserveError:
    try:
        parsed = json.loads(body)
    except json.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict):
        return _error_from_body(parsed, status, url)
    return RemoteBackendError(f"{url} answered HTTP {status}: {body.strip()[:300]}")


def _error_from_body(body: dict, status: int, url: str) -> GlyphserveError:
    """Turn a server's error reply into the matching typed error where it names one."""
    error = body.get("error")
    if isinstance(error, str):  # glyphserve: {"error": code, "message": ...}
        code, message = error, str(body.get("message", ""))
    elif isinstance(error, dict):  # OpenAI: {"error": {"message", "type", "code"}}
        code, message = str(error.get("code") or error.get("type") or ""), str(error.get("message", ""))
    else:  # vLLM: {"object": "error", "message", "type", "code"}
        code, message = str(body.get("type") or ""), str(body.get("message", ""))
    error_class = {cls.code: cls for cls in reversed(_subclasses(GlyphserveError))}.get(code)
    if error_class is not None:
        return error_class(message)
    if status == 400 and "context length" in message.lower():
        return ContextOverflowError(message)
    if status in (400, 422):  # the request's own fault (vLLM: a temperature past its range): not the backend's
        return GlyphserveError(f"{url} refused the request: {message or code}")
    return RemoteBackendError(f"{url} answered HTTP {status}: {message or code}")


def _subclasses(cls: type) -> list[type]:
    return [sub for direct in cls.__subclasses__() for sub in (direct, *_subclasses(direct))]


def _max_model_len(response: httpx.Response, model: str | None) -> int | None:
    """The context length a /v1/models response gives for ``model`` (its first model when None), if any."""
    try:
        entries = response.json()["data"] if response.is_success else []
        entry = next((m for m in entries if model is None or m.get("id") == model), None)
        value = entry.get("max_model_len") if isinstance(entry, dict) else None
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
