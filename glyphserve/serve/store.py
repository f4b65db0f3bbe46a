"""Documents on disk: an SQLite index plus one folder per document.

``<data>/index.sqlite3`` lists the documents; ``<data>/docs/<id>/`` holds what
``glyphserve.render.write_rendered`` writes (``page_001.png`` ..., ``manifest.json`` with each
page's character span and line baselines) and ``source.txt``, the text the pages were rendered from.
A document folder is written under a temporary name and renamed into place: that rename is the commit.
``add`` answers once it is done (the files are in the kernel's cache, so a killed server keeps them), and a
writer thread flushes them to disk (fsync) and inserts the row off the request path; until then reads are
served from memory, and a restart indexes a folder whose row is missing from its ``record.json``, once every
file it lists is there at its size. So an acknowledged document survives a crash of the server, and no crash
(of the server, or of the machine before the flush) leaves a listed document half written (an unrenamed
temporary folder, or a folder with a file cut short, is removed at start-up). A deleted one is renamed aside
before its row goes, so a delete that cannot proceed changes nothing; ``<data>/.reserve`` (``RESERVE_BYTES``) is
given up to a delete that finds the disk full (dropping a row writes to the index's log first; moving a folder
aside may need a directory block), so deleting is how a full disk is freed, and made again after. Disk faults
become typed errors: a full disk 507 ``storage_full``, anything else (read-only, I/O error, permissions) 503
``storage_unavailable``, each naming what could not be done.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from glyphserve.errors import ConfigError, GlyphserveError, NotFoundError
from glyphserve.render.document import page_filename, sync_folder, write_file
from glyphserve.serve.errors import InvalidRequestError, StorageFullError, StorageUnavailableError
from glyphserve.serve.retrieval import PageLayout

ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
logger = logging.getLogger(__name__)
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_SQLITE_FULL = 13  # SQLITE_FULL (the primary result code, low byte of the extended one)
_LEFTOVERS = (".tmp-*", ".deleted-*")  # interrupted writes and deletes
_RECORD = "record.json"  # a stored document's row, so a restart can index a folder it never indexed
_RESERVE = ".reserve"
# Room kept for deletes on a full disk: dropping a row appends a few pages to the index's write-ahead log (tens
# of KiB).
RESERVE_BYTES = 1 << 20

_SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    id TEXT PRIMARY KEY,
    name TEXT,
    kind TEXT NOT NULL,
    created REAL NOT NULL,
    pages INTEGER NOT NULL,
    summary TEXT NOT NULL,
    content_hash TEXT
)
"""
_HASH_INDEX = "CREATE INDEX IF NOT EXISTS documents_content_hash ON documents (content_hash)"


@contextmanager
def storage(action: str) -> Iterator[None]:
    """Disk and database faults while doing ``action`` ("store the document") as typed errors."""
    try:
        yield
    except GlyphserveError:
        raise
    except sqlite3.Error as exc:
        raise _storage_error(action, _disk_full(exc), f"the index database: {exc}") from exc
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise _storage_error(action, _disk_full(exc), f"{exc.strerror or exc}{where}") from exc


def _disk_full(exc: BaseException) -> bool:
    """Whether a database or file error says the disk (or the quota) is full."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        return (code is not None and code & 0xFF == _SQLITE_FULL) or "full" in str(exc)
    return isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS


def _storage_error(action: str, full: bool, cause: str) -> GlyphserveError:
    if full:
        return StorageFullError(f"could not {action}: the disk holding the data folder is full ({cause})")
    return StorageUnavailableError(f"could not {action}: the data folder cannot be written ({cause})")


def _record_json(record: DocumentRecord, content_hash: str | None, sizes: dict[str, int]) -> bytes:
    """A document's ``record.json``: its row, for a restart to index the folder if the row was never inserted,
    and the size of each of its files, so a file cut short (power lost before the flush) is not taken as whole."""
    return json.dumps({**dataclasses.asdict(record), "content_hash": content_hash, "sizes": sizes}).encode()


def _size(path: Path) -> int:
    """A file's size in bytes, -1 when it cannot be read."""
    try:
        return path.stat().st_size
    except OSError:
        return -1


