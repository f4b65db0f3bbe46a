"""The threads reading uploaded files: each client's share, the lines' turns, the refusals and what they say (in the
web UI too, where a client is the user's address)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Callable

import pytest

from glyphserve.serve.errors import ReadersBusyError, TooManyUploadsError
from glyphserve.serve.ui import _fail
from glyphserve.serve.upload_queue import REAP_S, QueueLimits, UploadQueue


class Files:
    """Files whose reading ends when the test says; ``started`` lists them in the order their reading began."""

    def __init__(self, queue: UploadQueue):
        self.queue = queue
        self.started: list[str] = []
        self.gates: dict[str, threading.Event] = {}

    def send(self, client: str, name: str) -> asyncio.Task:
        gate = self.gates[name] = threading.Event()

        def read() -> str:
            self.started.append(name)
            assert gate.wait(30)
            return name

        return asyncio.ensure_future(self.queue.run(client, read))

    async def end(self, name: str, task: asyncio.Task | None = None) -> None:
        self.gates[name].set()
        if task is not None:
            assert await task == name


async def until(condition: Callable[[], bool], seconds: float = 30) -> None:
    """Until what the reading threads and the loop do in turn has come about."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)


def run(test, limits: QueueLimits = QueueLimits(budget=30)) -> None:
    async def main():
        queue = UploadQueue(limits)
        files = Files(queue)
        try:
            await test(queue, files)
        finally:
            for gate in files.gates.values():
                gate.set()
            queue.close()

    asyncio.run(main())


def test_a_clients_files_past_its_share_wait_while_another_clients_are_read_at_once():
    async def test(queue: UploadQueue, files: Files):
        slow = [files.send("a", f"a{i}") for i in range(4)]
        await until(lambda: sorted(files.started) == ["a0", "a1"])
        assert (queue.reading, queue.waiting) == (2, 2)
        await files.end("b0", files.send("b", "b0"))  # read while a's files still hold their threads and line
        assert (queue.reading, queue.waiting) == (2, 2) and len(files.started) == 3
        await files.end("a0", slow[0])
        await until(lambda: files.started[-1] == "a2")
        assert (queue.reading, queue.waiting) == (2, 1)
        for i in range(1, 4):
            await files.end(f"a{i}")
        await asyncio.gather(*slow)
        assert (queue.reading, queue.waiting) == (0, 0)

    run(test)


def test_the_lines_take_turns_at_a_thread_that_frees_up():
    async def test(_, files: Files):
        tasks = [files.send(client, name) for client, name in
                 (("a", "a0"), ("a", "a1"), ("a", "a2"), ("b", "b0"), ("c", "c0"), ("b", "b1"))]
        order = ["a0", "a1", "b0", "c0", "a2", "b1"]  # a's line first in turn, then b's, c's, a's again
        for i, name in enumerate(order):
            await until(lambda: len(files.started) > i)
            assert files.started == order[:i + 1]
            await files.end(name)
        await asyncio.gather(*tasks)

    run(test, QueueLimits(budget=30, threads=1, per_client=1))


def test_a_client_past_its_line_is_refused_at_once_saying_when_to_retry():
    async def test(queue: UploadQueue, files: Files):
        tasks = [files.send("a", f"a{i}") for i in range(2 + queue.limits.waiting)]
        await until(lambda: (queue.reading, queue.waiting) == (2, 16))
        with pytest.raises(TooManyUploadsError) as refused:
            await files.send("a", "one too many")
        assert refused.value.http_status == 429 and refused.value.code == "too_many_uploads"
        assert 29 <= refused.value.retry_after <= 30  # when the first of its files runs out of budget
        assert "2 uploads being read and 16 waiting" in refused.value.message
        assert ("your address has 2 uploads being read and 16 waiting, the most this server takes from one address at "
                "once: retry in") in _fail(refused.value)  # (the web UI's status box)
        await files.end("b", files.send("b", "b"))  # another client's is read
        for i in range(2 + queue.limits.waiting):
            await files.end(f"a{i}")
        await asyncio.gather(*tasks)

    run(test)


