"""The one owner of the backend: a worker thread fed by a bounded queue.

Request handlers (asyncio) submit jobs; the worker drains up to ``max_batch`` waiting jobs,
streaming or not, into one ``stream_batch`` call, and hands deltas and results back to the event
loop (``_Outbox``: one ``call_soon_threadsafe`` per burst). With a backend that admits jobs into a running batch (the
engine: continuous batching), jobs that arrive while it decodes join as rows free up; with
other backends a lone job goes through ``stream`` (``ConcurrentScheduler`` runs several such jobs at once,
for servers that batch on their side). A job whose
client went away or whose deadline passed is skipped if still queued, and stops at its next
token if running (the engine polls the request's ``cancel`` every decode step).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from glyphserve.errors import GlyphserveError, InternalError, QueueFullError
from glyphserve.engine.types import StreamEvent
from glyphserve.serve.backends import Backend, ChatJob, Reply
from glyphserve.serve.errors import RequestTimeoutError, ShuttingDownError

log = logging.getLogger("glyphserve.serve")

_END = object()
_SETTLING = threading.Lock()  # a ticket's settling item goes out once (``_Ticket.deliver``)
_WAITING = object()  # no item yet, the keep-alive interval passed


class Cancelled(Exception):
    """The job was cancelled before it produced a result."""


class _Outbox:
    """Hands items from the worker thread to one event loop with one wake-up per burst: the tokens of
    every row of a decode step go over together instead of one ``call_soon_threadsafe`` each."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = weakref.ref(loop)  # the scheduler keys its outboxes weakly by loop
        self._items: list[tuple[_Ticket, object]] = []
        self._lock = threading.Lock()

    def put(self, ticket: _Ticket, item) -> None:
        with self._lock:
            self._items.append((ticket, item))
            if len(self._items) > 1:  # a flush is already scheduled
                return
        loop = self._loop()
        if loop is not None:
            loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for ticket, item in items:
            ticket.receive(item)


@dataclass(eq=False)  # one ticket is one request: compared (in the queue) by identity
class _Ticket:
    job: ChatJob
    streaming: bool
    outbox: _Outbox
    deadline: float
    arrived: float = field(default_factory=time.monotonic)
    cancel: threading.Event = field(default_factory=threading.Event)
    future: asyncio.Future | None = None
    events: asyncio.Queue | None = None
    settled: bool = False  # its last item (reply, end of stream or error) went out

    def deliver(self, *items) -> bool:
        """Thread-safe: resolve the future, or push ``items`` onto the event queue, in order. Items that settle the
        ticket (a reply, the stream's end, an error) go out only once: False, and nothing sent, when it is
        settled already (the worker's reply and a shutdown's cut-off may meet)."""
        if any(item is _END or isinstance(item, BaseException) or not self.streaming for item in items):
            with _SETTLING:
                if self.settled:
                    return False
                self.settled = True
        for item in items:
            self.outbox.put(self, item)
        return True

    def receive(self, item) -> None:
        """On the event loop: what ``deliver`` sent."""
        if self.events is not None:
            self.events.put_nowait(item)
        elif not self.future.done():
            if isinstance(item, BaseException):
                self.future.set_exception(item)
            else:
                self.future.set_result(item)


@dataclass
class SchedulerHooks:
    """Callbacks for metrics; all optional."""

    batch: Callable[[int], None] = lambda size: None
    # the job answered, its reply, and the seconds since the request arrived
    reply: Callable[[ChatJob, Reply, float], None] = lambda job, reply, seconds: None
    cancelled: Callable[[], None] = lambda: None
    joined: Callable[[int], None] = lambda count: None  # jobs admitted into a running batch


