"""Progress on stderr in tqdm's style (the one transformers' own bars use): a live bar on a terminal, the same
line every few seconds otherwise (a log keeps lines, not a bar redrawn with carriage returns)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """Counts the questions answered in this run (the bar), with documents finished and failures beside it."""

    def __init__(self, documents: int, items: int, *, stream: TextIO | None = None, interval_s: float = 10.0):
        self.documents = documents
        self.items = items
        self.stream = stream or sys.stderr
        self.interval_s = interval_s
        self.docs_done = 0
        self.items_done = 0
        self.failed = 0
        self._start = time.monotonic()
        self._last_line = float("-inf")  # the first item prints a line at once
        self._bar = tqdm(total=items, desc="batch", unit="question", file=self.stream, dynamic_ncols=True) \
            if self.stream.isatty() else None

    def item_done(self, failed: bool = False) -> None:
        self.items_done += 1
        self.failed += failed
        if self._bar is not None:
            self._bar.set_postfix_str(self._postfix(), refresh=False)
            self._bar.update()
        self._line()

    def document_done(self) -> None:
        self.docs_done += 1
        if self._bar is not None:
            self._bar.set_postfix_str(self._postfix())
        self._line()

    def note(self, message: str) -> None:
        """A message that must not be overwritten by the bar (e.g. a batch-size change)."""
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def status(self) -> str:
        return tqdm.format_meter(self.items_done, self.items, time.monotonic() - self._start, prefix="batch",
                                 unit="question", postfix=self._postfix(), ascii=True)

    def _postfix(self) -> str:
        failed = f", {self.failed} failed" if self.failed else ""
        return f"{self.docs_done}/{self.documents} documents{failed}"

    def _line(self) -> None:
        now = time.monotonic()
        if self._bar is None and now - self._last_line >= self.interval_s:
            self._last_line = now
            print(self.status(), file=self.stream, flush=True)
