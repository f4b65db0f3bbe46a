"""Two minutes of mixed load on the tiny model: uploads, chats (streamed and not), cancels, deletes and hostile
requests from several clients, with the server killed (SIGKILL) and restarted half way. At the end nothing that
was acknowledged is lost (every stored document is listed with its pages, every deleted one is gone) and every
answer equals the same question asked alone."""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import pytest

from tests.hostile.conftest import REPORT
from tests.serve.conftest import STORY
from tests.servers import Server

SOAK_SECONDS = float(os.environ.get("GLYPHSERVE_SOAK_SECONDS", "120"))
CLIENTS = 6
QUESTIONS = ["Who kept the lighthouse?", "What happened in the winter of 1887?", "What was engraved?"]
MAX_TOKENS = 8

pytestmark = pytest.mark.slow


@dataclass
class Ledger:
    """What the server acknowledged, and what the clients saw."""

    texts: dict[str, str] = field(default_factory=dict)  # id of a document created (201) -> its text
    deleted: set[str] = field(default_factory=set)  # acknowledged deletes
    # deletes sent but never answered (the server was killed meanwhile): the document may be there or gone
    unanswered_deletes: set[str] = field(default_factory=set)
    answers: list[tuple[str, str, str]] = field(default_factory=list)  # (text, question, answer)
    counts: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)  # what a client saw that it should not have
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, what: str) -> None:
        with self.lock:
            self.counts[what] += 1

    def stored(self) -> list[str]:
        with self.lock:
            return [d for d in self.texts if d not in self.deleted and d not in self.unanswered_deletes]