def prepare_data_dir(root: Path) -> None:
    """Make the data folder and check it can be written and no other server holds it (``hold_data_dir``), before
    anything slow starts (a typed error if not)."""
    with storage(f"use the data folder {root}"):
        (Path(root) / "docs").mkdir(parents=True, exist_ok=True)
        probe = Path(root) / f".write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
        hold_data_dir(root).close()  # the store takes it for good once the model has loaded


def check_id(document_id: str) -> str:
    """Return ``document_id`` if it is a well-formed id (32 hex digits), else refuse it."""
    if not isinstance(document_id, str) or not ID_PATTERN.fullmatch(document_id):
        raise InvalidRequestError("a document id is 32 lowercase hex digits")
    return document_id


UNNAMED = "pasted text"  # the name of pasted text sent without one, and of unnamed documents stored before


@dataclass
class DocumentRecord:
    id: str
    name: str | None
    kind: str
    created: float
    pages: int
    summary: dict  # compression figures and render settings

    @property
    def title(self) -> str:
        """The name shown for it: its own, else ``UNNAMED`` (pasted text stored before it was named so)."""
        return self.name or UNNAMED

    def to_dict(self) -> dict:
        return {"id": self.id, "name": self.name, "kind": self.kind, "created": self.created,
                "pages": self.pages, **self.summary}


@dataclass
class DocumentFiles:
    """What a document's folder holds, in memory until it is written."""

    manifest: dict  # manifest.json
    text: str  # source.txt
    pages: list[bytes]  # page_001.png ...

    def contents(self) -> dict[str, bytes]:
        """The folder's files by name, as written."""
        return {**{page_filename(n): data for n, data in enumerate(self.pages, 1)},
                "manifest.json": json.dumps(self.manifest, ensure_ascii=False, indent=1).encode(),
                "source.txt": self.text.encode("utf-8")}


@dataclass
class _Pending:
    """A document answered for whose files are not yet on disk."""

    record: DocumentRecord
    files: DocumentFiles
    content_hash: str | None
    sizes: dict[str, int]  # of the files, as record.json lists them
    written: Future | None = None


