"""The SSE response closes its event generator and the answer stream it reads however it ends (the request's
cleanup, which stops its job, runs at once)."""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import ClientDisconnect

from glyphserve.serve.api import sse_response


@pytest.mark.parametrize("failing", ["http.response.start", "http.response.body"])
def test_a_send_that_fails_closes_the_events_and_their_answer_stream(failing):
    """The client went away: Starlette raises from the send, before the first chunk (the event generator never
    started, so its own cleanup cannot run) or while a chunk went out (it waits at its ``yield``). The response
    closes both before returning; the test holds references to them, so the garbage collector cannot be what
    closes them."""
    closed = []

    async def items():  # stands for the service's answer stream
        try:
            while True:
                yield "token"
        finally:
            closed.append("items")

    async def events(source):
        try:
            async for item in source:
                yield f"data: {item}\n\n"
        finally:
            closed.append("events")
            await source.aclose()

    async def receive():
        await asyncio.Event().wait()  # the client sends nothing more

    async def send(message):
        if message["type"] == failing:
            raise OSError("connection reset")  # what an ASGI 2.4 server raises for a closed socket

    async def main():
        source = items()
        await source.asend(None)  # the answer has begun (the service awaited its first item)
        generator = events(source)
        scope = {"type": "http", "asgi": {"spec_version": "2.4"}, "method": "POST", "path": "/"}
        with pytest.raises(ClientDisconnect):
            await sse_response(generator, source)(scope, receive, send)
        return sorted(closed)  # before the loop's shutdown closes every generator left open

    expected = ["items"] if failing == "http.response.start" else ["events", "items"]
    assert asyncio.run(main()) == expected
