"""Clients that hold the server's connections and memory without finishing their requests (a hostile-input trial's
findings): request heads and bodies that stop arriving, bodies that fill memory together, clients that leave
mid-upload, multipart bodies cut short or padded with parts."""

from __future__ import annotations

import socket
import time

import pytest

from tests.hostile.conftest import HTTP, error
from tests.servers import Server


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """Heads and bodies get one second without bytes."""
    server = Server(tmp_path_factory.mktemp("quick") / "data", "--no-ui", "--header-timeout", "1",
                    "--body-timeout", "1").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Uploads of 1 MiB at most, 4 MiB of bodies in flight together."""
    server = Server(tmp_path_factory.mktemp("small") / "data", "--no-ui", "--max-upload-mb", "1",
                    "--max-bodies-mb", "4").start()
    yield server
    server.stop()


def connect(server: Server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    return sock


def head(path: str, length: int, content_type: str = "application/json") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def response(sock: socket.socket) -> bytes:
    """One whole answer (head and its Content-Length's body)."""
    got = b""
    while b"\r\n\r\n" not in got:
        got += sock.recv(65536)
    head_bytes, _, body = got.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head_bytes.split(b"\r\n") if line.lower().startswith(
        b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return head_bytes + b"\r\n\r\n" + body


def closed_after(sock: socket.socket) -> tuple[bytes, float]:
    """What the server sent until it closed the connection, and when it closed it."""
    started, got = time.monotonic(), b""
    while chunk := sock.recv(65536):
        got += chunk
    return got, time.monotonic() - started


def test_a_request_head_that_stops_arriving_is_closed_and_a_slow_whole_one_is_not(quick):
    stalled = connect(quick)
    stalled.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # no blank line: the head goes on
    got, seconds = closed_after(stalled)
    assert got == b"" and 0.8 < seconds < 10

    slow = connect(quick)
    slow.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    time.sleep(0.5)
    slow.sendall(b"Connection: close\r\n\r\n")
    got, _ = closed_after(slow)
    assert got.startswith(b"HTTP/1.1 200")

    kept = connect(quick)  # a keep-alive connection: the deadline starts again after each answer
    kept.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert response(kept).startswith(b"HTTP/1.1 200")
    kept.sendall(b"GET /health HTTP/1.1\r\n")
    got, seconds = closed_after(kept)
    assert got == b"" and seconds < 10


def test_a_body_that_stops_arriving_is_answered_408_and_lets_go(quick):
    sock = connect(quick)
    sock.sendall(head("/v1/documents", 1000) + b'{"text": "')
    got, seconds = closed_after(sock)
    assert got.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in got and seconds < 10
    assert HTTP.post(f"{quick.url}/v1/documents", json={"text": "hello"}).status_code in (200, 201)


def until(condition, seconds: float = 20):
    """Polls ``condition`` until it holds (the server takes its time on a busy machine); its last value."""
    deadline = time.monotonic() + seconds
    while not (value := condition()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return value


def test_bodies_in_flight_past_their_budget_are_refused_at_once_and_freed_when_they_end(small):
    held = []
    for _ in range(4):  # 4 MiB announced, taken from the budget when each head arrives: all of it
        sock = connect(small)
        sock.sendall(head("/v1/documents", 2**20) + b'{"text": "')
        held.append(sock)
    post = lambda: HTTP.post(f"{small.url}/v1/documents", json={"text": "x" * 900_000})  # noqa: E731
    refused = until(lambda: (r := post()).status_code == 503 and r)
    code, message = error(refused)
    assert code == "server_busy" and "--max-bodies-mb" in message and refused.headers["retry-after"] == "5"
    assert HTTP.get(f"{small.url}/health").status_code == 200  # a request without a body goes through
    # and a small one, from a reserve of its own (a question, a web UI event), announced or chunked
    assert HTTP.post(f"{small.url}/v1/documents", json={"text": "A small note."}).status_code in (200, 201)
    chunked = HTTP.post(f"{small.url}/v1/documents", headers={"Content-Type": "application/json"},
                        content=iter([b'{"text": "Another ', b'small note."}']))
    assert chunked.status_code in (200, 201), chunked.text
    past = HTTP.post(f"{small.url}/v1/documents", headers={"Content-Type": "application/json"},
                     content=iter([b'{"text": "', b"y" * 300_000, b'"}']))  # grows past the reserve's bound
    assert error(past)[0] == "server_busy"
    for sock in held:
        sock.close()
    assert until(lambda: post().status_code in (200, 201))


def test_a_body_that_trickles_in_is_cut_once_it_falls_below_the_least_rate(quick):
    sock = connect(quick)
    sock.sendall(head("/v1/documents", 100_000) + b'{"text": "' + b"a" * 20_000)
    started = time.monotonic()
    got = b""
    while time.monotonic() - started < 20 and not got:
        sock.sendall(b"a")  # a byte every 0.2 s: never the 1 s --body-timeout, 5 bytes a second on average
        time.sleep(0.2)
        sock.setblocking(False)
        try:
            got = sock.recv(65536)
        except BlockingIOError:
            pass
        sock.setblocking(True)
    assert got.startswith(b"HTTP/1.1 408"), got


def test_a_refused_body_that_never_comes_does_not_hold_its_connection(quick):
    sock = connect(quick)
    sock.sendall(head("/v1/documents", 60 * 2**20))  # past --max-upload-mb: refused, drained, and nothing comes
    got, seconds = closed_after(sock)
    assert got.startswith(b"HTTP/1.1 413") and seconds < 10


def test_a_client_that_leaves_mid_upload_is_no_server_error(small):
    sock = connect(small)
    boundary = "XyZ"
    part = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.txt\"\r\n\r\n"
            + "word " * 1000).encode()
    sock.sendall(head("/v1/documents", 500_000, f"multipart/form-data; boundary={boundary}") + part)
    time.sleep(0.3)
    sock.close()

    def counted() -> list[str]:  # the request, once the server has seen its client leave
        metrics = HTTP.get(f"{small.url}/metrics").text
        return [line for line in metrics.splitlines() if line.startswith("glyphserve_http_requests_total")
                and 'method="POST"' in line and ('status="499"' in line or 'status="500"' in line)]

    assert [line for line in until(counted) if 'status="499"' in line]
    assert not [line for line in counted() if 'status="500"' in line]
    assert "Traceback" not in small.log() and "unhandled error" not in small.log()


def multipart(*parts: tuple[str, str | None, bytes], end: bool = True) -> tuple[bytes, dict]:
    body = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--XyZ\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    if end:
        body += b"--XyZ--\r\n"
    return body, {"content-type": "multipart/form-data; boundary=XyZ"}


def test_a_multipart_body_cut_before_its_end_is_refused_not_stored_short(small):
    total = HTTP.get(f"{small.url}/v1/documents").json()["total"]
    body, headers = multipart(("file", "notes.txt", b"The keeper was given a lamp. " * 20), end=False)
    refused = HTTP.post(f"{small.url}/v1/documents", content=body[:-10], headers=headers)
    assert refused.status_code == 400 and "incomplete" in error(refused)[1]
    assert HTTP.get(f"{small.url}/v1/documents").json()["total"] == total


@pytest.mark.parametrize("parts, message", [
    ([("preset", None, b"auto")] * 3, "given twice"),
    ([("a", None, b"1")] * 1000, "given twice"),
    ([("text", None, b"another document")], "file alone"),
])
def test_form_fields_repeated_or_beside_the_file_are_refused(small, parts, message):
    body, headers = multipart(("file", "notes.txt", b"The keeper was given a lamp."), *parts)
    refused = HTTP.post(f"{small.url}/v1/documents", content=body, headers=headers)
    assert refused.status_code == 400 and message in error(refused)[1]


def test_a_request_head_past_64_kib_is_refused_and_its_connection_closed(quick):
    for pad in (b"X-Pad: " + b"a" * 70_000 + b"\r\n", b"a: b\r\n" * 20_000 + b"\r\n"):
        sock = connect(quick)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + pad)
        got, _ = closed_after(sock)
        assert got.startswith(b"HTTP/1.1 400")
    pipelined = connect(quick)  # a head queued behind a request being answered is counted as well
    pipelined.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /health HTTP/1.1\r\n"
                      + b"a: b\r\n" * 20_000)
    got, _ = closed_after(pipelined)
    assert b"HTTP/1.1 400" in got  # (the request before it may be answered first, or not: it came in one read)
    assert HTTP.get(f"{quick.url}/health").status_code == 200


def test_the_unread_body_of_a_request_answered_early_is_not_taken_for_a_head(quick):
    sock = connect(quick)  # refused before its body is read (an unknown route), then more body than a head may be
    sock.sendall(head("/v1/nowhere", 200_000) + b"x" * 200_000)
    got, _ = closed_after(sock)
    assert got.startswith(b"HTTP/1.1 404") and got.count(b"HTTP/1.1 ") == 1
