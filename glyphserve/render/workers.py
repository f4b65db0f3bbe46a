"""Worker processes that paint pages, and the shared memory their images come back in.

A small pool of our own rather than ``concurrent.futures``: its bookkeeping thread needs
the GIL, which the process laying out pages holds nearly all the time, so batches were
handed over and collected late. Here the caller's thread sends each task down a pipe and
polls for replies itself. Page images come back through reused shared-memory blocks (a
pickle would copy 1.5 MB twice per page).
"""

from __future__ import annotations

import atexit
import multiprocessing
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from typing import Any

from glyphserve.errors import WORKER_DIED, RenderWorkerError


class WorkerPool:
    """Persistent worker processes, one pipe each; used by one caller at a time (``lock``)."""

    def __init__(self, n: int):
        # fork is cheapest, but forking a process that runs other threads (a server) is
        # unsafe: then the workers come from a clean fork server instead.
        ctx = multiprocessing.get_context("fork" if threading.active_count() == 1 else "forkserver")
        self.lock = threading.Lock()
        self.conns: list[Connection] = []
        self.procs = []
        for _ in range(n):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(theirs,), daemon=True, name="glyphserve-render")
            proc.start()
            theirs.close()
            self.conns.append(ours)
            self.procs.append(proc)
        self.outstanding = [0] * n
        # Set when a pipe breaks: a worker killed a moment ago can still read as alive (its exit not yet reaped), and
        # the next render reused the pool and failed on a broken pipe.
        self.broken = False

    def __len__(self) -> int:
        return len(self.conns)

    def send(self, worker: int, fn: Callable, *args: Any) -> None:
        try:
            self.conns[worker].send((fn, args))
        except OSError:
            self.broken = True
            raise RenderWorkerError(WORKER_DIED) from None
        self.outstanding[worker] += 1

    def ready(self, worker: int) -> bool:
        return self.conns[worker].poll()

    def receive(self, worker: int) -> Any:
        """The worker's next reply (its task's error raised here); ``RenderWorkerError`` if it died, which leaves
        nothing owed by it (a dead worker's replies never come: ``drain`` spun on them) and the pool to be
        replaced."""
        try:
            ok, value = self.conns[worker].recv()
        except (EOFError, OSError):
            self.outstanding[worker] = 0
            self.broken = True
            raise RenderWorkerError(WORKER_DIED) from None
        self.outstanding[worker] -= 1
        if not ok:
            raise value
        return value

    def drain(self) -> None:
        """Collect (and drop) every reply still owed, e.g. after an error."""
        for worker in range(len(self)):
            while self.outstanding[worker]:
                try:
                    self.receive(worker)
                except Exception:  # noqa: BLE001 - the caller is already handling a failure
                    pass

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(None)
                conn.close()
            except OSError:
                pass
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()

    @property
    def alive(self) -> bool:
        return not self.broken and all(p.is_alive() for p in self.procs)


def _serve(conn: Connection) -> None:
    """Worker main loop: run (fn, args) tasks until told to stop."""
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        fn, args = task
        try:
            reply = (True, fn(*args))
        except BaseException as exc:  # noqa: BLE001 - sent back and raised in the caller
            reply = (False, exc)
        conn.send(reply)


_POOL: WorkerPool | None = None
_POOL_LOCK = threading.Lock()


def worker_pool(n: int) -> WorkerPool:
    """The process's pool of ``n`` workers, started on first use and kept."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or len(_POOL) != n or not _POOL.alive:
            if _POOL is not None:
                _POOL.close()
            _POOL = WorkerPool(n)
        return _POOL


class Blocks:
    """Shared-memory blocks for page images, reused from batch to batch (fresh memory
    costs a page fault per 4 KiB on both sides)."""

    def __init__(self) -> None:
        self._free: list[SharedMemory] = []
        self._all: list[SharedMemory] = []
        self._lock = threading.Lock()

    def take(self, size: int) -> SharedMemory:
        with self._lock:
            for i, shm in enumerate(self._free):
                if shm.size >= size:
                    return self._free.pop(i)
            shm = SharedMemory(create=True, size=size)
            self._all.append(shm)
            return shm

    def give(self, shm: SharedMemory) -> None:
        with self._lock:
            self._free.append(shm)

    def release_all(self) -> None:
        with self._lock:
            for shm in self._all:
                shm.close()
                shm.unlink()
            self._all, self._free = [], []


BLOCKS = Blocks()
_ATTACHED: dict[str, SharedMemory] = {}  # in a worker: the caller's blocks, kept mapped


def attached(name: str) -> SharedMemory:
    """In a worker: map the caller's block once, without registering it with the resource
    tracker (Python < 3.13 does that on attach, then reports the caller's blocks as
    leaked). A worker runs one task at a time."""
    shm = _ATTACHED.get(name)
    if shm is None:
        from multiprocessing import resource_tracker

        register = resource_tracker.register
        resource_tracker.register = lambda *args, **kwargs: None
        try:
            shm = _ATTACHED[name] = SharedMemory(name=name)
        finally:
            resource_tracker.register = register
    return shm


def shutdown() -> None:
    """Stop the workers and free the shared memory (both are otherwise kept until exit)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is not None:
            _POOL.close()
            _POOL = None
        BLOCKS.release_all()


atexit.register(shutdown)
