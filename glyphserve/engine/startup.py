"""An engine's start: how many KV blocks it gets (on CUDA from a memory profile of its largest prefill) and, on
CUDA, what it builds before its first question: compiled kernels, cuDNN plans and captured graphs.

Run once by ``Engine.__init__`` on the engine's parts; kept apart so the engine's file reads as its public face
and its loop."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from glyphserve.engine.kv_pool import TRASH_BLOCK
from glyphserve.engine.model_runner import PAGED_CHUNK_TOKENS, PROMPT_PAD_TOKENS, DenseChunk, ModelRunner, StepInputs
from glyphserve.engine.pass_graphs import PASS_GRAPH_TOKENS, PassGraphs
from glyphserve.errors import ConfigError

if TYPE_CHECKING:
    from glyphserve.engine.engine import Engine
    from glyphserve.engine.scheduler import SchedulerConfig

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


def pool_blocks(engine: Engine, sched: SchedulerConfig) -> int:
    """Blocks in the KV pool: as configured, else what the memory budget leaves after the weights, the activations
    of the largest prefill (measured with a real forward pass) and the vision cache."""
    config = engine.config
    per_block = ModelRunner.bytes_per_block(engine.model.config, config.kv_block_size, engine.dtype)
    if config.num_kv_blocks is not None:
        blocks = config.num_kv_blocks
    elif engine.device.type != "cuda":
        blocks = config.cpu_kv_cache_bytes // per_block
    else:
        blocks = _cuda_budget(engine, sched) // per_block
    need = -(-(engine.max_context + 1) // config.kv_block_size) + 1
    if blocks < need:
        raise ConfigError(
            f"the KV pool would hold {blocks} blocks of {config.kv_block_size} tokens, fewer than one full context "
            f"({engine.max_context} tokens) needs: raise gpu_memory_utilization (now "
            f"{config.gpu_memory_utilization}) or lower max_context")
    return blocks


def _cuda_budget(engine: Engine, sched: SchedulerConfig) -> int:
    """Bytes left for the KV pool under ``gpu_memory_utilization``."""
    device, config = engine.device, engine.config
    engine.runner.allocate_kv(2)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    with torch.inference_mode():
        page = np.full((840, 588, 3), 255, dtype=np.uint8)
        grid = engine.params.grid(840, 588)
        pages = config.vision_batch_pages
        engine.vision.encode(engine.preprocessor([page] * pages), [grid] * pages)
    prompt_pass(engine, sched.max_prefill_tokens)
    torch.cuda.synchronize(device)
    transient = torch.cuda.max_memory_allocated(device) - base
    engine.runner.allocate_kv(0)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    budget = int(total * config.gpu_memory_utilization) - (total - free) - transient - CUDA_RESERVE_BYTES
    return max(0, budget - config.vision_cache_bytes)


@torch.inference_mode()
def prompt_pass(engine: Engine, n: int) -> None:
    """One forward pass of an ``n``-token prompt of zeros as a first chunk, its K/V stored in the pool's trash block
    (no sequence's)."""
    device = engine.device
    embeds = torch.zeros(n, engine.model.config.text_config.hidden_size, device=device, dtype=engine.dtype)
    engine.runner.forward(StepInputs(
        embeds=embeds, positions=torch.arange(n, device=device).expand(3, -1),
        slot_mapping=torch.full((n,), TRASH_BLOCK * engine.config.kv_block_size, dtype=torch.long, device=device),
        dense=[DenseChunk(0, n, 0)], logits_index=torch.tensor([n - 1], device=device)))


def warm_up(engine: Engine) -> None:
    """Compile, plan and capture on CUDA what the first question would otherwise wait for; nothing elsewhere."""
    if engine.device.type != "cuda":
        return
    config, runner = engine.config, engine.runner
    # A prompt's pass where the memory profile ran none (the pool's size given): the compiled layer pieces trace one
    # variant for a prompt's rows beside those of the decode steps' row counts (``linear.gated_linear`` bounds the
    # rows its decode kernels take), else traced at the first question's prefill.
    if config.num_kv_blocks is not None:
        prompt_pass(engine, PROMPT_PAD_TOKENS)
    # A page the processor resizes both ways: the preprocessing's Triton kernels compile here, not in a question.
    engine.preprocessor([np.full((842, 595, 3), 255, dtype=np.uint8)])
    if engine.compiled_vision:
        for height, width in config.warmup_page_shapes or ((224, 224),):
            page = np.full((height, width, 3), 255, dtype=np.uint8)
            grid = engine.params.grid(height, width)
            for n in sorted({1, config.vision_batch_pages}):
                engine.vision.encode(engine.preprocessor([page] * n), [grid] * n)
    core = engine.core
    buckets = graph_buckets(config.max_num_seqs, runner.max_rows if core.row_prefill else config.max_num_seqs)
    runner.warm_attention(buckets, [1, 2, PAGED_CHUNK_TOKENS])
    engine.plan_attention()
    if config.cuda_graphs:
        runner.capture(buckets, engine.sampler)
        if core.row_prefill:  # prompt chunks in graphs: as rows of a step, or a captured pass
            # (Captured at load, while the memory profile's transient, a whole prefill's, is free: the pool grows by
            # ~0.1-0.3 GiB on GLM-4.1V-9B, inside CUDA_RESERVE_BYTES.)
            passes = PassGraphs(runner, min(PASS_GRAPH_TOKENS, config.max_num_batched_tokens), config.max_num_seqs)
            passes.capture(runner.graph_pool)
            core.passes = passes
    torch.cuda.synchronize(engine.device)
