"""Requests to sequences: settings checked, the prompt built and fitted to the context, pages identified.

Everything a request needs before it can be scheduled is computed here, once: the prompt tokens (the chat
template with one vision token per merged patch), their M-RoPE positions exactly as the HF model computes them,
each page's identity (its key when the caller gives one; otherwise a hash of the encoded bytes or of the
pixels, so no page is decoded here), and the content hashes of the prompt's full KV blocks.
"""

from __future__ import annotations

import itertools
import math
import numbers
import secrets
import threading
from collections import OrderedDict

import torch

from glyphserve.engine.kv_pool import block_hashes
from glyphserve.engine.output import OutputState
from glyphserve.engine.preprocess import PreprocessParams, check_page, page_keys
from glyphserve.engine.prompt import PromptBuilder, PromptTokens, answer_room, conversation
from glyphserve.engine.sequence import Sequence
from glyphserve.engine.types import (MAX_LOGPROBS, MAX_SEED, PENALTY_RANGE, REPETITION_PENALTY_RANGE, AnswerRequest,
                                     GenerationSettings)
from glyphserve.errors import ConfigError, ContextOverflowError, GlyphserveError
from glyphserve.glm4v import PAGE_MARKER_TOKENS
from glyphserve.retrieve.selection import shown_number


POSITION_HEADS = 64  # document prefixes whose positions are kept


