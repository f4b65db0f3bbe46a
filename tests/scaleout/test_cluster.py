"""A routing front and three tiny-model glyphserve replicas, all real processes on loopback."""

from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from glyphserve.serve.routing import HashRing
from tests.serve.conftest import STORY, Server

pytestmark = pytest.mark.timeout(300)

QUESTIONS = ["Who kept the lighthouse?", "What happened in the winter of 1887?", "What was engraved on the compass?"]
MAX_TOKENS = 32
LONG_TOKENS = 200  # with ignore_eos: streams long enough to be cut by a replica's death
DOCUMENTS = [f"Copy {i} of the story.\n\n{STORY}\n\nThe keeper's dog was called Rook {i}." for i in range(6)]


def _start_all(servers: list[Server]) -> None:
    with ThreadPoolExecutor(len(servers)) as pool:
        list(pool.map(lambda s: s.start(timeout=180), servers))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("scaleout")
    replicas = [Server(root / f"replica{i}", "--model", str(tiny_model_dir), "--device", "cpu", "--no-ui",
                       "--max-batch", "4") for i in range(3)]
    front = Server(root / "front", "--backend", "openai", *[a for r in replicas for a in ("--endpoint", r.url)],
                   "--replica-concurrency", "2", "--health-interval", "0.5", "--no-ui")
    try:
        _start_all(replicas)
        front.start()
        yield front, replicas
    finally:
        for server in [front, *replicas]:
            server.stop()


@pytest.fixture(scope="module")
def documents(cluster):
    """The documents uploaded to the front, and each question's answer from a single server
    (replica 0 asked directly about its own copy of the document)."""
    front, replicas = cluster
    single = replicas[0]
    out = []
    with front.client() as fc, single.client() as sc:
        for text in DOCUMENTS:
            front_id = fc.post("/v1/documents", json={"text": text}).json()["id"]
            single_id = sc.post("/v1/documents", json={"text": text}).json()["id"]
            expected = [_ask(sc, single_id, q) for q in QUESTIONS]
            out.append({"id": front_id, "pages": fc.get(f"/v1/documents/{front_id}").json()["document"]["pages"],
                        "expected": expected, "expected_long": _complete(sc, single_id, stream=False)})
    return out


def _ask(client: httpx.Client, document_id: str, question: str) -> str:
    response = client.post(f"/v1/documents/{document_id}/chat", json={"question": question, "max_tokens": MAX_TOKENS})
    assert response.status_code == 200, response.text
    return response.json()["answer"]


def _ask_streaming(client: httpx.Client, document_id: str, question: str) -> tuple[int, str]:
    """(status, answer) of a streamed document chat; the answer joined from its deltas."""
    body = {"question": question, "max_tokens": MAX_TOKENS, "stream": True}
    with client.stream("POST", f"/v1/documents/{document_id}/chat", json=body) as response:
        if response.status_code != 200:
            response.read()
            return response.status_code, response.text
        deltas, done = [], None
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            assert event["type"] != "error", event
            if event["type"] == "delta" and event["channel"] == "answer":
                deltas.append(event["text"])
            elif event["type"] == "done":
                done = event
        assert done is not None and "".join(deltas) == done["answer"]
        return 200, done["answer"]


def _complete(client: httpx.Client, document_id: str, *, stream: bool) -> str:
    """A long answer (stop tokens ignored) through the OpenAI route, about a stored document."""
    body = {"messages": [{"role": "user", "content": QUESTIONS[0]}], "document": document_id,
            "max_tokens": LONG_TOKENS, "ignore_eos": True, "stream": stream}
    if not stream:
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["message"]["content"]
    parts = []
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                parts += [c["delta"].get("content") or "" for c in chunk["choices"]]
    return "".join(parts)


