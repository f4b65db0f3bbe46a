"""The SSE response closes its event generator however it ends (the request's cleanup runs at once)."""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import ClientDisconnect

from glyphserve.serve.api import sse_response


def test_a_send_that_fails_mid_stream_closes_the_event_generator():
    """The client went away while a chunk went out: Starlette raises from the send while the generator waits
    at its ``yield``; the response closes it before returning (the test holds a reference to it, so the
    garbage collector cannot be what closes it)."""
    closed = []

    async def events():
        try:
            while True:
                yield "data: x\n\n"
        finally:
            closed.append(True)

    async def receive():
        await asyncio.Event().wait()  # the client sends nothing more

    async def send(message):
        if message["type"] == "http.response.body":
            raise OSError("connection reset")  # what an ASGI 2.4 server raises for a closed socket

    async def main():
        generator = events()
        scope = {"type": "http", "asgi": {"spec_version": "2.4"}, "method": "POST", "path": "/"}
        with pytest.raises(ClientDisconnect):
            await sse_response(generator)(scope, receive, send)
        return list(closed)  # before the loop's shutdown closes every generator left open

    assert asyncio.run(main()) == [True]
