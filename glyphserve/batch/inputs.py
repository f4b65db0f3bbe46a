"""What a batch run reads: the documents (folder, glob or JSONL manifest) and their questions."""

from __future__ import annotations

import csv
import glob
import io
import json
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from glyphserve.errors import ConfigError, NotFoundError


@dataclass(frozen=True)
class BatchDocument:
    """One document of a batch run: a file or inline text, and the questions to ask it."""

    id: str
    questions: tuple[str, ...]
    path: Path | None = None
    text: str | None = None


def load_questions(path: str | Path, *, note: Callable[[str], None] | None = None) -> list[str]:
    """Questions from a file: a JSON list (of strings, or of objects with a "question"), JSON Lines (an object
    with a "question" per line; a .jsonl file, or any whose first line is such an object), a .csv or .tsv table
    with a ``question`` column, or else plain text, one question per line. Any text encoding, as documents.

    A question the file repeats (alike once stripped) is kept once: a results row is one document and one
    question, so two would be one row; ``note`` is told how many were merged."""
    file = Path(path)
    raw = _read_text(file, "questions file")
    where = f"questions file {file}"
    suffix = file.suffix.lower()
    first = next((line.strip() for line in raw.splitlines() if line.strip()), "")
    if suffix in (".csv", ".tsv"):
        questions = _csv_questions(raw, "\t" if suffix == ".tsv" else ",", where)
    elif suffix in (".jsonl", ".ndjson") or (first.startswith("{") and _json_object(first)):
        questions = _jsonl_questions(raw, where)
    elif suffix == ".json" or first.startswith("["):
        try:
            listed = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where} is not valid JSON: {exc}") from None
        if not isinstance(listed, list):
            raise ConfigError(f"{where} must hold a JSON list of questions")
        questions = [_question(entry, f"{where}, item {n}") for n, entry in enumerate(listed, start=1)]
        _no_blank(questions, where)
    else:
        questions = raw.splitlines()  # (blank lines are spacing)
    questions = _merged(questions, where, note)
    if not questions:
        raise ConfigError(f"{where} holds no questions")
    return questions


def _read_text(file: Path, what: str) -> str:
    """A question file's or manifest's text, decoded as documents are (UTF-8, UTF-16 or a legacy code page)."""
    from glyphserve.ingest.textenc import decode_text

    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise NotFoundError(f"{what} not found: {file}") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {file} is a folder: give a file") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {file}: {exc.strerror}") from None
    decoded = decode_text(data)
    if decoded is None:
        raise ConfigError(f"{what} {file} is not a text file")
    return decoded.text


def _json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def _question(entry: object, where: str) -> str:
    """A listed question: a string, or an object's "question" string."""
    if isinstance(entry, dict):
        entry = entry.get("question")
    if not isinstance(entry, str):
        raise ConfigError(f"{where}: a question is a string or an object with a string \"question\"")
    return entry


def _jsonl_questions(raw: str, where: str) -> list[str]:
    questions = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}, line {number}: not valid JSON: {exc}") from None
        questions.append(_question(entry, f"{where}, line {number}"))
        if not questions[-1].strip():
            raise ConfigError(f"{where}, line {number}: the question is blank")
    return questions


def _csv_questions(raw: str, delimiter: str, where: str) -> list[str]:
    rows = csv.reader(io.StringIO(raw), delimiter=delimiter)
    header = [name.strip().lower() for name in next(rows, [])]
    if "question" not in header:
        raise ConfigError(f"{where} needs a header row with a 'question' column "
                          f"(its first row: {delimiter.join(header) or 'empty'})")
    column = header.index("question")
    questions = []
    try:
        for row in rows:
            if not any(cell.strip() for cell in row):
                continue  # spacing
            if len(row) <= column or not row[column].strip():
                raise ConfigError(f"{where}, line {rows.line_num}: the question is blank")
            questions.append(row[column])
    except csv.Error as exc:
        raise ConfigError(f"{where}, line {rows.line_num}: {exc}") from None
    return questions


def collect_documents(source: str, shared_questions: list[str] | None = None,
                      exclude: Iterable[str | Path] = (), *,
                      note: Callable[[str], None] | None = None) -> list[BatchDocument]:
    """Expand INPUT (a folder, a glob, a single file or a ``.jsonl`` manifest) into documents.

    Folder and glob inputs take every regular, non-hidden file but those in ``exclude`` (the run's own
    outputs, which may lie among its inputs); their ids are the paths relative to the folder (or as the glob
    matched them), so reruns find the same ids. Manifest lines carry their own questions; ``shared_questions``
    are added to every document. A question a document would be asked twice (a manifest line repeating one, or
    listing one of the shared ones) is asked once, ``note`` told how often that happened.
    """
    shared = _unique(shared_questions or [])
    excluded = {Path(p).resolve() for p in exclude}
    path = Path(source)
    left_out: list[Path] = []
    if path.is_file() and path.suffix.lower() == ".jsonl":
        documents = _read_manifest(path, shared, note)
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path)))
        left_out = [p for p in files if p.resolve() in excluded]
        documents = [BatchDocument(p.relative_to(path).as_posix(), tuple(shared), path=p) for p in files
                     if p not in left_out]
    elif path.is_file():
        documents = [BatchDocument(path.name, tuple(shared), path=path)]
    else:
        matches = sorted(glob.glob(source, recursive=True))
        # (glob already skips dot-files)
        files = [Path(m) for m in matches if Path(m).is_file()]
        if not matches and not glob.has_magic(source):
            raise NotFoundError(f"input not found: {source}")
        left_out = [p for p in files if p.resolve() in excluded]
        documents = [BatchDocument(p.as_posix(), tuple(shared), path=p) for p in files if p not in left_out]
    if not documents:
        besides = f" (besides this run's own output {', '.join(map(str, left_out))})" if left_out else ""
        raise NotFoundError(f"no documents found in {source}{besides}")
    if not any(doc.questions for doc in documents):
        raise ConfigError("no questions: pass --questions FILE or give each manifest line a 'questions' list")
    return documents


