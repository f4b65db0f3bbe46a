"""uvicorn's HTTP protocol with a deadline for each request's head.

uvicorn closes a connection left idle after an answer (its keep-alive timeout), but one that sends part of a
request head and then nothing stays open for good: 50 such connections were all still open after 30 s, and
19,985 of them took the server to its open-file limit, where every other client's request failed. Here a
connection whose next request head has not arrived whole ``seconds`` after it opened, or after its last answer, is
closed (a request being read or answered is never cut).
"""

from __future__ import annotations

import asyncio


def with_head_timeout(seconds: float) -> type[asyncio.Protocol]:
    """The protocol class uvicorn would pick (``http="auto"``: httptools if installed, else h11), with the head
    deadline; for ``uvicorn.Config(http=...)``."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class HeadTimeoutProtocol(AutoHTTPProtocol):
        _head_timer: asyncio.TimerHandle | None = None
        _head_cycle: object = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._await_head()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._await_head()

        def connection_lost(self, exc) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def _await_head(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_cycle = self.cycle  # the request before; a new head makes a new one
            self._head_timer = self.loop.call_later(seconds, self._head_expired)

        def _head_expired(self) -> None:
            self._head_timer = None
            cycle = self.cycle
            waiting = cycle is self._head_cycle and (cycle is None or cycle.response_complete)
            if waiting and not self.transport.is_closing():
                self.transport.close()

    return HeadTimeoutProtocol
