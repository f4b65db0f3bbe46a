"""The results file: one JSON line per (document, question), durable and resumable.

Each line is flushed and fsynced as soon as it is written, so a crash loses at most the
items in flight. Reopening the file finds what is already done; a line torn by a crash
mid-write is cut off, and failures that may pass on a retry (server-side errors such as
out-of-memory, or every failure with ``retry_failed``) are dropped so they run again.
A file holding any other line (not a results file, or a hand-edited one) is refused untouched.

Each row also says what answered it (``answered_by``: an ``Answerer``). A resume whose answerer differs from
the rows' is refused, untouched, unless mixing is allowed: a rerun skips what is done, so otherwise one file
could end up holding answers of two models or settings that nothing tells apart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from glyphserve.errors import ConfigError

if TYPE_CHECKING:
    from glyphserve.batch.prefetch import Item, ItemError
    from glyphserve.engine import Answer

Key = tuple[str, str]


@dataclasses.dataclass(frozen=True)
class Answerer:
    """What answers a run's questions, as its rows record it: who (the backend and its model) and the settings
    that change an answer. Settings that do not apply to the backend are None: the extractive answers read the
    text, whatever the model flags say. Left out, as they change no answer but by rounding (as the batch size
    does): the dtype, the device and the caches."""

    backend: str  # local, openai or extractive
    # local: the folder (absolute) or Hub id given, or RANDOM_WEIGHTS with the architecture; openai: the name the
    # servers answer as (--remote-model, or what their /v1/models names), several joined by ", "
    model: str | None = None
    quantize: str | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    ignore_eos: bool | None = None
    max_context: int | None = None  # --max-model-len as given (None: the model's, or the servers')
    page_selection: str | None = None
    # How pages are rendered, for every backend: the pages a model reads, and those an extractive answer cites.
    preset: str | None = None
    dpi: float | None = None
    newline: str | None = None

    RANDOM_WEIGHTS = "{} (random weights)"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, recorded: dict[str, Any]) -> Answerer:
        """A row's answerer (fields it lacks as None; fields a later glyphserve may add are not compared; a value
        no run writes, such as a list in a hand-edited row, as its JSON text, which no run's equals)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value if isinstance(value, str | int | float | bool | None) else json.dumps(value)
                      for key, value in recorded.items() if key in names})

    def differences(self, other: Answerer) -> tuple[str, str]:
        """How this answerer and ``other`` differ, as the batch flags of each: the backend and model when those
        differ (the other settings then mean other things), else each setting that differs."""
        if (self.backend, self.model) != (other.backend, other.model):
            names = ["backend", "model"]
        else:
            names = [f.name for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]
        return self._flags(names), other._flags(names)

    def flags(self) -> str:
        """The flags of a batch command that answers so (those set to something other than unset)."""
        return self._flags([f.name for f in dataclasses.fields(self)
                            if f.name in ("backend", "model") or getattr(self, f.name) not in (None, False)])

    def _flags(self, names: list[str]) -> str:
        words = []
        for name in names:
            value = getattr(self, name)
            if name == "model":
                if value is None:
                    continue
                random = self.RANDOM_WEIGHTS.format("")
                flag = ("--remote-model" if self.backend == "openai"
                        else "--random-weights" if value.endswith(random) else "--model")
                words.append(f"{flag} {value.removesuffix(random)}")
                continue
            flag = _FLAGS[name]
            if value is None or value is False:
                words.append(f"no {flag}")
            elif value is True:
                words.append(flag)
            else:
                words.append(f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}")
        return " ".join(words) if words else "the defaults"


