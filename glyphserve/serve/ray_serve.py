"""``glyphserve serve --ray``: engine replicas as a Ray Serve deployment, behind the usual front.

Two deployments make one Ray Serve application:

- ``GlyphEngine``: one engine per replica (``num_gpus=1``; a CPU on CPU-only clusters), each with the same
  scheduler as a single-machine server (continuous batching of the requests it holds). A fixed number of
  replicas, or ``--replicas auto``: Ray Serve's autoscaler adds and removes replicas on the requests in flight
  per replica (``target_ongoing_requests``: one full batch), within ``--min-replicas``/``--max-replicas``.
- ``GlyphFront``: the FastAPI app of ``glyphserve serve`` (API, UI, metrics, SQLite store; one replica, on the
  node that runs the command, where ``--data-dir`` lives) as the HTTP ingress. It ingests and renders uploads
  and sends each question, with the document's stored page files, to the engine replicas.

Document affinity: ``DocumentAffinityRouter`` (a Ray Serve request router) ranks the replicas for each request
by rendezvous hashing of its document key, so every question about a document reaches the replica whose
vision and prefix caches hold it, and a replica joining or leaving moves only the documents it takes or held.
Ray Serve sends the request to the first replica in that order with a free slot (``max_ongoing_requests``),
so a busy document spills to the same second replica every time instead of queueing behind the first.

Cancelling: a request the front stops (client gone, deadline) is cancelled through Ray (``ray.cancel`` of the
replica's call) and, once its replica has reported, also stopped by name (``EngineReplica.stop``, routed to that
replica): Ray's cancel of a running streaming call is best effort, and on the 2-core test machine about one call in
ten went on decoding to its last token without the second path.

Failover: a request whose replica dies is sent again (the router no longer offers the dead replica) with the
tokens already streamed (``AnswerRequest.resume_tokens``, and how much of their text the client got): the new
replica computes them as context and streams only what follows, so the client sees one uninterrupted answer,
greedy or sampled.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import hashlib
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.config import AutoscalingConfig, RequestRouterConfig
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError, RequestCancelledError
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from glyphserve.engine.types import AnswerRequest, EncodedPage, EngineConfig, StreamEvent, TokenLogprob
from glyphserve.errors import ConfigError, GlyphserveError, InternalError, QueueFullError, RemoteBackendError
from glyphserve.serve.app import SHUTDOWN_SEND_S, create_app, prepare, public_url
from glyphserve.serve.backends import ChatJob, EngineBackend, Reply
from glyphserve.serve.config import ServeConfig
from glyphserve.serve.errors import RequestTimeoutError, ShuttingDownError
from glyphserve.serve.scheduler import Cancelled, Scheduler, SchedulerHooks, log_cut_off
from glyphserve.serve.service import ENGINE_COUNTERS
from glyphserve.serve.weights import resolve_model

APP_NAME = "glyphserve"
TAKE_DOWN_S = 15.0  # seconds a stopping server waits for Ray to take its application down
RAY_PROBE_S = 3.0  # seconds a stopping server waits to hear Ray is still there before taking its application down
ENGINE_DEPLOYMENT = "GlyphEngine"
FRONT_DEPLOYMENT = "GlyphFront"
MAX_ATTEMPTS = 3  # sends of one request: the first, and retries after its replica died
RECENT_DOCUMENTS = 32  # document keys listed per replica in /health
STOPPED_CALLS = 4096  # ids of stops that found no call running, remembered per replica
STOP_TIMEOUT_S = 60.0  # a stop waits this long for a slot on its replica
REPORT_TIMEOUT_S = 5.0  # /v1/models waits this long for a replica to say its context (before any request came)

log = logging.getLogger("glyphserve.serve")


# -- routing ------------------------------------------------------------------------------------------------

def routing_key(job: ChatJob) -> str:
    """What the router keeps together: the stored document, else the pages, else the conversation's start."""
    if job.document_id is not None:
        return job.document_id
    request = job.request
    digest = hashlib.blake2b(digest_size=16)
    if request.pages:
        keys = request.page_keys or [None] * len(request.pages)
        for key, page in zip(keys, request.pages):
            digest.update(key.encode() if key else page.data if isinstance(page, EncodedPage) else page.tobytes())
    else:
        digest.update((request.history[0].content if request.history else request.question).encode())
    return digest.hexdigest()


