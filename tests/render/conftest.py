"""Fixtures for the renderer tests."""

from __future__ import annotations

import shutil

import pytest


@pytest.fixture(scope="session")
def reference_available() -> None:
    """Skip unless the official pipeline can run (reportlab, pdf2image, fontTools, pdftoppm)."""
    pytest.importorskip("reportlab")
    pytest.importorskip("pdf2image")
    pytest.importorskip("fontTools")
    if not shutil.which("pdftoppm"):
        pytest.skip("poppler-utils (pdftoppm) is not installed")


@pytest.fixture(autouse=True)
def no_glyph_repo_from_the_environment(monkeypatch) -> None:
    """Tests ask for a Glyph repository clone explicitly; one named in the environment (for the
    official-script tests) must not change what the presets resolve to elsewhere."""
    monkeypatch.delenv("GLYPHSERVE_GLYPH_REPO", raising=False)
