"""Rasterising laid-out pages in memory, the way poppler's Splash rasteriser draws the PDF.

Glyph origins are computed with the PDF's own arithmetic (reportlab's rounded numbers,
poppler's matrix products, left-to-right advance sums), then quantised like Splash: the
integer pixel of the origin plus one of four horizontal sub-pixel phases. Each (glyph,
phase) is rendered once with FreeType, unhinted and anti-aliased exactly as Splash asks
for it, and cached as a list of pixels. A page is composited in one vectorised pass over
all its glyph pixels: the light each lets through (1 - coverage) is multiplied into the
page (``np.multiply.at``), which is the ``over`` blending Splash does glyph after glyph.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from glyphserve.render.config import RenderConfig, parse_color
from glyphserve.render.crop import crop_page, pil_round
from glyphserve.render.fonts import CharTable, FontFace
from glyphserve.render.layout import PageLayout
from glyphserve.render.lines import frame_geometry
from glyphserve.render.text import pdf_number

PHASES = 4  # Splash's splashFontFraction
_PIXEL = np.dtype([("offset", "<i4"), ("through", "<f4")])


def page_pixels(config: RenderConfig) -> tuple[int, int]:
    """(width, height) of the page image pdftoppm produces."""
    s = config.scale
    return math.ceil(config.page_size[0] * s), math.ceil(config.page_size[1] * s)


class GlyphAtlas:
    """Glyph bitmaps of one font set at one pixel size, kept as sparse pixel lists."""

    def __init__(self, table: CharTable, size_px: float):
        import freetype  # freetype-py: FreeType with the load flags poppler uses

        self._ft = freetype
        self.table = table
        self.size_px = size_px
        # Splash: FreeType size = the rounded pixel size, the rest done by the matrix
        self.ppem = max(1, math.floor(size_px + 0.5))
        scale = size_px / self.ppem
        self._matrix = freetype.Matrix(int(scale * 65536), 0, 0, int(scale * 65536))
        self._flags = freetype.FT_LOAD_NO_HINTING | freetype.FT_LOAD_NO_BITMAP
        self._faces: dict[int, object] = {}
        self._phased: dict[int, bool] = {}
        self._keys: dict[tuple[int, str, int], int] = {}
        self.lock = threading.Lock()
        self._meta: list[tuple[int, int, int, int]] = []  # per entry: left, top, rows, width
        self._rows: list[np.ndarray] = []
        self._cols: list[np.ndarray] = []
        self._through: list[np.ndarray] = []
        self._packed: tuple | None = None
        self._packed_width = -1

    def _face(self, slot: int):
        face = self._faces.get(slot)
        if face is None:
            spec: FontFace = self.table.faces[slot]
            face = self._ft.Face(spec.path, spec.index)
            face.set_pixel_sizes(0, self.ppem)
            self._faces[slot] = face
            # Splash gives up sub-pixel phases when the font's bbox is over 50 px tall.
            upm = face.units_per_EM
            y_hi = int(self.size_px * face.bbox.yMax / upm)
            y_lo = int(self.size_px * face.bbox.yMin / upm)
            self._phased[slot] = (y_hi - y_lo + 3) <= 50
        return face

    def phased(self, slot: int) -> bool:
        self._face(slot)
        return self._phased[slot]

    def entry(self, slot: int, ch: str, phase: int) -> int:
        key = (slot, ch, phase)
        idx = self._keys.get(key)
        if idx is None:
            idx = self._keys[key] = self._render(slot, ch, phase)
        return idx

    def _render(self, slot: int, ch: str, phase: int) -> int:
        face = self._face(slot)
        face.set_transform(self._matrix, self._ft.Vector(phase * 64 // PHASES, 0))
        face.load_char(ch, self._flags)  # a character no font has gets glyph 0 (.notdef), as in the PDF
        glyph = face.glyph
        glyph.render(self._ft.FT_RENDER_MODE_NORMAL)
        bm = glyph.bitmap
        if bm.rows and bm.width:
            a = np.array(bm.buffer, dtype=np.uint8).reshape(bm.rows, bm.pitch)[:, : bm.width]
            rows, cols = np.nonzero(a)
            through = 1.0 - a[rows, cols] / 255.0
        else:
            rows = cols = np.zeros(0, dtype=np.int64)
            through = np.zeros(0)
        self._meta.append((glyph.bitmap_left, glyph.bitmap_top, bm.rows, bm.width))
        self._rows.append(rows)
        self._cols.append(cols)
        self._through.append(through)
        self._packed = None
        return len(self._meta) - 1

    def packed(self, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(meta [left, top, rows, width], first pixel, pixel count, pixels) with pixel
        offsets for a canvas ``width`` wide."""
        if self._packed is None or self._packed_width != width:
            counts = np.array([len(r) for r in self._rows], dtype=np.int64)
            pixels = np.empty(int(counts.sum()), dtype=_PIXEL)
            if len(pixels):
                pixels["offset"] = np.concatenate(self._rows) * width + np.concatenate(self._cols)
                pixels["through"] = np.concatenate(self._through)
            start = np.concatenate(([0], np.cumsum(counts)[:-1]))
            self._packed = (np.array(self._meta, dtype=np.int64).reshape(-1, 4), start, counts, pixels)
            self._packed_width = width
        return self._packed


