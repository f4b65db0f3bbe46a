"""Real server processes (loopback only) and sample documents for the serve tests."""

from __future__ import annotations

import io

import pytest

from tests.servers import REPO, Server, free_port  # noqa: F401 (re-exported to the serve tests)


@pytest.fixture(scope="session")
def extractive_server(tmp_path_factory):
    """The embedded default (no model), small limits so limit tests stay fast."""
    server = Server(tmp_path_factory.mktemp("extractive") / "data", "--max-upload-mb", "1", "--max-pages", "30")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def model_server(tmp_path_factory, tiny_model_dir):
    """The tiny random GLM-4.1V on the CPU, with the default batching (up to 256 sequences in the KV pool)."""
    server = Server(tmp_path_factory.mktemp("model") / "data", str(tiny_model_dir), "--served-model-name", "glyph",
                    "--device", "cpu", "--queue-size", "64", "--no-ui")
    server.start()
    yield server
    server.stop()


# -- sample documents -----------------------------------------------------------------------

STORY = (
    "The lighthouse keeper of Carrow Point was named Edwin Marsh. Every evening he climbed the "
    "ninety-seven steps to light the great lamp.\n\n"
    "In the winter of 1887 a storm drove the schooner Albatross onto the rocks below the tower. "
    "Marsh rowed out alone and rescued eleven sailors before dawn.\n\n"
    "The harbour master later gave him a silver compass engraved with the words: for courage at sea."
)


def make_pdf(text: str, *, password: str | None = None) -> bytes:
    from reportlab.lib.pagesizes import A4
    from reportlab.pdfgen import canvas

    out = io.BytesIO()
    pdf = canvas.Canvas(out, pagesize=A4, encrypt=password)
    y = 800
    for paragraph in text.split("\n\n"):
        for start in range(0, len(paragraph), 90):
            pdf.drawString(40, y, paragraph[start:start + 90])
            y -= 14
        y -= 10
    pdf.save()
    return out.getvalue()


def make_docx(text: str) -> bytes:
    import docx

    document = docx.Document()
    for paragraph in text.split("\n\n"):
        document.add_paragraph(paragraph)
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def make_png(color: str | tuple[int, int, int] = "white") -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(out, format="PNG")
    return out.getvalue()
