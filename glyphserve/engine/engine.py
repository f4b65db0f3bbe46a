"""The engine: rendered pages and a conversation in, streamed thinking and answer out."""

from __future__ import annotations

import hashlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from glyphserve.engine import loading
from glyphserve.engine.caches import PrefixCache, PrefixEntry, VisionCache
from glyphserve.engine.preprocess import PagePreprocessor, PreprocessParams, check_page, decode_pages, page_digests
from glyphserve.engine.prompt import PromptBuilder, PromptTokens, conversation
from glyphserve.engine.runner import LMRunner, VisionRunner
from glyphserve.engine.textstream import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    THINK_CLOSE,
    THINK_OPEN,
    IncrementalDecoder,
    ReasoningParser,
)
from glyphserve.glm4v import STOP_TOKENS
from glyphserve.engine.types import (
    Answer,
    AnswerRequest,
    CacheReport,
    EngineConfig,
    GenerationSettings,
    Page,
    StageTimings,
    StreamEvent,
)
from glyphserve.errors import ConfigError, ContextOverflowError, EngineOutOfMemoryError, GlyphserveError

DEFAULT_MAX_CONTEXT = 32768
GRAPH_BATCH_SIZES = (1, 2, 4, 8)
# Prompt tokens prefilled together in one pass (follow-up questions on cached prefixes, short text prompts).
PREFILL_GROUP_TOKENS = 2048
# While other rows decode, a long prompt is prefilled this many tokens at a time between their decode steps, so
# their streams pause for one slice at most, not for the whole document.
INTERLEAVED_PREFILL_TOKENS = 2048


@dataclass(eq=False)
class _Job:
    """One request on its way through the engine."""

    request: AnswerRequest
    settings: GenerationSettings
    pages: list[Page]
    prompt: PromptTokens
    positions: torch.Tensor  # [3, 1, L] M-RoPE positions of the whole prompt (CPU)
    rope_delta: int
    started: float
    doc_key: str | None = None
    digests: list[str] | None = None
    prefix: PrefixEntry | None = None
    features: list[torch.Tensor] | None = None
    row: int = 0
    decode_started: float = 0.0
    cache_pos: int = 0  # next KV position a decode step writes for this row
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    timings: StageTimings = field(default_factory=StageTimings)
    cache: CacheReport = field(default_factory=CacheReport)
    decoder: IncrementalDecoder | None = None
    parser: ReasoningParser = field(default_factory=ReasoningParser)
    generator: torch.Generator | None = None
    peak_gpu_bytes: int | None = None

    @property
    def greedy(self) -> bool:
        return self.settings.temperature <= 0


@dataclass(eq=False)
class _Prefilling:
    """A long prompt prefilled a slice at a time between other rows' decode steps."""

    job: _Job
    embeds: torch.Tensor  # [1, S, D]: what remains after the cached prefix, page features in place
    positions: torch.Tensor  # [3, 1, S]
    start: int  # cache position of embeds[:, 0]
    started: float
    done: int = 0