def check_settings(s: GenerationSettings, vocab: int) -> None:
    """vLLM's rules for sampling parameters; a ConfigError names the first one that cannot be honoured (its
    ``param``: the API's error body names the field)."""
    def bad(param: str, message: str) -> None:
        raise ConfigError(f"{param} {message}", param=param)

    # Types first (a library's caller has no request schema in front: "hot" failed in isfinite, 1.5 passed as a
    # top_k). numpy's numbers count.
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        value = getattr(s, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            bad(name, f"must be a number, not {value!r}")
    for name in ("top_k", "logprobs", "seed"):
        value = getattr(s, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
            bad(name, f"must be an integer, not {value!r}")
    if any(isinstance(t, bool) or not isinstance(t, numbers.Integral) for t in s.stop_token_ids):
        bad("stop_token_ids", "must be integers")
    if s.max_tokens is not None and (not isinstance(s.max_tokens, int) or s.max_tokens < 1):
        bad("max_tokens", "must be at least 1 (or None: up to the end of the context)")
    if not math.isfinite(s.temperature) or s.temperature < 0:
        bad("temperature", "must be a finite number >= 0")
    if not math.isfinite(s.top_p) or not 0 < s.top_p <= 1:
        bad("top_p", "must be in (0, 1]")
    if s.top_k < 0:
        bad("top_k", "must be >= 0 (0 keeps every token)")
    if not math.isfinite(s.min_p) or not 0 <= s.min_p <= 1:
        bad("min_p", "must be in [0, 1]")
    low, high = REPETITION_PENALTY_RANGE
    if not math.isfinite(s.repetition_penalty) or not low <= s.repetition_penalty <= high:
        bad("repetition_penalty", f"must be in [{low:g}, {high:g}] (1: none)")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(s, name)
        if not math.isfinite(value) or not PENALTY_RANGE[0] <= value <= PENALTY_RANGE[1]:
            bad(name, f"must be in [{PENALTY_RANGE[0]:g}, {PENALTY_RANGE[1]:g}]")
    if s.logprobs is not None and not 0 <= s.logprobs <= MAX_LOGPROBS:
        bad("logprobs", f"must be between 0 and {MAX_LOGPROBS}")
    if s.seed is not None and not 0 <= s.seed <= MAX_SEED:
        bad("seed", f"must be between 0 and {MAX_SEED}")
    if any(not 0 <= t < vocab for t in s.stop_token_ids):
        bad("stop_token_ids", f"must be token ids from 0 to {vocab - 1}")


class Planner:
    def __init__(self, model, tokenizer, prompts: PromptBuilder, params: PreprocessParams, *, max_context: int,
                 block_size: int, pool_tokens: int, stop_ids: list[int], prefix_caching: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.prompts = prompts
        self.params = params
        self.max_context = max_context
        self.block_size = block_size
        self.pool_tokens = pool_tokens
        self.stop_ids = frozenset(stop_ids)
        self.prefix_caching = prefix_caching
        self.vocab = model.config.text_config.vocab_size
        self._ids = itertools.count()  # requests are planned on several threads
        self._heads: OrderedDict[tuple, torch.Tensor] = OrderedDict()  # document prefix -> its positions
        self._heads_lock = threading.Lock()  # requests are planned on the callers' threads and the engine's

    def plan(self, request: AnswerRequest) -> Sequence:
        settings = request.settings
        if request.warm:
            if not settings.use_cache:
                raise ConfigError("warming a document needs the caches (use_cache)")
            if not request.pages:
                raise GlyphserveError("warming needs a document's pages")
        else:
            if not isinstance(request.question, str) or not request.question.strip():
                raise GlyphserveError("the question is empty")
            check_settings(settings, self.vocab)
        for i, page in enumerate(request.pages):
            check_page(page, i)
        if request.page_keys is not None and len(request.page_keys) != len(request.pages):
            raise GlyphserveError("page_keys must name every page")
        pages = list(request.pages)
        keys = list(request.page_keys) if request.page_keys is not None else page_keys(pages)
        grids = [self.params.grid(*p.shape[:2]) for p in pages]
        question = "" if request.warm else request.question
        labels = request.page_labels
        prompt = self.prompts.build(conversation(request.history, question, len(pages), labels), grids)
        # Unset max_tokens: the answer may take what the prompt leaves, of which it needs one token, or, where pages
        # are dropped to fit (truncate_pages), the room a page choice keeps for an answer (``answer_room``).
        unset_room = answer_room(self.max_context) if settings.truncate_pages else 1
        new_tokens = 0 if request.warm else settings.max_tokens or unset_room
        budget = self.max_context - new_tokens
        if len(prompt.ids) > budget:
            fit = self._pages_that_fit(prompt, budget)
            if fit == 0 or not settings.truncate_pages:
                raise self._overflow(prompt, fit, settings.max_tokens)
            while True:  # the first pages that fit, their labels counted too
                kept = labels[:fit] if labels is not None else None
                prompt = self.prompts.build(conversation(request.history, question, fit, kept), grids[:fit])
                if len(prompt.ids) <= budget or fit == 1:
                    break
                fit -= 1
            if len(prompt.ids) > budget:
                raise self._overflow(prompt, 0, settings.max_tokens)
            pages, keys, grids, labels = pages[:fit], keys[:fit], grids[:fit], kept
        if request.warm:  # only the document prefix is computed
            prompt = PromptTokens(prompt.ids[: prompt.prefix_len], prompt.prefix_len, prompt.image_grids)
        elif settings.max_tokens is None:
            new_tokens = self.max_context - len(prompt.ids)
        need = -(-(len(prompt.ids) + new_tokens + 1) // self.block_size) * self.block_size
        if need > self.pool_tokens:
            raise ContextOverflowError(
                f"this request needs {len(prompt.ids)} prompt tokens plus {new_tokens} new tokens, but the KV "
                f"pool holds {self.pool_tokens} tokens in all (raise --gpu-memory-utilization, or ask about "
                "fewer pages)")
        positions, delta = self._positions(prompt)
        page_tokens = [self.params.vision_tokens(*p.shape[:2]) for p in pages]
        image_id = self.model.config.image_token_id
        offsets, i = [], 0
        for count in page_tokens:
            i = prompt.ids.index(image_id, i)
            offsets.append(i)
            i += count
        seq = Sequence(next(self._ids), request, pages, keys, prompt, positions, delta, page_tokens, offsets,
                       max_tokens=new_tokens)
        if settings.use_cache and self.prefix_caching:
            seq.hashes = block_hashes(seq.identities(), self.block_size)
        stops = set() if settings.ignore_eos else set(self.stop_ids)
        seq.out = OutputState(self.tokenizer, settings, frozenset(stops | set(settings.stop_token_ids)))
        seed = settings.seed if settings.seed is not None else secrets.randbits(63)
        seq.seed = seed - 2**64 if seed >= 2**63 else seed  # as a signed 64-bit integer
        if request.resume_tokens:
            self._resume(seq)
        return seq

    def _resume(self, seq: Sequence) -> None:
        """Put ``seq`` where an earlier attempt left its answer: those tokens generated (their K/V computed with
        the prompt's, as after a preemption), its output state past them, and the part of their text the caller
        did not receive owed to its stream. Tokens that end the answer (at a stop, or max_tokens of them: the
        earlier attempt died before its reply) finish it before anything runs."""
        request = seq.request
        tokens = request.resume_tokens
        if request.warm or len(tokens) > seq.max_tokens or any(not 0 <= t < self.vocab for t in tokens):
            raise ConfigError("resume_tokens must be at most max_tokens token ids of the vocabulary")
        logprobs = request.resume_logprobs if seq.out.logprobs is not None else None
        if logprobs is not None and len(logprobs) != len(tokens):
            raise ConfigError("resume_logprobs must give one log-probability per resumed token")
        for i, token in enumerate(tokens):
            if seq.stop_reason is not None:
                raise ConfigError("resume_tokens go on past the end of the answer")
            seq.stop_reason = seq.out.push(token, logprobs[i] if logprobs is not None else None).stop_reason
        shown = request.resume_shown
        released = {"thinking": len(seq.out.thinking_text), "answer": len(seq.out.answer_text)}
        if shown is not None and any(c not in released or not 0 <= n <= released[c] for c, n in shown.items()):
            raise ConfigError("resume_shown must count characters of the text resume_tokens give, per channel")
        seq.out.delivered(shown)
        seq.output = list(tokens)
        seq.scheduled_outputs = len(tokens)
        if seq.stop_reason is not None or len(tokens) == seq.max_tokens:
            seq.finish_reason = "stop" if seq.stop_reason is not None else "length"

    def _page_costs(self, prompt: PromptTokens) -> list[int]:
        """Each page's tokens in the prompt: its vision tokens and its markers."""
        merge = self.params.merge_size**2
        return [g[0] * g[1] * g[2] // merge + PAGE_MARKER_TOKENS for g in prompt.image_grids]

    def _pages_that_fit(self, prompt: PromptTokens, budget: int) -> int:
        per_page = self._page_costs(prompt)
        total = len(prompt.ids) - sum(per_page)
        if total > budget:
            return 0
        fit = 0
        for cost in per_page:
            if total + cost > budget:
                break
            total += cost
            fit += 1
        return fit

    def _overflow(self, prompt: PromptTokens, fit: int, max_tokens: int | None) -> ContextOverflowError:
        n = len(prompt.image_grids)
        pages = f"{n} page{'s' * (n != 1)}"
        if max_tokens is None:
            head = (f"the prompt needs {len(prompt.ids)} tokens ({pages}) and the answer at least one, but the "
                    f"context holds {self.max_context}")
        elif max_tokens >= self.max_context:
            head = (f"the prompt needs {len(prompt.ids)} tokens ({pages}) plus max_tokens {shown_number(max_tokens)}, "
                    f"which alone is at least the whole context ({self.max_context})")
        else:
            head = (f"the prompt needs {len(prompt.ids)} tokens ({pages}) plus max_tokens {max_tokens} "
                    f"= {len(prompt.ids) + max_tokens}, but the context holds {self.max_context}")
        if max_tokens is not None and len(prompt.ids) < self.max_context:
            return ContextOverflowError(f"{head}: lower max_tokens to at most {self.max_context - len(prompt.ids)}"
                                        + (f", or ask about the first {fit} of {n} pages" if 0 < fit < n else ""))
        if n == 0:
            return ContextOverflowError(f"{head}: the text alone does not fit; shorten the question or the "
                                        "conversation")
        if fit == 0:
            first = self._page_costs(prompt)[0]
            if first > self.max_context // 2:  # the page, not the text, is what does not fit
                return ContextOverflowError(
                    f"{head}: not even the first page fits, which alone takes {first} tokens; send a smaller image "
                    "of it (fewer pixels; a document rendered at a lower dpi), or use a longer context")
            return ContextOverflowError(f"{head}: not even the first page fits; shorten the question or the "
                                        "conversation")
        return ContextOverflowError(
            f"{head}: only the first {fit} of {n} pages fit. Ask about fewer or smaller pages, keep the first {fit} "
            f"(truncate_pages), or, for a stored document, let the pages that match the question be chosen "
            f"(page_selection retrieve)")

    def _positions(self, prompt: PromptTokens) -> tuple[torch.Tensor, int]:
        """M-RoPE positions [3, L] of the prompt, exactly as the HF model computes them (on CPU).

        The document prefix's are HF's ``get_rope_index`` (3.3 ms for a W50 prompt on the CPU, in Python loops,
        on the thread that runs the steps), kept for the document's next questions; the text after it counts on
        by one on all three axes, as HF counts any text."""
        n = prompt.prefix_len
        key = (tuple(prompt.ids[:n]), tuple(prompt.image_grids))
        with self._heads_lock:
            head = self._heads.get(key)
            if head is not None:
                self._heads.move_to_end(key)
        if head is None:
            head = self._rope_index(prompt.ids[:n], prompt.image_grids)
            with self._heads_lock:
                self._heads[key] = head
                while len(self._heads) > POSITION_HEADS:
                    self._heads.popitem(last=False)
        start = int(head[0, -1]) + 1 if n else 0
        tail = torch.arange(start, start + len(prompt.ids) - n).expand(3, -1)
        positions = torch.cat([head, tail], dim=1)
        return positions, int(positions.max()) + 1 - len(prompt.ids) if len(prompt.ids) else 0

    def _rope_index(self, ids: list[int], image_grids: list) -> torch.Tensor:
        """HF's positions [3, len(ids)] (no positions for no tokens)."""
        if not ids:
            return torch.zeros(3, 0, dtype=torch.long)
        tokens = torch.tensor([ids], dtype=torch.long)
        mm = (tokens == self.model.config.image_token_id).long()
        grids = torch.tensor(image_grids, dtype=torch.long) if image_grids else None
        return self.model.model.get_rope_index(tokens, mm, image_grid_thw=grids)[0][:, 0]
