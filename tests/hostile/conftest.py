"""The hostile-input suite: every case of issue 16 against real servers on loopback, each bounded in time and in
the memory it adds to the server (its process and children, sampled while the request runs)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.servers import Server

UPLOAD_SECONDS = 5.0  # every hostile case gets its 4xx within this (the 10,000-page PDF: PDF_SECONDS)
PDF_SECONDS = 10.0
ADDED_BYTES = 300 * 2**20  # memory a hostile request may add to the server (images: IMAGE_ADDED_BYTES)
IMAGE_ADDED_BYTES = 600 * 2**20
HTTP = httpx.Client(timeout=120)  # generous: CI machines are small and busy; the bounds are asserted separately


def tree_memory(pid: int) -> int:
    """Memory of a process and all its descendants: the sum of their proportional set sizes (a page shared by n
    processes counts 1/n in each), 0 for processes that are gone. A child between fork and exec (its command line
    still the server's) is left out: it holds no memory of its own, yet reads as a second copy of the server."""
    total, todo = 0, [pid]
    own = Path(f"/proc/{pid}/cmdline").read_bytes()
    while todo:
        current = todo.pop()
        try:
            if current != pid and Path(f"/proc/{current}/cmdline").read_bytes() == own:
                continue
            rollup = Path(f"/proc/{current}/smaps_rollup").read_text()
            total += int(next(line.split()[1] for line in rollup.splitlines() if line.startswith("Pss:"))) * 1024
            for task in os.listdir(f"/proc/{current}/task"):
                todo.extend(int(c) for c in Path(f"/proc/{current}/task/{task}/children").read_text().split())
        except (OSError, StopIteration, ValueError):
            continue
    return total


REPORT = os.environ.get("GLYPHSERVE_HOSTILE_REPORT")  # a JSON-lines file: one line per watched case


class Watch:
    """Seconds taken and peak memory added to a server's process tree while the ``with`` block runs, and what is
    still added once it ended (``after``); each case is appended to ``$GLYPHSERVE_HOSTILE_REPORT`` when set."""

    def __init__(self, server: Server, case: str, interval: float = 0.01):
        self.pid = server.process.pid
        self.case = case
        self.interval = interval

    def __enter__(self) -> "Watch":
        self.baseline = self.peak = tree_memory(self.pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.started = time.monotonic()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, tree_memory(self.pid))

    def __exit__(self, *exc) -> None:
        self.seconds = time.monotonic() - self.started
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_memory(self.pid))
        self.added = self.peak - self.baseline
        time.sleep(0.5)  # the parser process has exited, freed memory gone back
        self.after = tree_memory(self.pid) - self.baseline
        if REPORT:
            with open(REPORT, "a") as out:
                out.write(json.dumps({"case": self.case, "seconds": round(self.seconds, 3),
                                      "added_mib": round(self.added / 2**20, 1),
                                      "after_mib": round(self.after / 2**20, 1)}) + "\n")


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """No model, the default limits (the cases are about defaults), the UI; ``server.cache`` is the folder where
    the UI framework keeps its copies of files."""
    root = tmp_path_factory.mktemp("hostile")
    server = Server(root / "data")
    server.cache = root / "ui-framework-cache"
    previous = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(server.cache)  # read by the server process at start
    try:
        server.start()
    finally:
        if previous is None:
            del os.environ["GRADIO_TEMP_DIR"]
        else:
            os.environ["GRADIO_TEMP_DIR"] = previous
    yield server
    server.stop()


def error(response) -> tuple[str, str]:
    """(code, message) of an error answer (OpenAI's shape)."""
    body = response.json()["error"]
    return body["code"], body["message"]


def copy_gone(server: Server, document: Path) -> bool:
    """Whether the UI framework's copy of ``document`` leaves the server's cache within its grace and a margin."""
    from glyphserve.serve.ui import UPLOAD_COPY_GRACE_S

    deadline = time.monotonic() + UPLOAD_COPY_GRACE_S + 30
    while any(path.read_bytes() == document.read_bytes() for path in server.cache.rglob(document.name)):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True
