"""``glyphserve make-tiny-model`` and ``glyphserve ask`` with a model."""

from __future__ import annotations

import io
import json

import pytest

from glyphserve.cli import main


def test_make_tiny_model_command(tmp_path, capsys):
    assert main(["make-tiny-model", str(tmp_path / "tiny")]) == 0
    assert (tmp_path / "tiny" / "model.safetensors").exists()
    assert str(tmp_path / "tiny") in capsys.readouterr().out


def test_ask_needs_a_question_or_chat(tiny_model_dir, tmp_path, capsys):
    doc = tmp_path / "story.txt"
    doc.write_text("Little Red Riding Hood met a wolf.")
    assert main(["ask", str(doc), "--model", str(tiny_model_dir)]) == 2
    assert "give a QUESTION" in capsys.readouterr().err
    assert main(["ask", str(doc), "Who?", "--model", str(tmp_path / "no-model"), "--max-new-tokens", "0"]) == 2
    assert capsys.readouterr().err == "error: --max-new-tokens must be at least 1\n"  # before any model is looked for
    assert main(["ask", str(doc), "Who?", "--quantize", "fp8"]) == 2  # no model: nothing to quantize
    assert "--quantize needs --model" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--remote-model", "--served-model-name"])
def test_ask_an_endpoint_names_the_model_as_batch_and_eval_do(tmp_path, capsys, flag):
    from tests.batch.chat_server import ChatServer

    doc = tmp_path / "story.txt"
    doc.write_text("Little Red Riding Hood met a wolf.")
    server = ChatServer(api_key="sekrit")
    try:
        args = ["ask", str(doc), "Who?", "--endpoint", server.url + "/v1"]
        assert main([*args, "--api-key", "wrong"]) == 2
        assert "refused the API key (401 Unauthorized)" in capsys.readouterr().err
        assert main([*args, "--api-key", "sekrit", flag, "glyph"]) == 0
        assert capsys.readouterr().out.endswith("answer to: Who?\n")
        assert server.requests[-1]["model"] == "glyph"
    finally:
        server.close()


def images_sent(server) -> list[dict]:
    return [part for part in server.requests[-1]["messages"][0]["content"] if part["type"] == "image_url"]


def test_ask_an_endpoint_selects_the_pages_that_fit_the_context_it_reports(tmp_path, capsys):
    """The server's max_model_len (or a lower --max-context) bounds the pages sent; the prompt's text is bounded
    from above (a token per UTF-8 byte), so what is sent always fits."""
    from glyphserve.glm4v import PAGE_MARKER_TOKENS, vision_tokens
    from glyphserve.ingest import ingest_path
    from glyphserve.render import render_document, resolve_config
    from tests.batch.chat_server import ChatServer

    doc = tmp_path / "long.txt"
    paragraphs = [f"Paragraph {i} tells of the mill, the river and the road to town. " * 6 for i in range(160)]
    paragraphs[-3] = "The keeper's name was Ottoline Vance. " * 4
    doc.write_text("\n\n".join(paragraphs))
    document = ingest_path(doc)
    pages = render_document(document, resolve_config(document.text)).pages
    cost = [vision_tokens(*p.image.shape[:2]) + PAGE_MARKER_TOKENS for p in pages]
    assert len(pages) >= 6
    server = ChatServer(max_model_len=sum(cost[:3]) + 200)  # three pages, the question and a 64-token answer
    try:
        args = ["ask", str(doc), "What was the keeper's name?", "--endpoint", server.url + "/v1",
                "--max-new-tokens", "64"]
        assert main([*args, "--page-selection", "first"]) == 0
        assert len(images_sent(server)) == 3
        assert f"[pages shown: 1-3 of {len(pages)}]" in capsys.readouterr().err
        assert main([*args, "--page-selection", "first", "--max-context", str(sum(cost[:2]) + 200)]) == 0
        assert len(images_sent(server)) == 2
        assert f"[pages shown: 1-2 of {len(pages)}]" in capsys.readouterr().err
        assert main([*args, "--page-selection", "retrieve", "--json"]) == 0
        keeper = next(p.number for p in pages if "Ottoline" in document.text[slice(*p.char_span)])
        shown = json.loads(capsys.readouterr().out)["pages_shown"]
        assert len(images_sent(server)) == len(shown) == 3 and keeper in shown and shown != [1, 2, 3]
    finally:
        server.close()


