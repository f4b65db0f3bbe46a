"""Decode text files of unknown encoding.

Exact checks come first (byte-order marks, the NUL pattern of BOM-less UTF-16, UTF-8).
Legacy encodings fall back to charset-normalizer, limited to common encodings; its
candidates are checked with :func:`plausibility` (common CJK characters, letters that
form sensible words, usual punctuation) so that short or ambiguous inputs do not end up
in an odd code page: Chinese GBK text is read as gb18030, Western text as cp1252.
"""

from __future__ import annotations

import codecs
import functools
import re
import string
import unicodedata
from dataclasses import dataclass

import charset_normalizer

_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le", "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be", "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8", "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16-le", "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be", "utf-16-be"),
)

# The legacy encodings considered; on a tie the earlier one wins, so Chinese GBK text
# is read as gb18030 (its superset) and Western text as cp1252 rather than a rarer cousin.
_PREFERRED = (
    "gb18030", "big5", "shift_jis", "cp932", "euc_jp", "euc_kr", "cp949",
    "cp1252", "cp1250", "cp1251", "koi8_r", "cp1253", "cp1254", "cp1255",
    "cp1256", "cp1257", "cp874", "latin_1",
)
_PREFERRED_CODECS = tuple(codecs.lookup(name).name for name in _PREFERRED)

_SCAN_BYTES = 64 * 1024
_MAX_RUNS = 3000  # runs of non-ASCII characters scored per candidate
_MIN_SCORE = 0.35
_PLAUSIBILITY_MARGIN = 0.1
# A BOM-less UTF-16 guess on weak evidence (fewer than this share of its high bytes zero: ASCII-heavy UTF-16 has
# ~0.9) must read as writing: ASCII with a NUL after every 5th letter ("hello\0world\0"..., 0.33 zero) decoded to
# rare CJK characters (plausibility 0.25; writing ~1; a text of emoji or maths symbols scores low too, hence the
# strong evidence passing alone).
_STRONG_UTF16_ZEROS = 0.8
_MIN_UTF16_PLAUSIBILITY = 0.6
_MAX_CONTROL_RATIO = 0.02
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1a\x1c-\x1f\x7f-\x9f]")  # \t \n \v \f \r ESC allowed
_NON_ASCII_RUN = re.compile(r"[^\x00-\x7f]{1,32}")
_COMMON_SYMBOL_RANGES = (
    (0x00A0, 0x00BF), (0x00D7, 0x00D7), (0x00F7, 0x00F7), (0x2010, 0x203A),
    (0x20AC, 0x20AC), (0x2116, 0x2122), (0x2190, 0x21FF), (0x2460, 0x24FF),
    (0x25A0, 0x25FF), (0x3000, 0x303F), (0xFF01, 0xFF65),
)
_CJK_SCRIPTS = frozenset({"CJK", "HIRAGANA", "KATAKANA", "HANGUL"})


@dataclass(frozen=True)
class DecodedText:
    text: str
    encoding: str  # a Python codec name, "utf-8-sig" for UTF-8 with a BOM


def decode_text(data: bytes) -> DecodedText | None:
    """Decode ``data`` if it looks like text; ``None`` when it looks binary."""
    decoded = _decode_with_bom(data) or _decode_bomless_utf16(data)
    if decoded is None:
        head = data[:_SCAN_BYTES]
        if head.count(0) > len(head) // 100:
            return None
        decoded = _decode_utf8(data) or _decode_legacy(data)
    if decoded is None or not _looks_like_text(decoded.text):
        return None
    return decoded


def _decode_with_bom(data: bytes) -> DecodedText | None:
    for bom, codec, name in _BOMS:
        if data.startswith(bom):
            try:
                return DecodedText(data[len(bom):].decode(codec), name)
            except UnicodeDecodeError:
                continue  # e.g. a UTF-16 LE BOM followed by a NUL looks like UTF-32
    return None


def _decode_bomless_utf16(data: bytes) -> DecodedText | None:
    head = data[: _SCAN_BYTES & ~1]
    pairs = len(head) // 2
    if not pairs:
        return None
    zeros_even = head[0::2].count(0) / pairs
    zeros_odd = head[1::2].count(0) / pairs
    if zeros_odd > 0.3 and zeros_even < 0.02:
        codec = "utf-16-le"
    elif zeros_even > 0.3 and zeros_odd < 0.02:
        codec = "utf-16-be"
    else:
        return None
    try:
        text = data[: len(data) & ~1].decode(codec)
    except UnicodeDecodeError:
        return None
    weak = max(zeros_odd, zeros_even) < _STRONG_UTF16_ZEROS
    if weak and plausibility(text[:_SCAN_BYTES]) < _MIN_UTF16_PLAUSIBILITY:
        return None
    return DecodedText(text, codec)


def _decode_utf8(data: bytes) -> DecodedText | None:
    try:
        return DecodedText(data.decode("utf-8"), "utf-8")
    except UnicodeDecodeError:
        pass
    # Mostly valid UTF-8 with a few damaged bytes (a cut-off file, a stray byte) stays
    # UTF-8: a legacy codec would garble every one of its many valid sequences.
    text = data.decode("utf-8", "replace")
    bad = text.count("\ufffd")
    valid_non_ascii = len(text) - len(text.encode("ascii", "ignore")) - bad
    if valid_non_ascii >= 20 and bad * 50 <= valid_non_ascii:
        return DecodedText(text, "utf-8")
    return None


