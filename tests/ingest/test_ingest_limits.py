"""Limits checked before (or while) the work they bound, on hostile files built by hand, and parsing in child
processes that are killed past their budget."""

from __future__ import annotations

import threading
import weakref

import numpy as np
import pytest

from glyphserve.bench import hostile_files
from glyphserve.errors import (
    CorruptFileError,
    EmptyDocumentError,
    FileTooLargeError,
    IngestTimeoutError,
    TooManyPagesError,
)
from glyphserve.ingest import ImagePart, IngestLimits, TextPart, clean_filename, clean_name, ingest_bytes

ISOLATED = IngestLimits(timeout=30)
WHITE_BOX = b"1 1 1 rg 0 0 612 792 re f"  # drawn, so the page must be rendered to see it is blank


def test_docx_paragraphs_are_counted_while_the_xml_streams():
    data = hostile_files.docx_of_paragraphs(8)  # ~250,000 paragraphs in a ~25 KB file
    with pytest.raises(FileTooLargeError, match="more than 1,000 paragraphs.*--max-docx-paragraphs"):
        ingest_bytes(data, "many.docx", limits=IngestLimits(max_paragraphs=1000))
    text = "<w:p><w:r><w:t>abcdefghij</w:t></w:r></w:p>"
    with pytest.raises(FileTooLargeError, match="more than 5,000 characters.*--max-characters"):
        ingest_bytes(hostile_files.docx_of_paragraphs(1, text), "long.docx", limits=IngestLimits(max_characters=5000))


def test_a_declared_size_over_the_limit_is_refused_without_inflating():
    data = hostile_files.docx_of_paragraphs(250)  # 250 MiB of XML in ~0.8 MB
    with pytest.raises(FileTooLargeError, match="unpacks to more than 128 MiB.*--max-unpacked-mb"):
        ingest_bytes(data, "bomb.docx")


def test_a_member_inflating_past_its_declared_size_stops_there():
    data = hostile_files.docx_with_lying_size(64, declared=1000)  # declares 1,000 bytes, holds 64 MiB
    with pytest.raises(CorruptFileError, match="CRC"):
        ingest_bytes(data, "liar.docx")


def test_dtds_and_oversized_directories_are_refused():
    with pytest.raises(CorruptFileError, match="^'laughs.docx': its XML declares a DTD"):
        ingest_bytes(hostile_files.docx_with_entity_expansion(), "laughs.docx")
    with pytest.raises(FileTooLargeError, match="more than 10,000 entries"):
        ingest_bytes(hostile_files.zip_of_many_entries(10_001), "entries.docx")


def test_pdf_page_count_is_checked_before_any_page_is_read():
    data = hostile_files.pdf_of_pages(10_000)
    with pytest.raises(TooManyPagesError, match="10,000 pages.*limit of 2,000 \\(--max-pdf-pages\\)"):
        ingest_bytes(data, "long.pdf")
    # Allowed, its pages have no content at all: blank without rendering them.
    with pytest.raises(EmptyDocumentError, match="only blank pages"):
        ingest_bytes(data, "long.pdf", limits=IngestLimits(max_pdf_pages=10_000))


def test_pdf_text_is_counted(make_pdf):
    data = make_pdf([("text", ["word " * 200]), ("text", ["word " * 200])])
    with pytest.raises(FileTooLargeError, match="more than 1,500 characters"):
        ingest_bytes(data, "wordy.pdf", limits=IngestLimits(max_characters=1500))


