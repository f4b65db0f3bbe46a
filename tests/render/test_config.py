"""Glyph config files, presets, overrides and bad values."""

from __future__ import annotations

import json

import pytest

from glyphserve.errors import ConfigError, PageTooLargeError
from glyphserve.render import MARKER_MARKUP, load_glyph_config, preset, resolve_config

OFFICIAL_ZH = {
    "page-size": "595,842", "dpi": 72, "margin-x": 10, "margin-y": 10,
    "font-path": "../config/SourceHanSansHWSC-VF.ttf", "font-size": 9, "line-height": 10,
    "font-color": "#000000", "alignment": "LEFT", "horizontal-scale": 1.0, "first-line-indent": 0,
    "left-indent": 0, "right-indent": 0, "space-after": 0, "space-before": 0, "border-width": 0,
    "border-padding": 0, "page-bg-color": "#FFFFFF", "para-bg-color": "#FFFFFF",
    "auto-crop-width": True, "auto-crop-last-page": True,
}


def test_presets_hold_the_released_values():
    en, zh = preset("glyph-en"), preset("glyph-zh")
    for cfg in (en, zh):
        assert cfg.page_size == (595.0, 842.0) and cfg.dpi == 72
        assert (cfg.margin_x, cfg.margin_y, cfg.font_size, cfg.line_height) == (10, 10, 9, 10)
        assert (cfg.font_color, cfg.page_bg_color, cfg.alignment) == ("#000000", "#FFFFFF", "LEFT")
        assert cfg.auto_crop_width and cfg.auto_crop_last_page and cfg.horizontal_scale == 1.0
        assert cfg.newline_markup == "<br/>"
    assert en.font_path == "Verdana.ttf" and zh.font_path == "SourceHanSansHWSC-VF.ttf"


def test_official_config_file_loads_unchanged(tmp_path):
    path = tmp_path / "config_zh.json"
    path.write_text(json.dumps(OFFICIAL_ZH, indent=4), encoding="utf-8")
    cfg = load_glyph_config(path)
    assert cfg == preset("glyph-zh").replace(font_path="../config/SourceHanSansHWSC-VF.ttf")
    assert load_glyph_config({**OFFICIAL_ZH, "page-size": [595, 842]}).page_size == (595.0, 842.0)


def test_to_glyph_json_round_trips():
    cfg = preset("glyph-en").replace(dpi=96, newline_markup=MARKER_MARKUP, page_size=(600.5, 800))
    data = json.loads(cfg.to_glyph_json())
    assert data["page-size"] == "600.5,800" and data["newline-markup"] == MARKER_MARKUP
    assert load_glyph_config(data) == cfg


def test_resolve_config_auto_preset_and_overrides(tmp_path):
    assert resolve_config("plain English").font_path == "Verdana.ttf"
    assert resolve_config("English with 中文").font_path == "SourceHanSansHWSC-VF.ttf"
    cfg = resolve_config("x", preset="glyph-zh", dpi=96, font="/some/font.ttf", newline="marker")
    assert (cfg.dpi, cfg.font_path, cfg.newline_markup) == (96, "/some/font.ttf", MARKER_MARKUP)
    file_cfg = tmp_path / "c.json"
    file_cfg.write_text(json.dumps({"font-size": 12, "line-height": 14}), encoding="utf-8")
    cfg = resolve_config("x", config=file_cfg, dpi=96)
    assert (cfg.font_size, cfg.line_height, cfg.dpi) == (12, 14, 96)


@pytest.mark.parametrize(
    ("data", "names"),
    [
        ({"dpi": "high"}, "dpi"),
        ({"dpi": -3}, "dpi"),
        ({"font-size": 0}, "font-size"),
        ({"page-size": "595"}, "page-size"),
        ({"font-color": "black"}, "font-color"),
        ({"alignment": "DIAGONAL"}, "alignment"),
        ({"auto-crop-width": "yes"}, "auto-crop-width"),
        ({"newline-markup": "<p/>"}, "newline-markup"),
        ({"margin-x": 300}, "margin"),
        ({"fontsize": 9}, "fontsize"),
    ],
)
def test_bad_values_name_the_setting(data, names):
    with pytest.raises(ConfigError) as err:
        load_glyph_config(data)
    assert names in err.value.message


def test_bad_config_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_glyph_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_glyph_config(bad)
    with pytest.raises(ConfigError, match="--newline"):
        resolve_config("x", newline="crlf")
    with pytest.raises(ConfigError, match="unknown preset"):
        resolve_config("x", preset="glyph-fr")


def test_pages_too_large_are_refused_naming_the_setting():
    with pytest.raises(PageTooLargeError, match="dpi"):
        preset("glyph-en").replace(dpi=1000)
    with pytest.raises(PageTooLargeError, match="page-size"):
        load_glyph_config({"page-size": "6000,6500"})
    preset("glyph-en").replace(dpi=500)  # 4133 x 5848 px: allowed