class Soak:
    def __init__(self, server: Server, seed: int):
        self.server = server
        self.ledger = Ledger()
        self.stop = threading.Event()
        self.seed = seed

    def client(self, number: int) -> None:
        rng = random.Random(self.seed * 100 + number)
        with httpx.Client(timeout=60) as http:
            while not self.stop.is_set():
                action = rng.choices(["upload", "chat", "stream", "cancel", "delete", "hostile"],
                                     [3, 4, 3, 1, 1, 1])[0]
                try:
                    getattr(self, action)(http, rng)
                    self.ledger.count(action)
                except httpx.HTTPError:  # the server is down (killed and restarting): nothing acknowledged
                    self.ledger.count(f"{action} unanswered")
                    time.sleep(0.2)
                except Exception as exc:  # noqa: BLE001 (a thread's assertion must reach the test)
                    with self.ledger.lock:
                        self.ledger.failures.append(f"{action}: {type(exc).__name__}: {exc}")

    @property
    def url(self) -> str:
        return self.server.url

    def pick(self, rng: random.Random) -> tuple[str, str] | None:
        stored = self.ledger.stored()
        if not stored:
            return None
        document = rng.choice(stored)
        return document, self.ledger.texts[document]

    def upload(self, http: httpx.Client, rng: random.Random) -> None:
        """A few texts, so answers repeat; an upload found stored already (200) is not a new acknowledgement
        (the document it names may be being deleted by another client)."""
        text = f"{STORY}\n\nCopy {rng.randrange(12)}."
        response = http.post(f"{self.url}/v1/documents", json={"text": text})
        assert response.status_code in (200, 201), response.text
        if response.status_code == 201:
            with self.ledger.lock:
                self.ledger.texts[response.json()["id"]] = text

    def chat(self, http: httpx.Client, rng: random.Random) -> None:
        picked = self.pick(rng)
        if picked is None:
            return
        document, text = picked
        question = rng.choice(QUESTIONS)
        response = http.post(f"{self.url}/v1/documents/{document}/chat",
                             json={"question": question, "max_tokens": MAX_TOKENS})
        if response.status_code == 404:  # deleted meanwhile by another client
            return
        assert response.status_code == 200, response.text
        with self.ledger.lock:
            self.ledger.answers.append((text, question, response.json()["answer"]))

    def stream(self, http: httpx.Client, rng: random.Random) -> None:
        picked = self.pick(rng)
        if picked is None:
            return
        document, text = picked
        question = rng.choice(QUESTIONS)
        body = {"model": "glyph", "messages": [{"role": "user", "content": question}], "document": document,
                "max_tokens": MAX_TOKENS, "stream": True}
        with http.stream("POST", f"{self.url}/v1/chat/completions", json=body) as response:
            if response.status_code == 404:
                return
            assert response.status_code == 200
            parts, finished = [], False
            for line in response.iter_lines():
                if line == "data: [DONE]":
                    finished = True
                elif line.startswith("data: {"):
                    event = json.loads(line[6:])
                    if "error" in event and event["error"].get("code") == "not_found":
                        return  # its document was deleted before the answer began
                    assert "error" not in event, event
                    parts.extend(c["delta"].get("content") or "" for c in event["choices"])
        if finished:
            with self.ledger.lock:
                self.ledger.answers.append((text, question, "".join(parts).strip()))

    def cancel(self, http: httpx.Client, rng: random.Random) -> None:
        picked = self.pick(rng)
        if picked is None:
            return
        body = {"question": "Tell a long story", "max_tokens": 2000, "stream": True}
        with http.stream("POST", f"{self.url}/v1/documents/{picked[0]}/chat", json=body) as response:
            for _ in zip(range(4), response.iter_lines()):
                pass  # then hang up mid-answer

    def delete(self, http: httpx.Client, rng: random.Random) -> None:
        picked = self.pick(rng)
        if picked is None:
            return
        with self.ledger.lock:
            self.ledger.unanswered_deletes.add(picked[0])
        response = http.delete(f"{self.url}/v1/documents/{picked[0]}")  # raises if the server is killed meanwhile
        with self.ledger.lock:
            self.ledger.unanswered_deletes.discard(picked[0])
            if response.status_code == 200:
                self.ledger.deleted.add(picked[0])

    def hostile(self, http: httpx.Client, rng: random.Random) -> None:
        bad = rng.choice([{"temperature": 1e-300}, {"temperature": 1.0, "top_p": 1e-300}, {"seed": 2**64},
                          {"temperature": float("inf")}])
        body = {"model": "glyph", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": MAX_TOKENS, **bad}
        response = http.post(f"{self.url}/v1/chat/completions", content=json.dumps(body, allow_nan=True),
                             headers={"content-type": "application/json"})
        assert response.status_code in (200, 400), response.text


def test_two_minutes_of_mixed_load_with_a_kill_loses_nothing_and_changes_no_answer(tmp_path, tiny_model_dir):
    args = ("--model", str(tiny_model_dir), "--device", "cpu", "--no-ui", "--served-model-name", "glyph")
    server = Server(tmp_path / "data", *args).start()
    soak = Soak(server, seed=16)
    threads = [threading.Thread(target=soak.client, args=(i,)) for i in range(CLIENTS)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    try:
        time.sleep(SOAK_SECONDS / 2)
        server.process.kill()  # kill -9, mid-upload and mid-answer
        server.process.wait()
        restarted = Server(tmp_path / "data", *args)
        restarted.port, restarted.url = server.port, server.url
        soak.server = server = restarted.start()
        time.sleep(max(0.0, started + SOAK_SECONDS - time.monotonic()))
    finally:
        soak.stop.set()
        for thread in threads:
            thread.join(timeout=120)
    try:
        ledger = soak.ledger
        with httpx.Client(base_url=server.url, timeout=120) as http:
            listed = {d["id"]: d for d in http.get("/v1/documents").json()["documents"]}
            lost = [d for d in ledger.stored() if d not in listed
                    or http.get(f"/v1/documents/{d}/pages/{listed[d]['pages']}.png").status_code != 200]
            # a delete cut by the kill either happened or not: the document is gone, or there whole
            lost += [d for d in ledger.unanswered_deletes if d in listed and d not in ledger.deleted and
                     http.get(f"/v1/documents/{d}/pages/{listed[d]['pages']}.png").status_code != 200]
            resurrected = [d for d in ledger.deleted if d in listed]
            # Every answer against the same question asked alone, about a document of the same text.
            alone: dict[tuple[str, str], str] = {}
            mismatched = []
            for text, question, answer in ledger.answers:
                if (text, question) not in alone:
                    document = http.post("/v1/documents", json={"text": text}).json()["id"]
                    alone[(text, question)] = http.post(f"/v1/documents/{document}/chat", json={
                        "question": question, "max_tokens": MAX_TOKENS}).json()["answer"]
                if answer.strip() != alone[(text, question)].strip():
                    mismatched.append((question, answer, alone[(text, question)]))
        counts = dict(ledger.counts)
        if REPORT:
            with open(REPORT, "a") as out:
                out.write(json.dumps({"case": "soak", "seconds": SOAK_SECONDS, "counts": counts,
                                      "documents_acknowledged": len(ledger.texts), "deleted": len(ledger.deleted),
                                      "answers": len(ledger.answers), "lost": len(lost),
                                      "mismatched": len(mismatched)}) + "\n")
        assert ledger.failures == [], ledger.failures[:5]
        assert ledger.counts["upload"] > 10 and len(ledger.answers) > 20 and ledger.counts["delete"] > 0, counts
        assert lost == [] and resurrected == [], (lost, resurrected)
        assert mismatched == [], mismatched[:3]
    finally:
        server.stop()
