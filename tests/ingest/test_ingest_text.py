"""Plain text and Markdown: encodings, newlines, empties."""

from __future__ import annotations

import codecs

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from glyphserve.errors import EmptyDocumentError, UnsupportedTypeError
from glyphserve.ingest import TextPart, ingest_bytes, ingest_text
from glyphserve.ingest.textenc import plausibility

CHINESE = "长文本被渲染成紧凑的页面图像，然后由视觉语言模型阅读。我们希望检测到正确的编码。"
SAMPLES = [
    ("utf-8", "Grüße, 世界! Ünïcödé ✓ 🎉", "utf-8"),
    ("utf-8-sig", "With a byte-order mark: café", "utf-8-sig"),
    ("utf-16", "UTF-16 with BOM: naïve 中文", "utf-16-le"),  # Python writes a LE BOM here
    ("utf-16-be", "\ufeffUTF-16 BE with BOM: naïve 中文", "utf-16-be"),
    ("utf-32", "UTF-32 with BOM: ok", "utf-32-le"),
    ("gbk", CHINESE, "gb18030"),
    ("gb18030", "中文测试，还有一个罕见字：𠀀。", "gb18030"),
    ("gbk", "你好，世界", "gb18030"),
    ("big5", "這是一個用於測試的繁體中文文本。我們希望檢測到正確的編碼。", "big5"),
    ("shift_jis", "これはテスト用の日本語のテキストです。正しく読めるはずです。", "shift_jis"),
    ("euc_kr", "안녕하세요. 이것은 한국어 테스트 텍스트입니다.", "euc_kr"),
    ("cp1252", "Café “quotes” — naïve façade, déjà vu. Price: 5€.", "cp1252"),
    ("cp1252", "El niño comió jamón. ¿Qué pasó?", "cp1252"),
    ("latin-1", "Grüße aus München, schöne Straße.", "cp1252"),
    ("cp1251", "Привет, мир. Это тестовый текст на русском языке.", "cp1251"),
    ("koi8-r", "Привет, мир. Это тестовый текст на русском языке.", "koi8-r"),
    ("cp1250", "Zażółć gęślą jaźń. Łódź jest pięknym miastem.", "cp1250"),
]


@pytest.mark.parametrize(
    ("codec", "text", "expected"), SAMPLES, ids=[f"{s[0]}-{i}" for i, s in enumerate(SAMPLES)]
)
def test_encodings_are_detected(codec, text, expected):
    document = ingest_bytes(text.encode(codec), "notes.txt")

    assert document.kind == "txt"
    assert document.text == text.removeprefix("\ufeff")
    assert codecs.lookup(document.encoding).name == codecs.lookup(expected).name


@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be"])
@pytest.mark.parametrize("text", [
    "Plain ASCII-heavy text without a BOM.\nSecond line, ünïcode.\n",
    "Release notes \U0001f389 \u2014 version 2.0 \u2728 fixes \U0001f41b and more.\n" * 20,  # emoji score low
    "For all x \u2208 \u211d, x\u00b2 \u2265 0 and \u2211 \u03b5 > 0.\n" * 20,  # and so do maths symbols
])
def test_bomless_utf16_is_detected_from_nul_bytes(codec, text):
    document = ingest_bytes(text.encode(codec))
    assert document.text == text
    assert document.encoding == codec


def test_ascii_with_a_nul_every_few_letters_is_not_taken_for_bomless_utf16():
    """A hostile-input trial: "hello\\0world\\0"... has UTF-16's zero bytes, and was stored as rare CJK characters."""
    with pytest.raises(UnsupportedTypeError):
        ingest_bytes(b"hello\0world\0" * 1000, "nuls.txt")


def test_long_gbk_text_is_gb18030():
    document = ingest_bytes(((CHINESE + "\r\n") * 2000).encode("gbk"))
    assert document.encoding == "gb18030"
    assert document.text == (CHINESE + "\n") * 2000


def test_mostly_utf8_with_a_damaged_byte_stays_utf8():
    data = ("Ünïcödé text, 中文内容。" * 20).encode() + b"\xff" + "tail".encode()
    document = ingest_bytes(data)
    assert document.encoding == "utf-8"
    assert document.text.endswith("\ufffdtail")


def test_newlines_are_normalised_and_whitespace_kept():
    text = "  indented\r\nwindows\rold mac\nunix\t\ttabs  \r\n\r\n"
    document = ingest_bytes(text.encode("utf-16"), "notes.txt")
    assert document.parts == [TextPart("  indented\nwindows\nold mac\nunix\t\ttabs  \n\n")]


def test_markdown_is_told_apart_by_name_only():
    data = b"# Title\n\nSome *markdown* text.\n"
    assert ingest_bytes(data, "README.md").kind == "markdown"
    assert ingest_bytes(data, "notes.MARKDOWN").kind == "markdown"
    assert ingest_bytes(data, "notes.txt").kind == "txt"
    assert ingest_bytes(data).kind == "txt"
    assert ingest_bytes(data, "misleading.pdf").kind == "txt"


@pytest.mark.parametrize("data", [b"", b" \r\n\t \n", "\u3000\n".encode("utf-8"), codecs.BOM_UTF8])
def test_empty_and_whitespace_only_files(data):
    with pytest.raises(EmptyDocumentError) as info:
        ingest_bytes(data, "empty.txt")
    assert "'empty.txt'" in info.value.message
    assert info.value.to_dict()["error"]["code"] == "empty_document"


def test_pasted_text():
    document = ingest_text("\ufeffline one\r\nline two\ud800")
    assert document.kind == "text"
    assert document.source_name is None and document.encoding is None
    assert document.text == "line one\nline two\ufffd"
    assert document.source_bytes == len(document.text.encode())
    with pytest.raises(EmptyDocumentError):
        ingest_text(" \n ")


_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc")) | st.sampled_from("\n\t"), min_size=1
).filter(lambda s: s.strip() and not s.startswith("\ufeff"))


@settings(max_examples=150, deadline=None)
@given(
    text=_TEXT,
    codec=st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be"]),
)
def test_unicode_round_trips(text, codec):
    data = text.encode(codec)
    if codec in ("utf-16-le", "utf-16-be") and (len(data) < 16 or not _has_clear_nul_pattern(data)):
        return  # BOM-less UTF-16 is only recognised from ASCII-heavy text, and a few bytes are no evidence
    assert ingest_bytes(data).text == text


def _has_clear_nul_pattern(data: bytes) -> bool:
    """ASCII-heavy (most high bytes zero), or less so but reading as writing."""
    pairs = len(data) // 2
    zeros = (data[0::2].count(0) / pairs, data[1::2].count(0) / pairs)
    if not (max(zeros) > 0.3 and min(zeros) < 0.02):
        return False
    codec = "utf-16-le" if zeros[1] > zeros[0] else "utf-16-be"
    return max(zeros) >= 0.8 or plausibility(data.decode(codec, "replace")) >= 0.6
