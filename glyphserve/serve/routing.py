"""Scale-out over existing engines: this server ingests, renders and stores; replicas answer.

``HashRing`` places each document on one replica (consistent hashing with virtual nodes, so a
replica joining or leaving moves about 1/N of the documents) and the follow-up questions about
a document reach the replica whose prefix cache holds it. ``Router`` keeps the replicas' health
(``GET /health`` from a background thread; a replica that fails a request is taken out at once
and rejoins when its health check passes) and chooses the replica of each request for
``RemoteEngine``: the document's owner while it has fewer than ``concurrency`` requests in flight
(for local replicas: a batch decoding and one waiting), else the next replica along the document's
ring order that has (consistent hashing with bounded loads: a few busy documents cannot pile onto one
GPU while another idles, and a spill always goes to the same next replica, whose prefix cache then
serves the document too). Requests beyond every replica's slots wait here.
``RoutedScheduler`` runs requests concurrently, as many as the healthy replicas take, and
refuses (429) past the queue that capacity allows. ``LocalReplicas`` starts one engine process
per local GPU for ``glyphserve serve --gpus``.
"""

from __future__ import annotations

import bisect
import ctypes
import hashlib
import logging
import math
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from glyphserve.errors import ModelLoadError, QueueFullError
from glyphserve.serve.backends import Backend
from glyphserve.serve.scheduler import Scheduler, SchedulerHooks

if TYPE_CHECKING:
    from glyphserve.engine.remote import RemoteEngine
    from glyphserve.serve.config import ServeConfig

log = logging.getLogger("glyphserve.serve")


def _point(value: str) -> int:
    return int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), "big")


class HashRing:
    """Consistent hashing: each node owns ``vnodes`` points on a 64-bit circle, and a key goes
    to the node of the first point clockwise from the key's hash."""

    def __init__(self, nodes: list[str] = (), vnodes: int = 160):
        self.vnodes = vnodes
        self._points: list[int] = []
        self._owners: list[str] = []
        self._nodes: list[str] = []
        for node in nodes:
            self.add(node)

    @property
    def nodes(self) -> list[str]:
        return list(self._nodes)

    def add(self, node: str) -> None:
        if node in self._nodes:
            return
        self._nodes.append(node)
        for i in range(self.vnodes):
            point = _point(f"{node}#{i}")
            at = bisect.bisect(self._points, point)
            self._points.insert(at, point)
            self._owners.insert(at, node)

    def remove(self, node: str) -> None:
        if node not in self._nodes:
            return
        self._nodes.remove(node)
        kept = [(p, o) for p, o in zip(self._points, self._owners) if o != node]
        self._points = [p for p, _ in kept]
        self._owners = [o for _, o in kept]

    def lookup(self, key: str) -> str:
        if not self._points:
            raise LookupError("the ring has no nodes")
        return self._owners[bisect.bisect(self._points, _point(key)) % len(self._points)]

    def preference(self, key: str) -> list[str]:
        """Every node once, in the order met clockwise from the key: the owner, then who takes
        over its keys if it is gone, and so on."""
        order: list[str] = []
        if not self._points:
            return order
        start = bisect.bisect(self._points, _point(key))
        for step in range(len(self._points)):
            owner = self._owners[(start + step) % len(self._points)]
            if owner not in order:
                order.append(owner)
                if len(order) == len(self._nodes):
                    break
        return order


@dataclass
class ReplicaState:
    url: str  # chat-completions URL, as RemoteEngine names its endpoints
    health_url: str
    healthy: bool = False
    last_error: str | None = None
    checked_at: float = 0.0
    downs: int = 0  # times it was taken out
    spilled_in: int = 0  # requests it took because the document's owner was full

    def to_dict(self) -> dict:
        return {"url": self.url, "healthy": self.healthy, "last_error": self.last_error, "downs": self.downs,
                "spilled_in": self.spilled_in}


def health_url(endpoint: str) -> str:
    """``GET /health`` beside the OpenAI routes (where vLLM, SGLang and glyphserve serve it)."""
    from glyphserve.engine.remote import chat_completions_url

    return chat_completions_url(endpoint).removesuffix("/chat/completions").removesuffix("/v1") + "/health"


