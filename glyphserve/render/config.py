"""Rendering settings in Glyph's own configuration format.

:class:`RenderConfig` holds exactly the keys of the official ``config_en.json`` /
``config_zh.json`` (plus ``para-border-color``, which the official renderer also reads, and
glyphserve's one extension, ``fallback-fonts``), so a Glyph config file can be passed
unchanged. ``load_glyph_config`` reads one, ``RenderConfig.to_glyph_json`` writes one back.
A clone of the official repository (``GLYPHSERVE_GLYPH_REPO`` or ``glyph_repo=``) supplies
the presets from its own ``config/config_en.json`` and ``config/config_zh.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glyphserve.errors import ConfigError, PageTooLargeError
from glyphserve.render.fonts import font_available, missing_font_message, substitute_for
from glyphserve.render import official
from glyphserve.render.official import OFFICIAL_CONFIGS, OFFICIAL_EN_FONT, OFFICIAL_ZH_FONT

BR_MARKUP = "<br/>"
# The red inline marker of the Glyph paper: a literal backslash-n drawn in red between lines.
MARKER_MARKUP = '<font color="#FF0000"> \\n </font>'
NEWLINE_MODES = {"br": BR_MARKUP, "marker": MARKER_MARKUP}
ALIGNMENTS = ("LEFT", "CENTER", "RIGHT", "JUSTIFY")


MAX_PAGE_SIDE = 8192
MAX_PAGE_PIXELS = 36_000_000

_HEX = re.compile(r"^#?(?:0x)?([0-9a-fA-F]{6})$")
_CJK = re.compile(r"[\u4E00-\u9FFF]")


@dataclass(frozen=True)
class RenderConfig:
    """Glyph's rendering settings; field ``x_y`` is JSON key ``x-y``. Lengths are in points."""

    page_size: tuple[float, float] = (595.0, 842.0)
    dpi: float = 72
    margin_x: float = 10
    margin_y: float = 10
    font_path: str = OFFICIAL_EN_FONT
    font_size: float = 9
    line_height: float = 10
    font_color: str = "#000000"
    alignment: str = "LEFT"
    horizontal_scale: float = 1.0
    first_line_indent: float = 0
    left_indent: float = 0
    right_indent: float = 0
    space_before: float = 0
    space_after: float = 0
    border_width: float = 0
    border_padding: float = 0
    page_bg_color: str = "#FFFFFF"
    para_bg_color: str = "#FFFFFF"
    para_border_color: str = "#FFFFFF"
    auto_crop_width: bool = True
    auto_crop_last_page: bool = True
    newline_markup: str = BR_MARKUP
    # glyphserve's extension: draw characters the main font lacks from installed fonts that have
    # them, instead of the font's missing-glyph box (what the official pipeline draws)
    fallback_fonts: bool = False

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def scale(self) -> float:
        """Pixels per point."""
        return self.dpi / 72.0

    @property
    def newline_mode(self) -> str:
        """``br`` or ``marker`` (what ``--newline`` calls them)."""
        return "marker" if self.newline_markup == MARKER_MARKUP else "br"

    def replace(self, **changes: Any) -> RenderConfig:
        return dataclasses.replace(self, **changes)

    def to_glyph_dict(self) -> dict[str, Any]:
        """The settings under the official JSON keys."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "page_size":
                value = ",".join(_num_text(v) for v in value)
            out[f.name.replace("_", "-")] = value
        return out

    def to_glyph_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_glyph_dict(), indent=indent, ensure_ascii=False)


def preset(name: str) -> RenderConfig:
    """The released Glyph settings: ``glyph-en`` (Verdana) or ``glyph-zh`` (Source Han Sans HW SC)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}: choose one of auto, {', '.join(PRESETS)}") from None


class FontSubstituteWarning(UserWarning):
    """A configured font file is missing and a free substitute renders in its place."""


def has_cjk(text: str) -> bool:
    """Whether Glyph would wrap this text the CJK way (any character in U+4E00..U+9FFF)."""
    return _CJK.search(text) is not None


def cjk_characters(text: str) -> int:
    """The characters of ``text`` that make it CJK for ``has_cjk``."""
    return len(_CJK.findall(text))