def rendezvous_order(key: str, nodes: list[str]) -> list[str]:
    """``nodes`` by their rendezvous (highest random weight) score for ``key``: the first owns the key; when it
    leaves, its keys go to their next node and no other key moves."""
    def weight(node: str) -> bytes:
        return hashlib.blake2b(f"{node}\x1f{key}".encode(), digest_size=8).digest()

    return sorted(nodes, key=weight, reverse=True)


class DocumentAffinityRouter(RequestRouter):
    """Ranks the replicas by rendezvous hashing of the request's ``key`` keyword argument; Ray Serve takes
    the first with a free slot. Requests without a key go to the least loaded replica; a ``replica`` keyword
    argument (a stop) goes to that replica while it runs."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        kwargs = pending_request.kwargs if pending_request is not None else {}
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # all full: wait before asking again
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        if kwargs.get("replica") in by_id:
            return [[by_id[kwargs["replica"]]]]
        key = kwargs.get("key")
        if not key:
            return [candidate_replicas]
        return [[by_id[node]] for node in rendezvous_order(key, list(by_id))]


# -- the engine replicas ------------------------------------------------------------------------------------

@dataclass
class ReplicaReport:
    """Sent by a replica before a request's first token (where it runs) and before its Reply (its counters), and
    given when the front asks (``EngineReplica.report``: its context)."""

    replica: str
    pid: int
    node: str
    engine: dict[str, float] = field(default_factory=dict)
    dtype: str = ""  # its engine's, as loaded (``--dtype auto``: bfloat16 on a GPU, float32 on a CPU)
    quantize: str | None = None
    max_context: int | None = None  # its engine's context (prompt + answer tokens): the model's unless configured


class EngineReplica:
    """One engine and the scheduler that batches the requests this replica holds (``GlyphEngine``)."""

    def __init__(self, engine_config: EngineConfig, queue_size: int, timeout: float):
        import ray

        from glyphserve.engine import Engine

        engine = Engine.load(engine_config)
        self.engine = engine
        self.scheduler = Scheduler(EngineBackend(engine), queue_size=queue_size, max_batch=engine_config.max_num_seqs,
                                   timeout=timeout)
        self.where = ReplicaReport(serve.get_replica_context().replica_id.unique_id, os.getpid(),
                                   ray.get_runtime_context().get_node_id(),
                                   dtype=str(engine.dtype).removeprefix("torch."), quantize=engine_config.quantize,
                                   max_context=engine.max_context)
        self._calls: dict[str, ChatJob] = {}  # by call id, while they run (chat and stop share the replica's loop)
        # Ids of stops that found no call running here: one that has not begun yet ends as it begins (the others,
        # calls already ended, fall out of the bounded memory).
        self._stopped: OrderedDict[str, None] = OrderedDict()

    async def chat(self, job: ChatJob, key: str, call: str) -> AsyncIterator[ReplicaReport | StreamEvent | Reply]:
        """The job's items as a single-machine scheduler yields them, between two reports (the first before
        the job is queued, so the front knows where it runs). ``key`` is read by the router, ``call`` names the
        call for ``stop``. Cancelling the call (the client went away) stops the job at its next token; a job
        stopped by name ends its stream early, without a Reply."""
        yield self.where
        if call in self._stopped:
            del self._stopped[call]
            return
        self._calls[call] = job
        try:
            stream = await self.scheduler.stream(job)
            try:
                async for item in stream:
                    if isinstance(item, Reply):
                        counters = self.engine.counters()
                        yield dataclasses.replace(self.where, engine={k: counters[k] for k in ENGINE_COUNTERS})
                    yield item
            finally:
                await stream.aclose()
        except Cancelled:
            return  # stopped by name: nobody reads this stream any more
        finally:
            del self._calls[call]

    async def stop(self, call: str, replica: str | None = None) -> bool:
        """Stop the call named ``call`` (``replica`` is read by the router). A call not begun yet is remembered
        and ends as it begins. True if it was running here."""
        job = self._calls.get(call)
        if job is None:
            self._stopped[call] = None
            while len(self._stopped) > STOPPED_CALLS:
                self._stopped.popitem(last=False)
            return False
        return self.scheduler.cancel(job)

    def report(self) -> ReplicaReport:
        """Where this replica runs and what its engine holds (asked by the front before any request came)."""
        return self.where

    def check_health(self) -> None:
        if not self.scheduler.alive:
            raise RuntimeError("the engine's scheduler thread stopped")


# -- the front ----------------------------------------------------------------------------------------------

@dataclass
class _ReplicaState:
    report: ReplicaReport
    requests: int = 0
    lost: bool = False  # a request failed because the replica died
    documents: OrderedDict[str, None] = field(default_factory=OrderedDict)

    def to_dict(self) -> dict:
        return {"id": self.report.replica, "pid": self.report.pid, "node": self.report.node, "lost": self.lost,
                "requests": self.requests, "recent_documents": list(reversed(self.documents)),
                "dtype": self.report.dtype, "quantize": self.report.quantize, "engine": self.report.engine}


class ServeReplicas:
    """The front's view of the engine replicas: what it hands to ``GlyphService`` in place of an engine (it
    brings its own scheduler), and the replicas seen so far, for ``/health``."""

    def __init__(self, handle, config: ServeConfig):
        self.handle = handle.options(stream=True)
        self._stops = handle.options(stream=False)
        self.config = config
        self.replicas: dict[str, _ReplicaState] = {}
        self.counters = {"requests": 0, "retries": 0, "resumed": 0, "stops": 0}
        self._stopping: set[asyncio.Task] = set()  # stops in flight (the loop keeps only weak references)
        self._max_context: int | None = None  # as the replicas report it (``stats``)

    def make_scheduler(self, hooks: SchedulerHooks) -> ReplicaScheduler:
        return ReplicaScheduler(self, hooks, self.config.request_timeout)

    def describe(self) -> dict:
        """Replicas running (Ray Serve's count) and, for each replica that answered, its requests, recent
        documents and engine counters."""
        application = serve.status().applications.get(APP_NAME)
        deployment = application.deployments.get(ENGINE_DEPLOYMENT) if application else None
        running = deployment.replica_states.get("RUNNING", 0) if deployment else 0
        # The engines' dtype and quantization as the one-machine server's /health says them (every replica loads
        # with the same settings: the first that answered tells; none yet, as configured).
        first = next(iter(self.replicas.values()), None)
        return {"backend": "ray", "replicas_running": running, **self.counters,
                "dtype": first.report.dtype if first else self.config.dtype,
                "quantize": first.report.quantize if first else self.config.quantize,
                "replicas": [state.to_dict() for state in self.replicas.values()]}

    def stats(self) -> dict:
        """The replicas' context: as configured, else as the first replica to report says (each loads the same
        model with the same settings), asked of a replica while none has; None while none answers. Blocks up to
        ``REPORT_TIMEOUT_S``: call it on a worker thread (``/v1/models`` does)."""
        if self.config.max_model_len is None and self._max_context is None:
            try:
                self._max_context = self._stops.report.remote().result(timeout_s=REPORT_TIMEOUT_S).max_context
            except Exception as exc:  # no replica up yet, or all full past the timeout: asked again next time
                log.info("no replica reported its context: %s", type(exc).__name__)
        return {"max_context": self.config.max_model_len or self._max_context}

    def seen(self, report: ReplicaReport, key: str, first: bool) -> None:
        state = self.replicas.get(report.replica)
        if state is None:
            state = self.replicas[report.replica] = _ReplicaState(report)
        self._max_context = self._max_context or report.max_context
        if first:
            state.requests += 1
            state.documents[key] = None
            state.documents.move_to_end(key)
            while len(state.documents) > RECENT_DOCUMENTS:
                state.documents.popitem(last=False)
        else:
            state.report = report

    def lost(self, replica: str | None) -> None:
        if replica in self.replicas:
            self.replicas[replica].lost = True

    def stop(self, call: str, replica: str) -> None:
        """Stop a call by name on its replica, in the background: the client that went away does not wait for it.
        The stop needs a free slot on the replica like any call (so, on a full replica, it waits for an answer
        to end there). Sent for every call cancelled while running, as the front cannot tell which of Ray's cancels
        were lost: tried, reading the cancelled call's stream for a second ends it as cancelled on the front's
        side even when the replica's call runs on (2 of 16 went on to their last token)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a stream finalised with no loop running (the process is exiting)
            return
        self.counters["stops"] += 1
        # In a context of its own: in the abandoned request's, Ray Serve would cancel the stop with the request.
        task = loop.create_task(self._stop(call, replica), context=contextvars.Context())
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def _stop(self, call: str, replica: str) -> None:
        try:
            await asyncio.wait_for(self._stops.stop.remote(call, replica=replica), STOP_TIMEOUT_S)
        except Exception as exc:  # the replica died (nothing to stop) or stayed full past the timeout
            log.warning("stopping call %s on replica %s failed: %s", call, replica, type(exc).__name__)