class RasterContext:
    """What painting needs besides the layout: geometry, colours, glyphs, PDF widths."""

    def __init__(self, config: RenderConfig, table: CharTable, atlas: GlyphAtlas):
        cfg = self.config = config
        self.table = table
        self.atlas = atlas
        self.s = cfg.scale
        self.width, self.height = page_pixels(cfg)
        self.pad = 2 * math.ceil(cfg.font_size * self.s) + 8
        self.canvas_w = self.width + 2 * self.pad
        self.canvas_h = self.height + 2 * self.pad
        self.page_rgb = parse_color(cfg.page_bg_color)
        self.page_bg = np.array(self.page_rgb, dtype=np.float64)
        self.para_bg = parse_color(cfg.para_bg_color)
        self.border = parse_color(cfg.para_border_color)
        self.fg = np.array(parse_color(cfg.font_color), dtype=np.float64)
        self.red = np.array((255.0, 0.0, 0.0))
        # grey text on a grey page, unscaled: the fast path (the official configs)
        self.fast_gray = bool(np.all(self.page_bg == self.page_bg[0]) and np.all(self.fg == self.fg[0])
                              and cfg.horizontal_scale == 1.0)
        self.font_size = pdf_number(cfg.font_size)
        self.leading = pdf_number(cfg.line_height)
        self.avail_width = frame_geometry(cfg)[3]
        # characters seen so far: code point -> index into the per-character arrays
        self._bmp = np.full(0x10000, -1, dtype=np.int32)
        self._astral: dict[int, int] = {}
        self._chars: list[str] = []
        self._adv: list[float] = []
        self._slot: list[int] = []
        self._inked: list[bool] = []
        self._phased: list[bool] = []
        self._arrays: tuple | None = None
        self._entries = np.full((0, PHASES), -1, dtype=np.int64)
        self._local = threading.local()

    def workspace(self) -> _Workspace:
        """Scratch buffers for this thread (allocating them per page costs page faults)."""
        ws = getattr(self._local, "ws", None)
        if ws is None:
            ws = self._local.ws = _Workspace(self)
        return ws

    def scratch(self) -> np.ndarray:
        """An all-ones float32 canvas (padded page) for this thread; the caller owns it until
        it hands it back with ``release``."""
        free = self.workspace().canvases
        return free.pop() if free else np.ones(self.canvas_w * self.canvas_h, dtype=np.float32)

    def release(self, canvas: np.ndarray) -> None:
        canvas.fill(1.0)  # a memset: cheaper than resetting the pixels touched, scattered
        self.workspace().canvases.append(canvas)

    def char_index(self, codes: np.ndarray) -> np.ndarray:
        """Index of each code point in the per-character arrays (registering new ones)."""
        bmp = codes < 0x10000
        idx = np.where(bmp, self._bmp[np.where(bmp, codes, 0)], -1)
        missing = idx < 0
        if missing.any():
            for cp in np.unique(codes[missing]).tolist():
                if cp < 0x10000 and self._bmp[cp] >= 0 or cp in self._astral:
                    continue
                self._register(chr(cp))
            idx = np.where(bmp, self._bmp[np.where(bmp, codes, 0)], -1)
            for i in np.flatnonzero(~bmp).tolist():
                idx[i] = self._astral[int(codes[i])]
        return idx

    def _register(self, ch: str) -> None:
        width, slot = self.table[ch]
        i = len(self._chars)
        self._chars.append(ch)
        # advance as poppler computes it from the PDF's widths array
        self._adv.append((pdf_number(width) * 0.001) * self.font_size)
        self._slot.append(slot)
        self._inked.append(ch not in " \xa0")
        self._phased.append(self.atlas.phased(slot))
        if ord(ch) < 0x10000:
            self._bmp[ord(ch)] = i
        else:
            self._astral[ord(ch)] = i
        self._arrays = None

    def char_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(advance, inked, phased) per registered character."""
        if self._arrays is None:
            self._arrays = (np.array(self._adv), np.array(self._inked, dtype=bool), np.array(self._phased, dtype=bool))
        return self._arrays

    def entries(self, keys: np.ndarray) -> np.ndarray:
        """Atlas entry of each (character index * PHASES + phase) key, rendering new glyphs."""
        table = self._entries
        n_chars = len(self._chars)
        if len(table) < n_chars:
            grown = np.full((n_chars, PHASES), -1, dtype=np.int64)
            grown[: len(table)] = table
            table = self._entries = grown
        flat = table.reshape(-1)
        found = flat[keys]
        if (found < 0).any():
            for key in np.unique(keys[found < 0]).tolist():
                ci, phase = divmod(key, PHASES)
                flat[key] = self.atlas.entry(self._slot[ci], self._chars[ci], phase)
            found = flat[keys]
        return found


class _Workspace:
    def __init__(self, rc: RasterContext):
        self.canvases: list[np.ndarray] = []
        self.scaled = np.empty((rc.height, rc.width), dtype=np.float32)
        self.gray = np.empty((rc.height, rc.width), dtype=np.uint8)
        self._ramp = np.arange(0, dtype=np.int64)

    def ramp(self, n: int) -> np.ndarray:
        """0, 1, ..., n-1 (a view of a kept array)."""
        if len(self._ramp) < n:
            self._ramp = np.arange(max(n, 2 * len(self._ramp)), dtype=np.int64)
        return self._ramp[:n]



@dataclass
class DrawList:
    """One page reduced to what poppler would draw: small and picklable (for worker processes)."""

    texts: list[str]  # inked lines only
    x_origin: list[float]  # text-space x of each line's first glyph (poppler's curX)
    x_ctm: list[float]  # the CTM's x translation of that line's paragraph
    y_dev: list[float]  # baseline in device pixels (before Splash floors it)
    word_space: list[float]  # Tw of the line
    red_spans: list[tuple[int, int]]  # [start, end) into "".join(texts) drawn in the marker colour
    line_para: list[int]  # index on the page of each inked line's paragraph
    # paragraph backgrounds and borders, painted in order, each before its paragraph's text:
    # (x, y, width, height in points from the bottom left, colour, paragraph index)
    rects: list[tuple[float, float, float, float, tuple[int, int, int], int]]
    line_y: list[float]  # baseline of every laid-out line, inked or not


def draw_list(page: PageLayout, rc: RasterContext) -> DrawList:
    """Geometry of a page with the PDF's own arithmetic: reportlab's rounded numbers and
    poppler's matrix products, operation for operation."""
    cfg = rc.config
    s = rc.s
    base5 = s * cfg.page_size[1]
    out = DrawList([], [], [], [], [], [], [], [], [])
    pos = 0
    tm_x = pdf_number(cfg.left_indent)
    left = cfg.alignment == "LEFT"
    for index, para in enumerate(page.paragraphs):
        cm_x, cm_y = pdf_number(para.x), pdf_number(para.y)
        ctm4 = cm_x * s
        ctm5 = cm_y * (-s) + base5
        _para_rects(para, rc, cm_x, cm_y, index, out.rects)
        tm_y = pdf_number(para.height - cfg.font_size)
        line_y = 0.0
        last = len(para.lines) - 1
        for i, line in enumerate(para.lines):
            if i:
                line_y = line_y - rc.leading
            y = -s * (line_y + tm_y) + ctm5
            out.line_y.append(y)
            if not line.text.strip(" "):
                continue
            indent = para.first_indent if i == 0 else 0.0
            if left and line.extra > -1e-8:  # the usual case: no shift, no word spacing
                offset, tw = indent, 0.0
            else:
                offset, tw = _line_offset(line, cfg, indent, i == last and not para.justify_last)
            out.texts.append(line.text)
            out.x_origin.append((pdf_number(offset) if offset else 0.0) + tm_x)
            out.x_ctm.append(ctm4)
            out.y_dev.append(y)
            out.word_space.append(tw)
            out.line_para.append(index)
            if line.red:
                out.red_spans.extend((pos + a, pos + b) for a, b in line.red)
            pos += len(line.text)
    return out