def load_glyph_config(source: str | Path | dict[str, Any], base: RenderConfig | None = None) -> RenderConfig:
    """Read a Glyph config (a JSON file path or a dict with the official keys).

    Keys that are absent keep the value of ``base`` (default: the ``glyph-en`` preset).
    A relative ``font-path`` in a file is the one in the working directory if there is one,
    else the one read from the file's folder.
    """
    config_dir: Path | None = None
    if isinstance(source, dict):
        data = source
    else:
        path = Path(source)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"config file {path} is not valid JSON: {exc}") from None
        config_dir = path.resolve().parent
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a JSON object of Glyph settings")
    unknown = sorted(set(data) - set(GLYPH_KEYS))
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)}; valid keys: {', '.join(GLYPH_KEYS)}")
    changes = {key.replace("-", "_"): _coerce(key, value) for key, value in data.items()}
    if "font_path" in changes and config_dir is not None:
        changes["font_path"] = _anchor_font_path(changes["font_path"], config_dir)
    return (base or PRESETS["glyph-en"]).replace(**changes)


def resolve_config(
    text: str = "",
    preset: str = "auto",
    config: RenderConfig | str | Path | dict[str, Any] | None = None,
    dpi: float | None = None,
    font: str | None = None,
    newline: str | None = None,
    *,
    fallback_fonts: bool | None = None,
    glyph_repo: str | Path | None = None,
    allow_font_substitute: bool = False,
) -> RenderConfig:
    """Pick the settings for ``text``: a preset (``auto`` = zh when the text has CJK; read from
    the Glyph repository clone when there is one), overlaid with a config file/dict, then the
    single overrides (``dpi``, ``font``, ``newline``, ``fallback_fonts``).

    A font file that does not exist is a :class:`ConfigError` naming it; with
    ``allow_font_substitute`` a free substitute renders instead, with a
    :class:`FontSubstituteWarning`.
    """
    if preset == "auto":
        name = "glyph-zh" if has_cjk(text) else "glyph-en"
    else:
        name = preset
    cfg = _start_config(name, config, glyph_repo)
    changes: dict[str, Any] = {}
    if dpi is not None:
        changes["dpi"] = _coerce("dpi", dpi)
    if font is not None:
        changes["font_path"] = str(font)
    if newline is not None:
        if newline not in NEWLINE_MODES:
            raise ConfigError(f"--newline must be one of {', '.join(NEWLINE_MODES)}, not {newline!r}")
        changes["newline_markup"] = NEWLINE_MODES[newline]
    if fallback_fonts is not None:
        changes["fallback_fonts"] = bool(fallback_fonts)
    cfg = cfg.replace(**changes) if changes else cfg
    return _check_font(cfg, text, allow_font_substitute)


def preset_configs(
    preset: str = "auto",
    dpi: float | None = None,
    config: RenderConfig | str | Path | dict[str, Any] | None = None,
    *,
    glyph_repo: str | Path | None = None,
) -> list[RenderConfig]:
    """The settings ``resolve_config(text, preset, config, dpi, glyph_repo=glyph_repo)`` may give, whatever the
    text (both presets' for ``auto``): its font, newline and fallback overrides left out, font files unchecked."""
    configs = [_start_config(name, config, glyph_repo) for name in (PRESETS if preset == "auto" else [preset])]
    return configs if dpi is None else [cfg.replace(dpi=_coerce("dpi", dpi)) for cfg in configs]


def _start_config(name: str, config: RenderConfig | str | Path | dict[str, Any] | None,
                  glyph_repo: str | Path | None) -> RenderConfig:
    """Preset ``name`` overlaid with ``config`` (a file or dict; a :class:`RenderConfig` replaces it)."""
    cfg = _preset_config(name, glyph_repo)
    if isinstance(config, RenderConfig):
        return config
    return cfg if config is None else load_glyph_config(config, base=cfg)


def _preset_config(name: str, glyph_repo: str | Path | None) -> RenderConfig:
    """A preset's settings, read from the clone of the Glyph repository when there is one."""
    cfg = preset(name)
    repo = official.glyph_repo(glyph_repo)
    if repo is not None:
        cfg = load_glyph_config(repo / "config" / OFFICIAL_CONFIGS[name], base=cfg)
    return cfg


def _check_font(cfg: RenderConfig, text: str, allow_substitute: bool) -> RenderConfig:
    """Refuse a font file that is not there, or (when allowed) swap in a free substitute, loudly."""
    if font_available(cfg.font_path):
        return cfg
    if not allow_substitute:
        raise ConfigError(missing_font_message(cfg.font_path))
    stand_in = substitute_for(cfg.font_path, has_cjk(text))
    warnings.warn(FontSubstituteWarning(
        f"font file not found: {cfg.font_path}; rendering with the free substitute for {stand_in} instead "
        "(--allow-font-substitute): pages differ from the ones Glyph was trained on"), stacklevel=3)
    return cfg.replace(font_path=stand_in)


def parse_color(value: str, key: str = "color") -> tuple[int, int, int]:
    """``#RRGGBB`` -> (r, g, b)."""
    m = _HEX.match(value.strip()) if isinstance(value, str) else None
    if not m:
        raise ConfigError(f"{key} must be a colour like #RRGGBB, not {value!r}")
    h = m.group(1)
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