class Router:
    """Replicas on a hash ring, their health, and the order to try them for each document."""

    def __init__(self, endpoints: list[str], *, concurrency: int = 8, health_interval_s: float = 2.0,
                 health_timeout_s: float = 2.0, vnodes: int = 160):
        from glyphserve.engine.remote import chat_completions_url

        self.concurrency = concurrency
        self.health_interval_s = health_interval_s
        self.replicas = {chat_completions_url(e): ReplicaState(chat_completions_url(e), health_url(e))
                         for e in endpoints}
        self.ring = HashRing(list(self.replicas), vnodes)
        self._lock = threading.Lock()
        self._client = httpx.Client(timeout=health_timeout_s)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.replica_processes: LocalReplicas | None = None  # stopped with the router

    def start(self) -> Router:
        """Check every replica once, then keep checking in the background."""
        self.check_all()
        self._thread = threading.Thread(target=self._watch, name="glyphserve-health", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._client.close()
        if self.replica_processes is not None:
            self.replica_processes.stop()

    def candidates(self, key: str) -> list[str]:
        """The key's replicas in ring order, healthy ones first (the others as a last resort)."""
        order = self.ring.preference(key)
        with self._lock:
            return [u for u in order if self.replicas[u].healthy] + [u for u in order if not self.replicas[u].healthy]

    def choose(self, key: str, in_flight: Mapping[str, int], exclude: Collection[str] = ()) -> str:
        """The replica for a request about ``key``, given the requests each replica has in flight: among the
        healthy, not excluded replicas in the key's ring order, the first with a free slot, else the first;
        if none is healthy, the first not excluded."""
        order = self.candidates(key)
        usable = [u for u in order if u not in exclude] or order
        with self._lock:
            healthy = [u for u in usable if self.replicas[u].healthy]
            if not healthy:
                return usable[0]
            chosen = next((u for u in healthy if in_flight.get(u, 0) < self.concurrency), healthy[0])
            if chosen != healthy[0]:
                self.replicas[chosen].spilled_in += 1
            return chosen

    def mark_down(self, url: str, reason: str) -> None:
        with self._lock:
            self._take_out(self.replicas[url], reason)

    @staticmethod
    def _take_out(replica: ReplicaState, reason: str) -> None:
        """(Hold ``_lock``.)"""
        if replica.healthy:
            replica.downs += 1
            log.warning("replica %s taken out: %s", replica.url, reason)
        replica.healthy, replica.last_error = False, reason

    def healthy_count(self) -> int:
        with self._lock:
            return sum(r.healthy for r in self.replicas.values())

    def capacity(self) -> int:
        """Requests the healthy replicas take at once."""
        return self.healthy_count() * self.concurrency

    def snapshot(self) -> list[dict]:
        with self._lock:
            return [r.to_dict() for r in self.replicas.values()]

    def check_all(self) -> None:
        for replica in list(self.replicas.values()):
            self._check(replica)

    def _check(self, replica: ReplicaState) -> None:
        try:
            response = self._client.get(replica.health_url)
            error = None if response.status_code == 200 else f"/health answered HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            error = f"/health: {type(exc).__name__}: {exc}"
        with self._lock:
            replica.checked_at = time.time()
            if error is None:
                if not replica.healthy:
                    log.warning("replica %s is healthy", replica.url)
                replica.healthy, replica.last_error = True, None
            else:
                self._take_out(replica, error)

    def _watch(self) -> None:
        while not self._stop.wait(self.health_interval_s):
            self.check_all()


class RoutedScheduler(Scheduler):
    """Runs requests concurrently (the replicas batch them), at most the healthy replicas'
    capacity at a time; at most that many more wait (and never more than ``queue_size``)."""

    def __init__(self, backend: Backend, router: Router, *, queue_size: int, timeout: float,
                 hooks: SchedulerHooks | None = None):
        self.router = router
        self._active = 0
        self._pool = ThreadPoolExecutor(len(router.replicas) * router.concurrency, thread_name_prefix="glyphserve-route")
        # max_batch=1: every job runs through the backend's stream, cancellable at each token.
        super().__init__(backend, queue_size=queue_size, max_batch=1, timeout=timeout, hooks=hooks)

    @property
    def queue_size(self) -> int:
        return min(self._queue_limit, self.router.capacity())

    @queue_size.setter
    def queue_size(self, value: int) -> None:
        self._queue_limit = value

    def retry_after(self) -> int:
        capacity = self.router.capacity()
        if not capacity:  # until the next health check may bring a replica back
            return max(1, math.ceil(self.router.health_interval_s))
        return max(1, math.ceil(self._seconds_per_job * (len(self._queue) + 1) / capacity))

    def _submit(self, job, streaming):
        if self.router.capacity() == 0:
            raise QueueFullError(f"no replica is healthy at the moment; retry in {self.retry_after()} s")
        return super()._submit(job, streaming)

    def close(self) -> None:
        super().close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and self._active >= max(1, self.router.capacity()):
                    self._cond.wait(timeout=self.router.health_interval_s)  # capacity changes with health
            batch = self._take()
            if not batch:
                return
            with self._cond:
                self._active += 1
                self._running.append(batch[0])
            self._pool.submit(self._run, batch[0])

    def _run(self, ticket) -> None:
        started = time.monotonic()
        self.hooks.batch(1)
        try:
            self._run_single(ticket)
        except Exception:  # _run_single delivers every error to its ticket
            log.exception("routed request failed")
        finally:
            with self._cond:
                self._active -= 1
                self._running.remove(ticket)
                self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * (time.monotonic() - started)
                self._cond.notify_all()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the front dies, even by SIGKILL (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@dataclass
class _Child:
    gpu: str
    port: int
    process: subprocess.Popen
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class LocalReplicas:
    """``glyphserve serve`` children on loopback ports, one per GPU (``CUDA_VISIBLE_DEVICES``)."""

    def __init__(self, gpus: list[str], serve_args: list[str], data_dir: Path, api_key: str | None = None):
        self.gpus = gpus
        self.serve_args = serve_args
        self.data_dir = data_dir
        # The children accept only this server's requests (their /health stays open).
        self.api_key = api_key or secrets.token_urlsafe(24)
        self.children: list[_Child] = []

    def start(self, timeout_s: float = 900) -> list[str]:
        """Start every child and wait until all answer /health; their URLs."""
        base_env = {**os.environ, "GLYPHSERVE_API_KEY": self.api_key, "PYTHONUNBUFFERED": "1"}
        # Each child's torch would otherwise start one CPU thread per core: N engines on one host oversubscribe it.
        base_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // len(self.gpus))))
        for gpu in self.gpus:
            port = _free_port()
            folder = self.data_dir / "replicas" / f"gpu-{gpu}"
            folder.mkdir(parents=True, exist_ok=True)
            command = [sys.executable, "-m", "glyphserve.cli", "serve", "--no-ui", "--host", "127.0.0.1",
                       "--port", str(port), "--data-dir", str(folder), *self.serve_args]
            log_path = folder / "server.log"
            with open(log_path, "ab") as out:
                process = subprocess.Popen(command, env={**base_env, "CUDA_VISIBLE_DEVICES": gpu}, stdout=out,
                                           stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
            self.children.append(_Child(gpu, port, process, log_path))
            print(f"glyphserve: replica on GPU {gpu}: port {port}, log {log_path}", flush=True)
        try:
            self._wait_healthy(time.monotonic() + timeout_s)
        except BaseException:
            self.stop()
            raise
        return [child.url for child in self.children]

    def _wait_healthy(self, deadline: float) -> None:
        waiting = list(self.children)
        with httpx.Client(timeout=2) as client:
            while waiting:
                for child in list(waiting):
                    if child.process.poll() is not None:
                        tail = child.log_path.read_text(errors="replace")[-2000:]
                        raise ModelLoadError(f"the replica on GPU {child.gpu} exited with code "
                                             f"{child.process.returncode}:\n{tail}")
                    try:
                        if client.get(child.url + "/health").status_code == 200:
                            waiting.remove(child)
                    except httpx.HTTPError:
                        pass
                if waiting and time.monotonic() > deadline:
                    raise ModelLoadError(f"replicas on GPU {', '.join(c.gpu for c in waiting)} did not start in "
                                         f"time; see {waiting[0].log_path}")
                time.sleep(0.5)

    def stop(self) -> None:
        for child in self.children:
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGINT)
        for child in self.children:
            try:
                child.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()


def replica_args(config: "ServeConfig") -> list[str]:
    """The ``glyphserve serve`` arguments of a local replica: this server's model settings."""
    args = ["--dtype", config.dtype, "--device", config.device, "--max-num-seqs", str(config.max_num_seqs),
            "--queue-size", str(config.queue_size), "--request-timeout", str(config.request_timeout)]
    if config.max_model_len is not None:
        args += ["--max-model-len", str(config.max_model_len)]
    args += ["--gpu-memory-utilization", str(config.gpu_memory_utilization)]
    if config.model:
        args += [config.model]
    if config.random_weights:
        args += ["--random-weights", config.random_weights]
    return args


def load_routed(config: "ServeConfig") -> tuple["RemoteEngine", str]:
    """Start the local replicas (``--gpus``), route over them and the ``--endpoint`` servers."""
    from glyphserve.engine.remote import RemoteConfig, RemoteEngine

    endpoints = list(config.endpoints)
    children = None
    api_key = config.remote_api_key
    if config.gpus:
        children = LocalReplicas(config.gpus, replica_args(config), config.data_dir, api_key)
        print(f"glyphserve: starting {len(config.gpus)} replica(s) ...", flush=True)
        endpoints += children.start()
        api_key = children.api_key
    concurrency = config.concurrency_per_replica
    router = Router(endpoints, concurrency=concurrency, health_interval_s=config.health_interval)
    router.replica_processes = children
    try:
        remote = RemoteConfig(endpoints, model=config.remote_model, api_key=api_key, resume_greedy=True,
                              max_concurrency=len(endpoints) * concurrency)
        engine = RemoteEngine.load(remote, router)
        router.start()
    except BaseException:
        router.close()
        raise
    models = [e["model"] for e in engine.stats()["endpoints"] if e["model"]]
    return engine, models[0] if models else "glyph"