def _line_offset(line, cfg: RenderConfig, first_indent: float, last: bool) -> tuple[float, float]:
    """reportlab's per-line x offset and word spacing (Tw) for the paragraph alignment."""
    extra = line.extra
    n_spaces = line.word_count + line.text.count("\xa0") - 1
    align = cfg.alignment
    if align == "JUSTIFY":
        simple = line.hard_break or (-1e-8 < extra <= 1e-8) or (last and extra > -1e-8)
        if not simple and n_spaces > 0:
            return first_indent, pdf_number(extra / n_spaces)
        return first_indent, 0.0
    if extra > -1e-8 or n_spaces <= 0:
        shift = {"LEFT": 0.0, "CENTER": 0.5 * extra, "RIGHT": extra}[align]
        return first_indent + shift, 0.0
    return first_indent, pdf_number(extra / n_spaces)


def paint(dl: DrawList, rc: RasterContext, *, last: bool,
          alloc: Callable[..., np.ndarray] = np.empty) -> np.ndarray:
    """The page as poppler renders the PDF, auto-cropped like the official script, in an
    array from ``alloc(shape)`` (e.g. shared memory): HxW uint8 grey when it has no colour
    (grey text on a grey page), else HxWx3 uint8 RGB."""
    layers = _glyph_layers(dl, rc) if dl.texts else []
    # rects in the page's colour change nothing but the ink they cover (dropped from the layers)
    visible = any(color != rc.page_rgb for *_, color, _ in dl.rects)
    try:
        if rc.fast_gray and not visible and len(layers) <= 1 and not (layers and layers[0][0]):
            return _paint_gray(layers[0][1] if layers else None, rc, last, alloc)
        canvas = np.empty((rc.height, rc.width, 3), dtype=np.float64)
        canvas[...] = rc.page_bg
        if visible:
            _fill_rects(canvas, rc, dl.rects)
        for red, through in layers:
            color = rc.red if red else rc.fg
            cover = _page_region(through, rc)[..., None]
            canvas *= cover
            canvas += color * (1.0 - cover)
    finally:
        for _, through in layers:
            rc.release(through)
    rgb = np.rint(canvas).astype(np.uint8)
    if rc.config.horizontal_scale != 1.0:
        from PIL import Image

        img = Image.fromarray(rgb)
        rgb = np.asarray(img.resize((int(img.width * rc.config.horizontal_scale), img.height)))
    rgb = crop_page(rgb, rc.config, last=last)
    out = alloc(rgb.shape, dtype=np.uint8)
    out[...] = rgb
    return out