def _coerce(key: str, value: Any) -> Any:
    """Turn one JSON value into the field's type, naming the key on failure."""
    name = key.replace("-", "_")
    if name == "page_size":
        parts = value.split(",") if isinstance(value, str) else value
        try:
            w, h = (float(p) for p in parts)
        except (TypeError, ValueError):
            raise ConfigError(f'page-size must be "width,height" in points (e.g. "595,842"), not {value!r}') from None
        return (w, h)
    if name in ("auto_crop_width", "auto_crop_last_page", "fallback_fonts"):
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, not {value!r}")
        return value
    if name in ("font_path", "newline_markup", "alignment") or name.endswith("_color"):
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, not {value!r}")
        return value.upper() if name == "alignment" else value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be a number, not {value!r}")
    return value


def _validate(cfg: RenderConfig) -> None:
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f.name.replace("_", "-")
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if f.type == "float" and not (numeric and math.isfinite(value)):
            raise ConfigError(f"{key} must be a finite number, not {value!r}")
    w, h = cfg.page_size
    if not (w > 0 and h > 0 and math.isfinite(w) and math.isfinite(h)):
        raise ConfigError(f"page-size must be two positive numbers, not {cfg.page_size!r}")
    if cfg.dpi <= 0:
        raise ConfigError(f"dpi must be positive, not {cfg.dpi!r}")
    if cfg.font_size <= 0:
        raise ConfigError(f"font-size must be positive, not {cfg.font_size!r}")
    if cfg.line_height <= 0:
        raise ConfigError(f"line-height must be positive, not {cfg.line_height!r}")
    if cfg.horizontal_scale <= 0:
        raise ConfigError(f"horizontal-scale must be positive, not {cfg.horizontal_scale!r}")
    for key in ("margin_x", "margin_y", "space_before", "space_after", "border_width", "border_padding"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key.replace('_', '-')} must not be negative, not {getattr(cfg, key)!r}")
    if cfg.alignment not in ALIGNMENTS:
        raise ConfigError(f"alignment must be one of {', '.join(ALIGNMENTS)}, not {cfg.alignment!r}")
    for key in ("font_color", "page_bg_color", "para_bg_color", "para_border_color"):
        parse_color(getattr(cfg, key), key.replace("_", "-"))
    if not cfg.font_path:
        raise ConfigError("font-path must name a TrueType/OpenType font file")
    if cfg.newline_markup not in (BR_MARKUP, MARKER_MARKUP):
        raise ConfigError(
            "newline-markup must be Glyph's '<br/>' or its red marker "
            f"'{MARKER_MARKUP}' (use --newline br|marker), not {cfg.newline_markup!r}"
        )
    px_w = math.ceil(w * cfg.scale) * cfg.horizontal_scale
    px_h = math.ceil(h * cfg.scale)
    if max(px_w, px_h) > MAX_PAGE_SIDE or px_w * px_h > MAX_PAGE_PIXELS:
        raise PageTooLargeError(
            f"pages would be {px_w:.0f} x {px_h:.0f} px (limit {MAX_PAGE_SIDE} px per side and "
            f"{MAX_PAGE_PIXELS // 10**6} M pixels): lower dpi ({cfg.dpi:g}) or page-size ({w:g},{h:g})"
            + (f" or horizontal-scale ({cfg.horizontal_scale:g})" if cfg.horizontal_scale > 1 else "")
        )
    frame_w = w - 2 * cfg.margin_x - 12 - cfg.left_indent - cfg.right_indent
    frame_h = h - 2 * cfg.margin_y - 12
    if frame_w - max(cfg.first_line_indent, 0) <= cfg.font_size or frame_h < 2 * cfg.line_height:
        raise ConfigError(
            "page-size minus margin-x/margin-y and indents leaves no room for two lines of text; "
            "reduce the margins or indents, or enlarge page-size"
        )


def _anchor_font_path(font_path: str, config_dir: Path) -> str:
    """Keep the path if it exists from the working directory, else read it from the config's
    folder (the official script runs from its own folder), whether or not it is there."""
    p = Path(font_path).expanduser()
    if p.is_absolute() or p.exists():
        return str(p)
    return os.path.normpath(config_dir / p)


def _num_text(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


GLYPH_KEYS = tuple(f.name.replace("_", "-") for f in dataclasses.fields(RenderConfig))

PRESETS: dict[str, RenderConfig] = {
    "glyph-en": RenderConfig(font_path=OFFICIAL_EN_FONT),
    "glyph-zh": RenderConfig(font_path=OFFICIAL_ZH_FONT),
}