def test_all_clients_waiting_files_together_are_bounded():
    """Many clients each within their own line still hold what waits (the web UI's users had no other bound):
    past ``waiting_total`` a file is refused at once (503), and the next is taken once the lines move."""
    async def test(queue: UploadQueue, files: Files):
        tasks = [files.send(client, f"{client}{i}") for client in "abcd" for i in range(2)]
        await until(lambda: (queue.reading, queue.waiting) == (2, 6))
        with pytest.raises(ReadersBusyError) as refused:
            await files.send("e", "e0")
        assert refused.value.http_status == 503 and "6 uploads of other clients are waiting" in refused.value.message
        await files.end("a0")
        await until(lambda: queue.waiting == 5)
        late = files.send("e", "e1")
        for name in ["a1", "b0", "b1", "c0", "c1", "d0", "d1", "e1"]:
            await files.end(name)
        await asyncio.gather(*tasks, late)

    run(test, QueueLimits(budget=30, threads=2, per_client=1, waiting_total=6))


def test_retry_after_follows_how_long_the_last_uploads_took():
    """Small files read in milliseconds: a client past its line is told to retry in a second, not when its files'
    30 s budgets would run out; files already slower than the recent ones are expected to take as long again."""
    async def test(queue: UploadQueue, files: Files):
        for i in range(5):
            await files.end(f"quick{i}", files.send("b", f"quick{i}"))
        tasks = [files.send("a", f"a{i}") for i in range(2 + queue.limits.waiting)]
        await until(lambda: (queue.reading, queue.waiting) == (2, 16))
        with pytest.raises(TooManyUploadsError) as refused:
            await files.send("a", "one too many")
        assert refused.value.retry_after == 1 and "retry in 1 s" in refused.value.message
        await asyncio.sleep(1.2)  # both of a's files in hand now slower than every recent upload
        with pytest.raises(TooManyUploadsError) as refused:
            await files.send("a", "one too many")
        assert 2 <= refused.value.retry_after <= 3
        for i in range(2 + queue.limits.waiting):
            await files.end(f"a{i}")
        await asyncio.gather(*tasks)

    run(test)


@pytest.mark.parametrize("held_by", ["own", "others"])
def test_a_file_that_waits_a_whole_budget_is_refused_by_who_held_the_threads(held_by):
    """Its client's own files held its share (429), or other clients' files held every thread (503)."""
    async def test(queue: UploadQueue, files: Files):
        holders = ["a"] if held_by == "own" else ["b", "c"]
        held = [files.send(client, f"held{i}") for i, client in enumerate(holders)]
        await until(lambda: len(files.started) == len(holders))
        with pytest.raises((TooManyUploadsError, ReadersBusyError)) as refused:
            await asyncio.wait_for(files.send("a", "late"), 0.2 + REAP_S + 5)
        assert type(refused.value) is (TooManyUploadsError if held_by == "own" else ReadersBusyError)
        assert refused.value.http_status == (429 if held_by == "own" else 503)
        assert refused.value.retry_after == 1 and "late" not in files.started and queue.waiting == 0
        assert {"own": "other uploads from your address held the 1 of them; retry in 1 s",
                "others": "other users' uploads held them all; retry in 1 s"}[held_by] in _fail(refused.value)
        for i, task in enumerate(held):
            await files.end(f"held{i}", task)

    run(test, QueueLimits(budget=0.2, threads=2, per_client=1))


