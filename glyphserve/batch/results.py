"""The results file: one JSON line per (document, question), durable and resumable.

Each line is flushed and fsynced as soon as it is written, so a crash loses at most the
items in flight. Reopening the file finds what is already done; a line torn by a crash
mid-write is cut off, and failures that may pass on a retry (server-side errors such as
out-of-memory, or every failure with ``retry_failed``) are dropped so they run again.
A file holding any other line (not a results file, or a hand-edited one) is refused untouched.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from glyphserve.errors import ConfigError

if TYPE_CHECKING:
    from glyphserve.batch.prefetch import Item, ItemError
    from glyphserve.engine import Answer

Key = tuple[str, str]


def record_key(record: dict[str, Any]) -> Key:
    return (record["id"], record["question"])


def item_record(item: Item, answer: Answer | None, error: ItemError | None) -> dict[str, Any]:
    """The results line of one (document, question): its answer, or the error that stopped it."""
    prepared = item.prepared
    timings = {**(dataclasses.asdict(answer.timings) if answer is not None else {}), **prepared.timings}
    return {
        "id": prepared.document.id,
        "question": item.question,
        "answer": answer.text if answer is not None else None,
        "thinking": answer.thinking if answer is not None else None,
        "pages": len(prepared.pages),
        "pages_used": answer.pages_used if answer is not None else None,
        "pages_shown": item.pages_shown if answer is not None else None,
        "vision_tokens": prepared.vision_tokens,
        "text_tokens": prepared.text_tokens,
        "prompt_tokens": answer.prompt_tokens if answer is not None else None,
        "new_tokens": answer.new_tokens if answer is not None else None,
        "finish_reason": answer.finish_reason if answer is not None else None,
        "timings": {name: round(seconds, 4) for name, seconds in timings.items()},
        "kind": prepared.kind,
        "error": error.to_dict() if error is not None else None,
    }


class ResultLog:
    """Append-only JSONL writer holding an exclusive lock on the file while open."""

    def __init__(self, path: str | Path, *, retry_failed: bool = False):
        self.path = Path(path)
        if self.path.is_dir():
            raise ConfigError(f"{self.path} is a folder: give the results file (e.g. {self.path / 'results.jsonl'})")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise ConfigError(f"cannot make the folder of the results file {self.path}: a file stands in its "
                              "path") from None
        except OSError as exc:
            raise ConfigError(f"cannot make the folder of the results file {self.path}: {exc.strerror}") from None
        self._created = not self.path.exists()  # a file this run made and left empty goes again at close
        self._file = _open_locked(self.path)
        self.done: dict[Key, dict[str, Any]] = {}
        self.torn_bytes = 0
        self.retrying = 0
        self._load(retry_failed)

    def _load(self, retry_failed: bool) -> None:
        self._file.seek(0)
        data = self._file.read()
        lines = data.split(b"\n")
        tail = lines.pop()  # what follows the last newline: b"" when the file ends with one
        if tail and _parse(tail) is None and _torn(tail):
            self.torn_bytes = len(tail)
        elif tail:
            lines.append(tail)  # a whole line that only lacks its newline (or a foreign one, refused below)
        records = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue  # spacing, not a row (gone if the file is rewritten)
            record = _parse(line)
            if record is None:
                self.close()
                raise ConfigError(
                    f"{self.path} is not a batch results file: line {number} is not a result row "
                    f"({_why_not(line)}); it was left as it is: give -o another file, or fix that line"
                )
            records.append((line, record))
        kept = []
        for line, record in records:
            if record.get("error") and (retry_failed or record["error"].get("retryable")):
                self.retrying += 1
                continue
            kept.append(line)
            self.done[record_key(record)] = record
        if len(kept) < len(lines) or self.torn_bytes:
            self._rewrite(kept)
        elif tail:
            self._file.write(b"\n")  # the last row's missing newline, so the next row starts a line of its own
            self._file.flush()
            os.fsync(self._file.fileno())

    def _rewrite(self, lines: list[bytes]) -> None:
        # Write a new file and rename it over the old one, so a crash leaves either.
        tmp = written_files(self.path)[1]
        with open(tmp, "wb") as out:
            out.write(b"".join(line + b"\n" for line in lines))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self._file.close()
        self._file = _open_locked(self.path)

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n"
        self._file.seek(0, os.SEEK_END)
        self._file.write(line)
        self._file.flush()
        os.fsync(self._file.fileno())
        self.done[record_key(record)] = record

    def close(self) -> None:
        if not self._file.closed:
            if self._created and os.fstat(self._file.fileno()).st_size == 0:  # (a run that failed before any row)
                self.path.unlink(missing_ok=True)
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()

    def __enter__(self) -> ResultLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def written_files(path: str | Path) -> tuple[Path, Path]:
    """The files a ResultLog at ``path`` writes: the results and the temporary file of a rewrite."""
    path = Path(path)
    return path, path.with_name(path.name + ".tmp")


def holds_results(path: str | Path) -> bool:
    """Whether ``path`` may be a results file this module wrote: absent, blank, or its first line a result row
    (whole, or torn by a crash). Anything else is someone's file: a ResultLog refuses it."""
    try:
        with open(path, "rb") as file:
            while True:
                line = file.readline(1 << 20)  # (a longer row is cut here, and still starts as a row)
                if not line:
                    return True
                if line.strip():
                    line = line.rstrip(b"\r\n")
                    return _parse(line) is not None or _torn(line)
    except FileNotFoundError:
        return True
    except OSError:
        return False  # unreadable: not known to be ours