def _page_region(canvas: np.ndarray, rc: RasterContext) -> np.ndarray:
    p = rc.pad
    return canvas.reshape(rc.canvas_h, rc.canvas_w)[p : p + rc.height, p : p + rc.width]


def _paint_gray(through: np.ndarray | None, rc: RasterContext, last: bool, alloc) -> np.ndarray:
    """Grey text on a grey page: one channel, cropped."""
    bg = float(rc.page_bg[0])
    fg = float(rc.fg[0])
    ws = rc.workspace()
    page = ws.gray
    if through is None:
        page.fill(int(bg))
    else:
        np.multiply(_page_region(through, rc), bg - fg, out=ws.scaled)
        np.add(ws.scaled, fg + 0.5, out=page, casting="unsafe")  # the cast truncates: + 0.5 rounds
    lower, right = _crop_box(page, rc.config, last)
    out = alloc((lower, right), dtype=np.uint8)
    out[...] = page[:lower, :right]
    return out


def _crop_box(gray: np.ndarray, cfg: RenderConfig, last: bool) -> tuple[int, int]:
    """(lower, right) of the official auto-crop, from the greyscale page."""
    height, width = gray.shape
    crop_last = cfg.auto_crop_last_page and last
    if not (cfg.auto_crop_width or crop_last):
        return height, width
    m = float(np.median(gray[:2, :2]))
    # ink: |g - m| > 5, i.e. g <= dark or g >= light for integer g
    dark, light = math.ceil(m - 5) - 1, math.floor(m + 5) + 1

    def inked(axis: int) -> np.ndarray:
        found = gray.min(axis=axis) <= dark
        if light <= 255:
            found |= gray.max(axis=axis) >= light
        return np.flatnonzero(found)

    right, lower = width, height
    if cfg.auto_crop_width:
        cols = inked(0)
        if cols.size:
            right = min(width, pil_round(cols[-1] + 1 + cfg.margin_x))
    if crop_last:
        rows = inked(1)
        if rows.size:
            lower = min(height, pil_round(rows[-1] + cfg.margin_y))
    return lower, right


