"""``glyphserve doctor`` reports what the service will find."""

from __future__ import annotations

import subprocess
import sys

from tests.render.render_helpers import fake_glyph_repo
from tests.serve.conftest import REPO


def doctor(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "glyphserve.cli", "doctor", *args], cwd=REPO,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", **(env or {})},
                          capture_output=True, text=True, timeout=120)


def test_doctor_without_a_model_explains_the_extractive_fallback():
    result = doctor()
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for section in ("GPU:", "Libraries:", "Fonts:", "Model:"):
        assert section in out
    assert "ok torch:" in out and "ok transformers:" in out
    assert "ok English font: glyph-en:" in out and "ok Chinese font: glyph-zh:" in out
    assert "-- official Verdana: not present" in out and "GLYPHSERVE_GLYPH_REPO" in out
    assert "answers extractively" in out and out.rstrip().endswith("ready")


def test_doctor_checks_the_weights_of_a_given_model(tiny_model_dir, tmp_path):
    found = doctor("--model", str(tiny_model_dir))
    assert found.returncode == 0 and "weights found" in found.stdout
    (tmp_path / "config.json").write_text("{}")
    missing = doctor("--model", str(tmp_path))
    assert missing.returncode == 1
    assert "lacks config.json or *.safetensors" in missing.stdout and "means:" in missing.stdout


def test_doctor_reports_the_official_fonts_of_a_glyph_repository(tmp_path):
    repo = fake_glyph_repo(tmp_path, with_zh_font=True)
    out = doctor(env={"GLYPHSERVE_GLYPH_REPO": str(repo)}).stdout
    assert f"ok English font: glyph-en: DejaVu Sans ({repo / 'config' / 'Verdana.ttf'})" in out
    assert "ok official Verdana: present" in out and "ok official Source Han Sans HW SC: present" in out
