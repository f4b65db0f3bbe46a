"""An engine's start: how many KV blocks it gets (on CUDA from a memory profile of its largest prefill) and, on
CUDA, what it builds before its first question: compiled kernels, cuDNN plans and captured graphs.

``Engine.__init__`` builds a ``Startup`` of its parts; kept apart so the engine's file reads as its public face and
its loop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from glyphserve.engine.core import EngineCore
from glyphserve.engine.kv_pool import TRASH_BLOCK
from glyphserve.engine.model_runner import PAGED_CHUNK_TOKENS, PROMPT_PAD_TOKENS, DenseChunk, ModelRunner, StepInputs
from glyphserve.engine.pass_graphs import PASS_GRAPH_TOKENS, PassGraphs
from glyphserve.engine.preprocess import PagePreprocessor, PreprocessParams
from glyphserve.engine.sampler import Sampler
from glyphserve.engine.scheduler import SchedulerConfig
from glyphserve.engine.types import EngineConfig
from glyphserve.engine.vision import VisionRunner
from glyphserve.errors import ConfigError

# Memory kept free beside the KV pool on CUDA: CUDA graphs' own pool, cuBLAS workspaces, allocator slack.
CUDA_RESERVE_BYTES = 1 << 30


def graph_buckets(max_num_seqs: int, max_rows: int) -> list[int]:
    """Row counts with a captured graph step: powers of two up to ``max_num_seqs``, it, and ``max_rows`` (room for
    a short prompt chunk beside few sequences: one more capture, not every power of two up to it)."""
    out, b = [], 1
    while b < max_num_seqs:
        out.append(b)
        b *= 2
    return sorted({*out, max_num_seqs, max_rows})


def pass_graph_tokens(config: EngineConfig, max_context: int) -> int:
    """The tokens of the largest captured prompt pass: the largest step a pass of paged chunks can fill (the step's
    budget ``max_num_batched_tokens`` while other sequences decode, the prompt's ``max_prefill_tokens`` when none
    does; an engine of one sequence never decodes beside a prompt), up to ``PASS_GRAPH_TOKENS``. A bucket past it
    never replays, and its graph's pool holds memory for good: the smallest engine of ``bench engine`` (one sequence,
    1,024-token prompt passes) captured passes up to 2,048 tokens, and its peak for a cold W50 question with FP8
    weights went from 12.24 GiB before pass graphs to 12.62 (H200)."""
    prompt = min(config.max_prefill_tokens, max_context)
    largest = prompt if config.max_num_seqs == 1 else max(prompt, config.max_num_batched_tokens)
    return min(PASS_GRAPH_TOKENS, largest)


@dataclass
class Startup:
    """What sizes and warms an engine, from the parts it is built of (before the KV pool exists)."""

    config: EngineConfig
    model_config: Any  # the checkpoint's (``text_config`` sizes the KV blocks)
    runner: ModelRunner
    vision: VisionRunner
    preprocessor: PagePreprocessor
    params: PreprocessParams
    max_context: int

    def pool_blocks(self, sched: SchedulerConfig) -> int:
        """Blocks in the KV pool: as configured, else what the memory budget leaves after the weights, the
        activations of the largest prefill (measured with a real forward pass) and the vision cache."""
        config, runner = self.config, self.runner
        per_block = ModelRunner.bytes_per_block(self.model_config, config.kv_block_size, runner.dtype)
        if config.num_kv_blocks is not None:
            blocks = config.num_kv_blocks
        elif runner.device.type != "cuda":
            blocks = config.cpu_kv_cache_bytes // per_block
        else:
            blocks = self._cuda_budget(sched) // per_block
        need = -(-(self.max_context + 1) // config.kv_block_size) + 1
        if blocks < need:
            raise ConfigError(
                f"the KV pool would hold {blocks} blocks of {config.kv_block_size} tokens, fewer than one full "
                f"context ({self.max_context} tokens) needs: raise gpu_memory_utilization (now "
                f"{config.gpu_memory_utilization}) or lower max_context")
        return blocks

    def _cuda_budget(self, sched: SchedulerConfig) -> int:
        """Bytes left for the KV pool under ``gpu_memory_utilization``."""
        device, config = self.runner.device, self.config
        self.runner.allocate_kv(2)
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        with torch.inference_mode():
            page = np.full((840, 588, 3), 255, dtype=np.uint8)
            grid = self.params.grid(840, 588)
            pages = config.vision_batch_pages
            self.vision.encode(self.preprocessor([page] * pages), [grid] * pages)
        self.prompt_pass(sched.max_prefill_tokens)
        torch.cuda.synchronize(device)
        transient = torch.cuda.max_memory_allocated(device) - base
        self.runner.allocate_kv(0)
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
        budget = int(total * config.gpu_memory_utilization) - (total - free) - transient - CUDA_RESERVE_BYTES
        return max(0, budget - config.vision_cache_bytes)

    @torch.inference_mode()
    def prompt_pass(self, n: int) -> None:
        """One forward pass of an ``n``-token prompt of zeros as a first chunk, its K/V stored in the pool's trash
        block (no sequence's)."""
        runner = self.runner
        device = runner.device
        embeds = torch.zeros(n, runner.given.shape[1], device=device, dtype=runner.dtype)
        runner.forward(StepInputs(
            embeds=embeds, positions=torch.arange(n, device=device).expand(3, -1),
            slot_mapping=torch.full((n,), TRASH_BLOCK * runner.block_size, dtype=torch.long, device=device),
            dense=[DenseChunk(0, n, 0)], logits_index=torch.tensor([n - 1], device=device)))

    def warm_up(self, core: EngineCore, sampler: Sampler, compiled_vision: bool,
                plan_attention: Callable[[], None]) -> None:
        """Compile, plan (``plan_attention``: the engine's, on this thread) and capture on CUDA what the first
        question would otherwise wait for; nothing elsewhere."""
        config, runner = self.config, self.runner
        if runner.device.type != "cuda":
            return
        # A prompt's pass where the memory profile ran none (the pool's size given): the compiled layer pieces trace
        # one variant for a prompt's rows beside those of the decode steps' row counts (``linear.gated_linear``
        # bounds the rows its decode kernels take), else traced at the first question's prefill.
        if config.num_kv_blocks is not None:
            self.prompt_pass(PROMPT_PAD_TOKENS)
        # A page the processor resizes both ways: the preprocessing's Triton kernels compile here, not in a question.
        self.preprocessor([np.full((842, 595, 3), 255, dtype=np.uint8)])
        if compiled_vision:
            for height, width in config.warmup_page_shapes or ((224, 224),):
                page = np.full((height, width, 3), 255, dtype=np.uint8)
                grid = self.params.grid(height, width)
                for n in sorted({1, config.vision_batch_pages}):
                    self.vision.encode(self.preprocessor([page] * n), [grid] * n)
        buckets = graph_buckets(config.max_num_seqs, runner.max_rows if core.row_prefill else config.max_num_seqs)
        runner.warm_attention(buckets, [1, 2, PAGED_CHUNK_TOKENS])
        plan_attention()
        if config.cuda_graphs:
            runner.capture(buckets, sampler)
            if core.row_prefill:  # prompt chunks in graphs: as rows of a step, or a captured pass
                # (Captured at load, while the memory profile's transient, a whole prefill's, is free: the pool grows
                # by ~0.1-0.3 GiB on GLM-4.1V-9B, inside CUDA_RESERVE_BYTES.)
                passes = PassGraphs(runner, pass_graph_tokens(config, self.max_context), config.max_num_seqs)
                passes.capture(runner.graph_pool)
                core.passes = passes
        torch.cuda.synchronize(runner.device)
