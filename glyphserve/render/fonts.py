"""Fonts: finding the configured face (the official file, or a free substitute) and reading
advance widths.

Widths follow reportlab's ``stringWidth`` exactly (hmtx advance * 1000/unitsPerEm per
character, ``U+00A0`` measured as a space, unknown characters as glyph 0), because the
official renderer breaks lines with those numbers. A character the main font lacks is drawn
as the official pipeline draws it: the font's missing-glyph box (glyph 0) with its advance
width. With ``fallback-fonts`` it is drawn from the first installed font that has it instead,
as if that glyph were part of the main font.

Glyph's fonts (Verdana, Source Han Sans HW SC) are not redistributable. A clone of the
official repository (``GLYPHSERVE_GLYPH_REPO`` or ``--glyph-repo``) provides them as
``config/Verdana.ttf`` and ``config/SourceHanSansHWSC-VF.ttf``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path

from glyphserve.errors import ConfigError
from glyphserve.render.official import GLYPH_REPO_ENV, OFFICIAL_EN_FONT, OFFICIAL_ZH_FONT, glyph_repo

DEJAVU_SANS = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
NOTO_CJK = "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc"

# official font file -> (font it names, [(installed free substitute, face name)])
SUBSTITUTES: dict[str, tuple[str, list[tuple[str, str]]]] = {
    OFFICIAL_EN_FONT.lower(): ("Verdana", [(DEJAVU_SANS, "DejaVu Sans")]),
    # The Mono face of Noto Sans CJK is Source Han Sans HW ("half-width") under another name.
    OFFICIAL_ZH_FONT.lower(): ("Source Han Sans HW SC", [(NOTO_CJK, "Noto Sans Mono CJK SC")]),
}
OFFICIAL_NAMES = {name.lower(): name for name in (OFFICIAL_EN_FONT, OFFICIAL_ZH_FONT)}
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
    """The face to render with.

    A path to a file is that file (``PATH#N`` picks face N of a collection). A bare official
    font name (what the presets name: ``Verdana.ttf``, ``SourceHanSansHWSC-VF.ttf``) is the
    file in the Glyph repository clone when there is one, else its installed free substitute.
    Any other missing file is a :class:`ConfigError` naming it.
    """
    path, index = _split_face_suffix(font_path)
    p = Path(path).expanduser()
    if p.is_file():
        face = FontFace(str(p.resolve()), index)
        _check_readable(face, font_path)
        return ResolvedFont(font_path, face, substitute=False)
    if not is_bare_official(path):
        raise ConfigError(missing_font_message(font_path))
    official = official_font_file(path)
    if official is not None:
        face = FontFace(str(official.resolve()), index)
        _check_readable(face, str(official))
        return ResolvedFont(font_path, face, substitute=False)
    requested, candidates = SUBSTITUTES[path.lower()]
    for cand_path, name in candidates:
        face = find_face(cand_path, name) if os.path.exists(cand_path) else None
        face = face or _fc_match(name)
        if face is not None:
            return ResolvedFont(requested, face, substitute=True)
    raise ConfigError(
        f"{requested} ({path}) is not installed and neither is its free substitute "
        f"{candidates[0][1]}; install it (Debian: fonts-dejavu-core / fonts-noto-cjk) or pass --font PATH"
    )


def is_bare_official(font_path: str) -> bool:
    """Whether ``font_path`` is just the file name of one of Glyph's fonts: the presets' way
    of asking for the official font, or its free substitute when it is not at hand."""
    return font_path.lower() in SUBSTITUTES


def official_font_file(name: str) -> Path | None:
    """``config/<name>`` of the Glyph repository clone, if there is one and it holds the file."""
    repo = glyph_repo()
    canonical = OFFICIAL_NAMES.get(name.lower())
    if repo is None or canonical is None:
        return None
    path = repo / "config" / canonical
    return path if path.is_file() else None


def missing_font_message(font_path: str) -> str:
    """Why a font file cannot be used, and what to do about it."""
    name = Path(_split_face_suffix(font_path)[0]).name
    known = SUBSTITUTES.get(name.lower())
    if known is None:
        return (f"font file not found: {font_path} (set font-path in the config or pass --font PATH "
                "to a .ttf/.otf/.ttc file; --allow-font-substitute renders with a free font instead)")
    repo = glyph_repo()
    where = (f"the Glyph repository at {repo} has no config/{OFFICIAL_NAMES[name.lower()]}" if repo is not None
             else f"Glyph's fonts are not redistributable: clone https://github.com/thu-coai/Glyph (it ships "
                  f"config/{OFFICIAL_NAMES[name.lower()]}) and pass --glyph-repo PATH or set {GLYPH_REPO_ENV}")
    return (f"font file not found: {font_path} ({known[0]}); {where}; or pass --allow-font-substitute to "
            f"render with {known[1][0][1]} instead (pages then differ from Glyph's)")


def substitute_for(font_path: str, cjk: bool) -> str:
    """The bare official name whose free substitute stands in for a missing ``font_path``:
    its own when it names an official font, else the one for the text's script."""
    name = Path(_split_face_suffix(font_path)[0]).name
    return OFFICIAL_NAMES.get(name.lower()) or (OFFICIAL_ZH_FONT if cjk else OFFICIAL_EN_FONT)


def font_available(font_path: str) -> bool:
    """Whether ``font_path`` is a file, or a bare official name (which always resolves)."""
    path, _ = _split_face_suffix(font_path)
    return is_bare_official(path) or Path(path).expanduser().is_file()


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
    """Installed fonts tried, in order, for characters ``main`` lacks (``fallback-fonts``)."""
    faces = []
    for path, name in FALLBACKS:
        if os.path.exists(path):
            face = find_face(path, name)
            if face is not None and face != main and face not in faces:
                faces.append(face)
    return tuple(faces)


class FontMetrics:
    """reportlab-compatible advance widths of one face, in 1/1000 em, read from the font with
    FreeType on first use of each character (a document uses a few hundred at most)."""

    def __init__(self, face: FontFace):
        import freetype

        try:
            self._ft = freetype.Face(face.path, face.index)
        except freetype.FT_Exception as exc:
            raise ConfigError(f"cannot read font {face.path}: {exc}") from None
        self._lock = threading.Lock()  # a FreeType face serves one call at a time
        self._no_scale = freetype.FT_LOAD_NO_SCALE
        self._glyphs: dict[int, int] = {}
        self.face = face
        self.units_per_em = self._ft.units_per_EM
        self.default_width = self.scale(self._advance(0))
        # reportlab measures and draws U+00A0 as the space (or the space as U+00A0 if only it exists)
        space = self._glyph(0x20) or self._glyph(0xA0)
        self._glyphs[0x20] = self._glyphs[0xA0] = space

    def _glyph(self, code: int) -> int:
        glyph = self._glyphs.get(code)
        if glyph is None:
            with self._lock:
                glyph = self._glyphs[code] = self._ft.get_char_index(code)
        return glyph

    def _advance(self, glyph: int) -> int:
        with self._lock:
            return self._ft.get_advance(glyph, self._no_scale)

    def scale(self, advance: int) -> float:
        """Font units -> 1/1000 em, as reportlab computes it (exact when unitsPerEm is 1000)."""
        return advance if self.units_per_em == 1000 else advance * (1000 / self.units_per_em)

    def has(self, code: int) -> bool:
        """Whether the font maps ``code`` to a glyph other than glyph 0 (its missing-glyph box)."""
        return self._glyph(code) != 0

    def units(self, code: int) -> int:
        """The advance width of ``code``'s glyph in font units (glyph 0's when it has none)."""
        return self._advance(self._glyph(code))

    def width(self, code: int) -> float:
        """``code``'s advance width in 1/1000 em, as reportlab's ``stringWidth`` has it."""
        return self.scale(self.units(code))


@lru_cache(maxsize=16)
def metrics(face: FontFace) -> FontMetrics:
    return FontMetrics(face)


class CharTable(dict):
    """char -> (width in 1/1000 em, font slot) for one main font, with or without fallbacks.

    Slot 0 is the main font, 1.. the fallbacks. A character no font has is the main font's
    glyph 0 (its missing-glyph box), as reportlab draws it. Filled lazily: ``table[ch]``
    always answers. Two tables with the same ``faces`` give the same answers.
    """

    def __init__(self, main: FontFace, fallback: bool = False):
        super().__init__()
        self.faces: tuple[FontFace, ...] = (main, *fallback_faces(main)) if fallback else (main,)
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
            entry = (main.width(code), 0)
        else:
            for slot in range(1, len(self.faces)):
                m = self._metrics_of(slot)
                if m.has(code):
                    # the advance the glyph gets once copied into the main font (its units per em)
                    entry = (main.scale(round(m.units(code) * main.units_per_em / m.units_per_em)), slot)
                    break
        if entry is None:
            entry = (main.default_width, 0)  # drawn as the main font's .notdef, as reportlab would
        self[ch] = entry
        return entry

    def lacks(self, ch: str) -> bool:
        """Whether ``ch`` is drawn as the missing-glyph box: no font of the table has it (the main font, or with
        fallbacks none of them either; U+00A0 is drawn as a space)."""
        return not self._metrics[0].has(ord(ch)) and self[ch][1] == 0


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
    """The family name of each face of a font file (one, or several for a .ttc); () if unreadable."""
    import freetype

    try:
        count = freetype.Face(path).num_faces
        return tuple((freetype.Face(path, i).family_name or b"").decode("utf-8", "replace") for i in range(count))
    except (freetype.FT_Exception, OSError):
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
