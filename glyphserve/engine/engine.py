"""The engine's public face: rendered pages and a conversation in, streamed thinking and answer out.

``Engine`` loads the model, sizes the KV pool from the memory left after the weights and warms up (``startup``),
and runs requests through the engine loop (``EngineCore``: scheduler, KV pool, model runner, sampler). One
``stream``/``stream_batch`` call runs at a time (a lock); inside one, any number of requests (up to ``max_num_seqs``
at once) are batched continuously, and more can join through ``admit`` while it runs.
"""

from __future__ import annotations

import functools
import gc
import threading
import time
from collections.abc import Callable, Iterator

import torch

from glyphserve.engine import loading
from glyphserve.engine.caches import VisionCache
from glyphserve.engine.core import EngineCore, Event
from glyphserve.engine.kv_pool import KVPool
from glyphserve.engine.model_runner import ModelRunner
from glyphserve.engine.pdl import enable_for_inductor, pdl_enabled
from glyphserve.engine.planner import Planner
from glyphserve.engine.preprocess import PagePreprocessor, PreprocessParams
from glyphserve.engine.prompt import PromptBuilder
from glyphserve.engine.sampler import Sampler
from glyphserve.engine.scheduler import Scheduler, SchedulerConfig
from glyphserve.engine.sequence import Sequence, Status
from glyphserve.engine.stage_clock import StageClock
from glyphserve.engine.startup import Startup
from glyphserve.engine.step_trace import StepTrace
from glyphserve.engine.types import DEFAULT_MAX_CONTEXT, Answer, AnswerRequest, EngineConfig, StepRecord, StreamEvent
from glyphserve.engine.vision import VisionEncoder, VisionRunner
from glyphserve.errors import ConfigError, EngineOutOfMemoryError, GlyphserveError
from glyphserve.glm4v import STOP_TOKENS

_CLOSED = "this engine was closed (Engine.close): load another to answer more"


def _while_open(method):
    """``method``, refused once the engine is closed: also when ``close`` runs on another thread while it runs (the
    attributes it reads are gone then)."""

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        self._refuse_closed()
        try:
            return method(self, *args, **kwargs)
        except AttributeError:
            if self._closed:
                raise GlyphserveError(_CLOSED) from None
            raise

    return call


