"""HTTP routes: documents, document chat (SSE), OpenAI chat completions, health and metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, AsyncIterator, Awaitable, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from glyphserve.errors import GlyphserveError, NotFoundError
from glyphserve.serve import openai_compat as oai
from glyphserve.serve.backends import ChatJob, ChatSettings, Delta, Reply, Turn
from glyphserve.serve.errors import InvalidRequestError
from glyphserve.serve.scheduler import Cancelled
from glyphserve.serve.service import GlyphService, RenderOptions
from glyphserve.serve.store import check_id
from glyphserve.serve.uploads import read_upload

log = logging.getLogger("glyphserve.serve")


class DocumentText(BaseModel):
    """A pasted document (JSON), or the form fields beside an uploaded file; RenderOptions checks the values."""

    model_config = ConfigDict(extra="forbid")
    text: str
    preset: str = "auto"
    dpi: int | None = None
    newline: str | None = None
    name: str | None = Field(None, max_length=255)


class HistoryTurn(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class DocumentChat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: str = Field(min_length=1)
    history: list[HistoryTurn] = []
    max_tokens: int = Field(ChatSettings.max_tokens, ge=1, le=32768)
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    use_cache: bool = True
    stream: bool = False


def validation_message(exc: ValidationError | Any) -> str:
    """One line naming each invalid field."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


def sse(payload: Any) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def error_event(exc: BaseException) -> dict:
    if isinstance(exc, GlyphserveError):
        return {"type": "error", **exc.to_dict()}
    log.error("stream failed", exc_info=exc)
    return {"type": "error", "error": "internal_error", "message": "the answer failed; the server log has details"}


async def unless_disconnected(request: Request, answer: Awaitable[Reply]) -> Reply | None:
    """Await ``answer``, cancelling it (None) if the client hangs up first."""
    task = asyncio.ensure_future(answer)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await request.is_disconnected():
                return None
    finally:
        task.cancel()


def client_gone() -> Response:
    return Response(status_code=499)  # nginx's "client closed request"; nobody reads it


