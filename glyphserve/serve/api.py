"""HTTP routes: documents, document chat (SSE), OpenAI chat completions, health and metrics."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from dataclasses import asdict
from typing import Any, AsyncGenerator, Awaitable, Literal

from fastapi import APIRouter, Query, Request
from fastapi.routing import APIRoute
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.concurrency import run_in_threadpool

from glyphserve import __version__
from glyphserve.engine.types import MAX_LOGPROBS, AnswerRequest, ChatMessage, StreamEvent
from glyphserve.errors import GlyphserveError, InternalError, NotFoundError
from glyphserve.render.config import NEWLINE_MODES, PRESETS
from glyphserve.serve import openai_compat as oai
from glyphserve.serve.api_schema import request_body
from glyphserve.serve.backends import ChatJob, Reply
from glyphserve.serve.errors import InvalidRequestError, MethodNotAllowedError, UnsupportedMediaTypeError
from glyphserve.serve.origin import route_path
from glyphserve.serve.upload_queue import client_of
from glyphserve.serve.sampling import SamplingParams
from glyphserve.serve.scheduler import Cancelled
from glyphserve.serve.intake import RenderOptions
from glyphserve.serve.service import GlyphService
from glyphserve.serve.store import check_id
from glyphserve.serve.uploads import read_upload

log = logging.getLogger("glyphserve.serve")


class DocumentText(BaseModel):
    """A pasted document (JSON), or the form fields beside an uploaded file; RenderOptions checks the values."""

    model_config = ConfigDict(extra="forbid")
    text: str
    preset: str = "auto"
    dpi: int | None = Field(None, gt=0)
    newline: str | None = None
    name: str | None = Field(None, max_length=1000)  # cleaned and cut to MAX_NAME_CHARS as stored

    # Checked here so that the error names the field (param), in the API's words rather than the CLI's flags.
    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        if value != "auto" and value not in PRESETS:
            raise ValueError(f"unknown preset {value!r}: choose one of auto, {', '.join(PRESETS)}")
        return value

    @field_validator("newline")
    @classmethod
    def _known_newline(cls, value: str | None) -> str | None:
        if value is not None and value not in NEWLINE_MODES:
            raise ValueError(f"newline must be one of {', '.join(NEWLINE_MODES)}, not {value!r}")
        return value


class DocumentName(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=1000)  # over MAX_NAME_CHARS once cleaned: refused, saying so


class HistoryTurn(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


# Most documents one question may be asked over (their pages together are bounded by --max-pages as well).
MAX_COLLECTION = 32
PageSelection = Literal["retrieve", "first", "all"]


class DocumentChat(SamplingParams):
    """A question about a stored document (with ``documents``: about it and those, as one collection); the
    sampling parameters are the engine's (vLLM's names), and ``logprobs`` is the engine's too (the number of
    alternatives per token; 0: only the chosen token's)."""

    model_config = ConfigDict(extra="forbid")
    question: str = Field(min_length=1)
    history: list[HistoryTurn] = []
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    stream: bool = False
    documents: list[str] | None = Field(None, min_length=1, max_length=MAX_COLLECTION - 1)
    page_selection: PageSelection | None = None  # default: the server's --page-selection

    def job(self, document_id: str, page_selection: str) -> ChatJob:
        history = [ChatMessage(t.role, t.content) for t in self.history]
        settings = self.generation_settings(logprobs=self.logprobs)
        collection = list(dict.fromkeys([document_id, *(check_id(d) for d in self.documents or [])]))
        return ChatJob(AnswerRequest(pages=[], question=self.question, history=history, settings=settings),
                       document_id=document_id if len(collection) == 1 else None,
                       documents=collection if len(collection) > 1 else None,
                       page_selection=self.page_selection or page_selection, answer_tokens=self.max_tokens)


def path_id(document_id: str) -> str:
    """A document id from a URL path: one that cannot exist is a missing resource (404), as OpenAI answers for an
    unknown file id, not a malformed request (in a JSON body it is: 400)."""
    try:
        return check_id(document_id)
    except InvalidRequestError:
        raise NotFoundError(f"no document with id {document_id!r} (ids are 32 lowercase hex digits)") from None