class _Resume:
    """What the client has of an answer: the tokens (and logprobs) of every delta passed on, and the characters of
    each channel's text. A request sent again after its replica died carries them (``resume_tokens``,
    ``resume_shown``): the new replica computes the tokens as context, streams the part of their text the client
    missed (a token's text may span deltas, and the replica may die between them) and continues after them, so
    nothing is sent twice or lost, greedy or sampled."""

    def __init__(self):
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.shown: dict[str, int] = {}

    def took(self, event: StreamEvent) -> None:
        self.tokens += event.tokens
        self.logprobs += event.logprobs or []
        self.shown[event.channel] = self.shown.get(event.channel, 0) + len(event.text)

    def request(self, request: AnswerRequest) -> AnswerRequest:
        """The request to send (again)."""
        if not self.tokens:
            return request
        logprobs = list(self.logprobs) if request.settings.logprobs is not None else None
        return dataclasses.replace(request, resume_tokens=list(self.tokens), resume_logprobs=logprobs,
                                   resume_shown=dict(self.shown))


class ReplicaScheduler:
    """The scheduler of a front on Ray Serve, with ``Scheduler``'s surface: every job goes straight to the engine
    replicas (they batch); Ray Serve queues what they cannot take yet (past ``--queue-size``, 429)."""

    def __init__(self, replicas: ServeReplicas, hooks: SchedulerHooks, timeout: float):
        self.replicas = replicas
        self.hooks = hooks
        self.timeout = timeout
        self._waiting = 0  # sent, no token yet
        self._running = 0  # sent, answering
        self._draining = False
        self._cut_after: float | None = None  # the grace, once answers in flight are cut off
        self._reads: dict[asyncio.Timeout, ChatJob] = {}  # the time limits of the items awaited now, by job
        self._in_flight: set[int] = set()  # the jobs answering or waiting (ids of the ChatJobs given)
        self._stopped: set[int] = set()  # those of them stopped by ``cancel``

    @property
    def depth(self) -> int:
        return self._waiting

    @property
    def running(self) -> int:
        return self._running

    def retry_after(self) -> int:
        return 1

    def close(self) -> None:
        pass  # the replicas belong to Ray Serve; requests in flight are cancelled with their HTTP requests

    def cancel(self, job: ChatJob) -> bool:
        """Stop ``job`` from outside the task that reads it (the web UI's Stop): its reader gets ``Cancelled`` at
        once, and its call on the replica is stopped. False if it is not in flight here. On the event loop."""
        if id(job) not in self._in_flight:
            return False
        self._stopped.add(id(job))
        now = asyncio.get_running_loop().time()
        for limit in [limit for limit, owner in self._reads.items() if owner is job]:
            limit.reschedule(now)  # the item awaited now (none between two reads: the next read raises)
        return True

    async def shut_down(self, grace: float) -> None:
        """As ``Scheduler.shut_down``, on the front's event loop; returns once no request is in flight (at most
        ``grace`` seconds and the cut-off answers' last events later)."""
        self._draining = True
        deadline = time.monotonic() + grace
        while self._waiting + self._running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._cut_after = grace
        log_cut_off(self._waiting + self._running, grace)
        now = asyncio.get_running_loop().time()
        for read in list(self._reads):  # each awaited item's limit runs out now: its reader is cut off
            read.reschedule(now)
        deadline += SHUTDOWN_SEND_S
        while self._waiting + self._running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def answer(self, job: ChatJob) -> Reply:
        items = self._items(job)
        try:
            async for item in items:
                if isinstance(item, Reply):
                    return item
        finally:
            await items.aclose()
        raise InternalError("the backend gave no answer")

    async def stream(self, job: ChatJob, keepalive: float | None = None) -> AsyncIterator[StreamEvent | Reply | None]:
        """As ``Scheduler.stream``: errors before the first item are raised here; with ``keepalive``, None every
        that many seconds until the first item."""
        items = self._items(job)
        first = asyncio.ensure_future(items.__anext__())
        try:
            done, _ = await asyncio.wait({first}, timeout=keepalive)
            if done:
                first.result()  # raises what went wrong before the first item
        except StopAsyncIteration:
            raise InternalError("the backend gave no answer") from None
        except BaseException:
            await _close(first, items)
            raise
        chain = self._chain(first, items, keepalive)
        await chain.asend(None)  # into its try: closed even before its first item, it cancels the job
        return chain

    @staticmethod
    async def _chain(first: asyncio.Future, items: AsyncIterator, keepalive: float | None):
        try:
            yield  # the start, taken by stream()
            while not first.done():
                done, _ = await asyncio.wait({first}, timeout=keepalive)
                if not done:
                    yield None
            yield first.result()
            async for item in items:
                yield item
        except StopAsyncIteration:
            return
        finally:
            await _close(first, items)

    async def _next(self, response, timeout: float, job: ChatJob):
        """The call's next item, unless ``timeout`` passes (``TimeoutError``), ``job`` is stopped (``Cancelled``)
        or the server's shutdown cuts it off (``ShuttingDownError``): ``cancel`` and ``shut_down`` end the limit
        of the items awaited."""
        try:
            if self._cut_after is not None or id(job) in self._stopped:
                raise TimeoutError
            async with asyncio.timeout(timeout) as limit:
                self._reads[limit] = job
                try:
                    return await response.__anext__()
                finally:
                    del self._reads[limit]
        except TimeoutError:
            if id(job) in self._stopped:
                raise Cancelled() from None
            if self._cut_after is None:
                raise
            raise ShuttingDownError.cut_off(self._cut_after) from None

    async def _items(self, job: ChatJob) -> AsyncIterator[StreamEvent | Reply]:
        """The job's deltas and reply, sent again to another replica if its replica dies."""
        if self._draining:
            raise ShuttingDownError.refused()
        arrived = time.monotonic()
        key = routing_key(job)
        name = uuid.uuid4().hex  # each send is named apart (f"{name}.{attempt}"): a resend may reach the same replica
        given = job  # what ``cancel`` is handed
        self._in_flight.add(id(given))
        # The replica's own scheduler sets the request's cancel hook there.
        job = dataclasses.replace(job, request=dataclasses.replace(job.request, cancel=None))
        resume = _Resume()
        self.replicas.counters["requests"] += 1
        replied = False
        try:
            for attempt in range(MAX_ATTEMPTS):
                replica = None
                sent = dataclasses.replace(job, request=resume.request(job.request))
                call = f"{name}.{attempt}"
                response = self.replicas.handle.chat.remote(sent, key=key, call=call)
                self._waiting += 1
                waiting = True
                ended = False  # the replica's call finished (answered, failed, or its replica died)
                try:
                    while True:
                        remaining = self.timeout - (time.monotonic() - arrived)
                        item = await self._next(response, max(remaining, 0.001), given)
                        if isinstance(item, ReplicaReport):
                            self.replicas.seen(item, key, first=replica is None)
                            replica = item.replica
                            continue
                        if waiting:
                            waiting = False
                            self._waiting -= 1
                            self._running += 1
                        if isinstance(item, StreamEvent):
                            resume.took(item)
                            yield item
                            continue
                        self.hooks.reply(job, item, time.monotonic() - arrived)
                        replied = ended = True
                        yield item
                        return  # the Reply is the last item: a replica lost after it must not answer again
                except StopAsyncIteration:
                    ended = True
                    return
                except asyncio.TimeoutError:
                    raise RequestTimeoutError(f"the request took longer than the {self.timeout:g} s limit "
                                              "(--request-timeout)") from None
                except (RayActorError, ReplicaUnavailableError) as exc:
                    # Dead, or (ActorUnavailableError, ReplicaUnavailableError) unreachable for now: then the call
                    # may run on, and is stopped by name like an abandoned one.
                    ended = not isinstance(exc, (ActorUnavailableError, ReplicaUnavailableError))
                    self.replicas.lost(replica)
                    if attempt + 1 == MAX_ATTEMPTS:
                        raise RemoteBackendError(f"the engine replica died while answering ({type(exc).__name__})") \
                            from None
                    self.replicas.counters["retries"] += 1
                    self.replicas.counters["resumed"] += bool(resume.tokens)
                except BackPressureError:
                    ended = True
                    raise QueueFullError("the engine replicas' queue is full; retry in a moment") from None
                except RequestCancelledError:
                    raise asyncio.CancelledError() from None
                except RayTaskError as exc:  # raised by the replica's code: a user error, or a bug
                    ended = True
                    cause = exc.cause
                    raise cause if isinstance(cause, GlyphserveError) else InternalError(
                        f"the engine replica failed ({type(cause).__name__}); its log has the details") from None
                finally:
                    if waiting:
                        self._waiting -= 1
                    else:
                        self._running -= 1
                    response.cancel()  # a no-op once the call ended
                    # Ray's cancel of a running call is best effort. Before the replica reported (the call was
                    # queued, or had only just begun) it is the only stop: a queued call's cancel is reliable.
                    if not ended and replica is not None:
                        self.replicas.stop(call, replica)
                await asyncio.sleep(0.1 * 2**attempt)
        except (GeneratorExit, asyncio.CancelledError, RequestTimeoutError, ShuttingDownError, Cancelled):
            if not replied:  # the client went away or the deadline passed: counted as the local scheduler does
                self.hooks.cancelled()
            raise
        finally:
            self._in_flight.discard(id(given))
            self._stopped.discard(id(given))