def test_a_child_process_reads_what_this_process_reads(make_pdf, make_docx):
    pdf = make_pdf([("text", ["Before the scan."]), ("scan", ["scanned words"]), ("blank", []), ("text", ["After."])])
    here, there = ingest_bytes(pdf, "mixed.pdf"), ingest_bytes(pdf, "mixed.pdf", limits=ISOLATED)
    assert [type(p) for p in there.parts] == [TextPart, ImagePart, TextPart]
    assert there.text == here.text
    assert np.array_equal(there.parts[1].image, here.parts[1].image) and there.parts[1].source_page == 2
    docx = make_docx(lambda document: document.add_paragraph("Grüße \U0001f600 from a child"))
    assert ingest_bytes(docx, limits=ISOLATED).text == "Grüße \U0001f600 from a child"
    with pytest.raises(TooManyPagesError, match="--max-pdf-pages"):  # errors keep their type
        ingest_bytes(hostile_files.pdf_of_pages(50), "long.pdf", limits=IngestLimits(timeout=30, max_pdf_pages=10))


def _high_water_mib(pid: int) -> float:
    status = open(f"/proc/{pid}/status").read()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def test_page_images_pass_from_the_parser_child_one_at_a_time(make_pdf, monkeypatch):
    """Each page image is kept (here: one pixel of it) as it arrives, the pixels of no earlier page held meanwhile,
    and the child reads and sends a page at a time: its memory grows by a page or two from 2 pages to 16, not by
    14 pages' pixels."""
    from glyphserve.ingest import parsing

    take = parsing._CHILDREN._take
    children = []
    monkeypatch.setattr(parsing._CHILDREN, "_take", lambda: children.append(take()) or children[-1])

    def read(pages: int) -> float:
        """The child's peak memory (MiB) while its pages arrive."""
        held, peaks = [], []

        def keep(part: ImagePart) -> ImagePart:
            assert all(ref() is None for ref in held), f"page {part.source_page} came before the last was dropped"
            held.append(weakref.ref(part.image))
            if part.source_page < pages:  # the child cannot have ended before its last page is taken
                peaks.append(_high_water_mib(children[-1].pid))
            return ImagePart(part.image[:1, :1].copy(), part.source_page)

        pdf = make_pdf([("scan", [f"page {n}"]) for n in range(1, pages + 1)] + [("text", ["The end."])])
        document = ingest_bytes(pdf, "scans.pdf", limits=ISOLATED, keep=keep)
        assert [p.source_page for p in document.parts[:-1]] == list(range(1, pages + 1))
        assert document.text == "The end." and len(held) == pages
        return max(peaks)

    page_mib = 1190 * 1684 * 3 / 2**20  # an A4 scan at 144 dpi
    two, sixteen = read(2), read(16)
    # Measured +10 to +13 MiB; a child that held its pages until the end: +80 MiB.
    assert sixteen < two + 5 * page_mib, (two, sixteen)


@pytest.mark.parametrize("limits", [IngestLimits(max_scan_pages=2), IngestLimits(max_scan_pages=2, timeout=30)],
                         ids=["here", "child"])
def test_scans_over_the_limit_are_refused_while_kept_as_read(make_pdf, limits):
    kept = []
    pdf = make_pdf([("scan", [f"page {n}"]) for n in range(1, 4)])
    with pytest.raises(TooManyPagesError, match="^'scans.pdf' has more than 2 pages without a text layer \\(scans\\), "
                                                "this server's limit \\(--max-scan-pages\\)"):
        ingest_bytes(pdf, "scans.pdf", limits=limits, keep=lambda part: kept.append(part.source_page) or part)
    assert kept == [1, 2]
    assert len(ingest_bytes(pdf, "scans.pdf", limits=IngestLimits(max_scan_pages=3, timeout=30)).parts) == 3


def test_a_slow_file_is_killed_at_its_budget_and_blocks_no_other(make_pdf):
    slow = hostile_files.pdf_of_pages(5_000, WHITE_BOX)  # every page rendered to find it blank: minutes
    outcome = {}

    def read_slow():
        try:
            ingest_bytes(slow, "slow.pdf", limits=IngestLimits(timeout=2, max_pdf_pages=5_000))
        except IngestTimeoutError as exc:
            outcome["slow"] = exc

    thread = threading.Thread(target=read_slow)
    thread.start()
    quick = ingest_bytes(make_pdf([("text", ["Quick."])]), "quick.pdf", limits=ISOLATED)
    outcome["quick_done_first"] = thread.is_alive()
    thread.join(timeout=60)
    assert quick.text == "Quick." and outcome["quick_done_first"]
    assert "2 s budget (--ingest-timeout)" in outcome["slow"].message and outcome["slow"].http_status == 400


