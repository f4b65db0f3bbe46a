"""A small real OpenAI chat-completions server on loopback, with scripted failures.

Used to test the remote client's retry and timeout behaviour; answers are computed from the
request (the question and the number of images) so tests can check what was sent.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ChatServer:
    """Each POST takes the next action from ``plan`` (default "ok"):

    "ok" streams ``<think>…</think>answer`` in content; "reasoning" sends the thinking as
    ``reasoning_content``; "status:CODE[:BODY]" answers that status; "drop" closes the
    connection without replying; "partial" streams one token then closes; "sleep:S"
    waits S seconds before answering normally. With ``api_key``, a request without it is answered 401; with
    ``max_model_len``, /v1/models reports it (as vLLM does).
    """

    def __init__(self, model: str = "stub-glyph", delay_s: float = 0.0, api_key: str | None = None,
                 max_model_len: int | None = None, port: int = 0):
        self.model = model
        self.max_model_len = max_model_len
        self.api_key = api_key
        self.delay_s = delay_s
        self.plan: deque[str] = deque()
        self.requests: list[dict] = []
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _refused(self) -> bool:
                if server.api_key and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    self._json(401, {"error": {"message": "wrong API key", "type": "invalid_request_error",
                                               "param": None, "code": "invalid_api_key"}})
                    return True
                return False

            def do_GET(self):
                if self._refused():
                    return
                if self.path.rstrip("/") == "/v1/models":
                    entry = {"id": server.model, "object": "model"}
                    if server.max_model_len is not None:
                        entry["max_model_len"] = server.max_model_len
                    self._json(200, {"object": "list", "data": [entry]})
                else:
                    self._json(404, {"error": "not_found", "message": self.path})

            def do_POST(self):
                if self._refused():
                    return
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server._lock:
                    server.requests.append(body)
                    action = server.plan.popleft() if server.plan else "ok"
                    server.active += 1
                    server.max_active = max(server.max_active, server.active)
                try:
                    server._handle(self, action, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout tests)
                finally:
                    with server._lock:
                        server.active -= 1

            def _json(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._handler = Handler
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    @staticmethod
    def reply_for(body: dict) -> tuple[str, str]:
        """(thinking, answer) the server gives for a request."""
        user = [m for m in body["messages"] if m["role"] == "user"]
        question = user[-1]["content"] if isinstance(user[-1]["content"], str) else user[-1]["content"][-1]["text"]
        parts = [p for m in user if isinstance(m["content"], list) for p in m["content"]]
        images = sum(1 for p in parts if p["type"] == "image_url")
        return f"{images} pages to read", f"answer to: {question}"

    def _handle(self, handler: BaseHTTPRequestHandler, action: str, body: dict) -> None:
        kind, _, arg = action.partition(":")
        if kind == "status":
            code, _, payload = arg.partition(":")
            data = (payload or json.dumps({"error": "internal", "message": "scripted failure"})).encode()
            handler.send_response(int(code))
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
            return
        if kind == "drop":
            handler.close_connection = True
            handler.connection.shutdown(2)
            return
        if kind == "sleep":
            time.sleep(float(arg))
        time.sleep(self.delay_s)
        thinking, answer = self.reply_for(body)
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Cache-Control", "no-cache")
        handler.end_headers()

        def send(delta: dict, finish: str | None = None, usage: dict | None = None) -> None:
            chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": self.model,
                     "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]}
            if usage:
                chunk["usage"] = usage
            handler.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            handler.wfile.flush()

        send({"role": "assistant", "content": ""})
        if kind == "partial":
            send({"content": "<think>"})
            handler.close_connection = True
            handler.connection.shutdown(2)
            return
        if kind == "reasoning":
            send({"reasoning_content": thinking})
            pieces = [answer[:5], answer[5:]]
        else:
            text = f"<think>{thinking}</think>{answer}"
            pieces = [text[i : i + 7] for i in range(0, len(text), 7)]  # tags split across chunks
        for piece in pieces:
            send({"content": piece})
        send({}, finish="stop")
        if (body.get("stream_options") or {}).get("include_usage"):
            send({}, usage={"prompt_tokens": 100, "completion_tokens": len(pieces), "total_tokens": 100 + len(pieces)})
        handler.wfile.write(b"data: [DONE]\n\n")
        handler.wfile.flush()
