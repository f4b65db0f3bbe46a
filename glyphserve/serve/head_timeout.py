"""uvicorn's HTTP protocol with a deadline and a size limit for each request's head.

uvicorn closes a connection left idle after an answer (its keep-alive timeout), but one that sends part of a
request head and then nothing stays open for good: 50 such connections were all still open after 30 s, and
19,985 of them took the server to its open-file limit, where every other client's request failed. Here a
connection whose next request head has not arrived whole ``seconds`` after it opened, or after its last answer, is
closed; a request being read or answered, and a connection upgraded to a WebSocket, are never cut. A head past
``MAX_HEAD_BYTES`` is refused with uvicorn's own 400 and its connection closed (a 200 KB header, and 20,000
headers, were taken whole: uvicorn's httptools protocol has no limit; its h11 one is given this one).
"""

from __future__ import annotations

import asyncio

MAX_HEAD_BYTES = 64 * 1024


def with_head_timeout(seconds: float) -> type[asyncio.Protocol]:
    """The protocol class uvicorn would pick (``http="auto"``: httptools if installed, else h11), with the head's
    deadline and, for httptools, its size limit; for ``uvicorn.Config(http=..., h11_max_incomplete_event_size=
    MAX_HEAD_BYTES)``."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class HeadTimeoutProtocol(AutoHTTPProtocol):
        _head_timer: asyncio.TimerHandle | None = None
        _head_cycle: object = None
        _head_bytes = 0

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._await_head()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._await_head()

        def handle_websocket_upgrade(self, *args) -> None:
            self._stop_timer()  # the connection is the WebSocket's now
            super().handle_websocket_upgrade(*args)

        def connection_lost(self, exc) -> None:
            self._stop_timer()
            super().connection_lost(exc)

        # httptools: a head is measured twice. Whole, from its parsed URL and headers; unfinished, by the bytes
        # read while the parser is inside it (from a message's first byte to the end of its headers; the parser
        # holds a header's value until the next line begins). So a head pipelined behind a long answer is bounded
        # too, and an earlier request's unread body is never counted.
        _in_head = False
        _head_parsed = 0

        def on_message_begin(self) -> None:
            self._in_head, self._head_bytes, self._head_parsed = True, 0, 0
            super().on_message_begin()

        def on_url(self, url: bytes) -> None:
            self._head_parsed += len(url)
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._head_parsed += len(name) + len(value) + 4  # ": " and CRLF
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._in_head = False
            if self._head_parsed > MAX_HEAD_BYTES:
                import httptools

                raise httptools.HttpParserError(f"request head larger than {MAX_HEAD_BYTES // 1024} KiB")
            super().on_headers_complete()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._in_head and not self.transport.is_closing():
                self._head_bytes += len(data)
                if self._head_bytes > MAX_HEAD_BYTES:
                    self.send_400_response(f"request head larger than {MAX_HEAD_BYTES // 1024} KiB")

        def _await_head(self) -> None:
            self._stop_timer()
            self._head_cycle = self.cycle  # the request before; a new head makes a new one
            self._head_timer = self.loop.call_later(seconds, self._head_expired)

        def _stop_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_expired(self) -> None:
            self._head_timer = None
            cycle = self.cycle
            waiting = cycle is self._head_cycle and (cycle is None or cycle.response_complete)
            if waiting and not self.transport.is_closing():
                self.transport.close()

    return HeadTimeoutProtocol
