"""One request's state inside the engine: its prompt, its blocks, what has been computed and generated."""

from __future__ import annotations

import enum
import hashlib
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from glyphserve.engine.output import OutputState
from glyphserve.engine.prompt import PromptTokens
from glyphserve.engine.stage_clock import Mark
from glyphserve.engine.types import GREEDY_BELOW, AnswerRequest, CacheReport, GenerationSettings, Page, StageTimings


class Status(enum.Enum):
    WAITING = "waiting"  # not admitted, or preempted (its KV freed, to be recomputed)
    RUNNING = "running"  # holds blocks: prefilling its prompt a chunk at a time, then decoding
    FINISHED = "finished"


def page_identity_base(page_key: str) -> int:
    """A value in [2**62, 2**63) standing for a page in block hashes (62 bits of its key's digest, and bit 62
    set so that it never equals a token id); its vision tokens get base + offset."""
    digest = hashlib.blake2b(page_key.encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") & ((1 << 62) - 1)) | (1 << 62)


@dataclass(eq=False)
class Sequence:
    """A request planned into tokens. ``num_computed`` counts the tokens whose KV is written or scheduled to be
    (prompt first, then each generated token as it is fed back); ``scheduled_outputs`` the generated tokens whose
    step has been launched, ``output`` those read back so far (decode runs one step ahead of the host). A sequence
    that is not decoding prefills [num_computed, total_tokens) from host-known ids, a chunk at a time; after a
    preemption that is its prompt plus its answer so far (recomputed, then it continues)."""

    seq_id: int
    request: AnswerRequest
    pages: list[Page]
    page_keys: list[str]  # identity of each page: vision-feature key and block-hash material
    prompt: PromptTokens
    positions: torch.Tensor  # [3, L] M-RoPE positions of the prompt (CPU)
    rope_delta: int  # position of generated token i is len(prompt) + i + rope_delta on all three axes
    page_tokens: list[int]  # vision tokens per page
    image_offsets: list[int]  # prompt index of each page's first vision token
    arrived: float = field(default_factory=time.perf_counter)  # given to the engine (planning included), or
    # planned ahead, taken by the engine
    taken: bool = False  # handed to the engine (a sequence planned ahead runs once)
    status: Status = Status.WAITING
    slot: int = -1  # row of the per-sequence state arrays while running
    blocks: list[int] = field(default_factory=list)
    num_computed: int = 0
    num_cached: int = 0  # prompt tokens found in the pool at admission
    scheduled_outputs: int = 0  # generated tokens whose step has been launched
    output: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)  # of the prompt's full blocks (empty without caching)
    published: int = 0  # blocks [0, published) hold the hashed prefix; only they are marked ready
    finish_reason: str | None = None  # set when it finishes, or when planned (resumed tokens that end the answer)
    stop_reason: str | int | None = None
    preemptions: int = 0
    timings: StageTimings = field(default_factory=StageTimings)
    cache: CacheReport = field(default_factory=CacheReport)
    # Device marks (``StageClock``), read at the first token: stage spans (name in ``timings``, start, end), and the
    # prefill's start (its admission, after its first chunk's vision work in the stream's order; a later chunk's
    # vision work falls inside the prefill's span)
    stage_marks: list[tuple[str, Mark, Mark]] = field(default_factory=list)
    prefill_mark: Mark | None = None
    decode_started: float = 0.0
    peak_gpu_bytes: int | None = None
    out: OutputState | None = None  # text decoding, stop strings, logprobs
    seed: int = 0  # sampling seed as a signed 64-bit integer
    max_tokens: int = 0  # new tokens at most: the request's max_tokens, or what its context leaves (None)
    features: dict[int, torch.Tensor] = field(default_factory=dict)  # vision features held while prefilling

    @property
    def settings(self) -> GenerationSettings:
        return self.request.settings

    @property
    def prompt_len(self) -> int:
        return len(self.prompt.ids)

    @property
    def new_output(self) -> int:
        """Tokens generated in this engine (``output`` starts with the resumed ones, ``request.resume_tokens``)."""
        return len(self.output) - len(self.request.resume_tokens)

    @property
    def greedy(self) -> bool:
        return self.settings.temperature < GREEDY_BELOW

    @property
    def total_tokens(self) -> int:
        """Prompt plus every generated token whose step has been launched (read back or not)."""
        return self.prompt_len + self.scheduled_outputs

    @property
    def decoding(self) -> bool:
        """Its next step feeds back its last generated token (which may still be on the device only)."""
        return self.scheduled_outputs > 0 and self.num_computed == self.total_tokens - 1

    @property
    def done_scheduling(self) -> bool:
        """Every token it may generate has had its step launched."""
        return self.scheduled_outputs >= self.max_tokens or self.request.warm

    @property
    def image_end(self) -> int:
        """Prompt index just past the last vision token (0 without pages)."""
        return self.image_offsets[-1] + self.page_tokens[-1] if self.page_tokens else 0

    def token_ids(self, start: int, end: int) -> list[int]:
        ids = self.prompt.ids
        if end <= len(ids):
            return ids[start:end]
        return (ids + self.output)[start:end]

    def positions_of(self, start: int, end: int) -> torch.Tensor:
        """[3, end - start] positions; generated tokens (recomputed after a preemption) continue as text."""
        n = self.prompt_len
        if end <= n:
            return self.positions[:, start:end]
        tail = torch.arange(max(start, n), end, dtype=torch.long) + self.rope_delta
        head = self.positions[:, start:n] if start < n else self.positions[:, :0]
        return torch.cat([head, tail.expand(3, -1)], dim=1)

    def image_runs(self, start: int, end: int) -> list[tuple[int, int, int, int]]:
        """(page index, first feature row, rows, prompt index) of the vision tokens inside [start, end)."""
        runs = []
        for i, (offset, count) in enumerate(zip(self.image_offsets, self.page_tokens)):
            lo, hi = max(start, offset), min(end, offset + count)
            if lo < hi:
                runs.append((i, lo - offset, hi - lo, lo))
        return runs

    def identities(self) -> np.ndarray:
        """One int64 per prompt token for block hashing: text token ids, and for each page's vision tokens its
        identity plus the token's offset (the same pages in the same place give the same hashes)."""
        ids = np.asarray(self.prompt.ids, dtype=np.int64)
        for key, offset, count in zip(self.page_keys, self.image_offsets, self.page_tokens):
            ids[offset : offset + count] = page_identity_base(key) + np.arange(count, dtype=np.int64)
        return ids
