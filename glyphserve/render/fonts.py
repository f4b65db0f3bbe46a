"""Fonts: finding the configured face (or its free substitute) and reading advance widths.

Widths follow reportlab's ``stringWidth`` exactly (hmtx advance * 1000/unitsPerEm per
character, ``U+00A0`` measured as a space, unknown characters as glyph 0), because the
official renderer breaks lines with those numbers. Characters the main font lacks fall
back to the first installed font that has them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import unicodedata
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path

from glyphserve.errors import ConfigError
from glyphserve.render.config import OFFICIAL_EN_FONT, OFFICIAL_ZH_FONT

DEJAVU_SANS = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
NOTO_CJK = "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc"

# official font file -> (font it names, [(installed free substitute, face name)])
SUBSTITUTES: dict[str, tuple[str, list[tuple[str, str]]]] = {
    OFFICIAL_EN_FONT.lower(): ("Verdana", [(DEJAVU_SANS, "DejaVu Sans")]),
    # The Mono face of Noto Sans CJK is Source Han Sans HW ("half-width") under another name.
    OFFICIAL_ZH_FONT.lower(): ("Source Han Sans HW SC", [(NOTO_CJK, "Noto Sans Mono CJK SC")]),
}
# Tried in order for characters the main font lacks (symbols, then CJK, then anything).
FALLBACKS: list[tuple[str, str]] = [
    (DEJAVU_SANS, "DejaVu Sans"),
    (NOTO_CJK, "Noto Sans Mono CJK SC"),
    ("/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf", "DejaVu Sans Mono"),
    ("/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf", "Droid Sans Fallback"),
    ("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc", "WenQuanYi Micro Hei"),
]


@dataclass(frozen=True)
class FontFace:
    """One face of a font file (``index`` selects the face of a .ttc collection)."""

    path: str
    index: int = 0


@dataclass(frozen=True)
class ResolvedFont:
    requested: str  # what the config asked for (file name or path)
    face: FontFace
    substitute: bool  # True when an installed free font stands in for the official one

    def manifest(self) -> dict:
        return {"requested": self.requested, "used": self.face.path, "face_index": self.face.index,
                "name": face_name(self.face), "substitute": self.substitute}


def resolve_font(font_path: str) -> ResolvedFont:
    """The face to render with: the file itself, or a free substitute for Glyph's official fonts.

    ``PATH#N`` picks face N of a collection. A missing file that is not one of the official
    fonts is a :class:`ConfigError`.
    """
    path, index = _split_face_suffix(font_path)
    p = Path(path).expanduser()
    if p.is_file():
        face = FontFace(str(p.resolve()), index)
        _check_readable(face, font_path)
        return ResolvedFont(font_path, face, substitute=False)
    known = SUBSTITUTES.get(p.name.lower())
    if known is None:
        raise ConfigError(
            f"font file not found: {font_path} (set font-path in the config or pass --font PATH "
            "to a .ttf/.otf/.ttc file)"
        )
    requested, candidates = known
    for cand_path, name in candidates:
        face = find_face(cand_path, name) if os.path.exists(cand_path) else None
        face = face or _fc_match(name)
        if face is not None:
            return ResolvedFont(requested, face, substitute=True)
    raise ConfigError(
        f"{requested} ({p.name}) is not installed and neither is its free substitute "
        f"{candidates[0][1]}; install it (Debian: fonts-dejavu-core / fonts-noto-cjk) or pass --font PATH"
    )


@cache
def find_face(path: str, name: str) -> FontFace | None:
    """The face of ``path`` whose family name is ``name`` (None if absent)."""
    for index, face_name_ in enumerate(_face_names(path)):
        if face_name_ == name:
            return FontFace(path, index)
    return None


def face_name(face: FontFace) -> str:
    names = _face_names(face.path)
    return names[face.index] if face.index < len(names) else ""


@cache
def fallback_faces(main: FontFace) -> tuple[FontFace, ...]:
    faces = []
    for path, name in FALLBACKS:
        if os.path.exists(path):
            face = find_face(path, name)
            if face is not None and face != main and face not in faces:
                faces.append(face)
    return tuple(faces)


class FontMetrics:
    """reportlab-compatible advance widths of one face, in 1/1000 em."""

    def __init__(self, face: FontFace):
        from fontTools.ttLib import TTFont

        try:
            tt = TTFont(face.path, fontNumber=face.index, lazy=True)
            upm = tt["head"].unitsPerEm
            cmap = tt.getBestCmap() or {}
            hmtx = tt["hmtx"].metrics
            order = tt.getGlyphOrder()
            self.is_cff = "CFF " in tt or "CFF2" in tt
        except Exception as exc:  # fontTools raises many types for broken files
            raise ConfigError(f"cannot read font {face.path}: {exc}") from None
        # reportlab: width = advance * (1000/unitsPerEm), left exact when unitsPerEm == 1000.
        mult = 1000 / upm

        def scale(aw: int) -> float:
            return aw if upm == 1000 else aw * mult

        glyph0 = order[0]
        self.default_width = scale(hmtx[glyph0][0])
        widths: dict[int, float] = {}
        for code, glyph in cmap.items():
            if glyph != glyph0:
                widths[code] = scale(hmtx[glyph][0])
        if 0x20 in widths:
            widths[0xA0] = widths[0x20]
        elif 0xA0 in widths:
            widths[0x20] = widths[0xA0]
        self.face = face
        self.units_per_em = upm
        self.widths = widths

    def has(self, code: int) -> bool:
        return code in self.widths


@lru_cache(maxsize=16)
def metrics(face: FontFace) -> FontMetrics:
    return FontMetrics(face)


class CharTable(dict):
    """char -> (width in 1/1000 em, font slot) for one main font plus fallbacks.

    Slot 0 is the main font, 1.. the fallbacks, -1 an invisible character (controls and
    format characters no font has). Filled lazily: ``table[ch]`` always answers.
    """

    def __init__(self, main: FontFace):
        super().__init__()
        self.faces: tuple[FontFace, ...] = (main, *fallback_faces(main))
        self._metrics = [metrics(main)]

    def _metrics_of(self, slot: int) -> FontMetrics:
        while len(self._metrics) <= slot:
            self._metrics.append(metrics(self.faces[len(self._metrics)]))
        return self._metrics[slot]

    def __missing__(self, ch: str) -> tuple[float, int]:
        code = ord(ch)
        main = self._metrics[0]
        entry = None
        if main.has(code):
            entry = (main.widths[code], 0)
        elif unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
            entry = (0.0, -1)
        else:
            for slot in range(1, len(self.faces)):
                m = self._metrics_of(slot)
                if m.has(code):
                    entry = (m.widths[code], slot)
                    break
        if entry is None:
            entry = (main.default_width, 0)  # drawn as the main font's .notdef, as reportlab would
        self[ch] = entry
        return entry


class WidthMap(dict):
    """char -> width in 1/1000 em (what ``sum(map(widths.__getitem__, word))`` needs)."""

    def __init__(self, table: CharTable):
        super().__init__()
        self.table = table

    def __missing__(self, ch: str) -> float:
        w = self.table[ch][0]
        self[ch] = w
        return w


def _split_face_suffix(font_path: str) -> tuple[str, int]:
    base, sep, tail = font_path.rpartition("#")
    if sep and tail.isdigit() and base:
        return base, int(tail)
    return font_path, 0


@cache
def _face_names(path: str) -> tuple[str, ...]:
    from fontTools.ttLib import TTCollection, TTFont

    try:
        with open(path, "rb") as fh:
            is_collection = fh.read(4) == b"ttcf"
        fonts = TTCollection(path, lazy=True).fonts if is_collection else [TTFont(path, lazy=True)]
        return tuple(f["name"].getDebugName(1) or "" for f in fonts)
    except Exception:
        return ()


def _check_readable(face: FontFace, requested: str) -> None:
    names = _face_names(face.path)
    if not names:
        raise ConfigError(f"{requested} is not a readable TrueType/OpenType font")
    if face.index >= len(names):
        raise ConfigError(f"{requested}: the font file has {len(names)} face(s), no face {face.index}")


def _fc_match(name: str) -> FontFace | None:
    """Ask fontconfig for a family when the usual path is absent (other distributions)."""
    if not shutil.which("fc-match"):
        return None
    try:
        out = subprocess.run(["fc-match", "-f", "%{file}\n%{index}\n%{family}", name],
                             capture_output=True, text=True, timeout=10).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return None
    if len(out) >= 3 and name in out[2].split(",") and os.path.exists(out[0]):
        return FontFace(out[0], int(out[1] or 0))
    return None