def hold_data_dir(root: Path) -> IO[str]:
    """Take the data folder for this process: an exclusive lock on ``<data>/glyphserve.lock`` (which names the
    holder's pid), released when the returned file is closed or the process ends, killed or not. A second server on
    the folder would take the first one's uploads in progress for a crash's leftovers and delete them."""
    handle = open(Path(root) / "glyphserve.lock", "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip()
        handle.close()
        raise ConfigError(f"the data folder {root} is in use by another glyphserve server"
                          f"{f' (pid {holder})' if holder else ''}: stop it, or give this one its own --data-dir")
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


class DocumentStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.docs = self.root / "docs"
        self._lock = threading.Lock()
        self._reserve_lock = threading.Lock()  # making and giving up the reserve file
        prepare_data_dir(self.root)
        with storage(f"lock the data folder {self.root}"):
            self._holder = hold_data_dir(self.root)
        with storage(f"open the document index in {self.root}"):
            self._db = sqlite3.connect(self.root / "index.sqlite3", check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(_SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(documents)")}
            if "content_hash" not in columns:  # a store written before de-duplication
                self._db.execute("ALTER TABLE documents ADD COLUMN content_hash TEXT")
            self._db.execute(_HASH_INDEX)
            self._recover()
        self._keep_reserve()
        self._pending: dict[str, _Pending] = {}  # reads of these are served from memory
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="glyphserve-store")

    def _recover(self) -> None:
        """Drop leftovers of interrupted writes and deletes (temporary folders, rows without a folder), index
        stored folders that were never indexed, and drop any other folder without a row."""
        for pattern in _LEFTOVERS:
            for leftover in self.docs.glob(pattern):
                self.remove_tree(leftover)  # a folder, or a record.json written for a rename
        with self._lock:
            ids = [row[0] for row in self._db.execute("SELECT id FROM documents")]
            for document_id in ids:
                if not (self.docs / document_id / "manifest.json").is_file():
                    self._db.execute("DELETE FROM documents WHERE id = ?", (document_id,))
        listed = set(ids)
        for folder in self.docs.iterdir():
            if ID_PATTERN.fullmatch(folder.name) and folder.name not in listed and not self._adopt(folder):
                shutil.rmtree(folder, ignore_errors=True)

    def _adopt(self, folder: Path) -> bool:
        """Index a stored folder whose row was never inserted (the server stopped after answering, before the
        writer indexed it); False when the folder is not a complete document."""
        try:
            saved = json.loads((folder / _RECORD).read_text(encoding="utf-8"))
            record = DocumentRecord(**{k: saved[k] for k in ("id", "name", "kind", "created", "pages", "summary")})
        except (OSError, ValueError, KeyError, TypeError):
            return False
        names = {"manifest.json", "source.txt", *(page_filename(n) for n in range(1, record.pages + 1))}
        sizes = saved.get("sizes")
        complete = (record.id == folder.name and isinstance(sizes, dict) and set(sizes) == names
                    and all(_size(folder / name) == size for name, size in sizes.items()))
        if complete:
            with self._lock:
                self._index(record, saved.get("content_hash"))
        return complete

    def _index(self, record: DocumentRecord, content_hash: str | None) -> None:
        """Insert a document's row (hold ``_lock``)."""
        self._db.execute(
            "INSERT INTO documents (id, name, kind, created, pages, summary, content_hash) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (record.id, record.name, record.kind, record.created, record.pages, json.dumps(record.summary),
             content_hash),
        )

    def close(self) -> None:
        """Finish writing the documents still in memory, then close the index."""
        self._writer.shutdown(wait=True)
        with self._lock:
            self._db.close()
        self._holder.close()

    def add(self, *, name: str | None, kind: str, summary: dict, files: DocumentFiles,
            content_hash: str | None = None) -> DocumentRecord:
        """Store a rendered document: its files written (not yet flushed) and its folder renamed into place, or a
        storage error; flushing and indexing follow off the caller's path, reads come from memory until then.
        ``content_hash`` (of the upload and its render settings) finds it again (``find``)."""
        record = DocumentRecord(uuid.uuid4().hex, name, kind, time.time(), len(files.pages), summary)
        staging, folder = self.docs / f".tmp-{record.id}", self.docs / record.id
        contents = files.contents()
        sizes = {filename: len(data) for filename, data in contents.items()}
        with storage("store the document"):
            room = os.statvfs(self.docs)
            if room.f_bavail * room.f_frsize < sum(sizes.values()) + 2**20:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.docs))
            try:
                staging.mkdir()
                for filename, data in contents.items():
                    write_file(staging / filename, data, durable=False)
                write_file(staging / _RECORD, _record_json(record, content_hash, sizes), durable=False)
                staging.rename(folder)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        pending = _Pending(record, files, content_hash, sizes)
        with self._lock:
            self._pending[record.id] = pending
            pending.written = self._writer.submit(self._persist, pending)
        return record

    def _persist(self, pending: _Pending) -> None:
        """Flush a stored document's files to disk and index it. A failure here loses nothing the server still
        runs with (the files are in the kernel's cache and served from memory; a restart indexes the folder)."""
        record = pending.record
        folder = self.docs / record.id
        try:
            for path in folder.iterdir():
                sync_folder(path)  # an fsync through a read-only descriptor: a file's too
            sync_folder(folder)
            sync_folder(self.docs)
        except OSError:
            logger.exception("document %s could not be flushed to disk; it stays in the kernel's cache", record.id)
        try:
            with self._lock:
                self._index(record, pending.content_hash)
                del self._pending[record.id]
        except sqlite3.Error:
            logger.exception("document %s could not be indexed now; it is served from memory, indexed at the "
                             "next start", record.id)

    def _in_memory(self, document_id: str) -> DocumentFiles | None:
        """The files of a document still being written (None once they are on disk)."""
        with self._lock:
            pending = self._pending.get(document_id)
        return pending.files if pending else None

    def _on_disk(self, document_id: str) -> None:
        """Wait until the document's files are on disk (at once when they already are)."""
        with self._lock:
            pending = self._pending.get(document_id)
        if pending is not None:
            pending.written.exception()

    def find(self, content_hash: str) -> DocumentRecord | None:
        """The stored document with this content hash, if any."""
        with self._lock, storage("read the document index"):
            for pending in self._pending.values():
                if pending.content_hash == content_hash:
                    return pending.record
            row = self._db.execute(
                "SELECT id, name, kind, created, pages, summary FROM documents WHERE content_hash = ? LIMIT 1",
                (content_hash,),
            ).fetchone()
        return None if row is None else DocumentRecord(*row[:5], json.loads(row[5]))

    def rename(self, document_id: str, name: str) -> DocumentRecord:
        self.get(document_id)
        with self._lock, storage(f"rename document {document_id}"):
            pending = self._pending.get(document_id)
            if pending is not None:  # its row, inserted later (or by a restart, from record.json), takes the new name
                renamed = dataclasses.replace(pending.record, name=name)
                # Beside the folder, then moved in: the writer may be flushing the folder's files meanwhile.
                staging = self.docs / f".tmp-record-{document_id}"
                write_file(staging, _record_json(renamed, pending.content_hash, pending.sizes), durable=False)
                staging.replace(self.docs / document_id / _RECORD)
                pending.record.name = name
            self._db.execute("UPDATE documents SET name = ? WHERE id = ?", (name, document_id))
        return self.get(document_id)

    def get(self, document_id: str) -> DocumentRecord:
        check_id(document_id)
        with self._lock, storage("read the document index"):
            if document_id in self._pending:
                return self._pending[document_id].record
            row = self._db.execute(
                "SELECT id, name, kind, created, pages, summary FROM documents WHERE id = ?", (document_id,)
            ).fetchone()
        if row is None:
            raise NotFoundError(f"no document with id {document_id} (deleted, or never stored)")
        return DocumentRecord(*row[:5], json.loads(row[5]))

    def list(self) -> list[DocumentRecord]:
        with self._lock, storage("read the document index"):
            rows = self._db.execute(
                "SELECT id, name, kind, created, pages, summary FROM documents ORDER BY created DESC"
            ).fetchall()
            pending = [p.record for p in self._pending.values()]
        records = {r.id: r for r in [DocumentRecord(*row[:5], json.loads(row[5])) for row in rows] + pending}
        return sorted(records.values(), key=lambda r: r.created, reverse=True)

    def count(self) -> int:
        with self._lock, storage("read the document index"):
            return self._db.execute("SELECT COUNT(*) FROM documents").fetchone()[0] + len(self._pending)

    def delete(self, document_id: str) -> list[str]:
        """Remove a document; the files that could not be removed (relative to the data folder), if any.
        When the folder cannot even be moved aside, nothing changes and the error says why."""
        self.get(document_id)
        self._on_disk(document_id)
        folder, aside = self.docs / document_id, self.docs / f".deleted-{document_id}"
        with storage(f"delete document {document_id}"):
            try:
                self._set_aside(document_id, folder, aside)
            except (sqlite3.Error, OSError) as exc:
                # A full disk: moving the folder aside (a longer name, perhaps a new directory block) or dropping
                # the row (the index's write-ahead log grows first) had no room. The reserve gives it some.
                if not (_disk_full(exc) and self._give_up_reserve()):
                    raise
                self._set_aside(document_id, folder, aside)
        failed = self.remove_tree(aside)
        self._keep_reserve()
        return failed

    def _set_aside(self, document_id: str, folder: Path, aside: Path) -> None:
        """Move a document's folder aside and drop its row, or neither."""
        if folder.exists():
            folder.rename(aside)
        try:
            with self._lock:
                self._db.execute("DELETE FROM documents WHERE id = ?", (document_id,))
                self._pending.pop(document_id, None)  # one the writer could not index is served from memory
        except BaseException:
            if aside.exists():
                aside.rename(folder)
            raise

    def _give_up_reserve(self) -> bool:
        """Delete the reserve file for the room it holds; False where there is none (whole) to give."""
        with self._reserve_lock:
            path = self.root / _RESERVE
            if _size(path) != RESERVE_BYTES:
                return False
            path.unlink(missing_ok=True)
        logger.warning("the disk holding %s is full: its reserve (%d MiB) was freed to delete a document",
                       self.root, RESERVE_BYTES >> 20)
        return True

    def _keep_reserve(self) -> None:
        """Make the reserve file where it is missing (best effort: on a full disk, after the next delete). Built
        under another name and renamed, so that a reserve is whole wherever it is seen."""
        with self._reserve_lock:
            path, building = self.root / _RESERVE, self.root / f"{_RESERVE}.tmp"
            if _size(path) == RESERVE_BYTES:
                return
            try:
                with open(building, "wb") as file:
                    try:  # blocks of its own (a sparse file would free none)
                        os.posix_fallocate(file.fileno(), 0, RESERVE_BYTES)
                    except OSError as exc:
                        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                            raise
                        file.write(bytes(RESERVE_BYTES))  # a file system that allocates no space ahead
                os.replace(building, path)
            except OSError:
                building.unlink(missing_ok=True)

    def remove_tree(self, path: Path) -> list[str]:
        """Delete a folder or file; what could not be deleted, relative to the data folder."""
        failed: list[str] = []

        def record(_function, failed_path, _exc_info):
            failed.append(str(Path(failed_path).relative_to(self.root)))

        if path.is_dir():
            shutil.rmtree(path, onerror=record)
        elif path.exists():
            try:
                path.unlink()
            except OSError:
                failed.append(str(path.relative_to(self.root)))
        return failed

    def folder(self, document_id: str) -> Path:
        """The document's folder. Its files are in place once ``add`` returned (flushed to disk or not): reads do
        not wait for the flush (fsyncs queue behind all the disk's writeback: seconds on a busy disk)."""
        self.get(document_id)
        return self.docs / document_id

    @contextmanager
    def reading(self, *document_ids: str) -> Iterator[None]:
        """Reads of documents' files; one that fails because a document was deleted meanwhile (its folder moved
        aside, its row about to go) is a 404."""
        try:
            with storage("read " + ", ".join(f"document {d}" for d in document_ids)):
                yield
        except StorageUnavailableError:
            for document_id in document_ids:
                if not (self.docs / document_id).exists():
                    raise NotFoundError(f"document {document_id} was deleted") from None
                self.get(document_id)
            raise

    def manifest(self, document_id: str) -> dict:
        self.get(document_id)
        files = self._in_memory(document_id)
        if files is not None:
            return files.manifest
        with self.reading(document_id):
            return json.loads((self.folder(document_id) / "manifest.json").read_text(encoding="utf-8"))

    def text(self, document_id: str) -> str:
        self.get(document_id)
        files = self._in_memory(document_id)
        if files is not None:
            return files.text
        with self.reading(document_id):
            return (self.folder(document_id) / "source.txt").read_text(encoding="utf-8")

    def layouts(self, document_id: str) -> list[PageLayout]:
        return [PageLayout.from_manifest(p) for p in self.manifest(document_id)["pages"]]

    def pages(self, document_id: str) -> list[Path]:
        """The page files of a document, in order."""
        record = self.get(document_id)
        folder = self.folder(document_id)
        return [folder / page_filename(n) for n in range(1, record.pages + 1)]

    def page_path(self, document_id: str, number: int) -> Path:
        """The page's file."""
        self._check_page(document_id, number)
        return self.folder(document_id) / page_filename(number)

    def page_bytes(self, document_id: str, number: int) -> bytes:
        """The page's PNG file; from memory while the document is being written."""
        return self.pages_bytes(document_id, [number])[0]

    def pages_bytes(self, document_id: str, numbers: list[int]) -> list[bytes]:
        """Pages' PNG files, the document's record read once (a question's pages read one by one looked their
        document up three times a page); from memory while the document is being written."""
        record = self.get(document_id)
        for number in numbers:
            self._check_page(document_id, number, record)
        files = self._in_memory(document_id)
        if files is not None:
            return [files.pages[n - 1] for n in numbers]
        folder = self.docs / document_id
        with self.reading(document_id):
            return [(folder / page_filename(n)).read_bytes() for n in numbers]

    def _check_page(self, document_id: str, number: int, record: DocumentRecord | None = None) -> None:
        record = record or self.get(document_id)
        if not 1 <= number <= record.pages:
            raise NotFoundError(f"document {document_id} has pages 1 to {record.pages}, not {number}")