async def _close(pending: asyncio.Future, items) -> None:
    """Stop a stream: its pending read first (a generator cannot be closed while a read runs), then it."""
    if not pending.done():
        pending.cancel()
        with contextlib.suppress(BaseException):
            await pending
    await items.aclose()


@serve.ingress()
class GlyphFront:
    """The ingress deployment: the single-machine FastAPI app (API, UI, metrics, store) around the replicas."""

    def __init__(self, config: ServeConfig, engines, model_name: str):
        self.config, self.engines, self.model_name = config, engines, model_name

    def __serve_build_asgi_app__(self):
        os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
        self._front = create_app(self.config, ServeReplicas(self.engines, self.config), self.model_name)
        return self._front

    async def shut_down(self, grace: float) -> None:
        """Refuse new requests, give those in flight ``grace`` seconds, then cut them off (``serve --ray`` on
        Ctrl-C, before it takes the application down)."""
        await self._front.state.service.scheduler.shut_down(grace)


# -- deploying ----------------------------------------------------------------------------------------------

def engine_deployment(config: ServeConfig, engine_config: EngineConfig, gpus: int, cluster_gpus: int):
    """The engine replicas' deployment options: resources, replica count or autoscaling (at most
    ``--max-replicas``, else one per GPU of the cluster), queue limits, router."""
    per_replica = config.concurrency_per_replica
    options = {
        "name": ENGINE_DEPLOYMENT,
        "ray_actor_options": {"num_gpus": gpus, "num_cpus": 1},
        "max_ongoing_requests": per_replica,
        "max_queued_requests": config.queue_size,
        "request_router_config": RequestRouterConfig(request_router_class=DocumentAffinityRouter),
        "health_check_period_s": 2,
        "graceful_shutdown_timeout_s": 5,
    }
    if config.replicas == "auto":
        options["autoscaling_config"] = AutoscalingConfig(
            min_replicas=config.min_replicas, initial_replicas=config.min_replicas,
            max_replicas=config.max_replicas or max(config.min_replicas, cluster_gpus),
            target_ongoing_requests=min(per_replica, engine_config.max_num_seqs))
    else:
        options["num_replicas"] = config.replicas
    return serve.deployment(EngineReplica).options(**options)


