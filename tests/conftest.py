"""Fixtures shared across the suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

# Property tests draw the same examples on every run, so a CI result repeats; HYPOTHESIS_PROFILE=explore draws new ones.
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

CORPUS_DIR = Path(__file__).resolve().parents[2] / "shared" / "corpus"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random GLM-4.1V checkpoint written with save_pretrained, built once per session."""
    from glyphserve.engine import make_tiny_model

    path = tmp_path_factory.mktemp("tiny-glm4v")
    make_tiny_model(path)
    return path


@pytest.fixture(scope="session")
def scanned_pdf() -> bytes:
    """Three pages without a text layer: portrait, landscape in colour, and a sliver."""
    import io

    from PIL import Image, ImageDraw

    pages = [Image.new("RGB", size, "white") for size in ((600, 800), (800, 600), (60, 1400))]
    for n, page in enumerate(pages):
        ImageDraw.Draw(page).rectangle((10, 10, 50, 60 + 40 * n), fill=(200, 30, 30) if n == 1 else "black")
    out = io.BytesIO()
    pages[0].save(out, format="PDF", save_all=True, append_images=pages[1:])
    return out.getvalue()


@pytest.fixture
def documents_rendered(monkeypatch) -> list:
    """Each document ``glyphserve.render.render_document`` is given from here on (it renders them as ever): what a
    command kept of a file's scans as it read it."""
    import glyphserve.render

    render_document = glyphserve.render.render_document
    seen: list = []

    def recorded(document, *args, **kwargs):
        seen.append(document)
        return render_document(document, *args, **kwargs)

    monkeypatch.setattr(glyphserve.render, "render_document", recorded)
    return seen