def _metric(server: Server, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"{name}\{{(.*)\}} (\S+)$", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            total += float(match.group(2))
    return total


def _chats(server: Server) -> float:
    return _metric(server, "glyphserve_http_requests_total", route="/v1/chat/completions", status="200")


def _grown(replicas: list[Server], before: list[float], total: int) -> list[float]:
    """Chat requests each replica counted since ``before``, once they add up to ``total``: a replica
    counts a request after its last byte, so the front's answer may come first."""
    deadline = time.monotonic() + 10
    while True:
        grown = [_chats(r) - b for r, b in zip(replicas, before)]
        if sum(grown) >= total or time.monotonic() > deadline:
            return grown
        time.sleep(0.05)


def _vision_misses(server: Server) -> float:
    return _metric(server, "vllm:mm_cache_queries_total") - _metric(server, "vllm:mm_cache_hits_total")


def _health(front: Server) -> dict:
    return httpx.get(f"{front.url}/health", timeout=10).json()


def test_answers_equal_a_single_servers_and_each_document_stays_on_one_replica(cluster, documents):
    front, replicas = cluster
    owners = set()
    with front.client() as client:
        for document in documents:
            chats, misses = [_chats(r) for r in replicas], [_vision_misses(r) for r in replicas]
            answers = [_ask(client, document["id"], q) for q in QUESTIONS[:2]]
            answers.append(_ask_streaming(client, document["id"], QUESTIONS[2])[1])
            assert answers == document["expected"]
            grown = _grown(replicas, chats, len(QUESTIONS))
            assert sorted(grown) == [0, 0, len(QUESTIONS)], grown  # all of this document's questions on one replica
            owner = grown.index(len(QUESTIONS))
            owners.add(owner)
            # Its pages were encoded there once (replica 0 had them already: it answered the reference questions).
            encoded = [_vision_misses(r) - before for r, before in zip(replicas, misses)]
            assert encoded == [document["pages"] if i == owner and owner != 0 else 0 for i in range(3)], encoded
    assert len(owners) > 1  # and the documents spread over the replicas
    for i in owners:  # follow-up questions reused the document prefix on its replica
        assert _metric(replicas[i], "vllm:prefix_cache_hits_total") > 0
    health = _health(front)
    assert health["backend"] == "openai" and health["capacity"] == 6
    assert all(r["healthy"] for r in health["replicas"])


def test_a_busy_document_spills_to_the_next_replica_on_its_ring(cluster, documents):
    front, replicas = cluster
    document = documents[1]
    ring = HashRing([r.url + "/v1/chat/completions" for r in replicas])
    owner, second, _ = (next(r for r in replicas if url.startswith(r.url)) for url in ring.preference(document["id"]))
    spilled_before = {r["url"]: r["spilled_in"] for r in _health(front)["replicas"]}
    chats = [_chats(owner), _chats(second)]

    def ask(_):
        with front.client() as client:
            return _complete(client, document["id"], stream=False)

    with ThreadPoolExecutor(4) as pool:  # the owner takes 2 at once (--replica-concurrency 2)
        answers = list(pool.map(ask, range(4)))
    assert answers == [document["expected_long"]] * 4  # same answers wherever they were computed
    spilled = {r["url"]: r["spilled_in"] - spilled_before[r["url"]] for r in _health(front)["replicas"]}
    assert spilled[second.url + "/v1/chat/completions"] >= 1 and sum(spilled.values()) >= 1
    grown = _grown([owner, second], chats, 4)
    assert grown[0] >= 1 and grown[1] >= 1, grown


def test_past_the_replicas_capacity_the_front_answers_429(cluster, documents):
    front, _ = cluster
    # Capacity 3 replicas x 2; as many may wait: of 40 requests at once, some must be refused.
    body = {"question": QUESTIONS[0], "max_tokens": 256}

    def ask(i: int) -> httpx.Response:
        return httpx.post(f"{front.url}/v1/documents/{documents[i % len(documents)]['id']}/chat", json=body,
                          timeout=120)

    with ThreadPoolExecutor(40) as pool:
        responses = list(pool.map(ask, range(40)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) == {200, 429}, statuses
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.json()["error"]["code"] == "queue_full" and int(refused.headers["retry-after"]) >= 1


def test_killing_a_replica_mid_load_loses_no_request_and_it_rejoins(cluster, documents):
    front, replicas = cluster
    jobs = [(d, i % 2 == 0) for i in range(4) for d in documents]  # 24 long answers, half streamed
    watched = documents[0]
    ring = HashRing([r.url + "/v1/chat/completions" for r in replicas])
    victim = next(r for r in replicas if ring.lookup(watched["id"]).startswith(r.url))  # where the front sends it

    def ask(job):
        document, stream = job
        with front.client() as client:
            return _complete(client, document["id"], stream=stream)

    with ThreadPoolExecutor(6) as pool, front.client() as client:  # within the front's queue on two replicas
        futures = []
        body = {"messages": [{"role": "user", "content": QUESTIONS[0]}], "document": watched["id"],
                "max_tokens": LONG_TOKENS, "ignore_eos": True, "stream": True}
        parts = []
        # Asked first, on an idle cluster, so it goes to its document's owner (a busy owner would pass it on).
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    assert "error" not in chunk, chunk
                    parts += [c["delta"].get("content") or "" for c in chunk["choices"]]
                    if "".join(parts) and not futures:
                        futures = [pool.submit(ask, job) for job in jobs]
                    elif len(parts) > 8 and victim.process.poll() is None:
                        victim.process.kill()  # SIGKILL under load while this answer streams: connections drop
        answers = [f.result() for f in futures]
    assert "".join(parts) == watched["expected_long"]  # finished by the next replica on the ring
    wrong = [(i, stream, a, d["expected_long"]) for i, ((d, stream), a) in enumerate(zip(jobs, answers))
             if a != d["expected_long"]]
    assert not wrong, wrong
    health = _health(front)
    state = next(r for r in health["replicas"] if r["url"].startswith(victim.url))
    assert not state["healthy"] and state["downs"] >= 1 and state["failures"] >= 1
    assert health["capacity"] == 4 and health["resumed"] >= 1

    victim.stop()
    victim.start()  # same port: the replica comes back
    deadline = time.monotonic() + 30
    while not all(r["healthy"] for r in _health(front)["replicas"]):
        assert time.monotonic() < deadline, _health(front)
        time.sleep(0.2)
    with front.client() as client:
        for document in documents:
            assert _ask(client, document["id"], QUESTIONS[0]) == document["expected"][0]
    assert _chats(victim) > 0  # its documents came back to it


def test_gpus_starts_one_replica_per_gpu_and_stops_them_with_the_front(tmp_path, tiny_model_dir, documents):
    front = Server(tmp_path / "front", "--gpus", "0,1", "--model", str(tiny_model_dir), "--device", "cpu", "--no-ui",
                   "--health-interval", "0.5")
    try:
        front.start(timeout=180)
        health = _health(front)
        assert len(health["replicas"]) == 2 and all(r["healthy"] for r in health["replicas"])
        with front.client() as client:
            document_id = client.post("/v1/documents", json={"text": DOCUMENTS[0]}).json()["id"]
            assert _ask(client, document_id, QUESTIONS[0]) == documents[0]["expected"][0]
        children = [r["url"].removesuffix("/v1/chat/completions") for r in health["replicas"]]
        # The children answer only the front (it gave them a key); /health stays open.
        assert httpx.get(children[0] + "/v1/models").status_code == 401
    finally:
        front.stop()
    for child in children:
        with pytest.raises(httpx.ConnectError):
            httpx.get(child + "/health", timeout=2)
