"""PDF and DOCX parsing, in this process or in a child process killed past its wall-clock budget.

With ``IngestLimits.timeout`` set, each file is parsed by a fresh child process: a slow or hostile file
never holds a lock or a thread of the caller longer than the budget (PDFium is single-threaded; a child
each lets several files be read at once), and whatever memory the parser took goes back to the system
when the child exits. One spare child is kept started, its imports done, so a file does not wait for
Python to start. The child's address space (``max_parser_memory``) and CPU time are capped too, so one
left running by a parent killed outright still ends. The child answers in a framed format, never pickle (a
parser subverted by a crafted file still cannot run code in the caller): a JSON line for each part as soon as it
is read (a long text in several), a page image's raw pixels after its line, then a last line (the end, or an
error); what the child declares is held to what the file's limits allow before the caller allocates for it. Each page image is
made into what the document keeps of it (``keep``) as it arrives, so neither process holds the pixels of every
page at once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from glyphserve import errors
from glyphserve.errors import CorruptFileError, GlyphserveError, IngestTimeoutError
from glyphserve.ingest.document import PART_SEPARATOR, ImagePart, TextPart
from glyphserve.ingest.limits import MAX_IMAGE_SIDE, IngestLimits

Parts = list[TextPart | ImagePart]
Keep = Callable[[ImagePart], ImagePart]  # what a document keeps of a page image, made as the image is read
KINDS = {"pdf": "PDF", "docx": "Word document"}
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the glyphserve package
_CHILD = "from glyphserve.ingest.parsing import child_main; child_main()"
_FRAME_BYTES = 1 << 16  # a line's JSON around its text: an image's shape, an error's message
# A text part goes in lines of at most this many characters: what the caller reads and decodes of one line is
# bounded by it (lines of a whole text, up to 122 MB, took a hostile parser's caller 1 GiB to refuse).
_TEXT_CHARS = 1 << 20
_LINE_BYTES = 6 * _TEXT_CHARS + _FRAME_BYTES  # 6 bytes a character at most: a control escaped as \uXXXX
_MESSAGE_CHARS = 2000  # of a parser's error message passed on
_MOST_SIDE = MAX_IMAGE_SIDE + 1  # a page image's side, as PDFium rounds the scaled page


def parse_file(kind: str, data: bytes, label: str, limits: IngestLimits, keep: Keep | None = None) -> Parts:
    """The parts of a "pdf" or "docx" file, each page image passed through ``keep`` as it is read (one at a time);
    a :class:`GlyphserveError` for anything wrong with it."""
    if limits.timeout is None:
        return [_kept(part, keep) for part in read_parts(kind, data, label, limits)]
    return _CHILDREN.parse(kind, data, label, limits, keep)


def read_parts(kind: str, data: bytes, label: str, limits: IngestLimits) -> Iterator[TextPart | ImagePart]:
    """Parse in this process, each part as soon as it is read; any failure that is not already a user error means
    a damaged file."""
    from glyphserve.ingest.pdf import read_pdf
    from glyphserve.ingest.word import read_docx

    try:
        if kind == "pdf":
            yield from read_pdf(data, label, limits)
        else:
            yield TextPart(read_docx(data, label, limits))
    except (GlyphserveError, MemoryError):
        raise
    except Exception as exc:  # parsers fail in many ways on damaged input
        raise CorruptFileError(
            f"{label} looks like a {KINDS[kind]} but could not be read (damaged or truncated): "
            f"{type(exc).__name__}: {str(exc)[:200]}"
        ) from exc


def _kept(part: TextPart | ImagePart, keep: Keep | None) -> TextPart | ImagePart:
    return keep(part) if keep is not None and isinstance(part, ImagePart) else part


class _Children:
    """Starts parser processes, one per file, keeping one spare started."""

    def __init__(self):
        self._lock = threading.Lock()
        self._spare: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(_PACKAGE_ROOT),
                                                                          os.environ.get("PYTHONPATH")))),
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        return subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, env=env, start_new_session=True)

    def _take(self) -> subprocess.Popen:
        with self._lock:
            child, self._spare = self._spare, None
            if child is None or child.poll() is not None:
                child = self._start()
            self._spare = self._start()
        return child

    def close(self) -> None:
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is not None:
            spare.kill()
            spare.wait()

    def parse(self, kind: str, data: bytes, label: str, limits: IngestLimits, keep: Keep | None) -> Parts:
        child = self._take()
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            child.kill()

        timer = threading.Timer(limits.timeout, expire)
        timer.start()
        answer = None
        try:
            header = json.dumps({"kind": kind, "label": label, "size": len(data), "limits": _limits_dict(limits)})
            try:
                child.stdin.write(header.encode() + b"\n")
                child.stdin.write(data)
                child.stdin.close()
                answer = _read_answer(child.stdout, keep, limits)
            except Exception:  # a garbled or hostile answer (nested past the stack, Infinity as a size, ...)
                answer = None
        finally:
            timer.cancel()
            if child.poll() is None and (answer is None or answer.error is not None):
                child.kill()
            child.stdout.close()
            child.wait()
        if expired.is_set():
            raise _timeout_error(label, limits)
        if answer is None:
            raise _crash_error(child.returncode, kind, label, limits)
        if answer.error is not None:
            raise _error_from(answer.error, kind, label)
        return answer.parts


def _limits_dict(limits: IngestLimits) -> dict:
    return {name: getattr(limits, name) for name in limits.__dataclass_fields__}


@dataclass
class _Answer:
    """What a parser child sent: its parts, or the error it reports."""

    parts: Parts
    error: dict | None = None


def _read_answer(stream, keep: Keep | None, limits: IngestLimits) -> _Answer:
    """The child's parts up to its last line, each page image passed through ``keep`` as it arrives, before the
    next one is read. What the child declares is held to what an honest parser could send under ``limits`` before
    anything is allocated for it (a parser subverted by a crafted file could declare anything): a ``ValueError``
    past that, as for a garbled answer."""
    parts: Parts = []
    pieces: list[str] = []  # of a text part sent in several lines
    characters = images = 0
    most_characters = _most_characters(limits)
    while True:
        line = stream.readline(_LINE_BYTES)
        if not line.endswith(b"\n"):
            raise ValueError("the parser's answer ended early, or sent a line longer than its limits allow")
        frame = json.loads(line.decode("utf-8", "surrogatepass"), parse_constant=_no_constant)
        if "error" in frame:
            return _Answer([], frame["error"])
        if "end" in frame:
            return _Answer(parts)
        if len(parts) >= limits.max_pdf_pages:  # a PDF's text pages merge between scans: at most a part a page
            raise ValueError("the parser sent more parts than its file has pages")
        if "text" in frame:
            text = frame["text"]
            if not isinstance(text, str) or len(text) > _TEXT_CHARS:
                raise ValueError("the parser sent a text line it cannot have")
            characters += len(text)
            if characters > most_characters:
                raise ValueError("the parser sent more text than its limits allow")
            pieces.append(text)
            if not frame.get("more"):
                parts.append(TextPart("".join(pieces)))
                pieces = []
        else:
            height, width = (int(v) for v in frame["image"])
            images += 1
            if images > limits.max_scan_pages or not (0 < height <= _MOST_SIDE and 0 < width <= _MOST_SIDE):
                raise ValueError("the parser sent more or larger page images than its limits allow")
            parts.append(_kept(ImagePart(_read_pixels(stream, height, width), int(frame["page"])), keep))


def _most_characters(limits: IngestLimits) -> int:
    """Text an honest parser sends at most: ``max_characters`` (a DOCX's separators counted in them), and the
    blank line a PDF's text puts between its pages."""
    return limits.max_characters + len(PART_SEPARATOR) * limits.max_pdf_pages


def _no_constant(name: str) -> None:
    raise ValueError(f"the parser sent {name}")


def _read_pixels(stream, height: int, width: int) -> np.ndarray:
    image = np.empty((height, width, 3), dtype=np.uint8)
    view = memoryview(image).cast("B")
    filled = 0
    while filled < len(view):
        read = stream.readinto(view[filled:])
        if not read:
            raise ValueError("the parser's answer ended early")
        filled += read
    return image


_ERROR_TYPES = {cls.__name__: cls for cls in vars(errors).values()
                if isinstance(cls, type) and issubclass(cls, GlyphserveError)}


def _error_from(error: Any, kind: str, label: str) -> GlyphserveError:
    cls = _ERROR_TYPES.get(error.get("type")) if isinstance(error, dict) else None
    if cls is None or not isinstance(error.get("message"), str):
        return CorruptFileError(f"{label} looks like a {KINDS[kind]} but could not be read")
    return cls(error["message"][:_MESSAGE_CHARS])


def _timeout_error(label: str, limits: IngestLimits) -> IngestTimeoutError:
    return IngestTimeoutError(
        f"reading {label} took longer than this server's {limits.timeout:g} s budget (--ingest-timeout); "
        "split it into smaller files"
    )


def _crash_error(returncode: int | None, kind: str, label: str, limits: IngestLimits) -> GlyphserveError:
    if returncode == -signal.SIGXCPU:  # its CPU time ran out before the wall clock did
        return _timeout_error(label, limits)
    # Out of address space PDFium aborts or faults rather than failing an allocation cleanly.
    return CorruptFileError(
        f"{label} looks like a {KINDS[kind]} but could not be read: the parser stopped (a damaged file, or one "
        "that needs more memory than this server allows, --max-parser-memory-mb)"
    )


_CHILDREN = _Children()


def shutdown() -> None:
    """Stop the spare parser process (a new one starts with the next file)."""
    _CHILDREN.close()


# -- the child ------------------------------------------------------------------------------


def child_main() -> None:
    """Read one request from stdin, answer on stdout, exit."""
    import resource

    from glyphserve.ingest import pdf, word  # noqa: F401 (imported before the request: the spare's head start)

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    line = stdin.readline()
    if not line:
        return  # the parent went away before giving a file
    request = json.loads(line)
    limits = IngestLimits(**request["limits"])
    used = resource.getrusage(resource.RUSAGE_SELF)
    cpu = int(used.ru_utime + used.ru_stime + limits.timeout) + 2
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    if limits.max_parser_memory is not None:
        resource.setrlimit(resource.RLIMIT_AS, (limits.max_parser_memory, limits.max_parser_memory))
    data = stdin.read(request["size"])
    try:
        for part in read_parts(request["kind"], data, request["label"], limits):
            _send(stdout, part)
    except GlyphserveError as exc:
        last = {"error": {"type": type(exc).__name__, "message": exc.message}}
    except MemoryError:
        last = {"error": {"type": "FileTooLargeError", "message": (
            f"reading {request['label']} needs more memory than this server allows for one file "
            "(--max-parser-memory-mb); split it into smaller files")}}
    else:
        last = {"end": True}
    _send_line(stdout, last)
    stdout.flush()


def _send(stream, part: TextPart | ImagePart) -> None:
    """One part of the answer, at once: its line, then a page image's pixels."""
    if isinstance(part, TextPart):
        text = part.text
        for at in range(0, len(text), _TEXT_CHARS):
            _send_line(stream, {"text": text[at : at + _TEXT_CHARS], "more": at + _TEXT_CHARS < len(text)})
        if not text:
            _send_line(stream, {"text": ""})
    else:
        image = np.ascontiguousarray(part.image, dtype=np.uint8)
        _send_line(stream, {"image": list(image.shape[:2]), "page": part.source_page})
        stream.write(memoryview(image).cast("B"))
    stream.flush()


def _send_line(stream, frame: dict) -> None:
    stream.write(json.dumps(frame, ensure_ascii=False).encode("utf-8", "surrogatepass") + b"\n")