def invalid_request(exc: ValidationError | Any) -> InvalidRequestError:
    """One line naming each invalid field; ``param`` is the first of them.

    A field that takes one of several types (``stop``: a string or a list; ``content``: text or parts) fails once
    per type: only the type the value came closest to is reported (a type the value is not at all gives way to
    one whose checks it reached), under the field's own name; values of no accepted type get one message."""
    found: dict[str, list[tuple[str, str]]] = {}  # field -> (error type, message), in order
    for error in exc.errors():
        kind = error.get("type", "")
        loc = [p for p in error.get("loc", ()) if p != "body" and (kind == "extra_forbidden" or not _type_name(p))]
        found.setdefault(".".join(str(p) for p in loc) or "body", []).append((kind, error.get("msg", "invalid")))

    def reached(field: str, kind: str) -> bool:  # another member got further than a mere type mismatch
        return kind.endswith("_type") and any(
            (other.startswith(field + ".") or (other == field and not k.endswith("_type")))
            for other, errors in found.items() for k, _ in errors)

    parts = []
    for field, errors in found.items():
        messages = list(dict.fromkeys(msg for kind, msg in errors if not reached(field, kind)))
        if not messages:
            continue
        if len(messages) > 1 and all(m.startswith(_SHOULD_BE) for m in messages):
            messages = [_SHOULD_BE + " or ".join(m[len(_SHOULD_BE):] for m in messages)]
        parts += [f"{field}: {m}" for m in messages]
    fields = [part.split(": ", 1)[0] for part in parts]
    return InvalidRequestError("invalid request: " + "; ".join(parts), param=fields[0] if fields else None)


_SHOULD_BE = "Input should be "
_TYPE_NAMES = {"str", "int", "float", "bool", "bytes", "list", "dict", "none"}


def _type_name(part: Any) -> bool:
    """Whether a ``loc`` part names a member of a union by its type, as pydantic does ('str', 'constrained-str',
    'list[ContentPart]', a model's class name); the request models' fields are lowercase identifiers."""
    return isinstance(part, str) and (not part.isidentifier() or not part.islower() or part in _TYPE_NAMES)


KEEPALIVE = ": keep-alive\n\n"  # an SSE comment: clients skip it, proxies see the stream is alive


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def json_body(request: Request, alternative: str = "") -> bytes:
    """The body of a JSON route. Anything but ``application/json`` (or ``application/*+json``) is refused: a web
    page may send ``text/plain`` or a form to any site without asking first, never JSON."""
    media = _media_type(request)
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        raise UnsupportedMediaTypeError(
            f"this route takes JSON with 'Content-Type: application/json'{alternative} (got {media or 'none'!r})"
        )
    return await request.body()


def sse(payload: Any) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


class _EventStream(StreamingResponse):
    """A streaming response that closes its event generator, and the answer stream the generator reads, however
    the response ends. Starlette leaves a generator whose send was cancelled (the client went away while a chunk
    went out) waiting at its ``yield`` until the garbage collector finds it, and one that never started (the
    client went away before the first chunk) never runs its cleanup at all: the job ran on (on Ray Serve, its
    replica's call decoded to the last token when Ray's own cancel was lost as well)."""

    def __init__(self, events: AsyncGenerator[str, None], items: AsyncGenerator):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.items = items

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            await self.items.aclose()  # a no-op once the events' own cleanup closed it


def sse_response(events: AsyncGenerator[str, None], items: AsyncGenerator) -> StreamingResponse:
    """``events`` (SSE text) made from ``items`` (the service's answer stream), closed together at the end."""
    return _EventStream(events, items)


def error_event(exc: BaseException) -> dict:
    """OpenAI's error body for a failure after a stream began (vLLM sends the same as an SSE event)."""
    if not isinstance(exc, GlyphserveError):
        log.error("stream failed", exc_info=exc)
        exc = InternalError("the answer failed; the server log has details")
    return exc.to_dict()