def test_a_file_given_up_leaves_its_line_and_one_being_read_keeps_its_thread_until_read():
    async def test(queue: UploadQueue, files: Files):
        reading = [files.send("a", f"a{i}") for i in range(2)]
        waiting = files.send("a", "a2")
        await until(lambda: len(files.started) == 2)
        waiting.cancel()
        reading[0].cancel()  # its client went away: the parse runs on, holding its thread
        await until(lambda: waiting.done() and reading[0].done())
        assert (queue.reading, queue.waiting) == (2, 0)
        await files.end("a0")
        await until(lambda: queue.reading == 1)
        await files.end("a1", reading[1])
        assert queue.reading == 0 and sorted(files.started) == ["a0", "a1"]

    run(test)


def test_files_waiting_when_the_server_stops_are_refused_at_once_and_no_thread_is_lost():
    async def test(queue: UploadQueue, files: Files):
        reading = [files.send("a", f"a{i}") for i in range(2)]
        waiting = files.send("a", "a2")
        await until(lambda: (queue.reading, queue.waiting) == (2, 1))
        queue.close()
        with pytest.raises(ReadersBusyError, match="stopping"):
            await asyncio.wait_for(waiting, 5)
        for i, task in enumerate(reading):  # the files being read end as they would
            await files.end(f"a{i}", task)
        await until(lambda: queue.reading == 0)
        assert "a2" not in files.started
        with pytest.raises(ReadersBusyError, match="stopping"):
            await files.send("b", "b0")

    run(test)


def test_a_refusal_keeps_its_retry_after_across_processes_and_ipv6_clients_go_by_their_64():
    import pickle
    from types import SimpleNamespace

    from glyphserve.serve.upload_queue import client_of

    copy = pickle.loads(pickle.dumps(TooManyUploadsError("wait", 7)))
    assert (type(copy), copy.message, copy.retry_after) == (TooManyUploadsError, "wait", 7)
    ask = lambda host: client_of(SimpleNamespace(client=SimpleNamespace(host=host)))  # noqa: E731
    assert ask("2001:db8:1:2::5") == ask("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64" != ask("2001:db8:1:3::5")
    assert ask("10.0.0.7") == "10.0.0.7" and client_of(SimpleNamespace(client=None)) == ""


def test_a_client_with_nothing_in_hand_goes_before_another_clients_next_file():
    async def test(queue: UploadQueue, files: Files):
        a = [files.send("a", f"a{i}") for i in range(3)]  # a holds both threads, its third file waits
        await until(lambda: (queue.reading, queue.waiting) == (2, 1))
        b = files.send("b", "b0")  # after a's line in turn, but b has nothing in hand
        await until(lambda: queue.waiting == 2)
        await files.end("a0", a[0])  # a still has a1 in hand
        await until(lambda: len(files.started) == 3)
        assert files.started[2] == "b0"
        await files.end("b0", b)
        await until(lambda: len(files.started) == 4)
        for i in (1, 2):
            await files.end(f"a{i}", a[i])

    run(test, QueueLimits(budget=30, threads=2, per_client=2))


def test_an_uploads_copy_stays_its_grace_for_another_upload_of_the_same_file(tmp_path):
    """The UI framework writes one copy of a file for every upload of it (by its content): the first upload done
    removed it under another whose handler had not started yet (three users sending one file at once: "internal
    error" for two). The copy goes ``grace_s`` after its last reader, unless another took it meanwhile."""
    from glyphserve.serve.ui import _UploadCopies

    cache = tmp_path / "cache"
    copy = cache / "0123abcd" / "note.txt"
    copy.parent.mkdir(parents=True)
    copy.write_text("a note")
    copies = _UploadCopies(grace_s=0.2)

    async def main():
        with copies.held(copy, cache):
            pass
        assert copy.exists()  # the first upload done: another may still come for it
        await asyncio.sleep(0.1)
        with copies.held(copy, cache):  # ... and does, within the grace
            await asyncio.sleep(0.2)  # (past the first grace: still held)
            assert copy.exists()
        await asyncio.sleep(0.1)
        assert copy.exists()
        await asyncio.sleep(0.2)
        assert not copy.exists() and not copy.parent.exists()

    asyncio.run(main())