def _glyph_layers(dl: DrawList, rc: RasterContext) -> list[tuple[bool, np.ndarray]]:
    """Per colour (black, then the red marker if any): the flat padded canvas of light let
    through once every glyph of that colour is drawn (scratch canvases: hand them back with
    ``rc.release``)."""
    s = rc.s
    texts = dl.texts
    codes = np.frombuffer("".join(texts).encode("utf-32-le"), dtype="<u4").astype(np.int64)
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    n_lines = len(texts)
    line_id = np.repeat(np.arange(n_lines), lengths)
    pos_in_line = np.arange(len(codes)) - np.repeat(np.cumsum(lengths) - lengths, lengths)

    with rc.atlas.lock:
        ci = rc.char_index(codes)
        adv_c, inked_c, phased_c = rc.char_arrays()
        adv = adv_c[ci]
        tws = np.asarray(dl.word_space)
        if tws.any():  # word spacing: reportlab draws U+00A0 as the space (code 32) it applies to
            adv = adv + np.where((codes == 32) | (codes == 0xA0), tws[line_id], 0.0)

        # poppler's text position: the line origin plus the advances before it, added one
        # by one; then the CTM: s * x + translation.
        grid = np.zeros((n_lines, int(lengths.max()) + 1))
        grid[:, 0] = dl.x_origin
        grid[line_id, pos_in_line + 1] = adv
        np.add.accumulate(grid, axis=1, out=grid)
        x_dev = s * grid[line_id, pos_in_line] + np.asarray(dl.x_ctm)[line_id]
        x0 = np.floor(x_dev)
        phase = np.floor((x_dev - x0) * PHASES).astype(np.int64)
        phase[~phased_c[ci]] = 0
        y0 = np.floor(np.asarray(dl.y_dev)).astype(np.int64)[line_id]

        sel = np.flatnonzero(inked_c[ci])
        entries = rc.entries(ci[sel] * PHASES + phase[sel])
        meta, e_start, e_count, pixels = rc.atlas.packed(rc.canvas_w)

    col = x0.astype(np.int64)[sel] + meta[entries, 0] + rc.pad
    row = y0[sel] - meta[entries, 1] + rc.pad
    # glyphs that would leave the padded canvas are off the page: skip them
    ok = (col >= 0) & (row >= 0) & (col + meta[entries, 3] <= rc.canvas_w) & (row + meta[entries, 2] <= rc.canvas_h)
    base = row * rc.canvas_w + col
    para = np.asarray(dl.line_para, dtype=np.int64)[line_id[sel]]
    covers = _later_rects(dl, rc, para, row, col, meta[entries, 2], meta[entries, 3])

    ws = rc.workspace()

    def layer(m: np.ndarray) -> np.ndarray:
        ent = entries[m]
        counts = e_count[ent]
        total = int(counts.sum())
        first = np.repeat(e_start[ent] - np.cumsum(counts) + counts, counts)
        first += ws.ramp(total)  # each glyph's pixels: consecutive entries of ``pixels``
        px = pixels[first]
        idx = np.repeat(base[m], counts)
        idx += px["offset"]
        through = px["through"]
        if covers is not None and covers[0][m].any():
            _uncover(idx, through, counts, para[m], covers[0][m], covers[1], rc)
        # Splash draws glyph after glyph with "over": the light let through multiplies.
        canvas = rc.scratch()
        np.multiply.at(canvas, idx, through)
        return canvas

    if not dl.red_spans:
        return [(False, layer(ok))]
    is_red = np.zeros(len(codes), dtype=bool)
    for a, b in dl.red_spans:
        is_red[a:b] = True
    is_red = is_red[sel]
    return [(False, layer(ok & ~is_red)), (True, layer(ok & is_red))]