@pytest.mark.parametrize("raw, clean", [
    ("report.pdf", "report.pdf"),
    ("../../etc/passwd", "passwd"),
    ("C:\\Users\\me\\notes.md", "notes.md"),
    ("a\x00b\x1fc\nd.txt", "abc d.txt"),  # a line break is a space, as in any name
    ("\u202egpj.exe", "gpj.exe"),
    ("  ..hidden.txt ", "hidden.txt"),
    ("/", None),
    ("x" * 5000 + ".docx", "x" * 195 + ".docx"),
    ("y" * 5000, "y" * 200),
])
def test_file_names_are_cleaned(raw, clean):
    assert clean_filename(raw) == clean


@pytest.mark.parametrize("typed, clean", [
    ("Q3/Q4 report", "Q3/Q4 report"),  # a typed name keeps its slashes
    ("Launch plan\nline 2\t ", "Launch plan line 2"),
    ("a\u200bb\u061cc\u202ed", "abcd"),  # zero-width, direction marks and overrides go
    ("\u200b", ""), ("\u3164", ""), (" \u2800 ", ""),  # nothing visible: blank
    ("\U0001f469\u200d\U0001f4bb", "\U0001f469\u200d\U0001f4bb"),  # an emoji's joiner stays
])
def test_typed_names_are_cleaned(typed, clean):
    assert clean_name(typed) == clean
    assert clean_name("n" * 300, 200) == "n" * 200


# A parser child subverted by a crafted file could send anything; these stand in for it (real processes, started as
# the parser is). Each reads its request, then writes its frames (a Python expression: a list of bytes), forever or once.
_SUBVERTED = """
import sys
stdin, out = sys.stdin.buffer, sys.stdout.buffer
import json
request = json.loads(stdin.readline())
stdin.read(request["size"])
frames = {frames}
try:
    while True:
        for frame in frames:
            out.write(frame)
        out.flush()
        if not {forever}:
            break
except BrokenPipeError:
    pass
"""


@pytest.fixture
def subverted(monkeypatch):
    """Run the next parses with a child that sends ``frames`` (forever, or once then a last line)."""
    from glyphserve.ingest import parsing

    def use(frames: str, forever: bool) -> None:
        parsing.shutdown()  # the spare was started with the real parser
        monkeypatch.setattr(parsing, "_CHILD", _SUBVERTED.format(frames=frames, forever=forever))

    yield use
    parsing.shutdown()  # and the spare now is a subverted one
    monkeypatch.undo()


@pytest.mark.parametrize("frames, forever", [
    ([b'{"image": [100000, 100000], "page": 1}\n'], False),  # 30 GB of pixels declared
    ([b'{"image": [-5, 10], "page": 1}\n'], False),
    ([b'{"image": [4, 4], "page": 1}\n' + bytes(48)], True),  # small pages past --max-scan-pages
    ([b'{"text": "' + b"x" * 4096 + b'"}\n'], True),  # text past --max-characters
    ([b'{"text": ""}\n'], True),  # parts past the file's pages
    ([b'{"text": "' + b"x" * 65536], True),  # one line that never ends
    ([b'{"image": [Infinity, 4], "page": 1}\n'], False),
    ([b"[" * 100_000 + b"\n"], False),  # nested past the stack
    ("""[b'{"text": "' + b"x" * (1 << 21) + b'"}\\n']""", False),  # a line past the child's text lines
], ids=["huge-image", "negative-side", "many-images", "endless-text", "empty-parts", "endless-line", "infinite-side",
        "nested", "long-text-line"])