async def unless_disconnected(request: Request, answer: Awaitable[Reply]) -> Reply | None:
    """Await ``answer``, cancelling it (None) if the client hangs up first. Nothing polls: once the body is read,
    the server's next message on the request is its disconnect (it waits for one), so one task waits for it.
    (Polling ``Request.is_disconnected`` twice a second for each request in flight held the event loop's thread
    28% of its time under 64 sessions, on the CPU: each poll opens and cancels a cancel scope, whose message
    formats the task's repr.)"""
    task = asyncio.ensure_future(answer)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        return task.result() if task.done() else None
    finally:
        task.cancel()
        gone.cancel()


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone: the request's messages up to its disconnect (any body left is dropped)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def client_gone() -> Response:
    return Response(status_code=499)  # nginx's "client closed request"; nobody reads it


def build_router(service: GlyphService) -> APIRouter:
    """The API's routes for ``service``: status, documents, chat, and the answers for paths and methods it does not
    have."""
    router = APIRouter()
    _status_routes(router, service)
    _document_routes(router, service)
    _chat_routes(router, service)
    _method_routes(router)
    return router


def citations(reply: Reply) -> list[dict]:
    out = []
    for c in reply.citations:
        item = {"page": c.page, "start": c.start, "end": c.end, "text": c.text, "score": c.score}
        if c.document is not None:
            item["document"] = c.document
            if c.page is not None:
                crop = f"?top={c.rows[0]}&bottom={c.rows[1]}" if c.rows else ""
                item["crop_url"] = f"/v1/documents/{c.document}/pages/{c.page}.png{crop}"
        out.append(item)
    return out


def reply_body(reply: Reply, service: GlyphService) -> dict:
    """The answer (its text as ``answer``) with the engine's timings and cache report under their own names
    (``StageTimings``, ``CacheReport``)."""
    answer = reply.answer
    return {
        "answer": answer.text, "thinking": answer.thinking, "finish_reason": answer.finish_reason,
        "stop_reason": answer.stop_reason, "model": service.model_name, "backend": reply.backend,
        "notice": service.notice, "timings": asdict(answer.timings), "cache": asdict(answer.cache),
        "usage": {**oai.usage(answer), "vision_tokens": answer.vision_tokens},
        "logprobs": None if answer.logprobs is None else [asdict(t) for t in answer.logprobs],
        "pages_shown": reply.pages_shown,
        "citations": citations(reply),
    }


def delta_event(event: StreamEvent) -> dict:
    item = {"type": "delta", "channel": event.channel, "text": event.text}
    if event.logprobs is not None:
        item["logprobs"] = [asdict(t) for t in event.logprobs]
    return item


def _status_routes(router: APIRouter, service: GlyphService) -> None:
    @router.get("/health")
    async def health():
        # In a thread: on Ray Serve, describing the server asks Ray's controller (a blocking call).
        info = await run_in_threadpool(service.describe)
        # 503 while no engine replica runs (Ray Serve deploying them, or all lost), so a readiness probe waits.
        ready = info.get("replicas_running", 1) > 0
        body = {"status": "ok" if ready else "unavailable", **info, "documents": service.store.count(),
                "queue_depth": service.scheduler.depth}
        return JSONResponse(body, status_code=200 if ready else 503)

    @router.get("/v1/engine/steps")
    async def engine_steps(since: float | None = Query(None, description="only steps started after this time"),
                           last: int | None = Query(None, ge=1, description="only the last this many steps")):
        """The local engine's last steps (``serve --step-trace N``), oldest first; off the event loop (a long
        trace takes seconds to encode, which would hold up every stream)."""
        def steps() -> Response:
            records = service.step_trace()
            if since is not None:
                records = [r for r in records if r.started > since]
            if last is not None:
                records = records[-last:]
            return Response(json.dumps({"steps": [asdict(r) for r in records]}), media_type="application/json")

        return await run_in_threadpool(steps)

    @router.get("/metrics")
    async def metrics():
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @router.get("/version")
    async def version():
        return {"version": __version__}

    @router.get("/v1/models")
    async def models():
        return {"object": "list", "data": await run_in_threadpool(service.model_cards)}

    @router.get("/v1/models/{model:path}")
    async def model(model: str):
        service.check_model(model)
        return next(card for card in await run_in_threadpool(service.model_cards) if card["id"] == model)


