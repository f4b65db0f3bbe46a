"""The FastAPI application: API routes, JSON errors, auth, upload limits, metrics, and the UI at ``/``."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import secrets
import socket
import time
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from glyphserve import __version__
from glyphserve.errors import (ConfigError, FileTooLargeError, GlyphserveError, InternalError, NotFoundError,
                               QueueFullError)
from glyphserve.serve.api import build_router, client_gone, invalid_request
from glyphserve.serve.api_schema import describe_api
from glyphserve.serve.config import ServeConfig
from glyphserve.serve.errors import (BodiesFullError, BodyTimeoutError, MethodNotAllowedError, RequestTooLargeError,
                                     RetryLaterError, UnauthorizedError)
from glyphserve.serve.head_timeout import MAX_HEAD_BYTES, with_head_timeout
from glyphserve.serve.origin import OriginGuard, OriginPolicy, is_api_path, route_path
from glyphserve.serve.service import GlyphService
from glyphserve.serve.store import prepare_data_dir
from glyphserve.serve.weights import resolve_model

if TYPE_CHECKING:
    from glyphserve.engine import Engine
    from glyphserve.engine.remote import RemoteEngine

log = logging.getLogger("glyphserve.serve")

# Seconds past --shutdown-timeout the web server waits before closing connections: the answers cut off at the
# timeout send their last event meanwhile.
SHUTDOWN_SEND_S = 2.0
# Multipart framing around an upload; the file itself is checked against the exact limit.
_BODY_SLACK = 64 * 1024
# Past this, an oversized body is not drained before answering 413; the connection is closed.
_DRAIN_LIMIT = 256 * 2**20
BUSY_RETRY_AFTER_S = 5  # a request refused while the bodies in flight fill their budget (503 server_busy)
# A body must come at least this fast on average once --body-timeout has passed: one that trickled a byte every
# few seconds kept its share of the bodies' budget for good (a few such clients refused every other body).
MIN_BODY_BYTES_PER_S = 16 * 1024
# Bodies this small (a question, a web UI event) draw on a reserve of their own when the bodies in flight fill their
# budget: uploads held it whole and every chat request and every event of the web UI (a few hundred bytes each) got
# 503 server_busy, the UI unusable for all of its users while a few large files came in.
SMALL_BODY_BYTES = 64 * 1024
SMALL_BODIES_BYTES = 16 * 2**20  # the reserve: 256 such bodies at their largest, thousands of questions


class _Body:
    """What a request's body has brought so far, and what of the bodies' budget it holds."""

    def __init__(self):
        self.seen = 0  # bytes
        self.held = 0  # bytes of the budget: its announced length at once, more if more came
        self.small = False  # held in the small bodies' reserve
        self.started: float | None = None  # its first read
        self.done = False  # the last chunk came (or the client left)

    def deadline(self, timeout: float) -> float:
        """When its next bytes must have come: ``timeout`` after its first read, later as fast as they came."""
        return self.started + max(timeout, self.seen / MIN_BODY_BYTES_PER_S)


class ServiceMiddleware:
    """Pure ASGI (so streaming and disconnects pass through untouched): bearer auth, the size of one request's body
    (``--max-upload-mb``) and request/error/latency metrics by route template on API routes; on every route, the
    time a body may take and the bytes the bodies in flight may hold.

    A body gets ``--body-timeout`` for its next bytes, and past that must average ``MIN_BODY_BYTES_PER_S`` (20
    clients that stopped 44 MiB into an upload held 880 MiB for as long as they kept their connections); the
    bodies of all requests in flight hold at most ``--max-bodies-mb`` together, an announced length taken from it
    at once: a request that does not fit beside the others is refused with 503 ``server_busy``, unless its body is
    small (``SMALL_BODY_BYTES``: a question, a web UI event), which a reserve of its own then holds."""

    def __init__(self, app, service: GlyphService):
        self.app = app
        self.service = service
        self.limit = service.config.max_upload_bytes + _BODY_SLACK
        self.body_timeout = service.config.body_timeout
        self.bodies_limit = max(service.config.max_bodies_bytes, self.limit)  # one largest request fits alone
        self.bodies = 0  # body bytes of the requests in flight (touched on the event loop alone)
        self.small_bodies = 0  # of those, the bytes held in the small bodies' reserve
        key = service.config.api_key
        self.expected = f"Bearer {key}".encode() if key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if not (is_api_path(path := route_path(scope)) or path == "/health"):  # the web UI's routes
            return await self._with_body(scope, receive, send, None, sized=False)
        started = time.perf_counter()
        status = {"code": 500}

        async def send_tracked(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self._with_body(scope, receive, send_tracked, self._refusal(scope), sized=True)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            metrics = self.service.metrics.c
            metrics.requests.labels(label, scope["method"], str(status["code"])).inc()
            metrics.latency.labels(label).observe(time.perf_counter() - started)
            if status["code"] >= 400:
                code = scope.get("state", {}).get("error_code", "http_error")
                metrics.errors.labels(label, str(status["code"]), code).inc()

    async def _with_body(self, scope, receive, send, refusal: GlyphserveError | None, sized: bool) -> None:
        """The request under its body's limits: refused (its body drained) or passed on; its share of the bodies'
        budget given back when it ends."""
        body = _Body()
        try:
            refusal = refusal or self._admit(scope, body)
            if refusal is not None:
                await self._drain(scope, receive, body)
                await _send_error(send, refusal, scope)
                return
            await self.app(scope, self._limited(receive, scope, body, sized=sized), send)
        finally:
            if body.small:
                self.small_bodies -= body.held
            else:
                self.bodies -= body.held

    def _refusal(self, scope) -> GlyphserveError | None:
        headers = dict(scope["headers"])
        if self.expected is not None and is_api_path(route_path(scope)):
            if not secrets.compare_digest(headers.get(b"authorization", b""), self.expected):
                return UnauthorizedError("missing or wrong API key: send 'Authorization: Bearer <key>'")
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return self._too_large(scope)
        return None

    def _admit(self, scope, body: _Body) -> BodiesFullError | None:
        """Take the body's announced length from the bodies' budget, or refuse it (never the only body)."""
        length = dict(scope["headers"]).get(b"content-length", b"")
        if not length.isdigit():
            return None
        return None if self._take(body, int(length)) else self._busy()

    def _take(self, body: _Body, n: int) -> bool:
        """Hold ``n`` more bytes for ``body``: from the bodies' budget (never refused to the only body), else, for a
        body within ``SMALL_BODY_BYTES``, from the small bodies' reserve; False where neither has room. A small body
        that outgrows the reserve's bound moves to the budget whole."""
        if body.small:
            if body.held + n <= SMALL_BODY_BYTES and self.small_bodies + n <= SMALL_BODIES_BYTES:
                self.small_bodies += n
                body.held += n
                return True
            self.small_bodies -= body.held
            n, body.held, body.small = n + body.held, 0, False
        if self.bodies == body.held or self.bodies + n <= self.bodies_limit:
            self.bodies += n
            body.held += n
            return True
        if body.held == 0 and n <= SMALL_BODY_BYTES and self.small_bodies + n <= SMALL_BODIES_BYTES:
            self.small_bodies += n
            body.held, body.small = n, True
            return True
        return False

    def _busy(self) -> BodiesFullError:
        return BodiesFullError(f"the requests in flight hold {self.bodies / 2**20:.0f} MiB of bodies, this server's "
                               f"{self.bodies_limit / 2**20:g} MiB for them (--max-bodies-mb): retry in a few "
                               "seconds")

    def _too_large(self, scope) -> GlyphserveError:
        limit = self.service.config.max_upload_mb
        if route_path(scope).rstrip("/") == "/v1/documents":
            return FileTooLargeError(f"the upload is larger than this server's {limit:g} MiB limit (--max-upload-mb)")
        return RequestTooLargeError(f"the request body is larger than this server's {limit:g} MiB limit for a "
                                    "request (--max-upload-mb)")

    def _limited(self, receive, scope, body: _Body, sized: bool):
        """``receive``, the body's bytes counted against the limits (one request's where ``sized``; a chunked body
        announces no length) and awaited within the body's deadline."""

        async def wrapped():
            if body.done:  # (a route waiting for the client to leave)
                return await receive()
            message = await self._next(receive, body)
            if message is None:
                raise BodyTimeoutError(f"the request body stopped arriving for {self.body_timeout:g} s, or came "
                                       f"slower than {MIN_BODY_BYTES_PER_S // 1024} KiB/s (--body-timeout)")
            if body.done:
                return message
            if sized and body.seen > self.limit:
                raise self._too_large(scope)
            if body.seen > body.held and not self._take(body, body.seen - body.held):  # more than announced, or
                raise self._busy()  # none was
            return message

        return wrapped

    async def _next(self, receive, body: _Body) -> dict | None:
        """The body's next message, counted; None when its deadline passes first."""
        now = time.monotonic()
        if body.started is None:
            body.started = now
        try:
            message = await asyncio.wait_for(receive(), max(0.0, body.deadline(self.body_timeout) - now))
        except TimeoutError:
            return None
        if message["type"] != "http.request":
            body.done = True
            return message
        body.seen += len(message.get("body", b""))
        body.done = not message.get("more_body", False)
        return message

    async def _drain(self, scope, receive, body: _Body) -> None:
        """Read (and drop) the request body within its deadline, so the client sees the answer instead of a reset;
        not one a client waits to be asked for (``Expect: 100-continue``: it sends none unless read)."""
        if dict(scope["headers"]).get(b"expect", b"").lower() == b"100-continue":
            return
        while body.seen <= _DRAIN_LIMIT:
            message = await self._next(receive, body)
            if message is None or body.done:
                return


