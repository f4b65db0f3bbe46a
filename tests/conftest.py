"""Fixtures shared across the suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