def _document_routes(router: APIRouter, service: GlyphService) -> None:
    @router.post("/v1/documents", status_code=201, openapi_extra=request_body(
        DocumentText, {"text": "The harbour of Kelso keeps its boats in the west basin.", "name": "harbour notes"},
        upload=True))
    async def create_document(request: Request):
        if _media_type(request) == "multipart/form-data":
            upload = await read_upload(request)
            if "text" in upload.fields:  # (it was dropped for the file's)
                raise InvalidRequestError("a multipart upload carries its document as the file alone: send pasted "
                                          "text as JSON {\"text\": ...}", param="text")
            fields = {k: v for k, v in upload.fields.items() if v != ""}
            try:
                options = DocumentText.model_validate({**fields, "text": ""})
            except ValidationError as exc:
                raise invalid_request(exc) from None
            add = functools.partial(
                service.add_document, data=upload.data, filename=upload.filename, name=options.name or upload.filename,
                options=RenderOptions(options.preset, options.dpi, options.newline), client=client_of(request))
        else:
            try:
                body = DocumentText.model_validate_json(await json_body(request, ", or a file as multipart/form-data"))
            except ValidationError as exc:
                raise invalid_request(exc) from None
            add = functools.partial(service.add_document, text=body.text, name=body.name,
                                    options=RenderOptions(body.preset, body.dpi, body.newline),
                                    client=client_of(request))
        for tries in range(3, 0, -1):
            record, duplicate = await add()
            try:
                manifest = service.store.manifest(record.id)
                break
            except NotFoundError:
                # Found stored, then deleted by another request before this answer (a soak's clients did): the
                # content is stored again.
                if not duplicate or tries == 1:
                    raise
        # The same content with the same settings is stored once: 200 and the stored document.
        return JSONResponse({"id": record.id, "deduplicated": duplicate, "warm": service.warmth(record.id),
                             "document": record.to_dict(), "manifest": manifest},
                            status_code=200 if duplicate else 201)

    @router.get("/v1/documents")
    async def list_documents(limit: int | None = Query(None, ge=1), offset: int = Query(0, ge=0)):
        """Newest first; ``limit`` and ``offset`` page through them, ``total`` counts them all."""
        records = service.store.list()
        shown = records[offset : None if limit is None else offset + limit]
        return {"documents": [{**r.to_dict(), "warm": service.warmth(r.id)} for r in shown], "total": len(records)}

    @router.get("/v1/documents/{document_id}")
    async def get_document(document_id: str):
        record = service.store.get(path_id(document_id))
        return {"id": record.id, "warm": service.warmth(record.id), "document": record.to_dict(),
                "manifest": service.store.manifest(record.id)}

    @router.get("/v1/documents/{document_id}/pages/{page}.png", response_class=Response,
                responses={200: {"description": "the page (or its crop) as PNG", "content": {"image/png": {}}}})
    async def get_page(document_id: str, page: int, top: int | None = Query(None, ge=0),
                       bottom: int | None = Query(None, ge=1)):
        if (top is None) != (bottom is None):
            raise InvalidRequestError("give both top and bottom to crop a page, or neither")
        result = service.page_png(path_id(document_id), page, None if top is None else (top, bottom))
        if isinstance(result, bytes):
            return Response(result, media_type="image/png")
        return FileResponse(result, media_type="image/png")

    @router.patch("/v1/documents/{document_id}", openapi_extra=request_body(DocumentName, {"name": "Q3 report"}))
    async def rename_document(document_id: str, request: Request):
        path_id(document_id)
        try:
            body = DocumentName.model_validate_json(await json_body(request))
        except ValidationError as exc:
            raise invalid_request(exc) from None
        record = service.rename_document(document_id, body.name)
        return {"id": record.id, "document": record.to_dict()}

    @router.delete("/v1/documents/{document_id}")
    async def delete_document(document_id: str):
        service.delete_document(path_id(document_id))
        return {"id": document_id, "deleted": True}


