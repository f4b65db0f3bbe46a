"""What a batch run reads: the documents (folder, glob or JSONL manifest) and their questions."""

from __future__ import annotations

import glob
import json
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


def load_questions(path: str | Path) -> list[str]:
    """Questions from a text file (one per line) or a JSON list of strings."""
    file = Path(path)
    try:
        raw = file.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise NotFoundError(f"questions file not found: {file}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read questions file {file}: {exc}") from None
    if raw.lstrip().startswith("["):
        try:
            questions = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"questions file {file} is not a valid JSON list: {exc}") from None
        if not isinstance(questions, list) or not all(isinstance(q, str) for q in questions):
            raise ConfigError(f"questions file {file} must hold a JSON list of strings")
        _no_blank(questions, f"questions file {file}")
    else:
        questions = raw.splitlines()
    return _unique(q.strip() for q in questions)


def collect_documents(source: str, shared_questions: list[str] | None = None) -> list[BatchDocument]:
    """Expand INPUT (a folder, a glob, a single file or a ``.jsonl`` manifest) into documents.

    Folder and glob inputs take every regular, non-hidden file; their ids are the paths
    relative to the folder (or as the glob matched them), so reruns find the same ids.
    Manifest lines carry their own questions; ``shared_questions`` are added to every document.
    """
    shared = _unique(shared_questions or [])
    path = Path(source)
    if path.is_file() and path.suffix.lower() == ".jsonl":
        documents = _read_manifest(path, shared)
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path)))
        documents = [BatchDocument(p.relative_to(path).as_posix(), tuple(shared), path=p) for p in files]
    elif path.is_file():
        documents = [BatchDocument(path.name, tuple(shared), path=path)]
    else:
        matches = sorted(glob.glob(source, recursive=True))
        files = [Path(m) for m in matches if Path(m).is_file()]  # glob already skips dot-files
        if not matches and not glob.has_magic(source):
            raise NotFoundError(f"input not found: {source}")
        documents = [BatchDocument(p.as_posix(), tuple(shared), path=p) for p in files]
    if not documents:
        raise NotFoundError(f"no documents found in {source}")
    if not any(doc.questions for doc in documents):
        raise ConfigError("no questions: pass --questions FILE or give each manifest line a 'questions' list")
    return documents


# Bad manifest lines reported at once (a manifest with several needed as many runs to fix, one line each).
MANIFEST_ERRORS_SHOWN = 10


def _read_manifest(path: Path, shared: list[str]) -> list[BatchDocument]:
    documents: list[BatchDocument] = []
    seen: set[str] = set()
    errors: list[str] = []
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read manifest {path}: {exc}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            documents.append(_manifest_entry(line, path, shared, seen))
        except ConfigError as exc:
            errors.append(f"line {number}: {exc}")
    if errors:
        more = len(errors) - MANIFEST_ERRORS_SHOWN
        raise ConfigError(f"manifest {path} has {len(errors)} bad line{'s' * (len(errors) > 1)}: "
                          + "; ".join(errors[:MANIFEST_ERRORS_SHOWN]) + (f"; and {more} more" if more > 0 else ""))
    return documents


def _manifest_entry(line: str, path: Path, shared: list[str], seen: set[str]) -> BatchDocument:
    """One manifest line as a document (``seen``: the ids so far, this one added)."""
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
    return BatchDocument(doc_id, tuple(_unique([*(q.strip() for q in questions), *shared])), resolved, text)


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
