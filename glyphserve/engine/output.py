"""Generated token ids to what a caller sees: text deltas per channel, stop strings, log-probabilities.

Text is decoded incrementally by the tokenizer library's ``DecodeStream`` (a few microseconds a token; it holds
back incomplete UTF-8 until the character completes, or as U+FFFD when the answer ends first, as a whole decode
shows it), cut at the first stop string (held back while it could still be the start of one, so a
stream never shows text it later takes back), then split into Glyph's "thinking" and "answer" channels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from tokenizers.decoders import ByteLevel, DecodeStream

from glyphserve.engine.textstream import ReasoningParser
from glyphserve.engine.types import GenerationSettings, TokenLogprob


@lru_cache(maxsize=1)
def _byte_of() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2's, which GLM-4.1V's tokenizer uses): the character standing for each of
    the 256 bytes in a token's piece. Printable Latin-1 bytes stand for themselves, the others for 256 + n."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars = {b: b for b in kept}
    for n, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = 256 + n
    return {chr(c): b for b, c in chars.items()}


@dataclass
class Delta:
    channel: str  # "thinking" | "answer"
    text: str
    logprobs: list[TokenLogprob] | None = None
    tokens: list[int] = field(default_factory=list)  # the tokens pushed since the previous delta


@dataclass
class TokenOutcome:
    deltas: list[Delta] = field(default_factory=list)
    stop_reason: str | int | None = None  # a stop string or token ended the answer here


class OutputState:
    """One sequence's decoding state."""

    def __init__(self, tokenizer, settings: GenerationSettings, stop_ids: frozenset[int]):
        self.tokenizer = tokenizer
        self.backend = tokenizer.backend_tokenizer
        self.settings = settings
        self.stream = DecodeStream(skip_special_tokens=settings.skip_special_tokens)
        self.stop_ids = stop_ids  # the model's stop tokens (unless ignore_eos) and the request's stop_token_ids
        self.stops = [s for s in settings.stop if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""  # decoded text not yet released (could be the start of a stop string)
        self.parser = ReasoningParser()
        self.logprobs: list[TokenLogprob] | None = [] if settings.logprobs is not None else None
        self._unreleased: list[TokenLogprob] = []
        self._unreported: list[int] = []  # tokens pushed since the last delta
        self._undecoded: list[int] = []  # tokens whose text the decode stream holds back (an incomplete character)
        self._owed: list[Delta] = []  # text of resumed tokens the caller did not receive: released first
        self._added_ids = frozenset(tokenizer.get_added_vocab().values()) if self.logprobs is not None else frozenset()

    def push(self, token: int, logprob: TokenLogprob | None = None) -> TokenOutcome:
        """Take one generated token; returns the text it releases and whether the answer ends here."""
        outcome = self._outcome()
        self._unreported.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
            self._unreleased.append(logprob)
        if token in self.stop_ids:
            outcome.stop_reason = token
            if self.settings.include_stop_str_in_output:  # its text too (none for a special token skipped)
                self._step(token)
            self.pending += self._held_back()
            self._release(self.pending, outcome)
            self.pending = ""
            return outcome
        if self._step(token):
            self._cut(outcome)
        return outcome

    def _step(self, token: int) -> bool:
        """Feed the decode stream; whether it released text (into ``pending``)."""
        piece = self.stream.step(self.backend, token)
        if not piece:
            self._undecoded.append(token)
            return False
        self._undecoded.clear()
        self.pending += piece
        return True

    def _held_back(self) -> str:
        """The text of the tokens the stream still holds (U+FFFD for each incomplete character, as decoding the
        whole answer gives): the answer ends before their character does."""
        held, self._undecoded = self._undecoded, []
        return self.backend.decode(held, skip_special_tokens=self.settings.skip_special_tokens) if held else ""

    def delivered(self, shown: dict[str, int] | None = None) -> None:
        """What was pushed so far reached the caller before (an answer resumed): no later delta reports its
        tokens or logprobs again. ``shown``: the characters of each channel's text the caller received (None: all
        that was released). The rest (a token's text may span deltas: the caller may have missed the later ones)
        is owed and released first, by the next push or the finish; text still held back is released later, as it
        would have been."""
        self._unreported, self._unreleased = [], []
        if shown is None:
            return
        for channel, text in (("thinking", self.thinking_text), ("answer", self.answer_text)):
            owed = text[shown.get(channel, 0):]
            if owed:
                self._owed.append(Delta(channel, owed, self._take_logprobs()))

    def finish(self) -> list[Delta]:
        """The answer ended (length, stop, cancel): release everything held back."""
        outcome = self._outcome()
        self._release(self.pending + self._held_back(), outcome)
        self.pending = ""
        for channel, text in self.parser.finish():
            outcome.deltas.append(Delta(channel, text, self._take_logprobs(), self._take_tokens()))
        # Tokens that released no text (the stop token, a closing tag, trailing spaces) still report themselves
        # and their logprobs: with the last delta, or in one of no text.
        tokens, logprobs = self._take_tokens(), self._take_logprobs()
        if tokens or logprobs:
            if outcome.deltas:
                last = outcome.deltas[-1]
                last.tokens += tokens
                if logprobs:
                    last.logprobs = (last.logprobs or []) + logprobs
            else:
                channel = "thinking" if self.thinking_text and not self.answer_text else "answer"
                outcome.deltas.append(Delta(channel, "", logprobs, tokens))
        return outcome.deltas

    def _outcome(self) -> TokenOutcome:
        owed, self._owed = self._owed, []
        return TokenOutcome(owed)

    def _cut(self, outcome: TokenOutcome) -> None:
        if self.stops:
            hits = [(i, s) for s in self.stops if (i := self.pending.find(s)) >= 0]
            if hits:
                at, stop = min(hits)
                end = at + len(stop) if self.settings.include_stop_str_in_output else at
                self._release(self.pending[:end], outcome)
                self.pending = ""
                outcome.stop_reason = stop
                return
            keep = self.hold
        else:
            keep = 0
        cut = len(self.pending) - keep
        if cut > 0:
            self._release(self.pending[:cut], outcome)
            self.pending = self.pending[cut:]

    def _release(self, text: str, outcome: TokenOutcome) -> None:
        if not text:
            return
        for channel, part in self.parser.feed(text):
            outcome.deltas.append(Delta(channel, part, self._take_logprobs(), self._take_tokens()))

    def _take_logprobs(self) -> list[TokenLogprob] | None:
        if self.logprobs is None:
            return None
        taken, self._unreleased = self._unreleased, []
        return taken

    def _take_tokens(self) -> list[int]:
        taken, self._unreported = self._unreported, []
        return taken

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def token_bytes(self, token: int) -> list[int]:
        """The token's own bytes (OpenAI's logprob ``bytes``): a token holding part of a character has bytes that
        are no UTF-8 text on their own (the first byte of "è" decodes to U+FFFD, whose encoding is three other
        bytes), so they come from the byte-level piece; an added token's (``<|user|>``), or any token of a
        tokenizer that is not byte-level, is its text's UTF-8."""
        piece = self.tokenizer.convert_ids_to_tokens(token)
        if isinstance(self.backend.decoder, ByteLevel) and piece is not None and token not in self._added_ids:
            byte_of = _byte_of()
            if all(ch in byte_of for ch in piece):
                return [byte_of[ch] for ch in piece]
        return list(self.token_text(token).encode("utf-8"))

    @property
    def answer_text(self) -> str:
        return self.parser.answer_text

    @property
    def thinking_text(self) -> str:
        return self.parser.thinking_text
