"""``glyphserve render`` end to end, in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def glyphserve(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "glyphserve.cli", *args], input=stdin, capture_output=True,
                          env=env, cwd=REPO, timeout=180)


def test_render_a_file_with_options(tmp_path):
    src = tmp_path / "story.txt"
    src.write_text("\n".join(f"Paragraph {i}. " + "Words of the story go here. " * 9 for i in range(160)),
                   encoding="utf-8")
    out = tmp_path / "pages"
    proc = glyphserve("render", str(src), "-o", str(out), "--dpi", "96", "--newline", "marker", "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    summary = json.loads(proc.stdout)
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert summary["manifest"] == str(out / "manifest.json")
    # The summary is the manifest but for each page's lines of text, which it counts.
    assert [p["lines"] for p in summary["pages"]] == [len(p["lines"]) for p in manifest["pages"]]
    assert {k: v for k, v in summary.items() if k not in ("pages", "manifest")} == \
        {k: v for k, v in manifest.items() if k != "pages"}
    assert manifest["config"]["dpi"] == 96 and "\\n" in manifest["config"]["newline-markup"]
    assert manifest["source"] == "story.txt" and manifest["totals"]["pages"] >= 2
    for page in manifest["pages"]:
        assert (out / page["file"]).is_file()
    assert any("\\n" in ln["text"] for ln in manifest["pages"][0]["lines"])  # the red marker, inline


def test_render_stdin_chinese_with_config(tmp_path):
    cfg = tmp_path / "config_zh.json"
    cfg.write_text(json.dumps({"font-size": 10, "line-height": 12}), encoding="utf-8")
    out = tmp_path / "zh"
    proc = glyphserve("render", "-", "-o", str(out), "--config", str(cfg),
                      stdin="长文本压缩：把文字渲染成图片。\n第二行。".encode())
    assert proc.returncode == 0, proc.stderr.decode()
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["font"]["requested"] == "Source Han Sans HW SC"
    assert manifest["config"]["font-size"] == 10
    assert proc.stderr.decode().startswith("1 page, ")  # the one-line summary, in good English
    blank = glyphserve("render", "-", "-o", str(tmp_path / "blank"), stdin=b" \n")
    assert blank.returncode == 2 and blank.stderr.decode() == "error: standard input contains no text\n"
    workers = glyphserve("render", "-", "-o", str(tmp_path / "w"), "--workers", "0", stdin=b"text")
    assert workers.returncode == 2 and "--workers: must be at least 1, not 0" in workers.stderr.decode()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--font", "/no/such.ttf"], "font file not found"),
        (["--preset", "glyph-en", "--dpi", "2000"], "lower dpi"),
    ],
)
def test_user_errors_exit_2_with_a_message(tmp_path, args, message):
    src = tmp_path / "a.txt"
    src.write_text("hello", encoding="utf-8")
    proc = glyphserve("render", str(src), "-o", str(tmp_path / "o"), *args)
    assert proc.returncode == 2
    assert proc.stderr.decode().startswith("error: ") and message in proc.stderr.decode()
    assert "Traceback" not in proc.stderr.decode()


def test_missing_input_and_empty_input(tmp_path):
    proc = glyphserve("render", str(tmp_path / "nope.txt"), "-o", str(tmp_path / "o"))
    assert proc.returncode == 2 and proc.stderr.decode().startswith("error: ")
    proc = glyphserve("render", "-", "-o", str(tmp_path / "o"), stdin=b"   \n")
    assert proc.returncode == 2 and proc.stderr.decode().startswith("error: ")


def test_a_config_whose_font_is_missing_stops_or_warns_when_substitutes_are_allowed(tmp_path):
    cfg = tmp_path / "config_zh.json"
    cfg.write_text(json.dumps({"font-path": "../config/SourceHanSansHWSC-VF.ttf"}), encoding="utf-8")
    src = tmp_path / "a.txt"
    src.write_text("长文本压缩", encoding="utf-8")
    proc = glyphserve("render", str(src), "-o", str(tmp_path / "o"), "--config", str(cfg))
    assert proc.returncode == 2
    missing = tmp_path.parent / "config" / "SourceHanSansHWSC-VF.ttf"
    assert f"font file not found: {missing}" in proc.stderr.decode()
    proc = glyphserve("render", str(src), "-o", str(tmp_path / "o"), "--config", str(cfg), "--allow-font-substitute")
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stderr.decode().startswith(f"warning: font file not found: {missing}")
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["font"]["substitute"] is True


def test_a_few_cjk_characters_that_switch_auto_to_the_chinese_preset_are_pointed_out(tmp_path):
    src = tmp_path / "en.txt"
    src.write_text("The translator of this report is Li Wei (李).\n" * 30, encoding="utf-8")
    proc = glyphserve("render", str(src), "-o", str(tmp_path / "o"))
    assert proc.returncode == 0 and "note: --preset auto chose glyph-zh" in proc.stderr.decode()
    assert "for 30 CJK characters, 2.8% of the text; --preset glyph-en" in proc.stderr.decode()
    src.write_text("长文本压缩把文字渲染成图片, with a few English words.\n" * 30, encoding="utf-8")
    assert "note:" not in glyphserve("render", str(src), "-o", str(tmp_path / "o")).stderr.decode()


def test_many_characters_the_font_lacks_are_reported_with_advice(tmp_path):
    src = tmp_path / "hindi.txt"
    src.write_text("नमस्ते दुनिया " * 40, encoding="utf-8")  # Devanagari: in no installed font
    proc = glyphserve("render", str(src), "-o", str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stderr.decode()
    err = proc.stderr.decode()
    assert "warning: " in err and "are not in the font" in err and "--fallback-fonts" in err
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["totals"]["missing_chars"] == sum(p["missing_chars"] for p in manifest["pages"]) > 100

    src.write_text("长文本压缩把文字渲染成图片" * 20, encoding="utf-8")
    proc = glyphserve("render", str(src), "-o", str(tmp_path / "o"), "--preset", "glyph-en")
    assert "--preset glyph-zh" in proc.stderr.decode()
    proc = glyphserve("render", str(src), "-o", str(tmp_path / "o"), "--preset", "glyph-en", "--fallback-fonts")
    assert "warning" not in proc.stderr.decode()
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["config"]["fallback-fonts"] is True


def test_each_command_is_found_in_the_module_the_fast_start_imports():
    from glyphserve.cli import COMMAND_OWNERS, build_parser

    _, commands = build_parser()
    assert set(commands) == set(COMMAND_OWNERS)
    for command, module in COMMAND_OWNERS.items():
        assert command in build_parser((module,))[1]


def test_rendering_into_a_used_folder_replaces_its_pages_and_a_file_is_refused(tmp_path):
    long, short, out = tmp_path / "long.txt", tmp_path / "short.txt", tmp_path / "pages"
    long.write_text("Many words on many pages. " * 3000, encoding="utf-8")
    short.write_text("One short line.", encoding="utf-8")
    (out).mkdir()
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    assert glyphserve("render", str(long), "-o", str(out)).returncode == 0
    assert len(list(out.glob("page_*.png"))) >= 3
    proc = glyphserve("render", str(short), "-o", str(out))
    assert proc.returncode == 0, proc.stderr.decode()
    # Only the new document's page is left (a page_*.png glob must not pick up the old render's), and nothing else
    # in the folder is touched.
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "notes.txt", "page_001.png"]
    proc = glyphserve("render", str(short), "-o", str(short))
    assert proc.returncode == 2
    assert proc.stderr.decode().strip() == f"error: -o {short} is a file: give a folder for the pages"
    assert short.read_text(encoding="utf-8") == "One short line."
    proc = glyphserve("render", str(short), "-o", str(short / "sub"))
    assert proc.returncode == 2
    assert proc.stderr.decode().startswith(f"error: cannot write the pages to {short / 'sub'}: ")


@pytest.mark.parametrize("flags, page", [
    ([], (595, 842)),
    (["--preset", "glyph-zh", "--dpi", "96"], (794, 1123)),
    (["--config", "{config}"], (420, 595)),  # a config file's page size
    (["--glyph-repo", "{repo}"], (500, 700)),  # a Glyph clone's
], ids=["auto", "zh-96", "config", "glyph-repo"])
def test_a_scanned_pdf_renders_from_the_page_files_its_scans_were_made_into_as_read(
        tmp_path, scanned_pdf, documents_rendered, flags, page):
    """Each scan is kept as its page file as it is read (not its pixels until the end), at the page size the flags
    give: the pages written are those rendered from all the pixels."""
    from glyphserve.cli import main
    from glyphserve.ingest import ingest_bytes
    from glyphserve.render import FittedScan, render_document, resolve_config
    from tests.render.render_helpers import fake_glyph_repo

    (tmp_path / "config.json").write_text(json.dumps({"page-size": "420,595"}))
    (tmp_path / "glyph").mkdir()
    repo = fake_glyph_repo(tmp_path / "glyph")
    en = repo / "config" / "config_en.json"
    en.write_text(json.dumps({**json.loads(en.read_text()), "page-size": "500,700"}))
    flags = [flag.format(config=tmp_path / "config.json", repo=repo) for flag in flags]
    src = tmp_path / "scans.pdf"
    src.write_bytes(scanned_pdf)
    assert main(["render", str(src), "-o", str(tmp_path / "pages"), *flags]) == 0
    (document,) = documents_rendered
    assert [type(part) for part in document.parts] == [FittedScan] * 3
    assert all(part.image is None for part in document.parts)

    settings = dict(zip(flags[::2], flags[1::2]))
    every_pixel = ingest_bytes(scanned_pdf, "scans.pdf")  # what reading it gave before: each scan's pixels
    expected = render_document(every_pixel, resolve_config(
        every_pixel.text, preset=settings.get("--preset", "auto"), config=settings.get("--config"),
        dpi=float(settings["--dpi"]) if "--dpi" in settings else None, glyph_repo=settings.get("--glyph-repo")))
    manifest = json.loads((tmp_path / "pages" / "manifest.json").read_text())
    assert manifest["pages"] == expected.manifest()["pages"]
    assert [(tmp_path / "pages" / p["file"]).read_bytes() for p in manifest["pages"]] == \
        [p.png() for p in expected.pages]
    width, height = page
    assert max(p["height"] for p in manifest["pages"]) == height  # the portrait scan (and the sliver) fill it
    assert all(p["width"] <= width for p in manifest["pages"])
