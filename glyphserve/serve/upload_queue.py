"""The threads of one stage of an upload (reading the files; rendering the documents), shared fairly among the
clients sending them."""

from __future__ import annotations

import asyncio
import ipaddress
import math
import statistics
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, TypeVar

from glyphserve.serve.errors import ReadersBusyError, TooManyUploadsError

T = TypeVar("T")
# A file may wait for a thread this much longer than a budget: one whose parser is killed at the end of its budget
# frees its thread 20-50 ms after (measured on 2 busy cores), and the file next in line should get that thread
# rather than race it to a refusal.
REAP_S = 1.0
# Uploads whose time in a thread estimates the next ones' (``_retry_after``).
RECENT_UPLOADS = 32


@dataclass(frozen=True)
class QueueLimits:
    budget: float  # seconds an upload may take (--ingest-timeout); it waits about as long for a thread
    # Files read at once: each thread waits on a parser process of up to --max-parser-memory-mb, or decodes a text.
    threads: int = 4
    stage: str = "read"  # what the threads do to an upload, for messages: "read", "rendered"
    # Threads one client's files may hold: half, so one client's slow files (4 PDFs taking the whole budget held
    # another client's 0.1 s text file back 9.0 s of a 10 s budget) leave the other half to everyone else.
    per_client: int = 2
    # One client's files waiting for a thread; past it, 429. As many as the bodies' budget holds of the largest
    # uploads by default (--max-bodies-mb): a burst a client may send anyway waits its turn instead.
    waiting: int = 16
    # Every client's files waiting together; past it, 503. What waits is held (a file read waits for a render
    # thread as its text), and the web UI's users, unlike the API's bodies, had no bound on how many wait at once.
    waiting_total: int = 64


@dataclass
class _Waiter:
    loop: asyncio.AbstractEventLoop
    woken: asyncio.Future
    end: float | None = None  # set when it is given a thread: when its file's budget runs out


@dataclass
class _Client:
    ends: list[float] = field(default_factory=list)  # when the budgets of its files being read run out
    waiting: deque[_Waiter] = field(default_factory=deque)


def client_of(request) -> str:
    """Who sent a request (Starlette's or the UI framework's), for fair shares: its address as the web server
    gives it (behind a proxy on this machine, the X-Forwarded-For address: uvicorn trusts loopback proxies,
    ``FORWARDED_ALLOW_IPS``), an IPv6 address by its /64 (what one host is usually given)."""
    client = getattr(request, "client", None)
    host = client.host if client else ""
    if ":" in host:
        try:
            return str(ipaddress.ip_network(f"{host}/64", strict=False))
        except ValueError:
            pass
    return host