def test_a_subverted_parser_cannot_make_the_caller_hold_more_than_its_limits(subverted, frames, forever):
    """What the child declares is checked before the caller allocates for it: the file is refused as damaged, long
    before the parse's budget (60 s) runs out, and the caller's memory does not grow by what was declared."""
    import time

    subverted(frames if isinstance(frames, str) else repr(frames), forever)
    limits = IngestLimits(timeout=60, max_characters=100_000, max_scan_pages=5, max_pdf_pages=10)
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # the peak so far: this process's present size (earlier cases' peaks count not)
    before = _high_water_mib("self")
    started = time.monotonic()
    with pytest.raises(CorruptFileError, match="^'crafted.pdf' looks like a PDF but could not be read: the parser "
                                               "stopped"):
        ingest_bytes(b"%PDF-1.4\n%%EOF\n", "crafted.pdf", limits=limits)
    assert time.monotonic() - started < 30
    assert _high_water_mib("self") < before + 64


def test_a_subverted_parsers_error_is_passed_on_only_as_an_error_of_its_kind_and_bounded(subverted):
    for error, expected in ((b'[1]', "^'crafted.pdf' looks like a PDF but could not be read$"),
                            (b'{"type": "FileTooLargeError", "message": "' + b"m" * 10_000 + b'"}', "^m{2000}$")):
        subverted(repr([b'{"error": ' + error + b"}\n"]), False)
        with pytest.raises((CorruptFileError, FileTooLargeError), match=expected):
            ingest_bytes(b"%PDF-1.4\n%%EOF\n", "crafted.pdf", limits=IngestLimits(timeout=60))


def test_an_honest_answer_within_the_parent_limits_is_taken(subverted, tmp_path):
    """The same checks leave an answer at the limits whole: text of max_characters and its separators, pages of
    the largest side, as many scans as allowed."""
    side = 2001
    text = "y" * 100_000
    frames = [b'{"text": "' + text.encode() + b'"}\n']
    frames += [b'{"image": [%d, 3], "page": %d}\n' % (side, n) + bytes(side * 9) for n in (1, 2)]
    (tmp_path / "frames").write_bytes(b"".join(frames) + b'{"end": true}\n')
    subverted(f"[open({str(tmp_path / 'frames')!r}, 'rb').read()]", False)
    document = ingest_bytes(b"%PDF-1.4\n%%EOF\n", "fine.pdf",
                            limits=IngestLimits(timeout=60, max_characters=100_000, max_scan_pages=2))
    assert document.parts[0] == TextPart(text)
    assert [part.image.shape for part in document.parts[1:]] == [(side, 3, 3)] * 2


def test_a_docx_counts_its_symbols_and_separators_as_text_in_this_process_and_a_childs():
    """Tabs, breaks and table separators are characters of the text too: a small file of 5,000 <w:tab/> made 5,000
    characters no limit counted (and a parser process's answer held to the limit was refused as damaged)."""
    tabs = hostile_files.docx_of_paragraphs(1, "<w:p><w:r><w:t>a</w:t>" + "<w:tab/>" * 5000 + "</w:r></w:p>")
    for limits in (IngestLimits(max_characters=100_000), IngestLimits(max_characters=100_000, timeout=30)):
        with pytest.raises(FileTooLargeError, match="more than 100,000 characters"):
            ingest_bytes(tabs, "tabs.docx", limits=limits)


def test_a_long_text_comes_from_the_parser_child_in_pieces_whole():
    from docx import Document as WordDocument
    import io

    word = WordDocument()
    for i in range(3):
        word.add_paragraph(f"{i}" + "abc " * 150_000)  # 600k characters a paragraph: the text in several lines
    data = io.BytesIO()
    word.save(data)
    here = ingest_bytes(data.getvalue(), "long.docx")
    assert len(here.text) > 1_800_000
    assert ingest_bytes(data.getvalue(), "long.docx", limits=ISOLATED).text == here.text