def _decode_legacy(data: bytes) -> DecodedText | None:
    """charset-normalizer, limited to common encodings, proposes decodings; implausible
    ones are dropped, then the least chaotic, most coherent wins, ties going to the
    earlier entry of ``_PREFERRED``."""
    ranked = []
    for match in charset_normalizer.from_bytes(data, cp_isolation=list(_PREFERRED)):
        codecs_ = {_canonical(name) for name in (match.encoding, *match.could_be_from_charset)}
        codecs_.discard(None)
        if not codecs_:
            continue
        codec = min(codecs_, key=_preference)
        text = str(match)
        ranked.append((plausibility(text), match.chaos, match.coherence, codec, text))
    if not ranked:
        return None
    best_plausibility = max(entry[0] for entry in ranked)
    if best_plausibility < _MIN_SCORE:
        return None
    candidates = [entry for entry in ranked if entry[0] >= best_plausibility - _PLAUSIBILITY_MARGIN]
    _, _, _, codec, text = min(
        candidates, key=lambda e: (round(e[1], 2), -round(e[2], 2), _preference(e[3]))
    )
    return DecodedText(text, codec)


def _preference(codec: str) -> int:
    return _PREFERRED_CODECS.index(codec) if codec in _PREFERRED_CODECS else len(_PREFERRED_CODECS)


def _canonical(name: str) -> str | None:
    try:
        codec = codecs.lookup(name).name
    except LookupError:
        return None
    return "gb18030" if codec in ("gbk", "gb2312") else codec


def plausibility(text: str) -> float:
    """How much ``text``'s non-ASCII characters look like real writing, about -3..1.

    Used to compare decodings of the same bytes: common CJK characters, letters that
    form sensible words and usual punctuation score high; control, private-use and
    unassigned characters, halfwidth katakana and script soup score low.
    """
    total = 0.0
    count = 0
    scripts: dict[str, int] = {}
    for index, match in enumerate(_NON_ASCII_RUN.finditer(text)):
        if index >= _MAX_RUNS:
            break
        run = match.group()
        before = _trailing_ascii_letters(text[max(0, match.start() - 16) : match.start()])
        after = _trailing_ascii_letters(text[match.end() : match.end() + 16][::-1])
        in_latin_word = before + after > 0
        case_flip = _has_case_flip(run)
        mostly_non_ascii = len(run) >= 2 and len(run) > before + after
        for char in run:
            kind, script = _classify(char)
            count += 1
            if kind == "letter":
                scripts[script] = scripts.get(script, 0) + 1
                if script in _CJK_SCRIPTS:
                    total += 1.0 if char in _common_cjk() else 0.0
                elif in_latin_word and script != "LATIN":
                    total -= 1.0  # e.g. "cafй": a Cyrillic letter inside a Latin word
                elif not (case_flip or (script == "LATIN" and mostly_non_ascii)):
                    total += 1.0
            else:
                total += {"bad": -3.0, "rare": -1.0, "common": 1.0}.get(kind, 0.0)
    if count == 0:
        return 1.0
    letters = sum(scripts.values())
    dominance = max(scripts.values()) / letters if letters else 1.0
    return total / count * (0.5 + 0.5 * dominance)


def _trailing_ascii_letters(text: str) -> int:
    return len(text) - len(text.rstrip(string.ascii_letters))


def _has_case_flip(token: str) -> bool:
    letters = [c for c in token if c.isalpha() and not c.isascii()]
    return any(a.islower() and b.isupper() for a, b in zip(letters, letters[1:]))


@functools.lru_cache(maxsize=65536)
def _classify(char: str) -> tuple[str, str]:
    category = unicodedata.category(char)
    if category in ("Cc", "Cs", "Co", "Cn") or char == "\ufffd":
        return "bad", ""
    name = unicodedata.name(char, "")
    if name.startswith("HALFWIDTH KATAKANA"):
        return "rare", ""
    if category[0] == "L":
        script = name.split(" ", 1)[0]
        return "letter", "CJK" if script.startswith("CJK") else script
    point = ord(char)
    if any(lo <= point <= hi for lo, hi in _COMMON_SYMBOL_RANGES):
        return "common", ""
    return "other", ""


@functools.cache
def _common_cjk() -> frozenset[str]:
    """Frequent CJK characters: GB2312, Big5 level 1, JIS level 1 with kana, KS X 1001 hangul."""
    tables = (
        ("gb2312", range(0xB0, 0xF8), range(0xA1, 0xFF)),
        ("big5", range(0xA4, 0xC7), [*range(0x40, 0x7F), *range(0xA1, 0xFF)]),
        ("shift_jis", range(0x82, 0x99), [*range(0x40, 0x7F), *range(0x80, 0xFD)]),
        ("euc_kr", range(0xB0, 0xC9), range(0xA1, 0xFF)),
    )
    chars: set[str] = set()
    for codec, leads, trails in tables:
        for lead in leads:
            for trail in trails:
                try:
                    chars.add(bytes((lead, trail)).decode(codec))
                except UnicodeDecodeError:
                    pass
    return frozenset(chars)


def _looks_like_text(text: str) -> bool:
    if not text:
        return True
    controls = len(_CONTROL.findall(text))
    return controls <= len(text) * _MAX_CONTROL_RATIO
