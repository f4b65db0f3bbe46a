"""``glyphserve render``: a file (or stdin) to page images and a manifest."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

PRESET_CHOICES = ("auto", "glyph-en", "glyph-zh")
NEWLINE_CHOICES = ("br", "marker")  # the render commands' --newline (render, ask, batch)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "render",
        help="render a document into page images the way Glyph does",
        description="Render a document into page images with Glyph's rendering (pages + manifest.json).",
    )
    p.add_argument("input", metavar="INPUT", help="a .txt/.md/.pdf/.docx file, or - for stdin")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for page_001.png ... and manifest.json")
    add_render_options(p)
    p.add_argument("--workers", type=positive_int, default=None, metavar="N",
                   help="processes painting pages, at most one per core and per page (default: one per idle core "
                        "for long documents)")
    p.add_argument("--json", action="store_true",
                   help="print the rendering's summary as JSON: manifest.json without each page's lines of text "
                        "(their layout stays in the file), and the file's path")
    p.set_defaults(func=run)


def positive_int(value: str) -> int:
    """An argparse type: an integer of at least 1."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {number}")
    return number


def page_arguments(p: argparse.ArgumentParser) -> None:
    """--preset, --dpi and --newline: how the commands that render a document (render, ask, batch) draw its pages."""
    p.add_argument("--preset", choices=PRESET_CHOICES, default="auto",
                   help="Glyph's released settings; auto picks glyph-zh when the text has CJK (default: auto)")
    p.add_argument("--dpi", type=float,
                   help="resolution: 72 as released, 96 for the paper's sharper pages (default: the preset's)")
    p.add_argument("--newline", choices=NEWLINE_CHOICES,
                   help="source line breaks as <br/> (default) or Glyph's inline red \\n marker")


def add_render_options(p: argparse.ArgumentParser) -> None:
    """The rendering flags of ``glyphserve render``: ``page_arguments`` and how Glyph's own files are found."""
    page_arguments(p)
    p.add_argument("--config", metavar="FILE.json", help="a Glyph rendering config (config_en.json keys)")
    p.add_argument("--font", metavar="PATH", help="font file (e.g. the official Verdana.ttf); PATH#N picks face N")
    p.add_argument("--glyph-repo", metavar="PATH",
                   help="a clone of github.com/thu-coai/Glyph: its config/config_en.json, config_zh.json and fonts "
                        "are used unchanged for the presets (default: $GLYPHSERVE_GLYPH_REPO)")
    p.add_argument("--fallback-fonts", action="store_true",
                   help="draw characters the font lacks from installed fonts that have them, instead of the "
                        "missing-glyph box Glyph's renderer draws (pages then differ from Glyph's)")
    p.add_argument("--allow-font-substitute", action="store_true",
                   help="render with a free substitute when the configured font file is missing (a warning) "
                        "instead of stopping with an error")


# Below this share of CJK characters, the Chinese preset that auto picks is pointed out.
AUTO_NOTE_SHARE = 0.05


def config_from_args(args: argparse.Namespace, text: str):
    """The settings the flags ask for; a font substitution is reported on stderr."""
    from glyphserve.render import resolve_config
    from glyphserve.render.config import cjk_characters

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = resolve_config(text, preset=args.preset, config=args.config, dpi=args.dpi, font=args.font,
                                newline=args.newline, fallback_fonts=args.fallback_fonts or None,
                                glyph_repo=args.glyph_repo, allow_font_substitute=args.allow_font_substitute)
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    if args.preset == "auto" and args.config is None:
        cjk = cjk_characters(text)
        share = cjk / max(1, sum(not ch.isspace() for ch in text))
        if cjk and share < AUTO_NOTE_SHARE:  # a name or a quotation in another text switched the whole document
            print(f"note: --preset auto chose glyph-zh (its CJK font and line breaking) for {cjk} CJK "
                  f"character{'s' * (cjk != 1)}, {share:.1%} of the text; --preset glyph-en keeps the English "
                  "preset (those characters then drawn as boxes, or from another font with --fallback-fonts)",
                  file=sys.stderr)
    return config


def _page_counter():
    """A tqdm page counter on stderr, only when stderr is a terminal, and the render callback that moves it."""
    from tqdm import tqdm

    # Without tqdm's monitor thread: a second thread makes the render workers start from a fork server (forking
    # a threaded process is unsafe), whose fresh interpreters import the renderer again; that cost the W150
    # command 0.15 s, more than a second core saves it (measured on the 2-core VM).
    tqdm.monitor_interval = 0
    bar = tqdm(desc="rendering", unit="page", file=sys.stderr, disable=not sys.stderr.isatty())
    return bar, lambda pages: bar.update(pages - bar.n)


def run(args: argparse.Namespace) -> int:
    from glyphserve.errors import ConfigError, GlyphserveError
    from glyphserve.ingest import ingest_source
    from glyphserve.render import fit_scans, missing_glyphs_warning, render_document, write_rendered

    if Path(args.output).exists() and not Path(args.output).is_dir():
        raise ConfigError(f"-o {args.output} is a file: give a folder for the pages")
    # Each scan becomes its page file as it is read, for the page size config_from_args will pick: 100 A4 scans,
    # all held as pixels until rendered, peaked at 785 MiB (now 91).
    doc = ingest_source(args.input, keep=fit_scans(args.preset, args.dpi, args.config, glyph_repo=args.glyph_repo))
    config = config_from_args(args, doc.text)
    bar, progress = _page_counter()
    try:
        rendered = render_document(doc, config, workers=args.workers, progress=progress, encode=True)
    finally:
        bar.close()
    try:
        out = write_rendered(rendered, args.output)
    except OSError as exc:
        raise GlyphserveError(f"cannot write the pages to {args.output}: {exc.strerror or exc}") from None
    note = missing_glyphs_warning(rendered)
    if note:
        print(f"warning: {note}", file=sys.stderr)
    if args.json:  # each page's lines are the text again with its layout: as large as the document
        summary = rendered.manifest()
        for page in summary["pages"]:
            page["lines"] = len(page["lines"])
        summary["manifest"] = str(Path(out) / "manifest.json")
        print(json.dumps(summary, ensure_ascii=False, indent=1))
    else:
        t, n = rendered.stats, len(rendered.pages)
        print(f"{n} page{'s' * (n != 1)}, {t.vision_tokens} vision tokens for ~{t.text_tokens} text tokens "
              f"(x{t.compression_ratio:.2f}) in {t.seconds:.2f}s -> {out}", file=sys.stderr)
    return 0