# Each setting's batch flag (glyphserve.batch.commands).
_FLAGS = {"backend": "--backend", "quantize": "--quantize", "max_new_tokens": "--max-new-tokens",
          "temperature": "--temperature", "top_p": "--top-p", "seed": "--seed", "ignore_eos": "--ignore-eos",
          "max_context": "--max-model-len", "page_selection": "--page-selection", "preset": "--preset",
          "dpi": "--dpi", "newline": "--newline"}


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
    """Append-only JSONL writer holding an exclusive lock on the file while open.

    With an ``answerer`` each row appended records it, and a file whose rows another answerer wrote is refused
    (untouched, before anything runs) unless ``allow_mixed``; ``others`` then counts those rows by answerer.
    Rows that record none (written before glyphserve recorded it) are not compared: ``unrecorded`` counts them.
    ``answerer`` may be a function giving it, when knowing it takes work (asking servers their model's name):
    it is called once the file is known to hold results, so a file that is refused is refused first.
    """

    def __init__(self, path: str | Path, *, retry_failed: bool = False,
                 answerer: Answerer | Callable[[], Answerer] | None = None, allow_mixed: bool = False):
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
        self._answerer = answerer
        self.answerer: Answerer | None = None  # (known once the file is read)
        self.others: Counter[Answerer] = Counter()
        self.unrecorded = 0
        self._load(retry_failed, allow_mixed)

    def _load(self, retry_failed: bool, allow_mixed: bool) -> None:
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
        if self._answerer is not None:
            try:
                self.answerer = self._answerer() if callable(self._answerer) else self._answerer
            except BaseException:
                self.close()
                raise
            self._compare_answerers(allow_mixed)
        if len(kept) < len(lines) or self.torn_bytes:
            self._rewrite(kept)
        elif tail:
            self._file.write(b"\n")  # the last row's missing newline, so the next row starts a line of its own
            self._file.flush()
            os.fsync(self._file.fileno())

    def _compare_answerers(self, allow_mixed: bool) -> None:
        """Count the kept rows answered otherwise than ``answerer`` (and those that do not say), refusing the file
        when there are any and mixing is not allowed."""
        for record in self.done.values():
            recorded = record.get("answered_by")
            if not isinstance(recorded, dict):
                self.unrecorded += 1
            elif (other := Answerer.from_dict(recorded)) != self.answerer:
                self.others[other] += 1
        if not self.others or allow_mixed:
            return
        self.close()
        rows = sum(self.others.values())
        shown = [f"{count} by {theirs}, where this run has {ours}"
                 for other, count in self.others.most_common(MIXES_SHOWN)
                 for theirs, ours in [other.differences(self.answerer)]]
        more = len(self.others) - MIXES_SHOWN
        raise ConfigError(
            f"{self.path} holds {rows} row{'s' * (rows > 1)} answered otherwise than this run answers: "
            + "; ".join(shown) + (f"; and {more} more answerers" if more > 0 else "")
            + ". Resuming would mix their answers and this run's in one file: give -o another file for this run's "
            "answers, or rerun with the file's flags to finish it; --allow-mixed adds them anyway (each row records "
            "what answered it, in \"answered_by\")"
        )

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
        if self.answerer is not None:
            record = {**record, "answered_by": self.answerer.to_dict()}
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


# Answerers other than the run's named in the refusal (a file mixed with --allow-mixed may hold several).
MIXES_SHOWN = 3


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
    fields); the row count. Its columns are every field of any row (one that a row lacks, such as the
    ``answered_by`` of a row from before it was recorded, null there). The table is written beside ``out`` and
    renamed over it, so a failed write leaves any earlier table whole."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError("--parquet needs pyarrow: pip install 'glyphserve[cluster]'") from None
    records = [_no_empty_structs(r) for r in read_results(results)]
    columns = list(dict.fromkeys(key for record in records for key in record))  # (from_pylist reads the first row's)
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({key: [record.get(key) for record in records] for key in columns}), tmp)
        os.replace(tmp, out)
    except (OSError, pa.ArrowException) as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise ConfigError(f"cannot write the table {out}: {getattr(exc, 'strerror', None) or exc}") from None
    return len(records)


def _no_empty_structs(value):
    if isinstance(value, dict):
        return {key: _no_empty_structs(item) for key, item in value.items()} or None
    return [_no_empty_structs(item) for item in value] if isinstance(value, list) else value
