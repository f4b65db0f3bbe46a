"""Rendering legibility: render seeded text, read the pages back with Tesseract, report the CER.

The character error rate against the text drawn on each page is a cheap proxy for how readable
a rendering setting is before a model ever sees it, and it catches renderer regressions.
Tesseract is optional at run time; :func:`require_tesseract` explains what to install.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from glyphserve.errors import GlyphserveError
from glyphserve.eval import textgen
from glyphserve.eval.metrics import levenshtein, normalize_for_cer
from glyphserve.render import RenderedPage, render_text, resolve_config

OCR_LANGUAGES = {"glyph-en": "eng", "glyph-zh": "chi_sim"}


class OCRUnavailableError(GlyphserveError):
    """Tesseract or its language data is missing, or it failed on a page."""

    http_status = 501
    code = "ocr_unavailable"


@dataclass
class LegibilityRow:
    preset: str
    dpi: int
    font: str  # the face drawn with (a free substitute when Glyph's official font is absent)
    pages: int
    chars: int  # reference characters (normalised) over the pages read
    cer: float
    cer_upscaled: float | None  # the same pages enlarged 2x before OCR
    vision_tokens_per_page: float
    ocr_s: float


def tesseract_languages() -> set[str]:
    """Languages the installed Tesseract can read; empty when it is not installed."""
    if not shutil.which("tesseract"):
        return set()
    listing = subprocess.run(["tesseract", "--list-langs"], capture_output=True, text=True, check=False)
    return {line.strip() for line in listing.stdout.splitlines()[1:] if line.strip()}


def require_tesseract(languages: set[str]) -> None:
    available = tesseract_languages()
    if not available:
        raise OCRUnavailableError(
            "the legibility suite needs Tesseract: "
            "apt-get install tesseract-ocr tesseract-ocr-eng tesseract-ocr-chi-sim"
        )
    missing = languages - available
    if missing:
        packages = " ".join(f"tesseract-ocr-{lang.replace('_', '-')}" for lang in sorted(missing))
        raise OCRUnavailableError(
            f"Tesseract lacks language data {', '.join(sorted(missing))}: apt-get install {packages}"
        )


def ocr_image(image: np.ndarray, language: str, upscale: int = 1) -> str:
    """Text Tesseract reads on an RGB page (one uniform block of text, page segmentation mode 6)."""
    picture = Image.fromarray(image)
    if upscale != 1:
        picture = picture.resize((picture.width * upscale, picture.height * upscale), Image.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    # One OpenMP thread: on few cores Tesseract's threads mostly spin (4x slower here); pages run in parallel instead.
    run = subprocess.run(
        ["tesseract", "stdin", "stdout", "-l", language, "--psm", "6"],
        input=buffer.getvalue(), capture_output=True, check=False, env={**os.environ, "OMP_THREAD_LIMIT": "1"},
    )
    if run.returncode != 0:
        raise OCRUnavailableError(f"tesseract failed: {run.stderr.decode(errors='replace').strip()[:300]}")
    return run.stdout.decode("utf-8", errors="replace")


def page_reference(page: RenderedPage) -> str:
    """The text drawn on a page, line by line."""
    return "\n".join(line.text for line in page.lines)


def legibility_text(preset: str, seed: int, chars: int) -> str:
    """Seeded filler in the preset's language: English paragraphs or Chinese sentences."""
    rng = random.Random(f"{seed}:ocr:{preset}")
    if preset == "glyph-zh":
        return textgen.zh_filler(rng, chars)
    return textgen.join_paragraphs(textgen.paragraph_groups(textgen.filler_sentences(rng, chars), rng))


def legibility(preset: str, dpi: int, pages: int = 2, seed: int = 0, upscaled: bool = True) -> LegibilityRow:
    """Render seeded text with ``preset`` at ``dpi``, OCR the first ``pages`` pages, and return the CER.

    Errors are summed over the pages before dividing, so the rate is per reference character.
    """
    language = OCR_LANGUAGES[preset]
    zh = preset == "glyph-zh"
    text = legibility_text(preset, seed, chars=pages * 6000)
    rendered = render_text(text, resolve_config(text, preset=preset, dpi=dpi))
    read = rendered.pages[:pages]
    start = time.perf_counter()
    scales = (1, 2) if upscaled else (1,)
    jobs = [(number, scale) for number in range(len(read)) for scale in scales]
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        texts = list(pool.map(lambda job: ocr_image(read[job[0]].image, language, job[1]), jobs))
    references = [normalize_for_cer(page_reference(page), zh) for page in read]
    reference_chars = sum(map(len, references))
    errors = dict.fromkeys(scales, 0)
    for (number, scale), text in zip(jobs, texts):
        errors[scale] += levenshtein(normalize_for_cer(text, zh), references[number])
    return LegibilityRow(
        preset=preset, dpi=dpi, font=rendered.font.manifest()["name"] if rendered.font else "", pages=len(read),
        chars=reference_chars,
        cer=errors[1] / max(reference_chars, 1),
        cer_upscaled=errors[2] / max(reference_chars, 1) if upscaled else None,
        vision_tokens_per_page=sum(p.vision_tokens for p in read) / max(len(read), 1),
        ocr_s=time.perf_counter() - start,
    )