def build_application(config: ServeConfig):
    """The Ray Serve application (needs a connected Ray). The replicas load the model as given: on a cluster,
    each node finds (or downloads) it."""
    import ray

    from glyphserve.cluster import cluster_gpus

    engine_config = config.engine_config(config.model)
    available = cluster_gpus()
    gpus = 1 if config.device == "cuda" or (config.device == "auto" and available > 0) else 0
    engines = engine_deployment(config, engine_config, gpus, available).bind(
        engine_config, config.concurrency_per_replica, config.request_timeout)
    here = ray.util.get_node_ip_address()
    front = serve.deployment(GlyphFront).options(
        name=FRONT_DEPLOYMENT, num_replicas=1, max_ongoing_requests=max(256, 4 * config.queue_size),
        # On this node: the store (--data-dir) is here.
        ray_actor_options={"num_cpus": 0, "resources": {f"node:{here}": 0.001}},
    )
    return front.bind(config, engines, config.default_model_name)


def config_from_args(args: dict) -> ServeConfig:
    """A server's settings from a RayService's application ``args``: ServeConfig's fields by name (``data_dir``,
    ``model``, ``replicas``, ...). The HTTP proxy listens beyond the pod, so an API key is required: ``api_key``,
    or $GLYPHSERVE_API_KEY (a secret in the pod's environment)."""
    known = {f.name for f in dataclasses.fields(ServeConfig)}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ConfigError(f"unknown glyphserve settings: {', '.join(unknown)}")
    settings = {"ray": "auto", "host": "0.0.0.0", "api_key": os.environ.get("GLYPHSERVE_API_KEY"), **args}
    settings["data_dir"] = Path(settings.get("data_dir") or "data")
    config = ServeConfig(**settings)
    config.validate()
    return config