async def _send_error(send, error: GlyphserveError, scope) -> None:
    scope.setdefault("state", {})["error_code"] = error.code
    body = json.dumps(error.to_dict(), separators=(",", ":")).encode()  # as the app's own JSON responses
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if isinstance(error, UnauthorizedError):
        headers.append((b"www-authenticate", b"Bearer"))
    if isinstance(error, BodiesFullError):
        headers.append((b"retry-after", str(BUSY_RETRY_AFTER_S).encode()))
    await send({"type": "http.response.start", "status": error.http_status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def error_response(request: Request, error: GlyphserveError, service: GlyphService) -> JSONResponse:
    """OpenAI's error body and status; a 429 or a busy 503 says when to retry, a 405 which methods the route
    takes."""
    request.state.error_code = error.code
    headers = {}
    if isinstance(error, QueueFullError):
        headers["Retry-After"] = str(service.scheduler.retry_after())
    if isinstance(error, MethodNotAllowedError):
        headers["Allow"] = ", ".join(error.allow)
    if isinstance(error, BodiesFullError):
        headers["Retry-After"] = str(BUSY_RETRY_AFTER_S)
    if isinstance(error, RetryLaterError):
        headers["Retry-After"] = str(error.retry_after)
    return JSONResponse(error.to_dict(), status_code=error.http_status, headers=headers)


def mount_docs(app: FastAPI) -> None:
    """Swagger UI at ``/docs`` from the files of the swagger-ui-bundle package: no CDN, works offline."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles
    from swagger_ui_bundle import swagger_ui_path

    # The packaged Swagger UI (4.x) reads OpenAPI 3.0 documents; FastAPI's schema renders as one.
    app.openapi_version = "3.0.3"
    app.mount("/docs/static", StaticFiles(directory=swagger_ui_path), name="docs-static")

    @app.api_route("/docs", methods=["GET", "HEAD"], include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(openapi_url=app.openapi_url, title="glyphserve API",
                                   swagger_js_url="/docs/static/swagger-ui-bundle.js",
                                   swagger_css_url="/docs/static/swagger-ui.css",
                                   swagger_favicon_url="/docs/static/favicon-32x32.png")


def create_app(config: ServeConfig, engine: "Engine | None" = None, model_name: str | None = None) -> FastAPI:
    """Build the service; ``engine`` (already loaded) answers questions, else the extractive backend does."""
    service = GlyphService(config, engine, model_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.close()

    app = FastAPI(title="glyphserve", version=__version__, docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.service = service
    mount_docs(app)
    describe_api(app)

    @app.exception_handler(GlyphserveError)
    async def on_glyphserve_error(request: Request, exc: GlyphserveError):
        return error_response(request, exc, service)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        return error_response(request, invalid_request(exc), service)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return error_response(request, NotFoundError(f"no route {request.url.path}"), service)
        error = GlyphserveError(str(exc.detail))
        error.http_status, error.code = exc.status_code, "http_error"
        return error_response(request, error, service)

    @app.exception_handler(ClientDisconnect)
    async def on_client_gone(request: Request, exc: ClientDisconnect):
        # The client left while its body was read: nothing to answer, and no fault of the server's (it was logged
        # as an unhandled error twice over, with its traceback, and counted as a 500).
        request.state.error_code = "client_disconnected"
        return client_gone()

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception):
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(request, InternalError("internal error; the server log has the details"), service)

    app.include_router(build_router(service))
    app.add_middleware(ServiceMiddleware, service=service)
    if config.ui:
        from glyphserve.serve.ui import mount_ui

        app = mount_ui(app, service)
    policy = OriginPolicy.build(config.host, config.allowed_hosts, config.allowed_origins)
    app.add_middleware(OriginGuard, policy=policy, send_error=_send_error)  # outermost: sees every route first
    return app


def load_engine(config: ServeConfig) -> tuple["Engine | RemoteEngine | None", str | None]:
    """Load the model named by MODEL / ``--random-weights`` (None, None without one), or connect to the
    ``--endpoint`` servers (``--backend openai``); the name is the one served by default."""
    if config.remote:
        from glyphserve.engine.remote import RemoteConfig, RemoteEngine

        per_server = config.concurrency_per_replica
        remote = RemoteEngine.load(RemoteConfig(
            config.endpoints, model=config.remote_model, api_key=config.remote_api_key, resume_greedy=True,
            max_concurrency=len(config.endpoints) * per_server, max_context=config.max_model_len))
        models = [e["model"] for e in remote.stats()["endpoints"] if e["model"]]
        return remote, models[0] if models else "glyph"
    if not config.has_model:
        return None, None
    # Before torch is imported: a model that is neither here nor downloadable fails at once.
    source = resolve_model(config.model) if config.model else None
    from glyphserve.engine import Engine

    name = config.default_model_name
    print(f"glyphserve: loading {config.model or name} ...", flush=True)
    started = time.perf_counter()
    engine = Engine.load(config.engine_config(source))
    print(f"glyphserve: model loaded in {time.perf_counter() - started:.1f} s", flush=True)
    return engine, name


def listen_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads so a busy port is reported at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); another server may be "
                          "running there: choose another --port") from None
    sock.set_inheritable(True)
    return sock


def public_url(config: ServeConfig) -> str:
    """Where the server is reached, for its banner: a wildcard bind (0.0.0.0, ::) by this machine's name."""
    host = socket.gethostname() if config.host in ("0.0.0.0", "::", "") else config.host
    return f"http://{'[' + host + ']' if ':' in host else host}:{config.port}"


def log_config() -> dict:
    """uvicorn's logging with the time on every line, and glyphserve's own loggers through the same handler: one
    timeline to read."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    for formatter in config["formatters"].values():
        formatter["fmt"] = "%(asctime)s " + formatter["fmt"]
    config["loggers"]["glyphserve"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config


def prepare(config: ServeConfig) -> socket.socket:
    """What every server checks before anything loads, each a line at once: its settings, its port (the socket,
    bound), then its data folder (made only for a server that can start: a busy port left a data folder and a
    lock behind)."""
    config.validate()
    sock = listen_socket(config.host, config.port)
    try:
        prepare_data_dir(config.data_dir)
    except BaseException:
        sock.close()
        raise
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    return sock


def run(config: ServeConfig) -> int:
    """Bind the port, load the model (if any) and serve until interrupted (one machine; ``--ray`` runs
    ``ray_serve.run`` instead)."""
    import uvicorn

    sock = prepare(config)
    try:
        engine, name = load_engine(config)
        app = create_app(config, engine, name)
        info = app.state.service.describe()
        base = public_url(config)
        ui = f"web UI {base}/  " if config.ui else ""
        print(f"glyphserve: {ui}API {base}/v1 (docs {base}/docs)  model {info['model']}  data {config.data_dir}",
              flush=True)
        if info["notice"]:
            print(f"glyphserve: {info['notice']}", flush=True)
        grace = config.shutdown_timeout
        scheduler = app.state.service.scheduler

        class Server(uvicorn.Server):
            async def shutdown(self, sockets=None) -> None:
                scheduler.shut_down(grace)  # answers in flight end by themselves, or with an error, inside
                await super().shutdown(sockets)  # uvicorn's wait, which would cut them off mid-stream

        # The extra seconds are for the cut-off answers' last events to go out.
        server = Server(uvicorn.Config(app, log_level="info", log_config=log_config(),
                                       http=with_head_timeout(config.header_timeout),
                                       h11_max_incomplete_event_size=MAX_HEAD_BYTES,
                                       timeout_graceful_shutdown=grace + SHUTDOWN_SEND_S))
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0
