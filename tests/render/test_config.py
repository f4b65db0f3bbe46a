"""Glyph config files, presets, overrides, bad values, and where the fonts come from."""

from __future__ import annotations

import json

import pytest
from tests.render.render_helpers import OFFICIAL_ZH, fake_glyph_repo

from glyphserve.errors import ConfigError, PageTooLargeError
from glyphserve.render import (
    GLYPH_REPO_ENV,
    MARKER_MARKUP,
    FontSubstituteWarning,
    load_glyph_config,
    preset,
    render_text,
    resolve_config,
)
from glyphserve.render.fonts import DEJAVU_SANS as DEJAVU
from glyphserve.render.fonts import resolve_font



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
    assert cfg == preset("glyph-zh").replace(font_path=str(tmp_path.parent / "config" / "SourceHanSansHWSC-VF.ttf"))
    assert load_glyph_config({**OFFICIAL_ZH, "page-size": [595, 842]}).page_size == (595.0, 842.0)


def test_to_glyph_json_round_trips():
    cfg = preset("glyph-en").replace(dpi=96, newline_markup=MARKER_MARKUP, page_size=(600.5, 800))
    data = json.loads(cfg.to_glyph_json())
    assert data["page-size"] == "600.5,800" and data["newline-markup"] == MARKER_MARKUP
    assert load_glyph_config(data) == cfg


def test_resolve_config_auto_preset_and_overrides(tmp_path):
    assert resolve_config("plain English").font_path == "Verdana.ttf"
    assert resolve_config("English with 中文").font_path == "SourceHanSansHWSC-VF.ttf"
    cfg = resolve_config("x", preset="glyph-zh", dpi=96, font=DEJAVU, newline="marker", fallback_fonts=True)
    assert (cfg.dpi, cfg.font_path, cfg.newline_markup, cfg.fallback_fonts) == (96, DEJAVU, MARKER_MARKUP, True)
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


def test_a_missing_font_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / "config_zh.json"
    path.write_text(json.dumps(OFFICIAL_ZH), encoding="utf-8")
    missing = tmp_path.parent / "config" / "SourceHanSansHWSC-VF.ttf"
    with pytest.raises(ConfigError, match=f"font file not found: {missing} ") as err:
        resolve_config("中文", config=path)
    assert "--glyph-repo" in err.value.message and "--allow-font-substitute" in err.value.message
    with pytest.raises(ConfigError, match="font file not found: /no/such.ttf"):
        resolve_config("x", font="/no/such.ttf")
    # loaded without resolve_config's check, rendering refuses it just the same
    with pytest.raises(ConfigError, match="font file not found"):
        render_text("中文", load_glyph_config(path))


def test_allow_font_substitute_warns_and_renders_with_the_free_font(tmp_path):
    path = tmp_path / "config_zh.json"
    path.write_text(json.dumps(OFFICIAL_ZH), encoding="utf-8")
    with pytest.warns(FontSubstituteWarning, match="SourceHanSansHWSC-VF.ttf"):
        cfg = resolve_config("中文", config=path, allow_font_substitute=True)
    assert cfg.font_path == "SourceHanSansHWSC-VF.ttf"
    font = render_text("中文", cfg).manifest()["font"]
    assert font["substitute"] is True and font["name"] == "Noto Sans Mono CJK SC"
    with pytest.warns(FontSubstituteWarning):  # any missing file: the free font for the text's script
        assert resolve_config("abc", font="/no/such.ttf", allow_font_substitute=True).font_path == "Verdana.ttf"


def test_glyph_repo_configs_and_fonts_are_used_unchanged(tmp_path, monkeypatch):
    repo = fake_glyph_repo(tmp_path)
    cfg = resolve_config("English", glyph_repo=repo)
    assert cfg == preset("glyph-en").replace(font_path=str(repo / "config" / "Verdana.ttf"))
    font = render_text("English", cfg).manifest()["font"]
    assert font["substitute"] is False and font["used"] == str((repo / "config" / "Verdana.ttf").resolve())
    # the Chinese font is not in this clone: an error naming it, not a silent swap
    with pytest.raises(ConfigError, match="SourceHanSansHWSC-VF.ttf"):
        resolve_config("中文", glyph_repo=repo)
    # the environment variable does the same, also for the presets' bare font names
    monkeypatch.setenv(GLYPH_REPO_ENV, str(repo))
    assert resolve_config("English").font_path == str(repo / "config" / "Verdana.ttf")
    assert resolve_font("Verdana.ttf").substitute is False
    assert resolve_font("SourceHanSansHWSC-VF.ttf").substitute is True
    monkeypatch.setenv(GLYPH_REPO_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="not a clone of"):
        resolve_config("English")
