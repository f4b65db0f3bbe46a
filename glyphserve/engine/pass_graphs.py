"""Prompt passes over the paged kernel replayed from CUDA graphs, one captured per token bucket.

A step whose prompt chunks all attend through the paged kernel (follow-ups after a cached prefix, a prompt's later
chunks up to ``PAGED_PREFIX_CHUNK_TOKENS``) but hold more tokens than a graph step has rows ran as an eager pass,
launched kernel by kernel: on an H200, 16 follow-ups at once (960 tokens after W50 prefixes) took 72 ms of the
host's time for 35 ms of the device's, and 126 ms each under a server's 64 sessions, whose other threads take the
GIL between launches (profile-h200-s27.md, serve-h200-64sessions-s26.md). Here such a pass is
``ModelRunner.forward`` itself, captured for every ``PASS_BUCKET_TOKENS`` tokens up to the step's token budget:
its inputs are written to static buffers (one host-to-device copy and one copy of the embeddings), padding tokens
write their K/V to the trash block and belong to no sequence (their attention rows come out as zeros), and padding
sequences have no queries. Attention takes its programs from a list of (sequence, query tile) pairs
(``paged_attention_tiles``), so the captured launch is sized by the bucket's tokens whatever the chunks' lengths.
The logits of the sequences' last tokens land in ``ModelRunner.logits``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from glyphserve.engine.attention import query_tiles, tile_tokens
from glyphserve.engine.kv_pool import TRASH_BLOCK
from glyphserve.engine.model_runner import ModelRunner, StepInputs

# Captured passes every this many tokens: a pass pads to the next one (at 1,000 tokens, ~20% more products, while
# its eager launches cost the host more than the device's whole pass).
PASS_BUCKET_TOKENS = 256
# Passes are captured up to this many tokens (or the largest step, ``startup.pass_graph_tokens``): past ~2,000
# tokens the device's share of a pass outgrows the host's eager launches, and each bucket is one more capture.
PASS_GRAPH_TOKENS = 2048


@dataclass
class PassInputs:
    """A pass over paged rows: the embeddings (device) and the host arrays of what the graph reads."""

    embeds: torch.Tensor  # [T, D]
    positions: np.ndarray  # [3, T] M-RoPE positions
    slot_mapping: np.ndarray  # [T] pool slot of each token's K/V
    seq_slots: np.ndarray  # [S] each sequence's slot (its block table)
    seq_lens: np.ndarray  # [S] keys each sequence has after the pass
    query_lens: np.ndarray  # [S] its tokens in the pass (in order)
    logits_index: np.ndarray  # [R] tokens whose next-token logits are wanted


class PassGraphs:
    """Captured passes of up to ``max_tokens`` tokens from up to ``max_seqs`` sequences, for ``runner``."""

    def __init__(self, runner: ModelRunner, max_tokens: int, max_seqs: int):
        self.runner = runner
        self.buckets = sorted({*range(PASS_BUCKET_TOKENS, max_tokens, PASS_BUCKET_TOKENS), max_tokens})
        self.max_tokens, self.max_seqs = max_tokens, max_seqs
        self.tile_tokens = tile_tokens(runner.n_heads, runner.kv_heads)
        t, s = max_tokens, max_seqs
        # One flat int64 buffer, one copy a pass: positions [3, T], slots [T], sequence slots [S], key counts [S],
        # query starts [S + 1], wanted tokens [S], tiles [P]; views at fixed offsets.
        sizes = {"positions": 3 * t, "slots": t, "seq_slots": s, "seq_lens": s, "query_start": s + 1,
                 "logits_index": s, "tiles": self.tiles_for(t)}
        self.offsets, at = {}, 0
        for name, n in sizes.items():
            self.offsets[name] = (at, n)
            at += n
        self.meta = torch.zeros(at, device=runner.device, dtype=torch.long)
        self.embeds = torch.zeros(t, runner.given.shape[1], device=runner.device, dtype=runner.dtype)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def tiles_for(self, tokens: int) -> int:
        """Room in the tile list of a ``tokens`` bucket: a sequence's last tile may be partial, and a tile holds
        at least one token."""
        return min(tokens, tokens // self.tile_tokens + self.max_seqs)

    def bucket(self, tokens: int, seqs: int) -> int | None:
        """The bucket a pass of ``tokens`` tokens from ``seqs`` sequences takes, if any."""
        if seqs > self.max_seqs:
            return None
        return next((b for b in self.buckets if b >= tokens), None)

    def _view(self, name: str) -> torch.Tensor:
        at, n = self.offsets[name]
        return self.meta[at : at + n]

    def _stage(self, inp: PassInputs, bucket: int) -> np.ndarray:
        """The flat host buffer for ``inp`` padded to ``bucket`` tokens and ``max_seqs`` sequences."""
        host = np.zeros(self.meta.shape[0], dtype=np.int64)
        view = lambda name: host[self.offsets[name][0] : sum(self.offsets[name])]  # noqa: E731
        n, s = inp.slot_mapping.shape[0], inp.seq_slots.shape[0]
        view("positions").reshape(3, self.max_tokens)[:, :n] = inp.positions
        slots = view("slots")
        slots[:n] = inp.slot_mapping
        slots[n:] = TRASH_BLOCK * self.runner.block_size
        seq_slots = view("seq_slots")
        seq_slots[:s] = inp.seq_slots
        seq_slots[s:] = self.runner.pad_slot
        view("seq_lens")[:s] = inp.seq_lens
        starts = view("query_start")
        starts[1 : s + 1] = np.cumsum(inp.query_lens)
        starts[s + 1 :] = n
        view("logits_index")[: inp.logits_index.shape[0]] = inp.logits_index
        tiles = view("tiles")
        tiles[:] = -1
        tiles[: self.tiles_for(bucket)] = query_tiles(inp.query_lens, self.tile_tokens, self.tiles_for(bucket))
        return host

    def _body(self, bucket: int) -> None:
        runner = self.runner
        inp = StepInputs(
            embeds=self.embeds[:bucket],
            positions=self._view("positions").view(3, self.max_tokens)[:, :bucket],
            slot_mapping=self._view("slots")[:bucket],
            paged_tokens=bucket,
            block_tables=runner.block_tables[self._view("seq_slots")],
            seq_lens=self._view("seq_lens").to(torch.int32),
            query_start=self._view("query_start").to(torch.int32),
            logits_index=self._view("logits_index"),
            tiles=self._view("tiles")[: self.tiles_for(bucket)].to(torch.int32),
        )
        runner.forward(inp, logits_out=runner.logits[: self.max_seqs])

    @torch.inference_mode()
    def run(self, inp: PassInputs) -> torch.Tensor:
        """Replay the pass of ``inp`` (it must fit a bucket: ``bucket``), or run it eagerly as captured where its
        bucket has no graph (off CUDA: the tests); returns the wanted rows' logits [R, V]."""
        tokens = inp.slot_mapping.shape[0]
        bucket = self.bucket(tokens, inp.seq_slots.shape[0])
        host = torch.from_numpy(self._stage(inp, bucket))
        if self.meta.is_cuda:
            host = host.pin_memory()
        self.meta.copy_(host, non_blocking=True)
        self.embeds[:tokens].copy_(inp.embeds)
        graph = self.graphs.get(bucket)
        if graph is not None:
            graph.replay()
        else:
            self._body(bucket)
        return self.runner.logits[: inp.logits_index.shape[0]]

    @torch.inference_mode()
    def capture(self, pool) -> None:
        """Capture every bucket into the graph memory ``pool`` (the decode steps': they never run at once), after
        two warm-up runs on a side stream (compilation, kernels, cuBLAS workspaces). Staged inputs: all padding."""
        none = np.zeros(0, dtype=np.int64)
        empty = PassInputs(self.embeds[:0], none.reshape(3, 0), none, none, none, none, none)
        self.meta.copy_(torch.from_numpy(self._stage(empty, self.max_tokens)))
        device = self.runner.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                for b in self.buckets:
                    self._body(b)
        torch.cuda.current_stream(device).wait_stream(side)
        for b in reversed(self.buckets):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._body(b)
            self.graphs[b] = graph
        torch.cuda.synchronize(device)