class Engine:
    """GLM-4.1V (Glyph) inference over a paged KV pool, with vision-feature and prefix caches, continuous
    batching, chunked prefill and CUDA-graph decode.

    One ``stream``/``stream_batch`` (``answer``/``answer_batch``) runs at a time: questions asked from several
    threads are answered one after another, and a stream left unread holds the engine until it is closed. To
    batch, ask together (``answer_batch``), or run one ``stream_batch`` whose ``admit`` takes new requests as they
    come (what ``glyphserve serve`` does). A thread that opens a second stream while its first is open gets a
    ``GlyphserveError`` (it would wait on itself)."""

    def __init__(self, loaded: loading.LoadedModel, config: EngineConfig):
        self.config = config
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device, self.dtype = loaded.device, loaded.dtype
        self.name = loaded.name
        mcfg = self.model.config
        cuda = self.device.type == "cuda"
        self.params = PreprocessParams.from_image_processor(loaded.image_processor)
        self.preprocessor = PagePreprocessor(self.params, self.device, self.dtype, side_stream=config.pinned_copies)
        limit = mcfg.text_config.max_position_embeddings
        if config.max_context is not None and config.max_context > limit:  # as vLLM refuses a max_model_len past it
            raise ConfigError(f"a context of {config.max_context} tokens (max_context, --max-model-len) is longer "
                              f"than the model's {limit} positions (max_position_embeddings): give at most {limit}")
        self.max_context = config.max_context or min(limit, DEFAULT_MAX_CONTEXT)
        self.prompts = PromptBuilder(self.tokenizer, loaded.chat_template, mcfg.image_token_id,
                                     mcfg.image_end_token_id, self.params.merge_size, self.max_context)
        self.stop_ids = self._stop_ids()
        # Compiled in 16 bits only: in float32 (the CUDA exactness probe's dtype) the compiled tower moved two of the
        # probe's eight checks off generate's tokens (at top-2 gaps of 0.007 and 0.010; uncompiled, all eight equal),
        # and float32 is for checking, not serving.
        self.compiled_vision = config.compile_vision and cuda and self.dtype != torch.float32
        self.pdl = pdl_enabled(self.device)  # our kernels' launches
        enable_for_inductor(self.device)  # and Inductor's: set before anything is compiled (the memory profile)
        planned = [self.params.grid(h, w) for h, w in config.warmup_page_shapes] if self.compiled_vision else []
        self.vision = VisionRunner(self.model, config.vision_batch_pages, self.compiled_vision, planned)
        self._attention_plans = threading.local()  # ``.built`` on the threads holding cuDNN's (``plan_attention``)
        self.vision_cache = VisionCache(config.vision_cache_bytes, config.vision_cache_cpu_bytes, self.device)
        block_size = config.kv_block_size
        sched_config = SchedulerConfig(
            max_num_seqs=config.max_num_seqs,
            max_context=self.max_context,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_prefill_tokens=min(config.max_prefill_tokens, self.max_context),
        )
        max_blocks = -(-(self.max_context + 1) // block_size)
        self.runner = ModelRunner(self.model, block_size=block_size, max_num_seqs=config.max_num_seqs,
                                  max_blocks=max_blocks, device=self.device, dtype=self.dtype,
                                  compile=config.compile_decode and config.cuda_graphs and cuda,
                                  quantize=config.quantize)
        self.sampler = Sampler(self.runner.vocab, config.max_num_seqs + 1, self.stop_ids, self.device)
        start = Startup(config, mcfg, self.runner, self.vision, self.preprocessor, self.params, self.max_context)
        self.pool = KVPool(start.pool_blocks(sched_config), block_size)
        self.runner.allocate_kv(self.pool.num_blocks)
        self.scheduler = Scheduler(sched_config, self.pool)
        key_prefix = f"{self.name}|{self.dtype}|{self.params.fingerprint()}|"
        clock = StageClock(self.device)
        encoder = VisionEncoder(self.vision, self.preprocessor, self.vision_cache, key_prefix, clock)
        graphs = config.cuda_graphs and cuda
        self.core = EngineCore(self.runner, self.sampler, self.scheduler, encoder, clock, self.device,
                               row_prefill=graphs if config.graph_prefill is None else config.graph_prefill)
        if config.step_trace:
            self.core.trace = StepTrace(config.step_trace)
        self.planner = Planner(self.model, self.tokenizer, self.prompts, self.params, max_context=self.max_context,
                               block_size=block_size, pool_tokens=(self.pool.num_blocks - 1) * block_size,
                               stop_ids=self.stop_ids, prefix_caching=config.enable_prefix_caching)
        self._lock = threading.Lock()  # one stream (or batch) at a time; see the class docstring
        self._holder: int | None = None  # the thread whose stream holds it
        self._closed = False
        # plan_s: seconds spent planning requests (tokenizing, prefix lookup) in stream_batch and as they join, on
        # the thread that runs the steps; planned_ahead: requests that came planned (``plan``)
        self._counters = {"requests": 0, "new_tokens": 0, "prompt_tokens": 0, "oom_recoveries": 0, "plan_s": 0.0,
                          "planned_ahead": 0}
        start.warm_up(self.core, self.sampler, self.compiled_vision, self.plan_attention)

    @classmethod
    def load(cls, config: EngineConfig) -> Engine:
        """Load the checkpoint (or random weights), size the KV pool, capture decode graphs; raises
        ModelLoadError or ConfigError."""
        if config.max_num_seqs < 1:
            raise ConfigError("max_num_seqs must be at least 1")
        if not 0 < config.gpu_memory_utilization <= 1:
            raise ConfigError("gpu_memory_utilization must be in (0, 1]")
        if config.kv_block_size < 1 or config.kv_block_size & (config.kv_block_size - 1):
            raise ConfigError("kv_block_size must be a power of two")
        if config.quantize not in (None, "fp8"):
            raise ConfigError(f"unknown quantization {config.quantize!r} (fp8, or none)")
        if config.max_context is not None and config.max_context < 1:
            raise ConfigError("max_context (--max-model-len) must be at least 1, or unset: the model's, at most "
                              f"{DEFAULT_MAX_CONTEXT}")
        return cls(loading.load(config), config)

    # --- public API ----------------------------------------------------------------------------------------

    def answer(self, request: AnswerRequest) -> Answer:
        """``stream``'s Answer, once it is done."""
        result = None
        for event in self.stream(request):
            if event.channel == "done":
                result = event.result
        return result

    def stream(self, request: AnswerRequest) -> Iterator[StreamEvent]:
        """Text deltas on the "thinking" and "answer" channels, then a "done" event carrying the Answer. Closing
        the iterator stops generation."""
        events = self.stream_batch([request])
        try:
            for _, event in events:
                if event.channel == "error":
                    raise event.error
                yield event
        finally:
            events.close()

    def answer_batch(self, requests: list[AnswerRequest]) -> list[Answer]:
        """Answer several requests together (continuously batched: each decodes as soon as it is prefilled)."""
        answers: list[Answer | None] = [None] * len(requests)
        for index, event in self.stream_batch(requests):
            if event.channel == "done":
                answers[index] = event.result
            elif event.channel == "error":
                raise event.error
        return answers

    @_while_open
    def stream_batch(
        self, requests: list[AnswerRequest | Sequence],
        admit: Callable[[int], list[AnswerRequest | Sequence]] | None = None,
    ) -> Iterator[tuple[int, StreamEvent]]:
        """(request index, event) pairs for requests answered together; a request's "done" comes as soon as it
        ends. A request in ``requests`` that cannot run raises here, before anything runs. A request may come
        planned already (``plan``).

        Continuous batching: with ``admit``, whenever there is room for more sequences, ``admit(n)`` is asked for
        up to ``n`` more requests (numbered after the ones before); they join the running batch. A request that
        ``admit`` hands over but that cannot run (too long for the context, no question), or that fails inside
        the engine, gets an "error" event; the others go on."""
        seqs = [self._planned(r) for r in requests]
        return self._run(seqs, admit)

    @_while_open
    def plan(self, request: AnswerRequest) -> Sequence:
        """Plan ``request`` on the caller's thread (settings checked, prompt tokenized and fitted, positions, page
        identities, prefix hashes; raises what ``stream_batch`` would), to hand to ``stream_batch`` or ``admit``
        in its place, once. A server plans on its request threads, so that the thread running the steps does
        not (192 plans took 0.5 of 3.1 s of that thread under 64 sessions on an H200)."""
        return self.planner.plan(request)

    def _planned(self, request: AnswerRequest | Sequence) -> Sequence:
        if isinstance(request, Sequence):
            if request.taken:
                raise GlyphserveError("a planned request can run only once")
            # Its timings (time to first token, total) start here, as a request planned by the engine's start
            # when the engine takes it: a server's queue time stays out of them (and in its own metric).
            request.arrived = time.perf_counter()
            self._counters["planned_ahead"] += 1
            seq = request
        else:
            started = time.perf_counter()
            seq = self.planner.plan(request)
            seq.arrived = started  # planned here: its planning (pages hashed, prompt built) counts in its timings
            self._counters["plan_s"] += time.perf_counter() - started
        seq.taken = True
        return seq

    @_while_open
    def counters(self) -> dict[str, float]:
        """Requests, tokens, decode steps and rows, prefill passes, preemptions, the share of the KV pool's blocks
        in use (``kv_usage``), ...: plain numbers under fixed keys, safe to read while the engine runs on another
        thread (``stats`` walks the pool and caches)."""
        usable = self.pool.num_blocks - 1
        return {**self._counters, **self.core.counters, "preemptions": self.scheduler.preemptions,
                "kv_usage": (usable - self.pool.num_free) / usable}

    @_while_open
    def step_trace(self) -> list[StepRecord]:
        """The records of the last ``EngineConfig.step_trace`` steps, oldest first (none when it is 0); safe to
        call while the engine runs on another thread."""
        return self.core.trace.records() if self.core.trace is not None else []

    @_while_open
    def stats(self) -> dict:
        """The engine's settings, counters, caches and memory, as ``/health`` shows them."""
        pool = self.pool.stats()
        return {
            "model": self.name,
            "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "dtype": str(self.dtype).removeprefix("torch."),
            "quantize": self.config.quantize,
            "max_context": self.max_context,
            "max_num_seqs": self.config.max_num_seqs,
            "kv_block_size": self.pool.block_size,
            "cuda_graphs": len(self.runner.graphs),
            "pass_graphs": len(self.core.passes.graphs) if self.core.passes is not None else 0,
            "compiled_vision": self.compiled_vision,
            "pdl": self.pdl,
            **self._counters,
            **self.core.counters,
            "preemptions": self.scheduler.preemptions,
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "vision_cache": self.vision_cache.stats(),
            "kv_pool": {**vars(pool), "tokens": pool.blocks * self.pool.block_size,
                        "bytes": self.runner.num_blocks * ModelRunner.bytes_per_block(
                            self.model.config, self.pool.block_size, self.dtype)},
            "gpu_allocated_bytes": torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else None,
        }

    def clear_caches(self, vision: bool = True, prefix: bool = True) -> None:
        """Drop the vision features and/or the prefix KV kept for later questions (waits for a running stream)."""
        self._refuse_reentry("clear the caches")
        with self._lock:
            self._refuse_closed()
            if vision:
                self.vision_cache.clear()
            if prefix:
                self.pool.clear()

    def close(self) -> None:
        """Give back what the engine holds (the weights, the KV pool, the CUDA graphs, the caches: on a GPU, its
        memory), once a stream that runs on another thread has ended; every later call but this one raises
        ``GlyphserveError``. ``with Engine.load(config) as engine:`` closes it at the block's end."""
        self._refuse_reentry("close the engine")
        with self._lock:
            if self._closed:
                return
            self._closed = True
            kept = {"config", "name", "device", "dtype", "params", "max_context", "stop_ids", "compiled_vision",
                    "pdl", "_lock", "_holder", "_closed", "_counters"}
            for name in [n for n in vars(self) if n not in kept]:
                delattr(self, name)
        # The model and the graphs hold each other's tensors in cycles (modules, captured graphs' pools): only a
        # collection frees them, and only then can the allocator's cache give the device memory back. torch keeps a
        # cuBLAS workspace (32 MiB on an H200) for each stream that ran a product, the engine's own streams too, for
        # the life of the process: measured on an H200, 35 of a tiny engine's 40 MB stayed after its close without
        # clearing them (a captured graph has its workspace in its own pool: clearing leaves other engines whole).
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
            if clear_workspaces is not None:
                clear_workspaces()
            torch.cuda.empty_cache()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @_while_open
    def vision_tokens(self, page_shape: tuple[int, int]) -> int:
        """Tokens the model spends on a page of (height, width) pixels."""
        return self.params.vision_tokens(*page_shape)

    # --- running -------------------------------------------------------------------------------------------

    def _run(self, seqs: list[Sequence], admit) -> Iterator[tuple[int, StreamEvent]]:
        index = {seq.seq_id: i for i, seq in enumerate(seqs)}
        numbered = len(seqs)
        self._refuse_reentry("open a second stream")
        with self._lock:
            self._refuse_closed()  # closed while this stream waited for the lock
            self._holder = threading.get_ident()
            mine = list(seqs)
            for seq in seqs:
                self.core.add(seq)
            self._counters["requests"] += len(seqs)
            try:
                while True:
                    if admit is not None:
                        room = self.scheduler.room()
                        if room:
                            for request in admit(room):
                                try:
                                    seq = self._planned(request)
                                except GlyphserveError as exc:
                                    yield numbered, StreamEvent(channel="error", error=exc)
                                else:
                                    index[seq.seq_id] = numbered
                                    mine.append(seq)
                                    self.core.add(seq)
                                    self._counters["requests"] += 1
                                numbered += 1
                    if not self.core.has_work():
                        break
                    for event in self.core.step():
                        yield index[event.seq.seq_id], self._stream_event(event)
            except torch.OutOfMemoryError as exc:
                self._recover(mine)
                raise EngineOutOfMemoryError(
                    "the GPU ran out of memory on this request (caches were cleared; try fewer pages or a "
                    "shorter answer)"
                ) from exc
            finally:
                for seq in mine:  # a consumer that stopped early, or an error: nothing stays in the engine
                    self.core.abort(seq)
                self.core.drain()
                self._sync()
                self._holder = None

    def _refuse_closed(self) -> None:
        if self._closed:
            raise GlyphserveError(_CLOSED)

    def _refuse_reentry(self, what: str) -> None:
        if self._holder == threading.get_ident():
            raise GlyphserveError(
                f"this thread's stream of the engine is still open, so it cannot {what} (it would wait on itself): "
                "read it to its end or close it first, or ask together with stream_batch or answer_batch")

    def _stream_event(self, event: Event) -> StreamEvent:
        if event.channel == "done":
            return StreamEvent(channel="done", result=self._answer(event.seq))
        if event.channel == "error":
            return StreamEvent(channel="error", error=event.error)
        return StreamEvent(channel=event.channel, text=event.text, logprobs=event.logprobs, tokens=event.tokens)

    def _answer(self, seq: Sequence) -> Answer:
        self._counters["new_tokens"] += len(seq.output)
        self._counters["prompt_tokens"] += seq.prompt_len
        return Answer(
            text=seq.out.answer_text,
            thinking=seq.out.thinking_text,
            token_ids=list(seq.output),
            finish_reason=seq.finish_reason or "length",
            timings=seq.timings,
            prompt_tokens=seq.prompt_len,
            new_tokens=len(seq.output),
            vision_tokens=sum(seq.page_tokens),
            pages_used=len(seq.pages),
            cache=seq.cache,
            peak_gpu_bytes=seq.peak_gpu_bytes,
            stop_reason=self._reported_stop(seq),
            logprobs=seq.out.logprobs,
            token_times=[t - seq.arrived for t in seq.token_times],
        )

    def _reported_stop(self, seq: Sequence) -> str | int | None:
        """vLLM's ``stop_reason``: None when the tokenizer's end-of-text token ended the answer (not under
        ignore_eos), else the stop string or token id that did (the model's other stop tokens included)."""
        if seq.stop_reason == self.tokenizer.eos_token_id and not seq.settings.ignore_eos:
            return None
        return seq.stop_reason

    def _recover(self, seqs: list[Sequence]) -> None:
        self._counters["oom_recoveries"] += 1
        for seq in seqs:
            if seq.status is not Status.FINISHED:
                self.scheduler.finish(seq, "error")
        self.core.in_flight.clear()
        self.vision_cache.clear()
        self.pool.clear()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _stop_ids(self) -> list[int]:
        ids = self.model.generation_config.eos_token_id
        ids = set([ids] if isinstance(ids, int) else ids or [])
        for token in STOP_TOKENS:
            tid = self.tokenizer.convert_tokens_to_ids(token)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id:
                ids.add(tid)
        return sorted(ids)

    @_while_open
    def plan_attention(self) -> None:
        """Build cuDNN's attention plans on the calling thread, once per thread: for a prompt's first chunk at
        every padded length up to the largest prefill (``ModelRunner.warm_prompt_attention``) and for the vision
        tower's planned page shapes (``VisionRunner.plan_attention``). cuDNN builds a plan for each new shape (~45
        ms on an H200) and PyTorch keeps them per thread: the engine's load builds them on its own thread, and a
        caller that steps the engine from another one (the server's scheduler thread) calls this there first.
        Nothing off CUDA."""
        if self.device.type != "cuda" or getattr(self._attention_plans, "built", False):
            return
        sched = self.scheduler.config
        self.runner.warm_prompt_attention(min(max(sched.max_prefill_tokens, sched.max_num_batched_tokens),
                                              self.max_context))
        self.vision.plan_attention()
        self._sync()
        self._attention_plans.built = True