def build_router(service: GlyphService) -> APIRouter:
    router = APIRouter()

    def citations(document_id: str | None, reply: Reply) -> list[dict]:
        out = []
        for c in reply.citations:
            item = {"page": c.page, "start": c.start, "end": c.end, "text": c.text, "score": c.score}
            if c.page is not None and document_id is not None:
                crop = f"?top={c.rows[0]}&bottom={c.rows[1]}" if c.rows else ""
                item["crop_url"] = f"/v1/documents/{document_id}/pages/{c.page}.png{crop}"
            out.append(item)
        return out

    def reply_body(document_id: str | None, reply: Reply) -> dict:
        return {
            "answer": reply.text, "thinking": reply.thinking, "finish_reason": reply.finish_reason,
            "backend": reply.backend, "notice": service.describe()["notice"],
            "timings": reply.timings, "cache": reply.cache,
            "usage": {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                      "vision_tokens": reply.vision_tokens},
            "citations": citations(document_id, reply),
        }

    @router.get("/health")
    async def health():
        return {"status": "ok", **service.describe(), "documents": service.store.count(),
                "queue_depth": service.scheduler.depth}

    @router.get("/metrics")
    async def metrics():
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    # -- documents ----------------------------------------------------------------------

    @router.post("/v1/documents", status_code=201)
    async def create_document(request: Request):
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            upload = await read_upload(request)
            fields = {k: v for k, v in upload.fields.items() if v != ""}
            try:
                options = DocumentText.model_validate({**fields, "text": ""})
            except ValidationError as exc:
                raise InvalidRequestError(validation_message(exc)) from None
            record = await service.add_document(
                data=upload.data, filename=upload.filename, name=options.name or upload.filename,
                options=RenderOptions(options.preset, options.dpi, options.newline))
        else:
            try:
                body = DocumentText.model_validate_json(await request.body())
            except ValidationError as exc:
                raise InvalidRequestError(validation_message(exc)) from None
            record = await service.add_document(
                text=body.text, name=body.name, options=RenderOptions(body.preset, body.dpi, body.newline))
        return JSONResponse({"id": record.id, "document": record.to_dict(),
                             "manifest": service.store.manifest(record.id)}, status_code=201)

    @router.get("/v1/documents")
    async def list_documents():
        return {"documents": [r.to_dict() for r in service.store.list()]}

    @router.get("/v1/documents/{document_id}")
    async def get_document(document_id: str):
        record = service.store.get(document_id)
        return {"id": record.id, "document": record.to_dict(), "manifest": service.store.manifest(record.id)}

    @router.get("/v1/documents/{document_id}/pages/{page}.png")
    async def get_page(document_id: str, page: int, top: int | None = Query(None, ge=0),
                       bottom: int | None = Query(None, ge=1)):
        if (top is None) != (bottom is None):
            raise InvalidRequestError("give both top and bottom to crop a page, or neither")
        result = service.page_png(document_id, page, None if top is None else (top, bottom))
        if isinstance(result, bytes):
            return Response(result, media_type="image/png")
        return FileResponse(result, media_type="image/png")

    @router.delete("/v1/documents/{document_id}")
    async def delete_document(document_id: str):
        service.delete_document(document_id)
        return {"id": document_id, "deleted": True}

    @router.post("/v1/documents/{document_id}/chat")
    async def chat(document_id: str, request: Request):
        check_id(document_id)
        try:
            body = DocumentChat.model_validate_json(await request.body())
        except ValidationError as exc:
            raise InvalidRequestError(validation_message(exc)) from None
        job = ChatJob(
            question=body.question,
            history=[Turn(t.role, t.content) for t in body.history],
            settings=ChatSettings(max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                                  use_cache=body.use_cache),
            document_id=document_id,
        )
        if not body.stream:
            reply = await unless_disconnected(request, service.answer(job))
            return client_gone() if reply is None else reply_body(document_id, reply)
        items = await service.stream(job)

        async def events() -> AsyncIterator[str]:
            try:
                async for item in items:
                    if isinstance(item, Delta):
                        yield sse({"type": "delta", "channel": item.channel, "text": item.text})
                    else:
                        yield sse({"type": "done", **reply_body(document_id, item)})
            except Cancelled:
                return
            except Exception as exc:
                yield sse(error_event(exc))
            finally:
                await items.aclose()
            yield sse("[DONE]")

        return sse_response(events())

    # -- OpenAI-compatible ----------------------------------------------------------------

    @router.get("/v1/models")
    async def models():
        info = service.describe()
        return {"object": "list", "data": [{"id": info["model"], "object": "model", "created": 0,
                                            "owned_by": "glyphserve", "backend": info["backend"]}]}

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = oai.ChatCompletionRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            raise InvalidRequestError(validation_message(exc)) from None
        if body.document is not None:
            check_id(body.document)
        job = await run_in_threadpool(oai.to_job, body, has_model=service.has_model)
        model = service.model_name
        if not body.stream:
            reply = await unless_disconnected(request, service.answer(job))
            return client_gone() if reply is None else oai.completion(reply, model, body.stop)
        items = await service.stream(job)
        cid = oai.completion_id()
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events() -> AsyncIterator[str]:
            stop = oai.StopFilter(body.stop)
            try:
                yield sse(oai.chunk(cid, model, {"role": "assistant", "content": ""}))
                async for item in items:
                    if isinstance(item, Delta):
                        if item.channel == "thinking":
                            yield sse(oai.chunk(cid, model, {"reasoning_content": item.text}))
                            continue
                        text = stop.feed(item.text)
                        if text:
                            yield sse(oai.chunk(cid, model, {"content": text}))
                        if stop.stopped:
                            break
                        continue
                    tail = stop.flush()
                    if tail:
                        yield sse(oai.chunk(cid, model, {"content": tail}))
                    finish = "stop" if stop.stopped else item.finish_reason
                    yield sse(oai.chunk(cid, model, {}, finish))
                    if include_usage:
                        yield sse({"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
                                   "model": model, "choices": [], "usage": oai.usage(item)})
                if stop.stopped:
                    yield sse(oai.chunk(cid, model, {}, "stop"))
            except Cancelled:
                return
            except Exception as exc:
                yield sse({"error": {k: v for k, v in error_event(exc).items() if k != "type"}})
            finally:
                await items.aclose()
            yield sse("[DONE]")

        return sse_response(events())

    @router.api_route("/v1/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
                      include_in_schema=False)
    async def unknown(rest: str):
        raise NotFoundError(f"no API route /v1/{rest}")

    return router
