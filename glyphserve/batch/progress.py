"""Progress on stderr: a live bar on a terminal, a plain line every few seconds otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """Counts documents and questions finished in this run and shows rate and ETA."""

    def __init__(self, documents: int, items: int, *, stream: TextIO | None = None, interval_s: float = 10.0):
        self.documents = documents
        self.items = items
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval_s = interval_s
        self.docs_done = 0
        self.items_done = 0
        self.failed = 0
        self._start = time.monotonic()
        self._last_line = float("-inf")  # the first item prints a line at once

    def item_done(self, failed: bool = False) -> None:
        self.items_done += 1
        self.failed += failed
        self._show()

    def document_done(self) -> None:
        self.docs_done += 1
        self._show()

    def note(self, message: str) -> None:
        """A message that must not be overwritten by the bar (e.g. a batch-size change)."""
        self._clear()
        print(message, file=self.stream, flush=True)
        self._show(force=True)

    def finish(self) -> None:
        if self.tty:
            self._show(force=True)
            print(file=self.stream, flush=True)

    def status(self) -> str:
        elapsed = time.monotonic() - self._start
        per_minute = self.docs_done / elapsed * 60 if elapsed > 0 else 0.0
        eta = "?"
        if self.items_done:
            eta = format_duration((self.items - self.items_done) * elapsed / self.items_done)
        failed = f", {self.failed} failed" if self.failed else ""
        return (
            f"{self.docs_done}/{self.documents} documents, {self.items_done}/{self.items} questions{failed}"
            f" | {per_minute:.1f} docs/min | ETA {eta}"
        )

    def _show(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.tty:
            width = 24
            filled = int(width * self.items_done / self.items) if self.items else width
            bar = "#" * filled + "." * (width - filled)
            self.stream.write(f"\r[{bar}] {self.status()}\x1b[K")
            self.stream.flush()
        elif force or now - self._last_line >= self.interval_s:
            self._last_line = now
            print(f"batch: {self.status()}", file=self.stream, flush=True)

    def _clear(self) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K")
