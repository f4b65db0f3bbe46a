"""Against the official renderer itself: ``scripts/word2png_function.py`` of a clone of
thu-coai/Glyph, run unchanged with its own configs and fonts. Runs only where such a clone is at
hand (``GLYPHSERVE_GLYPH_REPO``); the fonts are not redistributable, so CI has none."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from tests.render.render_helpers import official_repo
from tests.render.test_official_cases import CASES, case_text

from glyphserve.render import render_text, resolve_config

REPO = official_repo()
pytestmark = [
    pytest.mark.usefixtures("reference_available"),
    pytest.mark.skipif(REPO is None or not (REPO / "scripts" / "word2png_function.py").is_file(),
                       reason="no clone of thu-coai/Glyph with its fonts (set GLYPHSERVE_GLYPH_REPO)"),
]

_RUN = """
import json, sys
from word2png_function import load_config, text_to_images
text, out, newline, dpi = json.load(sys.stdin)
config = load_config("../config/config_en.json")
config.update({"newline-markup": newline, "dpi": dpi})
print(json.dumps(text_to_images(text, out, config_dict=config, unique_id="doc")))
"""


def official_pages(text: str, newline: str, dpi: int, out) -> list[np.ndarray]:
    """Page images from the official script, run from its own folder as its README does."""
    proc = subprocess.run([sys.executable, "-c", _RUN], input=json.dumps([text, str(out), newline, dpi]),
                          capture_output=True, text=True, cwd=REPO / "scripts", timeout=300, check=True)
    return [np.asarray(Image.open(path).convert("RGB")) for path in json.loads(proc.stdout.splitlines()[-1])]


@pytest.mark.parametrize(("newline", "dpi"), [("br", 72), ("marker", 72), ("br", 96), ("marker", 96)])
def test_every_case_equals_the_official_script(newline, dpi, tmp_path):
    text = "\n".join(case_text(case, "en") for case in CASES)
    config = resolve_config(text, preset="glyph-en", glyph_repo=REPO, newline=newline, dpi=dpi)
    ours = render_text(text, config, workers=1).pages
    theirs = official_pages(text, config.newline_markup, dpi, tmp_path)
    assert [p.image.shape for p in ours] == [p.shape for p in theirs]
    for page, official in zip(ours, theirs):
        diff = np.abs(page.image.astype(np.int16) - official.astype(np.int16))
        assert int(diff.max()) <= 8, f"page {page.number}: {int((diff > 8).sum())} pixels differ"