class Scheduler:
    def __init__(self, backend: Backend, *, queue_size: int, max_batch: int, timeout: float,
                 hooks: SchedulerHooks | None = None):
        self.backend = backend
        self._admits = getattr(backend, "admits", False)  # continuous batching
        self.queue_size = queue_size
        self.max_batch = max_batch
        self.timeout = timeout
        self.hooks = hooks or SchedulerHooks()
        self._queue: deque[_Ticket] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._draining = False  # shutting down: requests refused, those in flight finish until the cut-off
        self._running: list[_Ticket] = []
        self._ended = 0  # tickets of the running batch already answered (the batch runs on for the others)
        self._outboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Outbox] = weakref.WeakKeyDictionary()
        self._seconds_per_job = 1.0  # moving average, for Retry-After
        self._thread = threading.Thread(target=self._work, name="glyphserve-scheduler", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Requests waiting."""
        return len(self._queue)

    @property
    def running(self) -> int:
        """Requests being answered."""
        return len(self._running) - self._ended

    @property
    def _places(self) -> int:
        """Requests answered at once."""
        return self.max_batch

    def _free_places(self) -> int:
        """Places the backend will take waiting requests into without one ending first (hold ``_cond``): a
        continuously batching backend's free rows; otherwise a full batch when idle, none while a batch runs."""
        if self._running and not self._admits:
            return 0
        return max(0, self.max_batch - self.running)

    @property
    def alive(self) -> bool:
        """Whether the worker thread runs (it stops only when closed)."""
        return self._thread.is_alive()

    def retry_after(self) -> int:
        """Seconds a client should wait before retrying a refused request."""
        return max(1, math.ceil(self._seconds_per_job * (len(self._queue) + 1) / self._places))

    def close(self) -> None:
        with self._cond:
            self._stopping = True
            for ticket in self._queue:
                ticket.cancel.set()
                ticket.deliver(Cancelled())
            self._queue.clear()
            for ticket in self._running:  # a lone job stops at its next token
                ticket.cancel.set()
            self._cond.notify_all()
        self._thread.join(timeout=30)

    def shut_down(self, grace: float) -> None:
        """Begin a graceful stop: new requests are refused (503 ``shutting_down``); those queued or running may
        finish for ``grace`` seconds, then each still unanswered ends with ``ShuttingDownError`` (a stream's last
        event, so a client cannot take a cut-off answer for a whole one) and its work stops."""
        self._draining = True
        timer = threading.Timer(grace, self._cut_off, args=(grace,))
        timer.daemon = True
        timer.start()

    def _cut_off(self, grace: float) -> None:
        with self._cond:
            queued, running = list(self._queue), list(self._running)
            self._queue.clear()
        cut = 0  # requests: a document's warm-up, also ended here, is the server's own work
        for ticket in queued + running:
            ticket.cancel.set()  # a running job stops at its next token (and the worker counts it as cancelled)
            if ticket.deliver(ShuttingDownError.cut_off(grace)) and not ticket.job.request.warm:
                cut += 1
        for ticket in queued:
            if not ticket.job.request.warm:
                self.hooks.cancelled()
        log_cut_off(cut, grace)

    def cancel(self, job: ChatJob) -> bool:
        """Stop ``job`` from outside the task that awaits it (as ``_withdraw``; its reader gets ``Cancelled``).
        False if the scheduler does not hold it."""
        with self._cond:
            ticket = next((t for t in (*self._queue, *self._running) if t.job is job), None)
        if ticket is None:
            return False
        self._withdraw(ticket)
        return True

    def _withdraw(self, ticket: _Ticket) -> None:
        """Stop a ticket's job: a running one at its next token; a queued one leaves the queue at once (its place
        counts no more against --queue-size: clients that time out and retry would otherwise fill the queue with
        requests nobody waits for)."""
        ticket.cancel.set()
        with self._cond:
            if ticket not in self._queue:
                return
            self._queue.remove(ticket)
        ticket.deliver(Cancelled())
        self.hooks.cancelled()

    # -- asyncio side ---------------------------------------------------------------------

    def _submit(self, job: ChatJob, streaming: bool) -> _Ticket:
        loop = asyncio.get_running_loop()
        outbox = self._outboxes.get(loop)
        if outbox is None:
            outbox = self._outboxes[loop] = _Outbox(loop)
        ticket = _Ticket(job, streaming, outbox, time.monotonic() + self.timeout)
        job.request.cancel = lambda: self._stopped(ticket)
        if streaming:
            ticket.events = asyncio.Queue()
        else:
            ticket.future = loop.create_future()
        with self._cond:
            if self._stopping or self._draining:
                raise ShuttingDownError.refused()
            # Waiting for a free place is not waiting for capacity: a burst arrives faster than the backend takes
            # it in (at its next step), and 100 questions at once to an engine running 256 got 429s with the
            # engine nearly idle. The queue's bound counts those beyond the free places.
            if len(self._queue) >= self.queue_size + self._free_places():
                raise QueueFullError(
                    f"the request queue is full ({self.queue_size} waiting beyond the {self._places} answered at "
                    f"once); retry in {self.retry_after()} s"
                )
            self._queue.append(ticket)
            self._cond.notify()
        return ticket

    def _timeout_error(self) -> RequestTimeoutError:
        return RequestTimeoutError(f"the request took longer than the {self.timeout:g} s limit (--request-timeout)")

    async def answer(self, job: ChatJob) -> Reply:
        """Queue ``job`` and wait for its reply; cancelling the awaiting task cancels the job."""
        ticket = self._submit(job, streaming=False)
        try:
            return await asyncio.wait_for(asyncio.shield(ticket.future), self.timeout)
        except asyncio.TimeoutError:
            raise self._timeout_error() from None
        finally:
            if not ticket.future.done():
                self._withdraw(ticket)
                ticket.future.cancel()  # nobody waits for it any more

    async def stream(self, job: ChatJob, keepalive: float | None = None) -> AsyncIterator[StreamEvent | Reply | None]:
        """Queue a streaming ``job``; the first item is awaited before this returns, so
        errors raised before the first token surface as exceptions, not as a broken stream.
        With ``keepalive``, this returns once that many seconds passed without a first item, and the stream
        yields None every ``keepalive`` seconds until it comes (a waiting client can be sent keep-alives; an
        error after that comes out of the stream). Closing the returned iterator cancels the job."""
        ticket = self._submit(job, streaming=True)
        try:
            first = await self._next(ticket, keepalive)
        except BaseException:
            self._withdraw(ticket)
            raise
        items = self._iterate(ticket, first, keepalive)
        await items.asend(None)  # into its try: closed even before its first item, it cancels the job
        return items

    async def _next(self, ticket: _Ticket, wait: float | None = None):
        """The ticket's next item; ``_WAITING`` when ``wait`` seconds pass first (before its deadline)."""
        remaining = ticket.deadline - time.monotonic()
        limit = remaining if wait is None else min(wait, remaining)
        try:
            item = await asyncio.wait_for(ticket.events.get(), max(limit, 0.001))
        except asyncio.TimeoutError:
            if limit < remaining:
                return _WAITING
            ticket.cancel.set()
            raise self._timeout_error() from None
        if isinstance(item, BaseException):
            raise item
        return item

    async def _iterate(self, ticket: _Ticket, first, keepalive: float | None) -> AsyncIterator[StreamEvent | Reply | None]:
        try:
            yield  # the start, taken by stream()
            pending = first
            while pending is _WAITING:
                yield None
                pending = await self._next(ticket, keepalive)
            while pending is not _END:
                item, pending = pending, None
                # Deltas that piled up while the reader was busy go out as one (fewer chunks to encode and send).
                while isinstance(item, StreamEvent) and not ticket.events.empty():
                    following = ticket.events.get_nowait()
                    if isinstance(following, StreamEvent) and following.channel == item.channel:
                        item = _joined(item, following)
                    else:
                        pending = following
                        break
                yield item
                if pending is None:
                    pending = await self._next(ticket)
                elif isinstance(pending, BaseException):
                    raise pending
        finally:
            self._withdraw(ticket)

    # -- worker side ----------------------------------------------------------------------

    def _take(self) -> list[_Ticket]:
        """Block until work arrives; return up to ``max_batch`` waiting tickets, counted as running from the moment
        they leave the queue (under the lock: ``cancel`` always finds a job in one or the other)."""
        with self._cond:
            while not self._stopping:
                batch = self._pull(self.max_batch)
                if batch:
                    self._begin(batch)
                    return batch
                self._cond.wait()
            return []

    def _begin(self, batch: list[_Ticket]) -> None:
        self._running, self._ended = batch, 0

    def _pull(self, limit: int) -> list[_Ticket]:
        """Up to ``limit`` waiting tickets, oldest first; cancelled ones on the way are dropped (hold ``_cond``)."""
        taken: list[_Ticket] = []
        while self._queue and len(taken) < limit:
            ticket = self._queue.popleft()
            if ticket.cancel.is_set():
                ticket.deliver(Cancelled())
                self.hooks.cancelled()
            else:
                taken.append(ticket)
        return taken

    def _work(self) -> None:
        prepare = getattr(self.backend, "prepare", None)  # first of all, on this thread (EngineBackend.prepare)
        if prepare is not None:
            try:
                prepare()
            except Exception:  # a request would meet the same fault and get its error
                log.exception("scheduler worker: preparing the backend failed")
        try:
            self._serve()
        finally:
            release = getattr(self.backend, "release", None)
            if release is not None:
                release()

    def _serve(self) -> None:
        while True:
            batch = self._take()
            if not batch:
                return
            started = time.monotonic()
            self.hooks.batch(len(batch))
            try:
                if len(batch) == 1 and not self._admits:
                    self._run_single(batch[0])
                else:
                    self._run_batch(batch)
            except Exception:  # never let the worker die; each ticket already got its error
                log.exception("scheduler worker error")
            self._running, self._ended = [], 0
            per_job = (time.monotonic() - started) / len(batch)
            self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * per_job

    def _run_batch(self, batch: list[_Ticket]) -> None:
        """Jobs answered together; streaming tickets get their deltas as they come."""
        streamed: set[int] = set()
        finished: set[int] = set()
        try:
            admit = (lambda free: self._admit(batch, free)) if self._admits else None
            for index, item in self.backend.stream_batch([t.job for t in batch], admit=admit):
                ticket = batch[index]
                if isinstance(item, Exception):  # an admitted job that could not run
                    finished.add(index)
                    self._ended += 1
                    ticket.deliver(_user_error(item))
                elif isinstance(item, Reply):
                    finished.add(index)
                    self._ended += 1
                    self._finish(ticket, item)
                elif ticket.streaming and not self._stopped(ticket):
                    streamed.add(index)
                    ticket.deliver(item)
        except Exception as exc:
            for index, ticket in enumerate(batch):
                if index in streamed - finished:
                    ticket.deliver(_user_error(exc))
                elif index not in finished:  # one by one, so an error reaches only the request that caused it
                    self._run_single(ticket)
            return
        for index in set(range(len(batch))) - finished:
            batch[index].deliver(InternalError("the backend gave no answer"))

    def _admit(self, batch: list[_Ticket], free: int) -> list[ChatJob]:
        """Up to ``free`` waiting jobs, appended to the running ``batch``."""
        with self._cond:
            joined = [] if self._stopping else self._pull(free)
            if joined:
                batch.extend(joined)  # batch is self._running: close() cancels them too
                self.hooks.joined(len(joined))
        return [t.job for t in joined]

    def _stopped(self, ticket: _Ticket) -> bool:
        return ticket.cancel.is_set() or time.monotonic() > ticket.deadline

    def _finish(self, ticket: _Ticket, reply: Reply) -> None:
        if self._stopped(ticket):
            self.hooks.cancelled()
            ticket.deliver(Cancelled() if ticket.cancel.is_set() else self._timeout_error())
            return
        if ticket.deliver(reply, _END) if ticket.streaming else ticket.deliver(reply):
            self.hooks.reply(ticket.job, reply, time.monotonic() - ticket.arrived)

    def _run_single(self, ticket: _Ticket) -> None:
        """One job through the backend's stream, so it stops at the next token once cancelled
        or past its deadline; a non-streaming ticket gets only the final Reply."""
        items = self.backend.stream(ticket.job)
        try:
            for item in items:
                if self._stopped(ticket):
                    self.hooks.cancelled()
                    ticket.deliver(Cancelled() if ticket.cancel.is_set() else self._timeout_error())
                    return
                if isinstance(item, Reply):  # the last item
                    self._finish(ticket, item)
                    return
                if ticket.streaming:
                    ticket.deliver(item)
            ticket.deliver(_END if ticket.streaming else InternalError("the backend gave no answer"))
        except Exception as exc:
            ticket.deliver(_user_error(exc))
        finally:
            items.close()


class ConcurrentScheduler(Scheduler):
    """For a backend whose servers batch on their side (``--backend openai``): up to ``concurrency`` jobs run at
    once, each through the backend's stream on a thread of its own (cancellable at each token); beyond the free
    places, at most ``concurrency`` more wait (and never more than ``queue_size``)."""

    def __init__(self, backend: Backend, *, concurrency: int, queue_size: int, timeout: float,
                 hooks: SchedulerHooks | None = None):
        self.concurrency = concurrency
        self._active = 0
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="glyphserve-remote")
        # max_batch=1: every job runs through the backend's stream.
        super().__init__(backend, queue_size=min(queue_size, concurrency), max_batch=1, timeout=timeout, hooks=hooks)

    @property
    def _places(self) -> int:
        return self.concurrency

    def _free_places(self) -> int:
        return max(0, self.concurrency - self._active)

    def _begin(self, batch: list[_Ticket]) -> None:
        self._active += 1
        self._running.append(batch[0])

    def close(self) -> None:
        super().close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and self._active >= self.concurrency:
                    self._cond.wait()
            batch = self._take()
            if not batch:
                return
            self._pool.submit(self._run, batch[0])

    def _run(self, ticket: _Ticket) -> None:
        started = time.monotonic()
        self.hooks.batch(1)
        try:
            self._run_single(ticket)
        except Exception:  # _run_single delivers every error to its ticket
            log.exception("remote request failed")
        finally:
            with self._cond:
                self._active -= 1
                self._running.remove(ticket)
                self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * (time.monotonic() - started)
                self._cond.notify_all()


def log_cut_off(count: int, grace: float) -> None:
    """The server's log line for the answers a shutdown cut off, if any."""
    if count:
        log.warning("shutting down: %d request(s) still unanswered after %g s were cut off", count, grace)


def _joined(first: StreamEvent, second: StreamEvent) -> StreamEvent:
    """Two deltas of one channel as one."""
    logprobs = None if first.logprobs is None and second.logprobs is None else \
        (first.logprobs or []) + (second.logprobs or [])
    return StreamEvent(first.channel, first.text + second.text, logprobs=logprobs, tokens=first.tokens + second.tokens)


def _user_error(exc: Exception) -> Exception:
    if isinstance(exc, GlyphserveError):
        return exc
    log.error("backend failure", exc_info=exc)
    return InternalError(f"the backend failed ({type(exc).__name__}); the server log has the details")
