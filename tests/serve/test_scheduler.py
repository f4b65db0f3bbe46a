"""The scheduler with the extractive backend: ordering, batching, streaming and cancellation."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from glyphserve.engine.types import AnswerRequest, StreamEvent
from glyphserve.errors import QueueFullError
from glyphserve.serve.backends import ChatJob, ExtractiveBackend, Reply
from glyphserve.serve.errors import ShuttingDownError
from glyphserve.serve.scheduler import Cancelled, Scheduler, SchedulerHooks

CONTEXTS = [f"Document {i} says the secret word is word{i}.\n\nIt also mentions filler." for i in range(40)]


def job(question: str, context: str) -> ChatJob:
    return ChatJob(AnswerRequest(pages=[], question=question), context=context)


def run(coro):
    return asyncio.run(coro)


def test_concurrent_jobs_get_their_own_replies_in_batches():
    sizes: list[int] = []
    scheduler = Scheduler(ExtractiveBackend(None), queue_size=64, max_batch=8, timeout=30,
                          hooks=SchedulerHooks(batch=sizes.append))

    async def main():
        jobs = [job(f"What is the secret word of document {i}?", c) for i, c in enumerate(CONTEXTS)]
        return await asyncio.gather(*(scheduler.answer(job) for job in jobs))

    try:
        replies = run(main())
    finally:
        scheduler.close()
    for i, reply in enumerate(replies):
        assert f"word{i}." in reply.answer.text
    assert sum(sizes) == len(CONTEXTS) and max(sizes) <= 8


def test_stream_yields_deltas_then_the_reply():
    scheduler = Scheduler(ExtractiveBackend(None), queue_size=4, max_batch=4, timeout=30)

    async def main():
        items = await scheduler.stream(job("secret word", CONTEXTS[3]))
        return [item async for item in items]

    try:
        items = run(main())
    finally:
        scheduler.close()
    assert isinstance(items[-1], Reply) and all(isinstance(i, StreamEvent) for i in items[:-1])
    assert "".join(i.text for i in items[:-1]) == items[-1].answer.text


def test_deltas_that_pile_up_reach_a_slow_reader_merged():
    scheduler = Scheduler(ExtractiveBackend(None), queue_size=4, max_batch=4, timeout=30)
    context = "\n\n".join(f"Passage {i}: the secret word is word{i}." for i in range(6))

    async def main():
        items = await scheduler.stream(job("secret word", context))
        await asyncio.sleep(0.3)  # the worker sends the rest meanwhile
        return [item async for item in items]

    try:
        items = run(main())
    finally:
        scheduler.close()
    reply = items[-1]
    assert reply.answer.text.count("secret word") == 3  # three passages, sent as three deltas
    assert [type(i) for i in items] == [StreamEvent, Reply]  # they waited for the reader together: one delta
    assert "".join(i.text for i in items[:-1]) == reply.answer.text


def test_errors_reach_only_their_request_and_full_queue_refuses():
    scheduler = Scheduler(ExtractiveBackend(None), queue_size=64, max_batch=8, timeout=30)

    async def main():
        good = job("secret word", CONTEXTS[0])
        bad = job("secret word", "   ")  # nothing to search: a user error
        return await asyncio.gather(scheduler.answer(good), scheduler.answer(bad), scheduler.answer(good),
                                    return_exceptions=True)

    try:
        first, second, third = run(main())
    finally:
        scheduler.close()
    assert "word0" in first.answer.text and "word0" in third.answer.text
    assert getattr(second, "code", None) == "invalid_request"

    closed = Scheduler(ExtractiveBackend(None), queue_size=1, max_batch=1, timeout=30)
    closed.close()
    with pytest.raises(ShuttingDownError):
        run(closed.answer(job("q", "c")))


def test_a_burst_up_to_the_free_places_and_the_queue_is_taken():
    """A burst arrives faster than the worker takes it in: the queue's bound counts only the requests beyond the
    places free (100 questions at once to an engine running 256 got 429s with the engine nearly idle)."""
    scheduler = Scheduler(ExtractiveBackend(None), queue_size=1, max_batch=8, timeout=30)

    async def main():
        return await asyncio.gather(*(scheduler.answer(job("secret word", CONTEXTS[i % len(CONTEXTS)]))
                                      for i in range(9)), return_exceptions=True)

    try:
        replies = run(main())
    finally:
        scheduler.close()
    assert all(isinstance(r, Reply) for r in replies), replies


class _GatedBackend:
    """A first delta at once, the rest once ``gate`` opens (a long answer, cut short when cancelled)."""

    name = "gated"

    def __init__(self):
        self.gate = threading.Event()

    def stream(self, job: ChatJob):
        yield StreamEvent("answer", "first")
        self.gate.wait(30)
        yield StreamEvent("answer", " second")


def test_a_stream_closed_before_its_first_item_is_read_cancels_its_job():
    backend, cancelled = _GatedBackend(), threading.Event()
    scheduler = Scheduler(backend, queue_size=4, max_batch=1, timeout=30,
                          hooks=SchedulerHooks(cancelled=cancelled.set))

    async def main():
        items = await scheduler.stream(job("secret word", CONTEXTS[0]))
        await items.aclose()  # the client went away before the response started

    try:
        run(main())
        backend.gate.set()
        assert cancelled.wait(30)  # the job stopped at its next delta instead of running on
    finally:
        scheduler.close()


def test_a_job_stopped_by_name_ends_running_or_queued():
    """``Scheduler.cancel`` (a Ray replica's ``stop``): the running job stops at its next delta, the queued one is
    skipped; each reader gets ``Cancelled``; a job the scheduler does not hold is refused."""
    backend, cancelled = _GatedBackend(), []
    scheduler = Scheduler(backend, queue_size=4, max_batch=1, timeout=30,
                          hooks=SchedulerHooks(cancelled=lambda: cancelled.append(1)))
    running, queued = job("secret word", CONTEXTS[0]), job("secret word", CONTEXTS[1])

    async def main():
        items = await scheduler.stream(running)
        waiting = asyncio.ensure_future(scheduler.stream(queued))  # behind the running job (one at a time)
        await asyncio.sleep(0.1)
        assert scheduler.cancel(queued) and scheduler.cancel(running)
        assert not scheduler.cancel(job("secret word", CONTEXTS[2]))
        backend.gate.set()
        first = await items.__anext__()
        with pytest.raises(Cancelled):
            await items.__anext__()
        with pytest.raises(Cancelled):
            await waiting
        return first

    try:
        assert run(main()).text == "first"
    finally:
        scheduler.close()
    assert len(cancelled) == 2


def test_shutting_down_refuses_new_jobs_and_cuts_off_the_unanswered_after_the_grace():
    """``shut_down``: a job answered within the grace gets its reply; at the grace's end the running one (a
    stream) and the queued one (a plain answer) get ``ShuttingDownError`` and their work stops; new jobs are
    refused at once."""
    backend, cancelled = _GatedBackend(), []
    scheduler = Scheduler(backend, queue_size=4, max_batch=1, timeout=30,
                          hooks=SchedulerHooks(cancelled=lambda: cancelled.append(1)))

    async def main():
        items = await scheduler.stream(job("secret word", CONTEXTS[0]))
        waiting = asyncio.ensure_future(scheduler.answer(job("secret word", CONTEXTS[1])))  # queued behind it
        await asyncio.sleep(0.1)
        scheduler.shut_down(0.3)
        with pytest.raises(ShuttingDownError):
            await scheduler.answer(job("secret word", CONTEXTS[2]))
        first = await items.__anext__()
        started = time.monotonic()
        with pytest.raises(ShuttingDownError, match="cut off"):
            await items.__anext__()
        with pytest.raises(ShuttingDownError):
            await waiting
        waited = time.monotonic() - started
        backend.gate.set()  # the running job's next delta: the worker stops it there
        deadline = time.monotonic() + 10
        while len(cancelled) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return first, waited

    try:
        first, waited = run(main())
        assert first.text == "first" and 0.1 < waited < 5
    finally:
        scheduler.close()
    assert len(cancelled) == 2


def test_a_queued_request_whose_client_left_frees_its_place_at_once():
    """Clients that time out while queued (and retry) do not fill the queue with requests nobody waits for."""
    backend, cancelled = _GatedBackend(), []
    scheduler = Scheduler(backend, queue_size=1, max_batch=1, timeout=30,
                          hooks=SchedulerHooks(cancelled=lambda: cancelled.append(1)))

    async def main():
        running = await scheduler.stream(job("secret word", CONTEXTS[0]))
        queued = await scheduler.stream(job("secret word", CONTEXTS[1]), keepalive=0.05)  # returns while waiting
        assert await queued.__anext__() is None and scheduler.depth == 1  # a keep-alive: it waits
        with pytest.raises(QueueFullError):
            await scheduler.stream(job("secret word", CONTEXTS[2]))
        await queued.aclose()  # its client went away
        assert scheduler.depth == 0 and cancelled == [1]
        third = asyncio.ensure_future(scheduler.stream(job("secret word", CONTEXTS[3])))  # queued, not refused
        await asyncio.sleep(0)
        backend.gate.set()
        assert [item.text async for item in running][0] == "first"
        items = await third
        return "".join([item.text async for item in items])

    try:
        assert run(main()) == "first second"  # the third request ran
    finally:
        scheduler.close()


def test_the_backend_is_prepared_on_the_worker_thread_before_its_first_job():
    """The local engine's cuDNN plans are per thread: the worker thread that will run the jobs builds them."""
    seen: list[str] = []

    class Prepared(ExtractiveBackend):
        def prepare(self):
            seen.append(threading.current_thread().name)

    scheduler = Scheduler(Prepared(None), queue_size=4, max_batch=4, timeout=30)
    try:
        reply = run(scheduler.answer(job("secret word", CONTEXTS[1])))
    finally:
        scheduler.close()
    assert seen == ["glyphserve-scheduler"] and "word1." in reply.answer.text


def test_a_local_engine_hands_the_gil_over_often_while_its_worker_runs():
    """The engine's thread competes with request threads: the process's switch interval is short while the
    worker runs a local engine's jobs, and what it was once the scheduler closes."""
    import sys

    from glyphserve.serve.backends import SWITCH_INTERVAL_S, EngineBackend

    class Local:  # a local engine as the backend sees one: it batches (stream_batch)
        def stream_batch(self, requests, admit=None):
            return iter(())

    before = sys.getswitchinterval()
    scheduler = Scheduler(EngineBackend(Local()), queue_size=4, max_batch=4, timeout=30)
    try:
        for _ in range(500):  # the worker prepares the backend as it starts
            if sys.getswitchinterval() == SWITCH_INTERVAL_S:
                break
            time.sleep(0.01)
        assert sys.getswitchinterval() == SWITCH_INTERVAL_S
    finally:
        scheduler.close()
    assert sys.getswitchinterval() == before
