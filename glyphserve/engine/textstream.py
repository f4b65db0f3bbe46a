"""Glyph's answers split into their "thinking" and "answer" channels, however the text arrives in pieces."""

from __future__ import annotations

from glyphserve.glm4v import ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, THINK_OPEN


def _partial_tag_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ReasoningParser:
    """Incremental parser for ``<think>...</think><answer>...</answer>``; both tags are optional.

    Each channel's text is trimmed at its edges as it streams: leading whitespace is dropped and trailing
    whitespace is held back until more text follows it, so the pieces a stream shows join to exactly the final
    ``thinking_text`` / ``answer_text``."""

    def __init__(self):
        self.state = "start"  # start -> think -> between -> answer -> done
        self.buffer = ""
        self.thinking: list[str] = []
        self.answer: list[str] = []
        self._held = {"thinking": "", "answer": ""}  # trailing whitespace not yet shown, per channel

    def feed(self, text: str) -> list[tuple[str, str]]:
        self.buffer += text
        out: list[tuple[str, str]] = []
        while self.buffer:
            if self.state in ("start", "between"):
                head = self.buffer.lstrip()
                opener = ANSWER_OPEN if self.state == "between" else None
                for tag in (opener,) if opener else (THINK_OPEN, ANSWER_OPEN):
                    if head.startswith(tag):
                        self.buffer = head[len(tag) :]
                        self.state = "think" if tag == THINK_OPEN else "answer"
                        break
                    if tag.startswith(head):
                        return out  # could still become the tag
                else:
                    self.state = "answer"
                    self.buffer = head
                continue
            if self.state == "done":
                self.buffer = ""
                break
            channel, close = ("thinking", THINK_CLOSE) if self.state == "think" else ("answer", ANSWER_CLOSE)
            at = self.buffer.find(close)
            if at >= 0:
                self._emit(out, channel, self.buffer[:at])
                self.buffer = self.buffer[at + len(close) :]
                self.state = "between" if self.state == "think" else "done"
                continue
            keep = _partial_tag_suffix(self.buffer, close)
            self._emit(out, channel, self.buffer[: len(self.buffer) - keep])
            self.buffer = self.buffer[len(self.buffer) - keep :]
            break
        return out

    def finish(self) -> list[tuple[str, str]]:
        """Release what was held back waiting for a tag that never came."""
        out: list[tuple[str, str]] = []
        if self.buffer and self.state != "done":
            self._emit(out, "thinking" if self.state == "think" else "answer", self.buffer)
        self.buffer = ""
        return out

    def emit(self, channel: str, text: str) -> list[tuple[str, str]]:
        """Text that arrives already in its channel (a server's separate reasoning field), edges trimmed alike."""
        out: list[tuple[str, str]] = []
        self._emit(out, channel, text)
        return out

    def _emit(self, out: list, channel: str, text: str) -> None:
        parts = self.thinking if channel == "thinking" else self.answer
        if not parts:
            text = text.lstrip()
        body = text.rstrip()
        if body:
            shown = self._held[channel] + body
            self._held[channel] = ""
            parts.append(shown)
            out.append((channel, shown))
        self._held[channel] += text[len(body):]

    @property
    def thinking_text(self) -> str:
        return "".join(self.thinking)

    @property
    def answer_text(self) -> str:
        return "".join(self.answer)
