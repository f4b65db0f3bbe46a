"""The official Glyph repository (https://github.com/thu-coai/Glyph): the names of its fonts and configs, and
where a clone of it is. Its ``config/`` folder holds ``config_en.json``, ``config_zh.json`` and the fonts they
name, which are not redistributable (substitutes render when they are absent)."""

from __future__ import annotations

import os
from pathlib import Path

from glyphserve.errors import ConfigError

OFFICIAL_EN_FONT = "Verdana.ttf"
OFFICIAL_ZH_FONT = "SourceHanSansHWSC-VF.ttf"
OFFICIAL_CONFIGS = {"glyph-en": "config_en.json", "glyph-zh": "config_zh.json"}
GLYPH_REPO_ENV = "GLYPHSERVE_GLYPH_REPO"  # where a clone is, when no --glyph-repo is given


def glyph_repo(path: str | Path | None = None) -> Path | None:
    """The clone of the official Glyph repository: ``path``, else ``$GLYPHSERVE_GLYPH_REPO``, else None."""
    value = path if path is not None else os.environ.get(GLYPH_REPO_ENV) or None
    if value is None:
        return None
    repo = Path(value).expanduser()
    if not (repo / "config").is_dir():
        source = "--glyph-repo" if path is not None else GLYPH_REPO_ENV
        raise ConfigError(f"{source} {value} is not a clone of https://github.com/thu-coai/Glyph "
                          "(it has no config/ folder with config_en.json, config_zh.json and the fonts)")
    return repo
