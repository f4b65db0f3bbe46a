"""Where a passage of the source text sits on the rendered pages (the extractive backend's citations).

Each passage keeps its character span, so it can be located on the page whose ``char_span`` holds it,
and then on that page's rows through ``PageLine`` baselines.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PageLayout:
    """What retrieval needs of a rendered page (from the stored manifest)."""

    number: int
    char_span: tuple[int, int]
    lines: list[tuple[str, float]]  # (text, baseline y in px)
    height: int

    @classmethod
    def from_manifest(cls, page: dict) -> "PageLayout":
        """From a page's manifest entry (``RenderedPage.manifest()``, or a stored manifest.json's)."""
        return cls(page["number"], tuple(page["char_span"]), [(ln["text"], ln["y"]) for ln in page["lines"]],
                   page["height"])


def pages_for_span(pages: list[PageLayout], start: int, end: int) -> list[int]:
    """Numbers of the pages whose character span overlaps [start, end)."""
    return [p.number for p in pages if p.char_span[0] < end and start < p.char_span[1]]


def crop_rows(page: PageLayout, source: str, start: int, end: int) -> tuple[int, int]:
    """Top and bottom pixel rows of ``page`` showing source characters [start, end).

    A line's place in the source is estimated by counting non-space characters, which is
    exact for wrapped text and off by a character per newline marker at worst.
    """
    if not page.lines:
        return 0, page.height
    page_start, page_end = page.char_span
    cumulative, count = [], 0
    for line_text, _ in page.lines:
        count += sum(1 for ch in line_text if not ch.isspace())
        cumulative.append(count)
    total_source = sum(1 for ch in source[page_start:page_end] if not ch.isspace()) or 1
    scale = cumulative[-1] / total_source if cumulative[-1] else 1.0

    def position(char: int) -> float:
        char = min(max(char, page_start), page_end)
        return sum(1 for ch in source[page_start:char] if not ch.isspace()) * scale

    first_pos, last_pos = position(start), position(end)
    first = next((i for i, c in enumerate(cumulative) if c > first_pos), len(cumulative) - 1)
    last = next((i for i, c in enumerate(cumulative) if c >= last_pos), len(cumulative) - 1)
    last = max(first, last)
    baselines = [y for _, y in page.lines]
    gaps = [b - a for a, b in zip(baselines, baselines[1:]) if b > a]
    pitch = sorted(gaps)[len(gaps) // 2] if gaps else page.height / max(len(baselines), 1)
    top = int(max(0, baselines[first] - 0.95 * pitch))
    bottom = int(min(page.height, baselines[last] + 0.35 * pitch))
    return top, max(bottom, top + 1)