# Bad manifest lines reported at once (a manifest with several needed as many runs to fix, one line each).
MANIFEST_ERRORS_SHOWN = 10


def _read_manifest(path: Path, shared: list[str], note: Callable[[str], None] | None) -> list[BatchDocument]:
    documents: list[BatchDocument] = []
    seen: set[str] = set()
    errors: list[str] = []
    merged = 0  # questions a line asks twice (in its list, or its list and the shared questions)
    first: str | None = None  # where the first was
    lines = _read_text(path, "manifest").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            document, asked = _manifest_entry(line, path, shared, seen)
        except ConfigError as exc:
            errors.append(f"line {number}: {exc}")
            continue
        documents.append(document)
        if asked > len(document.questions):
            merged += asked - len(document.questions)
            first = first or f"line {number}"
    if merged and not errors and note is not None:
        note(f"manifest {path}: {merged} question{'s' * (merged > 1)} a line asks twice (its 'questions' listing "
             f"one twice, or one that --questions adds too; first on {first}) asked once for its document: a "
             "result row is one document and one question")
    if errors:
        more = len(errors) - MANIFEST_ERRORS_SHOWN
        raise ConfigError(f"manifest {path} has {len(errors)} bad line{'s' * (len(errors) > 1)}: "
                          + "; ".join(errors[:MANIFEST_ERRORS_SHOWN]) + (f"; and {more} more" if more > 0 else ""))
    return documents


def _manifest_entry(line: str, path: Path, shared: list[str], seen: set[str]) -> tuple[BatchDocument, int]:
    """One manifest line as a document (``seen``: the ids so far, this one added), and how many questions it asks
    before the repeats are merged."""
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"not valid JSON: {exc}") from None
    if not isinstance(entry, dict):
        raise ConfigError("must be a JSON object")
    doc_path, text = entry.get("path"), entry.get("text")
    if (doc_path is None) == (text is None):
        raise ConfigError("needs exactly one of 'path' or 'text'")
    if not isinstance(doc_path or text, str):
        raise ConfigError("'path'/'text' must be a string")
    questions = entry.get("questions", [])
    if not isinstance(questions, list) or not all(isinstance(q, str) for q in questions):
        raise ConfigError("'questions' must be a list of strings")
    _no_blank(questions, "'questions'")
    doc_id = entry.get("id", doc_path)
    if not isinstance(doc_id, str) or not doc_id:
        raise ConfigError("needs a string 'id'")
    if doc_id in seen:
        raise ConfigError(f"duplicate id {doc_id!r}")
    seen.add(doc_id)
    resolved = None
    if doc_path is not None:
        resolved = Path(doc_path)
        if not resolved.is_absolute():
            resolved = path.parent / resolved
    asked = [*(q.strip() for q in questions), *shared]
    return BatchDocument(doc_id, tuple(_unique(asked)), resolved, text), len(asked)


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _no_blank(questions: list[str], where: str) -> None:
    """A listed question that is blank is a mistake to report, not one to drop (a text file's blank lines are
    only spacing)."""
    blank = [i for i, q in enumerate(questions, start=1) if not q.strip()]
    if blank:
        raise ConfigError(f"{where}: question {', '.join(map(str, blank))} of {len(questions)} is blank")


def _unique(items) -> list[str]:
    return list(dict.fromkeys(item for item in items if item))


def _merged(questions: list[str], where: str, note: Callable[[str], None] | None) -> list[str]:
    """``questions`` stripped, blanks dropped and each kept once (at its first place); ``note`` told of repeats."""
    stripped = [q.strip() for q in questions if q.strip()]
    unique = _unique(stripped)
    if len(unique) < len(stripped) and note is not None:
        counts = Counter(stripped)
        repeated = next(q for q in unique if counts[q] > 1)
        merged = len(stripped) - len(unique)
        note(f"{where} repeats {merged} question{'s' * (merged > 1)} (the first: {_shown(repeated)}): each is "
             "asked once per document, as a result row is one document and one question")
    return unique


def _shown(question: str, limit: int = 60) -> str:
    return repr(question if len(question) <= limit else question[: limit - 1] + "…")