def build(args: dict):
    """Ray Serve application builder (``import_path: glyphserve.serve.ray_serve:build`` in a RayService)."""
    return build_application(config_from_args(args))


def run(config: ServeConfig) -> int:
    """Start (or join) Ray, deploy the application with its HTTP proxy on --host/--port, serve until
    interrupted, then take the application down."""
    from glyphserve.cluster import connect

    # What the one-machine server checks before it loads, checked before Ray starts: a busy port or a model that is
    # not there failed only after Ray and its deployment had tried (a traceback, the reason in Ray's logs).
    prepare(config).close()
    if config.model and config.ray == "local":  # a cluster's nodes may hold a folder this machine does not
        resolve_model(config.model)
    most = (config.max_replicas or config.min_replicas) if config.replicas == "auto" else config.replicas
    disconnect = connect(config.ray, min_cpus=most + 1)
    # Ray Serve's progress lines on this console repeat what the server prints (its log files keep them).
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    stop = threading.Event()
    stopped_by: list[int] = []  # the signal that stopped the server
    grace = None  # seconds for answers in flight, once the application is up and asked to stop
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _: (stopped_by.append(signum), stop.set()))
    try:
        serve.start(http_options={"host": config.host, "port": config.port}, proxy_location="HeadOnly")
        print(f"glyphserve: deploying {config.replicas} engine replica(s) on Ray Serve ...", flush=True)
        started = time.perf_counter()
        serve.run(build_application(config), name=APP_NAME, route_prefix="/", blocking=False)
        base = public_url(config)
        ui = f"web UI {base}/  " if config.ui else ""
        print(f"glyphserve: up in {time.perf_counter() - started:.1f} s: {ui}API {base}/v1  data {config.data_dir}",
              flush=True)
        stop.wait()
        grace = config.shutdown_timeout
    finally:
        # Bounded: stopped with its whole process group (systemd's default, `timeout`), Ray's own processes are gone
        # first, and taking the application down waited 60 s for them before failing; so Ray is asked first whether
        # it still answers (it did not, and the server left only after 30 s of waiting: a new user's trial).
        if _answers_within(serve.status, RAY_PROBE_S):
            down = threading.Thread(target=_take_down, args=(grace,), daemon=True)
            down.start()
            waited = TAKE_DOWN_S + (grace + SHUTDOWN_SEND_S if grace is not None else 0)
            down.join(waited)
            if down.is_alive():
                print(f"glyphserve: Ray did not answer within {waited:g} s (stopped with this server?); leaving",
                      file=sys.stderr, flush=True)
            else:
                disconnect()
        else:
            print(f"glyphserve: Ray did not answer within {RAY_PROBE_S:g} s (stopped with this server?); leaving",
                  file=sys.stderr, flush=True)
    if stopped_by:  # ended by the signal, as the one-machine server (uvicorn) is: a shell shows 130 or 143
        signal.signal(stopped_by[0], signal.SIG_DFL)
        os.kill(os.getpid(), stopped_by[0])
    return 0


def _answers_within(call, seconds: float) -> bool:
    """Whether ``call()`` returns (or raises) within ``seconds``, on a thread of its own."""
    done = threading.Event()

    def probe() -> None:
        try:
            call()
        except Exception:  # an error is an answer: Ray is there to give it
            pass
        done.set()

    threading.Thread(target=probe, daemon=True).start()
    return done.wait(seconds)


def _take_down(grace: float | None) -> None:
    """Take the application down; with ``grace``, its answers in flight first end by themselves within that many
    seconds, or with an error event (``Scheduler.shut_down``), instead of losing their connections."""
    try:
        if grace is not None:
            try:
                serve.get_app_handle(APP_NAME).shut_down.remote(grace).result(timeout_s=grace + SHUTDOWN_SEND_S + 1)
            except Exception as exc:  # Ray stopping already (stopped with its process group)
                log.warning("ending the answers in flight failed: %s", type(exc).__name__)
        serve.delete(APP_NAME)
    finally:
        serve.shutdown()