def _render_available() -> bool:
    try:
        from glyphserve.render import render_document, resolve_config  # noqa: F401
    except ImportError:
        return False
    return True


needs_render = pytest.mark.skipif(not _render_available(), reason="glyphserve.render is not available yet")


@pytest.fixture
def story(tmp_path):
    doc = tmp_path / "story.txt"
    doc.write_text("Little Red Riding Hood walked to her grandmother's house. The wolf ran ahead. " * 20)
    return doc


def ask_args(model_dir, story, new_tokens: int) -> list[str]:
    return ["ask", str(story), "Who ran ahead?", "--model", str(model_dir), "--device", "cpu",
            "--max-new-tokens", str(new_tokens), "--ignore-eos"]


@needs_render
def test_ask_streams_and_reports_json(tiny_model_dir, story, capsys):
    args = ask_args(tiny_model_dir, story, 12)
    assert main(args) == 0
    assert capsys.readouterr().out.endswith("\n")
    assert main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["new_tokens"] == 12 and result["pages_used"] >= 1
    assert result["timings"]["render"] > 0 and result["timings"]["total"] > 0
    assert result["engine"]["vision_cache"]["misses"] >= 1


@needs_render
def test_ask_chat_reads_follow_ups_until_eof(tiny_model_dir, story, capsys, monkeypatch):
    """Each question is answered over the conversation so far, the document's prefix reused; its pages' pixels
    are hashed once for the chat, not once a question."""
    import glyphserve.engine.preprocess as preprocess

    hashed = []
    digest = preprocess.page_digest
    monkeypatch.setattr(preprocess, "page_digest", lambda page: hashed.append(page.shape) or digest(page))
    monkeypatch.setattr("sys.stdin", io.StringIO("Why?\n\nWhere?\n"))
    args = [*ask_args(tiny_model_dir, story, 6), "--chat", "--json"]
    assert main(args) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 3 and [line["question"] for line in lines[1:]] == ["Why?", "Where?"]
    assert lines[1]["cache"]["prefix_reused_tokens"] > 0 and lines[2]["cache"]["prefix_reused_tokens"] > 0
    assert lines[2]["prompt_tokens"] > lines[1]["prompt_tokens"] > lines[0]["prompt_tokens"] - 10
    assert 0 < len(hashed) == max(line["pages_used"] for line in lines)  # each rendered page once