class UploadQueue:
    """Reads files on ``limits.threads`` threads, at most ``limits.per_client`` of them for one client's files.
    A client's other files wait in a line of its own (past ``limits.waiting``, 429 ``too_many_uploads``) and the
    lines take turns at the threads that free up, so a client's slow files hold up its own files only. A file
    that waits a whole budget (and ``REAP_S``) gets 429 too when its client's files held its share, else 503
    ``server_busy`` (other clients' files held every thread), and so does one that finds ``limits.waiting_total``
    files of all clients waiting. Each refusal says when to retry. Callers may be on different event loops."""

    def __init__(self, limits: QueueLimits):
        self.limits = limits
        self._pool = ThreadPoolExecutor(max_workers=limits.threads, thread_name_prefix="glyphserve-ingest")
        self._lock = threading.Lock()
        self._clients: dict[str, _Client] = {}  # those with files being read or waiting
        self._turns: deque[str] = deque()  # clients with files waiting, in the order they get a thread
        self._reading = 0
        self._closed = False
        self._recent: deque[float] = deque(maxlen=RECENT_UPLOADS)  # seconds the last uploads held a thread

    @property
    def reading(self) -> int:
        return self._reading

    @property
    def waiting(self) -> int:
        with self._lock:
            return sum(len(client.waiting) for client in self._clients.values())

    async def run(self, client: str, work: Callable[[], T]) -> T:
        """``work()`` on a reading thread, once ``client``'s turn comes."""
        end = await self._take(client)
        try:
            future = self._pool.submit(work)
        except RuntimeError:  # closed meanwhile (the server stops): the thread it was given goes back
            self._give_back(client, end, ran=False)
            raise ReadersBusyError("the server is stopping: retry in a few seconds", 5) from None
        # (given back when the work ends, not when its caller stops waiting: a parse runs on after a cancel)
        future.add_done_callback(lambda _: self._give_back(client, end, ran=True))
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        """Stop reading: files waiting for a thread are refused (503) at once."""
        with self._lock:
            self._closed = True
            waiters = [w for client in self._clients.values() for w in client.waiting]
        for waiter in waiters:
            try:
                waiter.loop.call_soon_threadsafe(_wake, waiter.woken)
            except RuntimeError:  # its event loop is closed: nobody waits there any more
                pass
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _take(self, name: str) -> float:
        """Wait for a thread for one of ``name``'s files; when the file's budget runs out."""
        limits = self.limits
        with self._lock:
            if self._closed:
                raise ReadersBusyError("the server is stopping: retry in a few seconds", 5)
            client = self._clients.setdefault(name, _Client())
            if self._reading < limits.threads and len(client.ends) < limits.per_client:
                return self._start(client)
            if len(client.waiting) >= limits.waiting:
                retry = self._retry_after(client)
                self._forget(name)
                raise TooManyUploadsError(
                    f"this client has {len(client.ends)} uploads being {limits.stage} and {len(client.waiting)} "
                    f"waiting, the most this server takes from one client at once: retry in {retry} s", retry)
            waiting = sum(len(c.waiting) for c in self._clients.values())
            if waiting >= limits.waiting_total:
                retry = self._retry_after(None)
                self._forget(name)
                raise ReadersBusyError(
                    f"{waiting} uploads of other clients are waiting to be {limits.stage}, the most this server "
                    f"holds at once: retry in {retry} s", retry)
            loop = asyncio.get_running_loop()
            waiter = _Waiter(loop, loop.create_future())
            client.waiting.append(waiter)
            if name not in self._turns:
                self._turns.append(name)
        try:
            await asyncio.wait([waiter.woken], timeout=limits.budget + REAP_S)
        except asyncio.CancelledError:  # the request went away
            with self._lock:
                if waiter.end is None:
                    self._leave(name, waiter)
                else:  # given a thread meanwhile
                    self._end(name, waiter.end, ran=False)
            raise
        with self._lock:
            if waiter.end is not None:
                return waiter.end
            self._leave(name, waiter)
            if self._closed:
                raise ReadersBusyError("the server is stopping: retry in a few seconds", 5)
            own, retry = len(client.ends) >= limits.per_client, self._retry_after(client)
        held = (f"this client's other uploads held its {limits.per_client} of them" if own
                else "other clients' uploads held them all")
        error = TooManyUploadsError if own else ReadersBusyError
        raise error(f"no thread of the {limits.threads} by which uploads are {limits.stage} came free for this "
                    f"upload in {limits.budget + REAP_S:g} s (its budget, --ingest-timeout, plus {REAP_S:g} s): "
                    f"{held}; retry in {retry} s", retry)

    def _start(self, client: _Client) -> float:
        end = time.monotonic() + self.limits.budget
        client.ends.append(end)
        self._reading += 1
        return end

    def _give_back(self, name: str, end: float, ran: bool) -> None:
        with self._lock:
            self._end(name, end, ran)

    def _end(self, name: str, end: float, ran: bool) -> None:
        """A file of ``name``'s is no longer read (``ran``: its work ran, and its time counts among the recent
        ones): its thread goes to the next line whose turn it is."""
        self._clients[name].ends.remove(end)
        self._reading -= 1
        if ran:
            self._recent.append(time.monotonic() - (end - self.limits.budget))
        self._forget(name)
        while self._reading < self.limits.threads and not self._closed:
            # The line whose client has the fewest uploads in hand, the earliest turn among those: a client with
            # nothing in hand came after others' second files and was refused 503 (a new user's trial).
            ready = [n for n in self._turns if len(self._clients[n].ends) < self.limits.per_client]
            if not ready:
                return
            turn = min(ready, key=lambda n: len(self._clients[n].ends))
            self._turns.remove(turn)
            client = self._clients[turn]
            waiter = client.waiting.popleft()
            if client.waiting:
                self._turns.append(turn)  # its next file after the other lines' turns
            waiter.end = self._start(client)
            try:
                waiter.loop.call_soon_threadsafe(_wake, waiter.woken)
            except RuntimeError:  # its event loop is closed: nobody waits there any more
                client.ends.remove(waiter.end)
                self._reading -= 1
                self._forget(turn)

    def _leave(self, name: str, waiter: _Waiter) -> None:
        """A file leaves ``name``'s line without a thread."""
        client = self._clients[name]
        client.waiting.remove(waiter)
        if not client.waiting:
            self._turns.remove(name)
        self._forget(name)

    def _forget(self, name: str) -> None:
        client = self._clients[name]
        if not client.ends and not client.waiting:
            del self._clients[name]

    def _retry_after(self, client: _Client | None) -> int:
        """Seconds until the first of ``client``'s files being read (else of anyone's) is likely done: when it has
        taken the median time of the last uploads, or twice what it has taken so far if that is later; at the end
        of its budget at the latest (all "retry in" said before: 60 s, for 30 small files of one client all stored
        within 0.22 s, a new user's trial)."""
        ends = (client and client.ends) or [e for c in self._clients.values() for e in c.ends]
        now, budget = time.monotonic(), self.limits.budget
        typical = statistics.median(self._recent) if self._recent else budget
        left = [min(end - now, max(end - budget + typical - now, now - (end - budget))) for end in ends]
        return max(1, math.ceil(min(left, default=0.0)))


def _wake(woken: asyncio.Future) -> None:
    if not woken.done():
        woken.set_result(None)