def holds_parquet(path: str | Path) -> bool:
    """Whether ``path`` may be a table --parquet wrote: absent, empty, or a Parquet file (its magic bytes)."""
    try:
        with open(path, "rb") as file:
            head = file.read(4)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return head in (b"", b"PAR1")


def _open_locked(path: Path):
    try:
        file = open(path, "a+b")  # noqa: SIM115 (closed by ResultLog.close)
    except OSError as exc:
        raise ConfigError(f"cannot write the results file {path}: {exc.strerror}") from None
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.close()
        raise ConfigError(f"{path} is being written by another batch run") from None
    return file


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """Every complete, valid record of a results file (a torn last line is ignored)."""
    data = Path(path).read_bytes()
    complete = data.rpartition(b"\n")[0]
    return [r for r in (_parse(line) for line in complete.split(b"\n") if line) if r is not None]


def _parse(line: bytes) -> dict[str, Any] | None:
    """The result row ``line`` holds, or None: an object with string "id" and "question", and an "error"
    that is null or an object (a resume reads its "retryable")."""
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if (isinstance(record, dict) and isinstance(record.get("id"), str) and isinstance(record.get("question"), str)
            and isinstance(record.get("error"), dict | None)):
        return record
    return None


def _why_not(line: bytes) -> str:
    """Why ``line`` is not a result row, in a few words."""
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "not JSON"
    if not isinstance(record, dict):
        return "not a JSON object"
    missing = [key for key in ("id", "question") if not isinstance(record.get(key), str)]
    if missing:
        return f"no string {' or '.join(repr(key) for key in missing)}"
    return "its 'error' is neither null nor an object"


# Every line this module writes starts so (json.dumps of item_record, whose first key is "id").
_ROW_START = b'{"id": "'


def _torn(tail: bytes) -> bool:
    """Whether ``tail`` (text after the last newline, not a row) is a row cut off mid-write: anything else there
    (a file that is no results file) is no crash's doing, and not ours to cut."""
    return tail.startswith(_ROW_START) or _ROW_START.startswith(tail)


def write_parquet(results: str | Path, out: str | Path) -> int:
    """Every record of a results file as one Parquet table (nested timings and errors as structs; an empty one,
    such as the timings of a document that failed before rendering, as null: Parquet has no struct without
    fields); the row count."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError("--parquet needs pyarrow: pip install 'glyphserve[cluster]'") from None
    records = read_results(results)
    pq.write_table(pa.Table.from_pylist([_no_empty_structs(r) for r in records]), out)
    return len(records)


def _no_empty_structs(value):
    if isinstance(value, dict):
        return {key: _no_empty_structs(item) for key, item in value.items()} or None
    return [_no_empty_structs(item) for item in value] if isinstance(value, list) else value