def _para_rects(para, rc: RasterContext, cm_x: float, cm_y: float, index: int, rects: list) -> None:
    """reportlab paints each paragraph's background (the official style always sets one, white
    by default) and border before its text, so it covers the descenders of the paragraph above."""
    cfg = rc.config
    bp = cfg.border_padding
    x = cm_x + cfg.left_indent - bp
    y = cm_y - bp
    w = rc.avail_width - (cfg.left_indent + cfg.right_indent) + 2 * bp
    h = para.height + 2 * bp
    rects.append((x, y, w, h, rc.para_bg, index))
    if cfg.border_width > 0:
        bw = cfg.border_width
        for rx, ry, rw, rh in ((x - bw / 2, y - bw / 2, w + bw, bw), (x - bw / 2, y + h - bw / 2, w + bw, bw),
                               (x - bw / 2, y - bw / 2, bw, h + bw), (x + w - bw / 2, y - bw / 2, bw, h + bw)):
            rects.append((rx, ry, rw, rh, rc.border, index))


def _rect_pixels(rect: tuple, rc: RasterContext) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) pixel bounds a rectangle fills: Splash snaps its edges to
    whole pixels (stroke adjustment)."""
    x, y, w, h = rect[:4]
    s = rc.s
    page_h = rc.config.page_size[1]
    c0, c1 = math.floor(x * s + 0.5), math.floor((x + w) * s + 0.5)
    r0, r1 = math.floor((page_h - y - h) * s + 0.5), math.floor((page_h - y) * s + 0.5)
    return max(r0, 0), max(r1, 0), max(c0, 0), max(c1, 0)


def _fill_rects(canvas: np.ndarray, rc: RasterContext, rects: list) -> None:
    for rect in rects:
        r0, r1, c0, c1 = _rect_pixels(rect, rc)
        canvas[r0:r1, c0:c1] = rect[4]


def _later_rects(dl: DrawList, rc: RasterContext, para: np.ndarray, row: np.ndarray, col: np.ndarray,
                 rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Glyphs that a later paragraph's rectangle partly paints over (in practice the
    descenders of a paragraph's last line), and those rectangles in padded-canvas pixels
    (top, bottom, left, right, paragraph); None when there are none."""
    if not dl.rects or dl.rects[-1][5] == 0:  # rects come in paragraph order
        return None
    boxes = np.array([(*_rect_pixels(r, rc), r[5]) for r in dl.rects], dtype=np.int64)
    boxes[:, :4] += rc.pad
    hit = np.zeros(len(para), dtype=bool)
    for r0, r1, c0, c1, owner in boxes:
        hit |= (para < owner) & (row < r1) & (row + rows > r0) & (col < c1) & (col + cols > c0)
    return (hit, boxes) if hit.any() else None


def _uncover(idx: np.ndarray, through: np.ndarray, counts: np.ndarray, para: np.ndarray, suspect: np.ndarray,
             boxes: np.ndarray, rc: RasterContext) -> None:
    """Let the pixels of glyphs that a later paragraph's rectangle paints over through
    (``through`` set to 1, which the compositing then ignores); only ``suspect`` glyphs'
    pixels are looked at."""
    ends = np.cumsum(counts)
    glyphs = np.flatnonzero(suspect)
    n = counts[glyphs]
    where = np.repeat(ends[glyphs] - n - (np.cumsum(n) - n), n) + np.arange(int(n.sum()))
    r, c = np.divmod(idx[where], rc.canvas_w)
    owner = np.repeat(para[glyphs], n)
    gone = np.zeros(len(where), dtype=bool)
    for r0, r1, c0, c1, later in boxes:
        gone |= (owner < later) & (r >= r0) & (r < r1) & (c >= c0) & (c < c1)
    through[where[gone]] = 1.0
