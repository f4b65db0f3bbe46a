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