class Engine:
    """GLM-4.1V (Glyph) inference with vision-feature and document-prefix caches, static-cache decode and batching.

    One request (or one batch) runs at a time; calls from several threads queue on a lock.
    """

    def __init__(self, loaded: loading.LoadedModel, config: EngineConfig):
        self.config = config
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device, self.dtype = loaded.device, loaded.dtype
        self.name = loaded.name
        mcfg = self.model.config
        self.params = PreprocessParams.from_image_processor(loaded.image_processor)
        self._vision_key_prefix = f"{self.name}|{self.dtype}|{self.params.fingerprint()}|"
        self.preprocessor = PagePreprocessor(self.params, self.device, self.dtype, pinned=config.pinned_copies)
        self.prompts = PromptBuilder(
            self.tokenizer, loaded.chat_template, mcfg.image_token_id, mcfg.image_end_token_id, self.params.merge_size
        )
        limit = mcfg.text_config.max_position_embeddings
        self.max_context = min(config.max_context or min(limit, DEFAULT_MAX_CONTEXT), limit)
        cuda = self.device.type == "cuda"
        self.runner = LMRunner(
            self.model,
            config.max_batch_size,
            self.max_context,
            self.device,
            self.dtype,
            compile=config.compile_decode and config.cuda_graphs and cuda,
        )
        self.vision = VisionRunner(self.model, config.vision_batch_pages, config.compile_vision and cuda)
        self.vision_cache = VisionCache(config.vision_cache_bytes, config.vision_cache_cpu_bytes, self.device)
        self.prefix_cache = PrefixCache(config.prefix_cache_bytes)
        self.stop_ids = self._stop_ids()
        tags = {self.tokenizer.convert_tokens_to_ids(t) for t in (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)}
        special = {i for i, tok in self.tokenizer.added_tokens_decoder.items() if tok.special}
        self.hidden_ids = (special | set(self.stop_ids)) - tags
        self._stop_bias = torch.zeros(self.runner.vocab, device=self.device)
        self._stop_bias[self.stop_ids] = float("-inf")
        self._lock = threading.Lock()
        # decode_rows / decode_steps: rows busy per decode step (batch occupancy); prefill_passes: prompt passes.
        self._counters = {"requests": 0, "batches": 0, "new_tokens": 0, "prompt_tokens": 0, "oom_recoveries": 0,
                          "decode_steps": 0, "decode_rows": 0, "prefill_passes": 0}
        self._host_next = None
        self._launches = 0
        if self.device.type == "cuda" and config.pinned_copies:
            self._host_next = [torch.zeros(config.max_batch_size, dtype=torch.long).pin_memory() for _ in range(2)]
        self._warm_up()

    @classmethod
    def load(cls, config: EngineConfig) -> Engine:
        """Load the checkpoint (or random weights), capture decode graphs and warm up; raises ModelLoadError."""
        if config.max_batch_size < 1:
            raise ConfigError("max_batch_size must be at least 1")
        return cls(loading.load(config), config)

    # --- public API ----------------------------------------------------------------------------------------

    def answer(self, request: AnswerRequest) -> Answer:
        result = None
        for event in self.stream(request):
            if event.channel == "done":
                result = event.result
        return result

    def stream(self, request: AnswerRequest) -> Iterator[StreamEvent]:
        """Text deltas on the "thinking" and "answer" channels, then a "done" event carrying the Answer."""
        job = self._plan(request)
        events = self._run([job])
        try:
            for _, channel, text in events:
                if channel != "done":
                    yield StreamEvent(channel=channel, text=text)
        finally:
            events.close()  # a consumer that stops early releases the engine at once
        yield StreamEvent(channel="done", result=self._answer(job))

    def answer_batch(self, requests: list[AnswerRequest]) -> list[Answer]:
        """Answer several requests together: one vision batch, decode rows advanced together."""
        answers: list[Answer | None] = [None] * len(requests)
        for index, event in self.stream_batch(requests):
            if event.channel == "done":
                answers[index] = event.result
        return answers

    def stream_batch(
        self, requests: list[AnswerRequest], admit: Callable[[int], list[AnswerRequest]] | None = None
    ) -> Iterator[tuple[int, StreamEvent]]:
        """``stream`` for several requests decoded together: (request index, event) pairs, a request's "done"
        event as soon as its row finishes. Requests beyond ``max_batch_size`` wait for a free row.

        Continuous batching: with ``admit``, whenever rows are free between decode steps, ``admit(n)`` is asked
        for up to ``n`` more requests (numbered after the ones before); they are prefilled and join the rows
        already decoding. A request that ``admit`` hands over but that cannot run (too long for the context, no
        question) gets an "error" event instead of failing the others.
        """
        jobs = [self._plan(r) for r in requests]
        index = {id(job): i for i, job in enumerate(jobs)}
        numbered = len(jobs)
        refused: deque[tuple[int, GlyphserveError]] = deque()

        def admit_jobs(free: int) -> list[_Job]:
            nonlocal numbered
            planned = []
            for request in admit(free):
                try:
                    job = self._plan(request)
                except GlyphserveError as exc:
                    refused.append((numbered, exc))
                else:
                    index[id(job)] = numbered
                    planned.append(job)
                numbered += 1
            return planned

        def refusals() -> Iterator[tuple[int, StreamEvent]]:
            while refused:
                i, error = refused.popleft()
                yield i, StreamEvent(channel="error", error=error)

        events = self._run(jobs, admit_jobs if admit is not None else None)
        try:
            for job, channel, text in events:
                yield from refusals()
                result = self._answer(job) if channel == "done" else None
                yield index[id(job)], StreamEvent(channel=channel, text=text, result=result)
        finally:
            events.close()
        yield from refusals()

    def stats(self) -> dict:
        return {
            "model": self.name,
            "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "dtype": str(self.dtype).removeprefix("torch."),
            "max_context": self.max_context,
            "max_batch_size": self.config.max_batch_size,
            "cuda_graphs": len(self.runner.graphs),
            "compiled_vision": self.config.compile_vision and self.device.type == "cuda",
            **self._counters,
            "vision_cache": self.vision_cache.stats(),
            "prefix_cache": self.prefix_cache.stats(),
            "gpu_allocated_bytes": torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else None,
        }

    def clear_caches(self, vision: bool = True, prefix: bool = True) -> None:
        with self._lock:
            if vision:
                self.vision_cache.clear()
            if prefix:
                self.prefix_cache.clear()

    def vision_tokens(self, page_shape: tuple[int, int]) -> int:
        """Tokens the model spends on a page of (height, width) pixels."""
        return self.params.vision_tokens(*page_shape)

    # --- planning ------------------------------------------------------------------------------------------

    def _stop_ids(self) -> list[int]:
        ids = self.model.generation_config.eos_token_id
        ids = set([ids] if isinstance(ids, int) else ids or [])
        for token in STOP_TOKENS:
            tid = self.tokenizer.convert_tokens_to_ids(token)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id:
                ids.add(tid)
        return sorted(ids)

    def _plan(self, request: AnswerRequest) -> _Job:
        started = time.perf_counter()
        settings = request.settings
        if not request.question or not request.question.strip():
            raise GlyphserveError("the question is empty")
        if settings.max_tokens < 1:
            raise ConfigError("max_tokens must be at least 1")
        if settings.temperature < 0 or not 0 < settings.top_p <= 1:
            raise ConfigError("temperature must be >= 0 and top_p in (0, 1]")
        for i, page in enumerate(request.pages):
            check_page(page, i)
        pages = list(request.pages)
        grids = [self.params.grid(*p.shape[:2]) for p in pages]
        prompt = self.prompts.build(conversation(request.history, request.question, len(pages)), grids)
        budget = self.max_context - settings.max_tokens
        if len(prompt.ids) > budget:
            fit = self._pages_that_fit(prompt, budget)
            if fit == 0 or not settings.truncate_pages:
                raise self._overflow(prompt, fit, settings)
            pages, grids = pages[:fit], grids[:fit]
            prompt = self.prompts.build(conversation(request.history, request.question, fit), grids)
        positions, delta = self._positions(prompt)
        job = _Job(request, settings, pages, prompt, positions, delta, started)
        job.decoder = IncrementalDecoder(self.tokenizer, self.hidden_ids)
        if not job.greedy:
            job.generator = torch.Generator(self.device)
            job.generator.manual_seed(
                settings.seed if settings.seed is not None else int.from_bytes(np.random.bytes(4))
            )
        return job

    def _page_tokens(self, prompt: PromptTokens) -> list[int]:
        # Each page costs its vision tokens plus <|begin_of_image|> and <|end_of_image|>.
        return [self.vision.tokens_per_page(g) + 2 for g in prompt.image_grids]

    def _pages_that_fit(self, prompt: PromptTokens, budget: int) -> int:
        per_page = self._page_tokens(prompt)
        total = len(prompt.ids) - sum(per_page)
        fit = 0
        for cost in per_page:
            if total + cost > budget:
                break
            total += cost
            fit += 1
        return fit if len(prompt.ids) - sum(per_page) <= budget else 0

    def _overflow(self, prompt: PromptTokens, fit: int, settings: GenerationSettings) -> ContextOverflowError:
        n = len(prompt.image_grids)
        need = len(prompt.ids) + settings.max_tokens
        head = (
            f"the prompt needs {len(prompt.ids)} tokens ({n} pages) plus {settings.max_tokens} new tokens "
            f"= {need}, but the context holds {self.max_context}"
        )
        if fit == 0:
            return ContextOverflowError(
                f"{head}: not even the first page fits; shorten the conversation or max_tokens"
            )
        return ContextOverflowError(
            f"{head}: only the first {fit} of {n} pages fit. Ask about fewer pages, or set truncate_pages "
            f"(--truncate-pages) to keep the first {fit}"
        )

    def _positions(self, prompt: PromptTokens) -> tuple[torch.Tensor, int]:
        """M-RoPE positions of the full prompt, exactly as the HF model computes them (on CPU)."""
        ids = torch.tensor([prompt.ids], dtype=torch.long)
        image_id = self.model.config.image_token_id
        mm = (ids == image_id).long()
        grids = torch.tensor(prompt.image_grids, dtype=torch.long) if prompt.image_grids else None
        positions, delta = self.model.model.get_rope_index(ids, mm, image_grid_thw=grids)
        return positions, int(delta[0, 0])

    # --- running -------------------------------------------------------------------------------------------

    def _run(
        self, jobs: list[_Job], admit: Callable[[int], list[_Job]] | None = None
    ) -> Iterator[tuple[_Job, str, str]]:
        """Prefill and decode ``jobs`` in the static cache's rows, taking more from ``admit`` while rows are free.
        Yields (job, channel, text) deltas and (job, "done", "") when a job's row is finished."""
        with self._lock:
            self._counters["batches"] += 1
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            runner = self.runner
            runner.active.zero_()
            waiting: deque[_Job] = deque(jobs)
            live: list[_Job] = []
            prefilling: deque[_Prefilling] = deque()  # long prompts joining while rows decode
            in_flight: deque = deque()  # decode steps launched but not yet read back
            try:
                while True:
                    free = runner.max_batch - len(live) - len(prefilling)
                    if admit is not None and free > len(waiting):
                        waiting.extend(admit(free - len(waiting)))
                    if waiting and free:
                        yield from self._settle(in_flight, live)  # before new rows start
                        free = runner.max_batch - len(live) - len(prefilling)
                        joining = [waiting.popleft() for _ in range(min(free, len(waiting)))]
                        yield from self._join(joining, live, prefilling)
                        continue
                    if prefilling:
                        yield from self._prefill_slice(prefilling, live, in_flight)
                    if live:
                        yield from self._collect(live, self._step(live, in_flight))
                    elif not prefilling:
                        break
            except torch.OutOfMemoryError as exc:
                self._recover()
                raise EngineOutOfMemoryError(
                    "the GPU ran out of memory on this request (caches were cleared; try fewer pages or a "
                    "shorter answer)"
                ) from exc
            finally:
                self._sync()

    def _recover(self) -> None:
        self._counters["oom_recoveries"] += 1
        self.vision_cache.clear()
        self.prefix_cache.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _keys(self, job: _Job) -> None:
        """The job's prefix-cache key: its pages' keys, else a hash of its pixels (page digests are computed
        only then, or when its pages must be encoded)."""
        if not job.settings.use_cache:
            return
        base = job.request.pages_key()
        if base is None:
            self._digest(job)
            base = hashlib.blake2b("".join(job.digests).encode(), digest_size=16).hexdigest()
        else:
            job.digests = list(job.request.page_keys[: len(job.pages)])
        job.doc_key = f"{base}#{len(job.pages)}"

    @staticmethod
    def _digest(job: _Job) -> None:
        """Digests of the job's pixels (vision-cache keys); encoded pages are decoded once, here."""
        job.pages = decode_pages(job.pages)
        job.digests = page_digests(job.pages)

    def _vision_key(self, digest: str) -> str:
        return self._vision_key_prefix + digest

    def _encode_pages(self, jobs: list[_Job]) -> None:
        """Vision features for the jobs' pages: cache hits, the misses encoded together in one batch."""
        t0 = time.perf_counter()
        wanted: dict[str, tuple[np.ndarray, tuple[int, int, int], bool]] = {}
        found: dict[str, torch.Tensor] = {}
        for job in jobs:
            if job.settings.use_cache and job.digests is None:
                self._digest(job)
            for i, page in enumerate(job.pages):
                if job.digests is None:
                    wanted[f"{id(job)}:{i}"] = (page, job.prompt.image_grids[i], False)
                    continue
                key = self._vision_key(job.digests[i])
                if key in found or key in wanted:
                    job.cache.vision_hits += 1
                    continue
                hit = self.vision_cache.get(key)
                if hit is None:
                    job.cache.vision_misses += 1
                    wanted[key] = (page, job.prompt.image_grids[i], True)
                else:
                    job.cache.vision_hits += 1
                    found[key] = hit
        keys = list(wanted)
        if keys:
            patches = self.preprocessor([wanted[k][0] for k in keys])
            self._sync()
            t1 = time.perf_counter()
            feats = self.vision.encode(patches, [wanted[k][1] for k in keys])
            for key, feat in zip(keys, feats):
                if wanted[key][2]:
                    feat = feat.clone()
                    self.vision_cache.put(key, feat)
                found[key] = feat
            self._sync()
            t2 = time.perf_counter()
        else:
            t1 = t2 = time.perf_counter()
        for job in jobs:
            job.features = [
                found[self._vision_key(job.digests[i]) if job.digests is not None else f"{id(job)}:{i}"]
                for i in range(len(job.pages))
            ]
            job.timings.preprocess += t1 - t0
            job.timings.vision_encode += t2 - t1

    def _prefill(self, jobs: list[_Job], sliced: list[_Prefilling] | None = None) -> Iterator[tuple[_Job, str, str]]:
        """Prefill the jobs and start their rows; with ``sliced``, long prompts are only begun and listed there."""
        t0 = time.perf_counter()
        planned: dict[str, tuple[int, ...]] = {}  # prefixes that an earlier job of this batch will store
        deferred: set[int] = set()
        for job in jobs:
            self._keys(job)
            p = job.prompt.prefix_len
            if job.doc_key is None or p == 0:
                continue
            ids = tuple(job.prompt.ids[:p])
            if planned.get(job.doc_key) == ids:
                deferred.add(id(job))  # same document as an earlier job: reuse its prefix once stored
                continue
            job.prefix = self.prefix_cache.lookup(job.doc_key, ids)
            if job.prefix is None:
                planned[job.doc_key] = ids
        hashing = time.perf_counter() - t0
        for job in jobs:
            job.timings.preprocess += hashing
        self._encode_pages([j for j in jobs if j.prefix is None and j.pages and id(j) not in deferred])
        # Cold documents first, one by one (their prompts are long and store the prefixes that jobs about the
        # same document wait for); then the short rest (follow-ups on cached prefixes, short text-only
        # prompts) together, so the weights are read once for all of them.
        together = []
        awaited = {job.doc_key for job in jobs if id(job) in deferred}  # prefixes other jobs wait for
        for job in jobs:
            if id(job) in deferred or self._short(job):
                together.append(job)
            elif (sliced is not None and job.doc_key not in awaited
                  and len(job.prompt.ids) - self._start_of(job) > INTERLEAVED_PREFILL_TOKENS):
                sliced.append(self._begin_slices(job))
            else:
                yield from self._first_token([job])
        for job in together:
            if id(job) in deferred:
                job.prefix = self.prefix_cache.lookup(job.doc_key, tuple(job.prompt.ids[: job.prompt.prefix_len]))
                if job.prefix is None:  # not stored after all (cache too small): a cold prefill of its own
                    self._encode_pages([job])
                    yield from self._first_token([job])
        group: list[_Job] = []
        tokens = 0
        for job in filter(self._short, together):
            n = len(job.prompt.ids) - self._start_of(job)
            if group and tokens + n > PREFILL_GROUP_TOKENS:
                yield from self._first_token(group)
                group, tokens = [], 0
            group.append(job)
            tokens += n
        if group:
            yield from self._first_token(group)

    @staticmethod
    def _start_of(job: _Job) -> int:
        return job.prefix.length if job.prefix is not None else 0

    def _short(self, job: _Job) -> bool:
        """Whether the job's prefill can join others': no page features to place (its pages' prefix is
        cached, or it has none) and a short remainder."""
        return (job.prefix is not None or not job.pages) and len(job.prompt.ids) - self._start_of(job) <= PREFILL_GROUP_TOKENS

    def _first_token(self, group: list[_Job]) -> Iterator[tuple[_Job, str, str]]:
        """Prefill ``group``, sample each job's first token and start its decode row."""
        t1 = time.perf_counter()
        self._counters["prefill_passes"] += 1
        yield from self._start_decoding(group, self._prefill_group(group), t1)

    def _begin_slices(self, job: _Job) -> _Prefilling:
        embeds, positions, start = self._prefill_inputs(job)
        job.features = None
        self.runner.park_row(job.row)
        return _Prefilling(job, embeds, positions, start, started=time.perf_counter())

    def _start_decoding(self, group: list[_Job], logits: torch.Tensor, t1: float) -> Iterator[tuple[_Job, str, str]]:
        """Sample each job's first token from its row of ``logits`` and start its decode row."""
        for member, row_logits in zip(group, logits):
            if member.settings.ignore_eos:
                row_logits = row_logits + self._stop_bias
            token = self._sample(member, row_logits)
            self._sync()
            member.timings.prefill = time.perf_counter() - t1
            member.timings.time_to_first_token = time.perf_counter() - member.started
            n = len(member.prompt.ids)
            bias = self._stop_bias if member.settings.ignore_eos else None
            self.runner.start_row(member.row, token, n, n + member.rope_delta, bias)
            member.cache_pos = n
            yield from self._accept(member, token)

    def _prefill_group(self, group: list[_Job]) -> torch.Tensor:
        """Last-token logits [jobs, vocab]: one job alone, several short remainders in one pass
        (``LMRunner.prefill_rows``)."""
        if len(group) == 1:
            return self._prefill_one(group[0]).unsqueeze(0)
        starts, ids, positions = [], [], []
        for job in group:
            start = self._load_prefix(job)
            starts.append(start)
            ids.extend(job.prompt.ids[start:])
            positions.append(job.positions[:, :, start:])
        lengths = [len(job.prompt.ids) - start for job, start in zip(group, starts)]
        with torch.inference_mode():
            embeds = self.runner.embed(torch.tensor([ids], device=self.device))
            return self.runner.prefill_rows(
                [job.row for job in group], embeds, torch.cat(positions, dim=2).to(self.device), starts, lengths
            )

    def _prefill_one(self, job: _Job) -> torch.Tensor:
        embeds, positions, start = self._prefill_inputs(job)
        logits = self.runner.prefill(job.row, embeds, positions, start)
        self._prefill_done(job)
        return logits

    def _prefill_inputs(self, job: _Job) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Write the job's cached prefix to its row; the embeddings (page features in place) and positions of the
        rest, and the cache position where the rest starts."""
        start = self._load_prefix(job)
        ids_dev = torch.tensor([job.prompt.ids[start:]], device=self.device)
        with torch.inference_mode():
            embeds = self.runner.embed(ids_dev)
            if start == 0 and job.features:
                mask = ids_dev[0] == self.model.config.image_token_id
                embeds[0, mask] = torch.cat(job.features).to(embeds.dtype)
        return embeds, job.positions[:, :, start:].to(self.device), start

    def _load_prefix(self, job: _Job) -> int:
        """Write the job's cached prefix (if any) to its row; the cache position where its prefill starts."""
        if job.prefix is None:
            return 0
        self.runner.write_kv(job.row, job.prefix.kv)
        job.cache.prefix_reused_tokens = job.prefix.length
        return job.prefix.length

    def _prefill_done(self, job: _Job) -> None:
        """Keep the document prefix the job's prefill computed."""
        p = job.prompt.prefix_len
        if job.prefix is None and job.doc_key is not None and p > 0:
            self.prefix_cache.store(job.doc_key, PrefixEntry(tuple(job.prompt.ids[:p]), self.runner.read_kv(job.row, p)))
        job.features = None

    def _sample(self, job: _Job, logits: torch.Tensor) -> int:
        """Next token from one row of logits (stop-token bias already applied)."""
        if job.greedy:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / job.settings.temperature, dim=-1)
        if job.settings.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(-1) - sorted_probs < job.settings.top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=job.generator))

    def _accept(self, job: _Job, token: int) -> Iterator[tuple[_Job, str, str]]:
        """Record a generated token; yields the text it completes per channel; marks the job finished."""
        job.tokens.append(token)
        stop = token in self.stop_ids and not job.settings.ignore_eos
        if stop:
            job.finish_reason = "stop"
        elif len(job.tokens) >= job.settings.max_tokens:
            job.finish_reason = "length"
        delta = "" if stop else job.decoder.push(token)
        if job.finish_reason is not None:
            delta += job.decoder.flush()
        events = job.parser.feed(delta) if delta else []
        if job.finish_reason is not None:
            events += job.parser.finish()
        for channel, text in events:
            yield job, channel, text

    def _join(
        self, joining: list[_Job], live: list[_Job], prefilling: deque[_Prefilling]
    ) -> Iterator[tuple[_Job, str, str]]:
        """Give the jobs free rows (lowest first, so decode covers few rows), prefill them and start decoding; while
        rows decode, long prompts are only begun here and go on a slice at a time (``_prefill_slice``)."""
        taken = {j.row for j in live} | {p.job.row for p in prefilling}
        free_rows = [r for r in range(self.runner.max_batch) if r not in taken]
        for job, row in zip(joining, free_rows):
            job.row = row
        self._counters["requests"] += len(joining)
        sliced: list[_Prefilling] | None = [] if live else None
        yield from self._prefill(joining, sliced)
        prefilling.extend(sliced or [])
        pending = {id(p.job) for p in sliced or []}
        yield from self._enter_decode([j for j in joining if id(j) not in pending], live)

    def _enter_decode(self, jobs: list[_Job], live: list[_Job]) -> Iterator[tuple[_Job, str, str]]:
        """Jobs with their first token decode from now on (or are done already)."""
        now = time.perf_counter()
        for job in jobs:
            job.decode_started = now
            if job.finish_reason is None:
                live.append(job)
            else:
                self.runner.active[job.row] = 0
                yield from self._finish(job)

    def _settle(self, in_flight: deque, live: list[_Job]) -> Iterator[tuple[_Job, str, str]]:
        """Read back the decode steps already launched (their tokens belong to the rows as they were)."""
        while in_flight:
            yield from self._collect(live, self._read(in_flight.popleft()))

    def _prefill_slice(
        self, prefilling: deque[_Prefilling], live: list[_Job], in_flight: deque
    ) -> Iterator[tuple[_Job, str, str]]:
        """The next slice of the first long prompt; after its last slice the job starts decoding."""
        slot = prefilling[0]
        job = slot.job
        if job.request.cancel is not None and job.request.cancel():
            prefilling.popleft()
            job.finish_reason = "cancelled"
            job.decode_started = time.perf_counter()
            yield from self._finish(job)
            return
        end = slot.done + INTERLEAVED_PREFILL_TOKENS
        self._counters["prefill_passes"] += 1
        logits = self.runner.prefill(job.row, slot.embeds[:, slot.done : end], slot.positions[:, :, slot.done : end],
                                     slot.start + slot.done)
        slot.done = end
        if slot.done < slot.embeds.shape[1]:
            return
        prefilling.popleft()
        self._prefill_done(job)
        yield from self._settle(in_flight, live)  # its row starts with the next step launched
        yield from self._start_decoding([job], logits.unsqueeze(0), slot.started)
        yield from self._enter_decode([job], live)

    def _step(self, live: list[_Job], in_flight: deque) -> list[int]:
        """One decode step over the rows up to the highest live one; the next token of each of those rows.
        Greedy rows on CUDA run one step ahead: the next step is enqueued before this one's tokens are read."""
        runner = self.runner
        b = max(j.row for j in live) + 1
        greedy = all(j.greedy for j in live)
        self._counters["decode_steps"] += 1
        self._counters["decode_rows"] += len(live)
        if greedy and self._host_next is not None:
            if not in_flight:
                in_flight.append(self._launch(b, live))
            step = in_flight.popleft()
            if any(len(j.tokens) + 1 + len(in_flight) < j.settings.max_tokens for j in live):
                in_flight.append(self._launch(b, live))
            return self._read(step)
        self._advance(b, live)
        tokens = runner.next[:b].tolist()
        if not greedy:
            for job in live:
                tokens[job.row] = self._sample(job, runner.logits[job.row])
            runner.tokens[:b, 0] = torch.tensor(tokens, device=self.device)
        return tokens

    def _collect(self, live: list[_Job], tokens: list[int]) -> Iterator[tuple[_Job, str, str]]:
        """Accept each live row's token (or its cancellation); finished rows leave ``live``."""
        for job in list(live):
            if job.request.cancel is not None and job.request.cancel():
                job.finish_reason = "cancelled"
            else:
                yield from self._accept(job, tokens[job.row])
            if job.finish_reason is not None:
                live.remove(job)
                self.runner.active[job.row] = 0
                yield from self._finish(job)

    def _finish(self, job: _Job) -> Iterator[tuple[_Job, str, str]]:
        now = time.perf_counter()
        job.timings.decode = now - job.decode_started
        job.timings.total = now - job.started
        if self.device.type == "cuda":
            job.peak_gpu_bytes = torch.cuda.max_memory_allocated(self.device)
        yield job, "done", ""

    def _advance(self, b: int, live: list[_Job]) -> None:
        self.runner.step(b, max(j.cache_pos for j in live))
        for j in live:
            j.cache_pos += 1

    def _launch(self, b: int, live: list[_Job]) -> tuple[torch.Tensor, torch.cuda.Event, int]:
        """Enqueue one decode step and the copy of its tokens into a pinned host buffer."""
        self._advance(b, live)
        self._launches += 1
        host = self._host_next[self._launches % 2]
        host[:b].copy_(self.runner.next[:b], non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event, b

    @staticmethod
    def _read(step: tuple[torch.Tensor, torch.cuda.Event, int]) -> list[int]:
        host, event, b = step
        event.synchronize()
        return host[:b].tolist()

    def _answer(self, job: _Job) -> Answer:
        self._counters["new_tokens"] += len(job.tokens)
        self._counters["prompt_tokens"] += len(job.prompt.ids)
        return Answer(
            text=job.parser.answer_text,
            thinking=job.parser.thinking_text,
            token_ids=list(job.tokens),
            finish_reason=job.finish_reason or "length",
            timings=job.timings,
            prompt_tokens=len(job.prompt.ids),
            new_tokens=len(job.tokens),
            vision_tokens=sum(self.vision.tokens_per_page(g) for g in job.prompt.image_grids),
            pages_used=len(job.pages),
            cache=job.cache,
            peak_gpu_bytes=job.peak_gpu_bytes,
        )

    # --- warm-up -------------------------------------------------------------------------------------------

    def _warm_up(self) -> None:
        if self.device.type != "cuda":
            return
        if self.config.compile_vision:
            for height, width in self.config.warmup_page_shapes:
                page = np.full((height, width, 3), 255, dtype=np.uint8)
                grid = self.params.grid(height, width)
                for n in sorted({1, self.config.vision_batch_pages}):
                    self.vision.encode(self.preprocessor([page] * n), [grid] * n)
        if self.config.cuda_graphs:
            self.runner.capture_graphs(list(GRAPH_BATCH_SIZES))
        self._sync()
