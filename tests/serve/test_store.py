"""The document store answers an upload once its folder is in place, flushes it to disk and indexes it off the
request path (serving it from memory meanwhile), and never loses what it acknowledged nor leaves a document half
written: killed at any moment after the answer, it comes back with the document complete."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from glyphserve.errors import NotFoundError
from glyphserve.serve.store import DocumentFiles, DocumentStore
from tests.serve.conftest import REPO, STORY, Server


def files(pages: int = 3, size: int = 1000) -> DocumentFiles:
    manifest = {"pages": [{"number": n, "char_span": [0, 1], "lines": [], "height": 10} for n in range(1, pages + 1)]}
    return DocumentFiles(manifest, "the text", [bytes([n % 256]) * size for n in range(1, pages + 1)])


def test_reads_come_from_memory_until_the_files_are_on_disk(tmp_path):
    store = DocumentStore(tmp_path)
    doc = files()
    record = store.add(name="a.txt", kind="txt", summary={"characters": 8}, files=doc)
    assert store.get(record.id) == record and [r.id for r in store.list()] == [record.id] and store.count() == 1
    assert store.manifest(record.id) == doc.manifest and store.text(record.id) == "the text"
    assert [store.page_bytes(record.id, n) for n in (1, 2, 3)] == doc.pages
    assert store.page_path(record.id, 2).read_bytes() == doc.pages[1]  # a path waits for the file
    with pytest.raises(NotFoundError):
        store.page_bytes(record.id, 4)
    store.close()

    again = DocumentStore(tmp_path)
    assert again.get(record.id) == record
    assert [again.page_bytes(record.id, n) for n in (1, 2, 3)] == doc.pages
    assert json.loads((again.folder(record.id) / "manifest.json").read_text()) == doc.manifest
    again.delete(record.id)
    assert again.count() == 0 and not (tmp_path / "docs" / record.id).exists()
    again.close()


_KILLED_WHILE_WRITING = """
import os, signal, sys, time
from glyphserve.serve.store import DocumentFiles, DocumentStore
delay = float(sys.argv[2])
pages = [bytes([n]) * 400_000 for n in range(1, 41)]
store = DocumentStore(sys.argv[1])
record = store.add(name="big", kind="txt", summary={}, files=DocumentFiles({"pages": []}, "text", pages))
print(record.id, flush=True)
time.sleep(delay)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_killed_during_the_flush_an_acknowledged_document_is_complete(tmp_path):
    """Killed at any moment after ``add`` answered (while the writer flushes and indexes, or after): the document
    is there in full after the restart, indexed from its folder if its row was never inserted."""
    for i, delay in enumerate((0.0, 0.002, 0.01, 0.03, 0.1, 3.0)):
        root = tmp_path / str(i)
        proc = subprocess.run([sys.executable, "-c", _KILLED_WHILE_WRITING, str(root), str(delay)], cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        document_id = proc.stdout.split()[0]
        store = DocumentStore(root)
        try:
            record = store.get(document_id)
            assert record.pages == 40
            assert all(store.page_bytes(document_id, n) == bytes([n]) * 400_000 for n in range(1, 41))
        finally:
            store.close()
        # nothing else is left behind: no temporary folder, no folder without its row
        assert [p.name for p in (root / "docs").iterdir()] == [document_id]


def test_a_server_killed_right_after_an_upload_comes_back_with_it_complete(tmp_path):
    text = "\n\n".join([STORY] * 400)  # ~50 pages: their files take a while to write
    server = Server(tmp_path / "data", "--no-ui").start()
    try:
        with server.client() as client:
            response = client.post("/v1/documents", json={"text": text})
            assert response.status_code == 201, response.text
            document_id = response.json()["id"]
            pages = response.json()["document"]["pages"]
            assert client.get(f"/v1/documents/{document_id}/pages/{pages}.png").status_code == 200
            uploaded = client.post("/v1/documents", json={"text": text + " (another)"}).json()  # then killed
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(timeout=30)
    finally:
        server.stop()
    server = Server(tmp_path / "data", "--no-ui").start()
    try:
        with server.client() as client:
            listed = {d["id"]: d["pages"] for d in client.get("/v1/documents").json()["documents"]}
            for doc in (document_id, uploaded["id"]):  # both were acknowledged: both are there, whole
                assert doc in listed
                for n in range(1, listed[doc] + 1):
                    assert client.get(f"/v1/documents/{doc}/pages/{n}.png").status_code == 200
    finally:
        server.stop()
    assert not list((tmp_path / "data" / "docs").glob(".tmp-*"))


_RENAMED_THEN_KILLED = """
import os, signal, sys, threading
from glyphserve.serve.store import DocumentFiles, DocumentStore
store = DocumentStore(sys.argv[1])
store._writer.submit(threading.Event().wait)  # the writer is busy: the document stays unindexed
record = store.add(name="old.txt", kind="txt", summary={}, files=DocumentFiles({"pages": []}, "text", [b"x"]))
store.rename(record.id, "new.txt")
print(record.id, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_document_renamed_before_it_was_indexed_keeps_its_new_name_after_a_crash(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _RENAMED_THEN_KILLED, str(tmp_path)], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    store = DocumentStore(tmp_path)
    try:
        assert store.get(proc.stdout.split()[0]).name == "new.txt"  # indexed from its folder at the restart
    finally:
        store.close()
    assert [p.name for p in (tmp_path / "docs").iterdir()] == [proc.stdout.split()[0]]
    (tmp_path / "docs" / f".tmp-record-{proc.stdout.split()[0]}").write_text("{}")  # killed during a rename
    DocumentStore(tmp_path).close()
    assert [p.name for p in (tmp_path / "docs").iterdir()] == [proc.stdout.split()[0]]


def test_a_document_the_writer_could_not_index_is_gone_once_deleted(tmp_path):
    """The writer could not insert the row (here: one is already there), so the document is served from memory;
    deleting it removes it from memory too."""
    import sqlite3
    import threading

    store = DocumentStore(tmp_path)
    gate = threading.Event()
    store._writer.submit(gate.wait)
    record = store.add(name="a.txt", kind="txt", summary={}, files=files())
    other = sqlite3.connect(tmp_path / "index.sqlite3")
    with other:
        other.execute("INSERT INTO documents (id, kind, created, pages, summary) VALUES (?, 'txt', 0, 3, '{}')",
                      (record.id,))
    other.close()
    gate.set()
    store.folder(record.id)  # the writer tried
    store.delete(record.id)
    with pytest.raises(NotFoundError):
        store.get(record.id)
    assert store.list() == [] and store.count() == 0
    store.close()


_ADDED_THEN_KILLED = """
import os, signal, sys, threading
from glyphserve.serve.store import DocumentFiles, DocumentStore
store = DocumentStore(sys.argv[1])
store._writer.submit(threading.Event().wait)  # the writer is busy: the document stays unindexed
pages = [bytes([n]) * 5000 for n in range(1, 4)]
record = store.add(name="a.txt", kind="txt", summary={}, files=DocumentFiles({"pages": []}, "text", pages))
print(record.id, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_folder_whose_page_was_cut_short_is_not_indexed_at_the_restart(tmp_path):
    """record.json lists each file's size: a page cut short (power lost before the flush reached the disk) makes
    the folder incomplete, so the restart drops it rather than list a document with a damaged page."""
    for cut in (False, True):
        root = tmp_path / str(cut)
        proc = subprocess.run([sys.executable, "-c", _ADDED_THEN_KILLED, str(root)], cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        document_id = proc.stdout.split()[0]
        if cut:
            page = root / "docs" / document_id / "page_002.png"
            page.write_bytes(page.read_bytes()[:1000])
        store = DocumentStore(root)
        try:
            if cut:
                with pytest.raises(NotFoundError):
                    store.get(document_id)
                assert list((root / "docs").iterdir()) == []
            else:
                assert store.get(document_id).pages == 3
                assert store.page_bytes(document_id, 2) == bytes([2]) * 5000
        finally:
            store.close()


def test_a_data_folder_serves_one_server_at_a_time(tmp_path):
    """A second store on the folder is refused (its start-up would take the first one's uploads in progress for a
    crash's leftovers); the folder is free again once the first closes, or its process dies (the crash tests)."""
    from glyphserve.errors import ConfigError

    store = DocumentStore(tmp_path)
    with pytest.raises(ConfigError, match=f"in use by another glyphserve server \\(pid {os.getpid()}\\)"):
        DocumentStore(tmp_path)
    record = store.add(name="a.txt", kind="txt", summary={}, files=files())
    store.close()
    again = DocumentStore(tmp_path)
    assert again.get(record.id) == record
    again.close()
