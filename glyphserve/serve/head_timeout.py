"""uvicorn's HTTP protocol with a deadline and a size limit for each request's head.

uvicorn closes a connection left idle after an answer (its keep-alive timeout), but one that sends part of a
request head and then nothing stays open for good: 50 such connections were all still open after 30 s, and
19,985 of them took the server to its open-file limit, where every other client's request failed. Here a
connection whose next request head has not arrived whole ``seconds`` after it opened, or after its last answer, is
closed (a request being read or answered is never cut). A head past ``MAX_HEAD_BYTES`` is answered 431 and its
connection closed (a 200 KB header, and 20,000 headers, were taken whole: uvicorn's httptools protocol has no limit).
"""

from __future__ import annotations

import asyncio

MAX_HEAD_BYTES = 64 * 1024
_TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain\r\nconnection: close\r\n"
              b"content-length: 36\r\n\r\nrequest head larger than 64 KiB sent")


def with_head_timeout(seconds: float) -> type[asyncio.Protocol]:
    """The protocol class uvicorn would pick (``http="auto"``: httptools if installed, else h11), with the head's
    deadline and size limit; for ``uvicorn.Config(http=...)``."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class HeadTimeoutProtocol(AutoHTTPProtocol):
        _head_timer: asyncio.TimerHandle | None = None
        _head_cycle: object = None
        _head_bytes = 0
        _head_tail = b""

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._await_head()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._await_head()

        def data_received(self, data: bytes) -> None:
            if self._awaiting_head():
                end = (self._head_tail + data).find(b"\r\n\r\n")  # (the blank line may span two reads)
                head = len(data) if end < 0 else end + 4 - len(self._head_tail)
                self._head_bytes += head
                self._head_tail = data[-3:]
                if self._head_bytes > MAX_HEAD_BYTES:
                    if not self.transport.is_closing():
                        self.transport.write(_TOO_LARGE)
                        self.transport.close()
                    return
            super().data_received(data)

        def connection_lost(self, exc) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def _await_head(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_cycle = self.cycle  # the request before; a new head makes a new one
            self._head_bytes = 0
            self._head_tail = b""
            self._head_timer = self.loop.call_later(seconds, self._head_expired)

        def _head_expired(self) -> None:
            self._head_timer = None
            if self._awaiting_head() and not self.transport.is_closing():
                self.transport.close()

        def _awaiting_head(self) -> bool:
            """No request began since the timer started (or the one that did is answered)."""
            cycle = self.cycle
            return cycle is self._head_cycle and (cycle is None or cycle.response_complete)

    return HeadTimeoutProtocol