def _chat_routes(router: APIRouter, service: GlyphService) -> None:
    @router.post("/v1/documents/{document_id}/chat", openapi_extra=request_body(
        DocumentChat, {"question": "Where are the boats kept?", "max_tokens": 256}))
    async def chat(document_id: str, request: Request):
        path_id(document_id)
        try:
            body = DocumentChat.model_validate_json(await json_body(request))
        except ValidationError as exc:
            raise invalid_request(exc) from None
        job = body.job(document_id, service.config.page_selection)
        if not body.stream:
            reply = await unless_disconnected(request, service.answer(job))
            return client_gone() if reply is None else reply_body(reply, service)
        items = await service.stream(job, service.config.sse_keepalive)

        async def events() -> AsyncGenerator[str, None]:
            try:
                async for item in items:
                    if item is None:
                        yield KEEPALIVE
                    elif isinstance(item, StreamEvent):
                        yield sse(delta_event(item))
                    else:
                        yield sse({"type": "done", **reply_body(item, service)})
            except Cancelled:
                return
            except Exception as exc:
                yield sse({"type": "error", **error_event(exc)})
            finally:
                await items.aclose()
            yield sse("[DONE]")

        return sse_response(events(), items)

    @router.post("/v1/chat/completions", openapi_extra=request_body(
        oai.ChatCompletionRequest, {"messages": [{"role": "user", "content": [
            {"type": "text", "text": "The harbour of Kelso keeps its boats in the west basin."},
            {"type": "text", "text": "Where are the boats kept?"}]}], "max_tokens": 256}))
    async def chat_completions(request: Request):
        try:
            body = oai.ChatCompletionRequest.model_validate_json(await json_body(request))
        except ValidationError as exc:
            raise invalid_request(exc) from None
        service.check_model(body.model)
        for document_id in [body.document] if body.document is not None else body.documents or []:
            check_id(document_id)
        job = await run_in_threadpool(oai.to_job, body, has_model=service.has_model,
                                      images=service.config.image_limits)
        job.page_selection = body.page_selection or service.config.page_selection
        model = service.model_name
        if not body.stream:
            reply = await unless_disconnected(request, service.answer(job))
            return client_gone() if reply is None else oai.completion(reply, model)
        items = await service.stream(job, service.config.sse_keepalive)
        cid = oai.completion_id()
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events() -> AsyncGenerator[str, None]:
            try:
                yield sse(oai.chunk(cid, model, {"role": "assistant", "content": ""}))
                async for item in items:
                    if item is None:
                        yield KEEPALIVE
                        continue
                    if isinstance(item, StreamEvent):
                        key = "reasoning_content" if item.channel == "thinking" else "content"
                        yield sse(oai.chunk(cid, model, {key: item.text}, tokens=item.logprobs))
                        continue
                    answer = item.answer
                    yield sse(oai.chunk(cid, model, {}, answer.finish_reason, stop_reason=answer.stop_reason,
                                        pages_shown=item.pages_shown))
                    if include_usage:
                        yield sse(oai.usage_chunk(cid, model, answer))
            except Cancelled:
                return
            except Exception as exc:
                yield sse(error_event(exc))
            finally:
                await items.aclose()
            yield sse("[DONE]")

        return sse_response(events(), items)


def _method_routes(router: APIRouter) -> None:
    """What the API answers for a path or method it does not have; a HEAD of every GET route. Added last: the
    routes above match first."""

    async def unknown(request: Request):
        """A path or method the API does not have: 404, or 405 naming the methods the path takes."""
        path = route_path(request.scope)
        routes = [r for r in router.routes if isinstance(r, APIRoute) and r.endpoint is not unknown]
        allow = sorted({method for r in routes if r.path_regex.match(path) for method in r.methods})
        if allow:
            raise MethodNotAllowedError(f"{request.method} is not a method of {path}: it takes {', '.join(allow)}",
                                        allow)
        raise NotFoundError(f"no API route {path}")

    # A HEAD of every GET route, as HTTP asks (probes, link checkers): FastAPI registers GET alone, and a HEAD fell
    # through to the web UI's plain 404. The body is left out by the server.
    for route in [r for r in router.routes if isinstance(r, APIRoute) and "GET" in r.methods]:
        router.add_api_route(route.path, route.endpoint, methods=["HEAD"], response_class=route.response_class,
                             status_code=route.status_code, include_in_schema=False)
    # (/health and /metrics too: under the web UI, which serves every other path, they got its plain 404)
    others = ["POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    router.add_api_route("/v1/{rest:path}", unknown, methods=["GET", "HEAD", *others], include_in_schema=False)
    router.add_api_route("/health", unknown, methods=others, include_in_schema=False)
    router.add_api_route("/metrics", unknown, methods=others, include_in_schema=False)