@needs_render
def test_ask_shows_the_pages_that_match_when_the_document_does_not_fit(tiny_model_dir, tmp_path, capsys):
    filler = " ".join(f"Paragraph {n} describes fields, rivers and the weather in spring." for n in range(480))
    doc = tmp_path / "long.txt"
    doc.write_text(filler + "\n\nThe harbour code is LANTERN-42.\n\n" + filler)
    args = ["ask", str(doc), "What is the harbour code?", "--model", str(tiny_model_dir), "--device", "cpu",
            "--max-new-tokens", "4", "--max-context", "1400", "--json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    from glyphserve.ingest import ingest_path
    from glyphserve.render import render_document, resolve_config

    text = ingest_path(doc).text
    pages = render_document(ingest_path(doc), resolve_config(text)).pages
    needle = text.index("LANTERN")
    [page] = [p.number for p in pages if p.char_span[0] <= needle < p.char_span[1]]
    assert len(pages) > len(result["pages_shown"]) >= 1 and page in result["pages_shown"]
    assert result["prompt_tokens"] <= 1400 - 4
    assert main([*args, "--page-selection", "first"]) == 0
    first = json.loads(capsys.readouterr().out)["pages_shown"]
    assert first == list(range(1, len(first) + 1))
    assert main([*args, "--page-selection", "all"]) == 2
    assert "context" in capsys.readouterr().err


@needs_render
def test_ask_without_a_model_cites_pages_as_the_server_does(tmp_path, capsys):
    filler = " ".join(f"Paragraph {n} describes fields, rivers and the weather in spring." for n in range(480))
    doc = tmp_path / "long.txt"
    doc.write_text(filler + "\n\nThe harbour code is LANTERN-42.\n\n" + filler)
    from glyphserve.ingest import ingest_path
    from glyphserve.render import render_document, resolve_config

    text = ingest_path(doc).text
    pages = render_document(ingest_path(doc), resolve_config(text)).pages
    needle = text.index("LANTERN")
    [page] = [p.number for p in pages if p.char_span[0] <= needle < p.char_span[1]]
    assert main(["ask", str(doc), "What is the harbour code?", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(pages) > 1 and page in result["pages_shown"]
    assert main(["ask", str(doc), "What is the harbour code?"]) == 0
    assert f"[page {page}] The harbour code is LANTERN-42." in capsys.readouterr().out


@needs_render
def test_ask_reads_the_document_from_stdin(tmp_path, capsys, monkeypatch):
    text = "The lighthouse keeper was called Elias.\n\nThe harbour code is LANTERN-42.\n"
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(text.encode("utf-8"))))
    assert main(["ask", "-", "What is the harbour code?", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert "LANTERN-42" in result["text"] and result["pages_shown"] == [1]
    assert main(["ask", "-", "--chat"]) == 2  # the questions would come from stdin too
    assert "give the document as a file" in capsys.readouterr().err


@needs_render
def test_ask_renders_with_the_newline_mode_asked_for(tiny_model_dir, tmp_path, capsys):
    doc = tmp_path / "lines.txt"
    doc.write_text("".join(f"Line {n}.\n" for n in range(300)))
    shown = {}
    for mode in ("br", "marker"):
        args = ["ask", str(doc), "Which line?", "--model", str(tiny_model_dir), "--device", "cpu",
                "--max-new-tokens", "1", "--page-selection", "all", "--newline", mode, "--json"]
        assert main(args) == 0
        shown[mode] = json.loads(capsys.readouterr().out)["pages_shown"]
    assert len(shown["br"]) > 1 and shown["marker"] == [1]  # a line each, or the red marker inline on one page


def test_ask_errors_name_its_own_flags(tmp_path, tiny_model_dir, capsys):
    """The engine's messages name request fields (max_tokens, max_context); ask's name its flags."""
    doc = tmp_path / "short.txt"
    doc.write_text("The keeper's name was Ottoline Vance.")
    args = ["ask", str(doc), "Who?", "--model", str(tiny_model_dir), "--device", "cpu"]
    assert main([*args, "--max-context", "0"]) == 2
    err = capsys.readouterr().err
    assert "--max-model-len" in err and "max_context" not in err
    assert main([*args, "--max-context", "200", "--max-new-tokens", "190"]) == 2
    err = capsys.readouterr().err
    assert "lower --max-new-tokens to at most" in err and "max_tokens" not in err
    for flag, value in (("--temperature", "5"), ("--temperature", "nan"), ("--top-p", "0"), ("--seed", "-1")):
        assert main([*args, flag, value]) == 2  # the API's ranges, refused before the model loads
        assert f"error: {flag} must be" in capsys.readouterr().err


@needs_render
def test_ask_chat_off_a_terminal_writes_each_answer_under_its_question(tiny_model_dir, story, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("Why?\nWhere?\n"))
    assert main([*ask_args(tiny_model_dir, story, 4), "--chat"]) == 0
    out = capsys.readouterr().out
    blocks = out.split("\n\n")  # a blank line between turns
    assert len(blocks) == 3 and blocks[1].startswith("> Why?\n") and blocks[2].startswith("> Where?\n")


def test_ask_without_a_model_on_a_scan_says_what_would_read_it(tmp_path, capsys):
    from PIL import Image, ImageDraw

    page = Image.new("RGB", (600, 800), "white")
    ImageDraw.Draw(page).rectangle((50, 50, 550, 120), fill="black")  # ink, no text layer
    page.save(tmp_path / "scan.pdf")
    assert main(["ask", str(tmp_path / "scan.pdf"), "What does it say?"]) == 2
    err = capsys.readouterr().err
    assert "no text layer" in err and "--model" in err and "document:" not in err


def test_ask_with_a_model_that_is_not_there_fails_before_rendering(story, tmp_path, capsys, monkeypatch):
    def render_document(*args, **kwargs):
        raise AssertionError("rendered before the model was checked")

    monkeypatch.setattr("glyphserve.render.render_document", render_document)
    assert main(["ask", str(story), "Who?", "--model", str(tmp_path / "no-model")]) == 2
    assert "no such folder" in capsys.readouterr().err


def _every_pixel_pages(pdf: bytes, **settings) -> list:
    """The pages of a PDF read with each scan's pixels kept until it renders (as ask read files before)."""
    from glyphserve.ingest import ingest_bytes
    from glyphserve.render import render_document, resolve_config

    document = ingest_bytes(pdf, "scans.pdf")
    return render_document(document, resolve_config(document.text, **settings)).pages


def test_ask_sends_each_scan_as_the_page_file_it_was_made_into_as_read(tmp_path, scanned_pdf, documents_rendered):
    """A scan is kept as its page file as it is read, not as all its pixels until the end, and that file is what
    an endpoint is sent: the bytes of the page rendered from all the pixels (as a server stores it)."""
    import base64

    from glyphserve.render import FittedScan
    from tests.batch.chat_server import ChatServer

    src = tmp_path / "scans.pdf"
    src.write_bytes(scanned_pdf)
    server = ChatServer()
    try:
        assert main(["ask", str(src), "What does it say?", "--endpoint", server.url + "/v1",
                     "--preset", "glyph-zh", "--dpi", "96"]) == 0
        sent = [base64.b64decode(part["image_url"]["url"].split(",", 1)[1]) for part in images_sent(server)]
    finally:
        server.close()
    (document,) = documents_rendered
    assert [type(part) for part in document.parts] == [FittedScan] * 3
    assert all(part.image is None for part in document.parts)
    assert sent == [page.png() for page in _every_pixel_pages(scanned_pdf, preset="glyph-zh", dpi=96)]


def test_ask_a_model_about_a_scan_answers_as_it_did_from_all_the_pixels(tiny_model_dir, tmp_path, scanned_pdf,
                                                                        capsys):
    """The model reads the scans' page files (decoded when its vision cache misses): the answer is the one the
    pages rendered from all the pixels get."""
    from glyphserve.engine import AnswerRequest, Engine, EngineConfig, GenerationSettings

    src = tmp_path / "scans.pdf"
    src.write_bytes(scanned_pdf)
    assert main(["ask", str(src), "What does it say?", "--model", str(tiny_model_dir), "--device", "cpu",
                 "--max-new-tokens", "8", "--ignore-eos", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    engine = Engine.load(EngineConfig(model=str(tiny_model_dir), device="cpu", max_num_seqs=1))
    try:
        alone = engine.answer(AnswerRequest([page.image for page in _every_pixel_pages(scanned_pdf)],
                                            "What does it say?",
                                            settings=GenerationSettings(max_tokens=8, ignore_eos=True)))
    finally:
        engine.close()
    assert result["pages_shown"] == [1, 2, 3] and result["pages_used"] == 3
    assert result["token_ids"] == alone.token_ids and result["text"] == alone.text


def test_ask_shows_a_documents_control_characters_as_escapes_on_a_terminal(tmp_path):
    """A document (or a model) cannot drive the terminal an answer is printed to: on a terminal its controls show as
    escapes; in a pipe the text is as it was written."""
    import os
    import pty
    import subprocess
    import sys

    doc = tmp_path / "esc.txt"
    doc.write_text("Secret \x1b]0;PWNED\x07 and \x1b[31mred\x1b[0m about apples.\tTabbed.\n")
    command = [sys.executable, "-m", "glyphserve", "ask", str(doc), "apples"]
    leader, follower = pty.openpty()
    child = subprocess.Popen(command, stdout=follower, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    assert child.wait(timeout=120) == 0
    assert b"\x1b" not in shown and b"\x07" not in shown
    assert b"Secret \\x1b]0;PWNED\\x07 and \\x1b[31mred\\x1b[0m about apples.\tTabbed." in shown
    piped = subprocess.run(command, capture_output=True, timeout=120, check=True).stdout
    assert b"Secret \x1b]0;PWNED\x07 and \x1b[31mred\x1b[0m about apples." in piped
