"""Next tokens for a batch of rows, each with its own generation settings, computed on the device in a few batched
operations (no per-row Python, no host synchronisation).

Per-sequence settings live in tensors indexed by the sequence's slot, written once when it is admitted. A step
passes the raw logits of its rows with their slots and answer positions:

- greedy rows without penalties take ``argmax`` (plus -inf on the stop tokens for ``ignore_eos``): the same
  arithmetic as Hugging Face's greedy ``generate``, so those answers stay token for token equal;
- penalties follow Hugging Face's repetition rule over prompt and answer tokens (a seen token's logit divided by
  the penalty when positive, multiplied when negative) and OpenAI's presence/frequency rule over answer tokens;
- sampled rows apply temperature, then top-k, top-p and min-p masks, and draw with the Gumbel-max trick from
  noise that is a hash of (seed, answer position, token id): a seeded answer is the same whatever else shares
  its batch, and the draw needs no generator object per row.
Log-probabilities are those of the raw model distribution (before penalties and sampling settings).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from glyphserve.engine.transfer import copy_rows, to_device
from glyphserve.engine.types import MAX_LOGPROBS, GenerationSettings

# splitmix64's constants, as signed 64-bit integers (torch has no uint64 arithmetic on every device).
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 values."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def uniform_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """[rows, vocab] float32 in [2**-24, 1 - 2**-24]: splitmix64 of (seed, position, token id), wrapping int64
    arithmetic, its top 23 bits as k, then (k + 0.5) / 2**23, exact in float32. (With 24 bits, k + 0.5 rounded
    to 2**24 for the largest k: a noise of exactly 1, an infinite Gumbel draw that took its token whatever its
    probability, once in 2**24 draws: every ~110 steps over a 151k vocabulary.)"""
    token = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    x = seeds.view(-1, 1) * _GOLDEN + positions.view(-1, 1) * _MIX1 + token.view(1, -1)
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    x = x ^ _shr(x, 31)
    return (_shr(x, 41).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


@dataclass
class SampleRows:
    """Which rows of a step need more than greedy argmax (host-side facts about the step's sequences)."""

    special: torch.Tensor | None  # rows with penalties or sampling (device indices), None when all are plain greedy
    penalised: torch.Tensor | None  # rows whose token statistics must be updated
    logprobs: int | None  # most top logprobs any row asked for; None: no row asked
    sorted_masks: bool = False  # some sampled row uses top-k or top-p
    min_p: bool = False  # some sampled row uses min-p

    @property
    def plain(self) -> bool:
        """Every row takes the greedy token and nothing else is wanted (no statistics, no logprobs)."""
        return self.special is None and self.penalised is None and self.logprobs is None


# Per-slot settings: columns of one float tensor on the device, written from a host mirror in one copy per step
# for the slots admitted since the last (ten small writes per admitted sequence, each a launch, cost 0.8 ms of
# the engine thread a request on an H200: 4% of it under 64 sessions).
_SETTINGS = ("temperature", "sampled", "top_p", "top_k", "min_p", "repetition", "presence", "frequency")
_NEUTRAL = {"temperature": 1.0, "top_p": 1.0, "repetition": 1.0}  # the rest 0


class Sampler:
    """Per-slot settings and token statistics, and the batched sampling step."""

    def __init__(self, vocab: int, slots: int, stop_ids: list[int], device: torch.device):
        self.vocab = vocab
        self.device = device
        # Then a column per stop token: its bias, -inf where ignore_eos suppresses it (not where the request
        # asked to stop at it: stop_token_ids).
        self.settings_host = np.zeros((slots, len(_SETTINGS) + len(stop_ids)), dtype=np.float32)
        for name, value in _NEUTRAL.items():
            self.settings_host[:, _SETTINGS.index(name)] = value
        self.settings = torch.from_numpy(self.settings_host).to(device)
        # Views of the device columns. temperature is 1 for greedy rows (their division is then exact); sampled:
        # 1 for rows that draw; top_k: 0 keeps all (exact in float32 up to 2**24); stop_bias: [slots, stop tokens].
        (self.temperature, self.sampled, self.top_p, self.top_k, self.min_p, self.repetition, self.presence,
         self.frequency) = self.settings[:, :len(_SETTINGS)].unbind(1)
        self.stop_bias = self.settings[:, len(_SETTINGS):]
        self._stop_list = list(stop_ids)
        self.seed = torch.zeros(slots, device=device, dtype=torch.int64)
        self.seed_host = np.zeros(slots, dtype=np.int64)
        self._dirty: set[int] = set()  # slots whose settings changed since the last flush
        self.stop_ids = torch.tensor(stop_ids, device=device, dtype=torch.int64)
        # Host mirrors of what decides a row's path, read when a step is built (no device reads).
        self.special_host = np.zeros(slots, dtype=bool)
        self.penalised_host = np.zeros(slots, dtype=bool)
        self.sorted_host = np.zeros(slots, dtype=bool)
        self.min_p_host = np.zeros(slots, dtype=bool)
        self.logprobs_host = np.full(slots, -1, dtype=np.int64)
        # Token statistics for penalties, allocated on first use ([slots, vocab] each).
        self.counts: torch.Tensor | None = None  # answer tokens
        self.seen: torch.Tensor | None = None  # prompt and answer tokens

    def admit(self, slot: int, settings: GenerationSettings, prompt_ids: list[int], seed: int, greedy: bool,
              answer_ids: list[int] = ()) -> None:
        """Set a sequence's settings for its slot (on the device at the next ``flush``); ``seed`` as a signed
        64-bit integer; ``answer_ids``: the tokens it generated before (recomputed after a preemption), counted
        for the penalties."""
        s = settings
        penalised = s.repetition_penalty != 1 or s.presence_penalty != 0 or s.frequency_penalty != 0
        top_k = s.top_k if s.top_k < self.vocab else 0  # the whole vocabulary or more keeps all of it
        suppressed = [float("-inf") if s.ignore_eos and t not in s.stop_token_ids else 0.0 for t in self._stop_list]
        self.settings_host[slot] = (1.0 if greedy else s.temperature, 0.0 if greedy else 1.0, s.top_p, top_k,
                                    s.min_p, s.repetition_penalty, s.presence_penalty, s.frequency_penalty,
                                    *suppressed)
        self.seed_host[slot] = seed
        self._dirty.add(slot)
        self.special_host[slot] = penalised or not greedy
        self.penalised_host[slot] = penalised
        self.sorted_host[slot] = not greedy and (top_k > 0 or s.top_p < 1)
        self.min_p_host[slot] = not greedy and s.min_p > 0
        self.logprobs_host[slot] = -1 if s.logprobs is None else min(s.logprobs, MAX_LOGPROBS)
        if penalised:
            if self.counts is None:
                shape = (len(self.seed), self.vocab)
                self.counts = torch.zeros(shape, device=self.device, dtype=torch.int32)
                self.seen = torch.zeros(shape, device=self.device, dtype=torch.bool)
            self.counts[slot].zero_()
            self.seen[slot].zero_()
            # Through pinned memory: ``torch.tensor(..., device=)`` copies synchronously, after the step in flight.
            self.seen[slot, to_device(np.asarray(prompt_ids, dtype=np.int64), self.device)] = True
            if answer_ids:
                answer = to_device(np.asarray(answer_ids, dtype=np.int64), self.device)
                # index_add_, not bincount: bincount reads its input's range back to the host (a sync)
                self.counts[slot].index_add_(0, answer, torch.ones_like(answer, dtype=torch.int32))
                self.seen[slot, answer] = True

    def flush(self) -> None:
        """Copy the settings of the slots admitted since the last flush to the device (before a step samples)."""
        if not self._dirty:
            return
        slots = np.fromiter(sorted(self._dirty), dtype=np.int64, count=len(self._dirty))
        self._dirty.clear()
        copy_rows(self.settings, slots, self.settings_host[slots])
        copy_rows(self.seed, slots, self.seed_host[slots])

    def rows(self, slots: np.ndarray) -> SampleRows:
        """The step's row classes from the host mirrors (vectorised over the rows); their row indices go to the
        device through pinned memory (from pageable memory the copy would wait for the step in flight: every step
        with a sampled row would stop the host running a step ahead)."""
        special = np.flatnonzero(self.special_host[slots])
        penalised = np.flatnonzero(self.penalised_host[slots])
        top = self.logprobs_host[slots].max(initial=-1)
        return SampleRows(
            special=to_device(special, self.device) if len(special) else None,
            penalised=to_device(penalised, self.device) if len(penalised) else None,
            logprobs=None if top < 0 else int(top),
            sorted_masks=bool(self.sorted_host[slots].any()),
            min_p=bool(self.min_p_host[slots].any()),
        )

    def greedy(self, logits: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """argmax with the stop tokens suppressed for ``ignore_eos`` rows (graph-capturable)."""
        biased = logits.clone()
        biased[:, self.stop_ids] += self.stop_bias[slots]
        return biased.argmax(dim=-1)

    def __call__(self, logits: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, rows: SampleRows,
                 tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Tokens [R] for raw ``logits`` [R, V] of sequences in ``slots`` drawing answer token ``positions``, and
        with ``rows.logprobs``: (chosen logprob [R], top logprobs [R, k], top ids [R, k]). ``tokens`` may carry the
        greedy choice already made (inside a captured decode step)."""
        if tokens is None:
            tokens = self.greedy(logits, slots)
        if rows.special is not None:
            idx = rows.special
            tokens[idx] = self._special(logits[idx], slots[idx], positions[idx], rows)
        if rows.penalised is not None:
            idx = rows.penalised
            chosen_slots, chosen = slots[idx], tokens[idx]
            self.counts[chosen_slots, chosen] += 1
            self.seen[chosen_slots, chosen] = True
        logprobs = None
        if rows.logprobs is not None:
            lp = torch.log_softmax(logits.float(), dim=-1)
            top = lp.topk(max(rows.logprobs, 1), dim=-1)
            logprobs = (lp.gather(1, tokens.view(-1, 1)).view(-1), top.values, top.indices)
        return tokens, logprobs

    def _special(self, logits: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                 rows: SampleRows) -> torch.Tensor:
        x = logits.float()
        if self.counts is not None:
            counts, seen = self.counts[slots], self.seen[slots]
            penalty = self.repetition[slots].unsqueeze(1)
            x = torch.where(seen, torch.where(x < 0, x * penalty, x / penalty), x)
            x = x - self.presence[slots].unsqueeze(1) * (counts > 0) - self.frequency[slots].unsqueeze(1) * counts
        x[:, self.stop_ids] += self.stop_bias[slots]
        # Greedy rows (temperature 1 here) keep their argmax: every mask below keeps the most likely token.
        x = x / self.temperature[slots].unsqueeze(1)
        if rows.sorted_masks:
            x = self._top_k_top_p(x, slots)
        if rows.min_p:
            probs = torch.softmax(x, dim=-1)
            floor = self.min_p[slots].unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
            x = x.masked_fill(probs < floor, float("-inf"))
        gumbel = -torch.log(-torch.log(uniform_noise(self.seed[slots], positions, x.shape[1])))
        # Greedy rows (penalised ones come here) take no noise at all: not even times zero, which is NaN for an
        # infinite draw, and argmax takes a NaN.
        return torch.where(self.sampled[slots].unsqueeze(1) > 0, x + gumbel, x).argmax(dim=-1)

    def _top_k_top_p(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Keep each row's ``top_k`` most likely tokens (0: all), then the smallest set whose probability reaches
        ``top_p`` (ties at the cut are kept). A row with ``top_p`` 1 keeps every token its top-k kept: the float32
        sum of a 151k-token softmax reaches 1 before its last tokens, which a cut at 1 would drop (and a seeded
        answer would then depend on whether a row with top-k or top-p shared its step)."""
        ordered = x.sort(dim=-1, descending=True).values
        k = self.top_k[slots].long()
        kth = ordered.gather(1, (k - 1).clamp(min=0).view(-1, 1))
        cut = torch.where(k.view(-1, 1) > 0, kth, torch.full_like(kth, float("-inf")))
        ordered = ordered.masked_fill(ordered < cut, float("-inf"))
        probs = torch.softmax(ordered, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above
        top_p = self.top_p[slots].unsqueeze(1)
        keep = (before < top_p).sum(dim=-1, keepdim=True).clamp(min=1)
        cut = torch.where(top_p < 1, torch.maximum(cut, ordered.gather(1, keep - 1)), cut)
        return x.masked_fill(x < cut, float("-inf"))
