"""The language model's forward passes over the paged KV pool, with the decode step captured as CUDA graphs.

The layers run over the HF model's weights with the same arithmetic as its modules (the rotary embedding, token
embedding and head are the HF modules; q/k/v are fused into one projection whose slices the HF modules keep as
views; a layer's input norm, and after the last layer the final norm, is computed with the layer before it), but
for the rotation of q/k: with the store of K/V in the pool it is one op, ``rotary.rotate_and_store``, which on
CUDA rounds once from fp32 where HF rounds each product. A step is a flat batch of tokens from several sequences:
decoding sequences (one token each) and prompt chunks. Every token's K/V goes to its slot in the pool; attention
then reads each sequence's blocks through its block table (``paged_attention``), except long prompt chunks
(``attends_paged``), which run PyTorch's SDPA (a prompt's first chunk over its own K/V with plain causal attention,
cuDNN's fastest path on Hopper; a later chunk over its earlier blocks gathered, with the lower-right causal bias).

A step of single-token rows is replayed from a CUDA graph captured per row-count bucket (1, 2, 4, ..., up to
``max_rows``): its inputs are written to static buffers first (one host-to-device copy), padding rows write
their K/V to the pool's trash block. Each slot's last sampled token stays on the device (``last_token``), so the
next step is built without reading tokens back: decode runs a step ahead of the host. A short prompt chunk (a
follow-up question after a cached prefix, with the vision tokens of the prefix's last, partial block) rides in the
same graphs, one row per token, a vision token's row taking its features from a staged buffer: every row writes
its K/V before any row attends, so a row that sees keys up to its own position is exactly causal attention
(a follow-up's first token took 70-110 ms on an H200 through the eager pass; a graph step costs a decode step
plus the rows' attention over the prefix).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from glyphserve.engine.attention import (compile_split_variants, paged_attention, paged_attention_rows,
                                         paged_attention_tiles, shared_row_tiles)
from glyphserve.engine.fp8 import Fp8Linear, Int8Embedding, quantize_fp8
from glyphserve.engine.kv_pool import TRASH_BLOCK
from glyphserve.engine.linear import gated_linear, linear
from glyphserve.engine.norms import add_rms_norms, rms_norm
from glyphserve.engine.rotary import rotate_and_store
from glyphserve.engine.sampler import Sampler
from glyphserve.engine.transfer import copy_rows
from glyphserve.errors import ModelLoadError

# Prompt chunks up to PAGED_CHUNK_TOKENS attend through the paged kernel, and so do chunks up to
# PAGED_PREFIX_CHUNK_TOKENS that follow earlier tokens in the pool (a later turn after its cached prefix: the
# question with the earlier answers; or a prompt's later chunk); longer ones through SDPA. The paged kernel takes
# all of a step's sequences in one launch a layer and reads the prefix in place; SDPA runs per chunk over the
# prefix gathered. On an H200 under 64 sessions,
# eager passes of ~16 such chunks each (100-260 tokens after a W50 prefix) launched SDPA layer by layer and chunk
# by chunk, and took 31% of the engine thread's time. For 128 queries after 4,096 keys the paged kernel costs
# what SDPA does (55 vs 54 us a layer, attention-h200.md); for thousands of queries flash attention wins.
PAGED_CHUNK_TOKENS = 64
PAGED_PREFIX_CHUNK_TOKENS = 512
# A prompt's first chunk (plain causal attention: cuDNN's kernel on Hopper, the fastest there, 2.96 ms a layer for
# W200's 15,215 tokens against flash's 5.6) goes to SDPA padded at its end to a multiple of PROMPT_PAD_TOKENS (the
# padding keys come after every real query, so causality hides them), and a plan for each padded length is built
# before a question comes (``warm_prompt_attention``, on each thread that steps the engine): cuDNN builds a plan
# for each new shape, and on an H200 that cost 45 ms the first time a length was seen, i.e. most cold questions
# (a W50 question of a new length: first token 0.196 s against 0.155 for a length seen before,
# shape-probe-h200.json).
PROMPT_PAD_TOKENS = 512
# A chunk's last row alone (the last layer's wanted row) attends without cuDNN, which would plan for each length.
NO_PLAN_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# Staged per-row inputs of a graph step: sequence slot (block table; last sampled token), the three M-RoPE
# positions, KV slot, KV length, input token (LAST_SAMPLED: the slot's last sampled token; GIVEN_EMBEDDING: a vision
# token whose features are staged in ``given``), output slot (where the sampled token is kept for the next step:
# the row's slot, or the padding slot for a prompt token whose next token is already known), then the keys the
# row's tile shares and the rows of the tile starting at the row (``attention.shared_tiles``).
META_ROWS = 10
# Graph steps of at least this many rows read the keys that consecutive rows share once for a tile of them
# (``paged_attention_rows``): on an H200, 64 decode rows over 16 W50 documents spent 2.2 ms a step in attention,
# reading each row's document prefix on its own (256 MB a layer). Fewer rows rarely share, and the shared-keys
# launch would cost them a launch a layer.
SHARED_KEYS_ROWS = 8
LAST_SAMPLED = -1
GIVEN_EMBEDDING = -2


def attends_paged(start: int, n: int) -> bool:
    """Whether a prompt chunk of ``n`` tokens at KV position ``start`` attends through the paged kernel."""
    return n <= PAGED_CHUNK_TOKENS or (start > 0 and n <= PAGED_PREFIX_CHUNK_TOKENS)


def fuse_qkv(attn) -> tuple[torch.Tensor, torch.Tensor]:
    """One [q; k; v] weight and bias for a layer; the HF projections become views into it (no extra memory)."""
    if not hasattr(attn, "glyph_qkv"):
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        weight = torch.cat([p.weight.data for p in projections])
        bias = torch.cat([p.bias.data for p in projections])
        start = 0
        for p in projections:
            rows = p.weight.shape[0]
            p.weight.data = weight[start : start + rows]
            p.bias.data = bias[start : start + rows]
            start += rows
        attn.glyph_qkv = (weight, bias)
    return attn.glyph_qkv


def _post_attention(x, attn_out, o_w, o_s, post_attn_w, pre_mlp_w, gate_up_w, gate_up_s, down_w, down_s,
                    post_mlp_w, next_norm_w, eps: float):
    """Output projection, the layer's three other norms, the gated MLP and both residuals; returns the residual
    stream and it normalised for what reads it next (the next layer's input norm, or after the last layer the
    model's final norm), so that norm is fused with this layer's last elementwise work instead of taking a launch
    of its own. Each residual add sits between two norms: one ``add_rms_norms`` (a launch for 16-bit rows on CUDA)."""
    x, h = add_rms_norms(linear(attn_out, o_w, o_s), x, post_attn_w, pre_mlp_w, eps)
    mlp_in = gated_linear(h, gate_up_w, gate_up_s)
    return add_rms_norms(linear(mlp_in, down_w, down_s), x, post_mlp_w, next_norm_w, eps)


@dataclass
class DenseChunk:
    """A long prompt chunk: tokens [offset, offset + n) of the step, at KV positions [start, start + n)."""

    offset: int
    n: int
    start: int
    blocks: torch.Tensor | None = None  # device ids of the blocks holding positions < start + n (start > 0)
    samples: bool = True  # its last token's next-token logits are wanted (in ``logits_index``)


@dataclass
class StepInputs:
    """A flat batch of tokens: those attending through the paged kernel first, then the dense chunks."""

    embeds: torch.Tensor  # [T, D]
    positions: torch.Tensor  # [3, T]
    slot_mapping: torch.Tensor  # [T] pool slot (block * block_size + offset) of each token's K/V
    paged_tokens: int = 0
    block_tables: torch.Tensor | None = None  # [S, max_blocks] int32 of the paged sequences
    seq_lens: torch.Tensor | None = None  # [S] int32
    query_start: torch.Tensor | None = None  # [S + 1] int32
    max_query_len: int = 1
    dense: list[DenseChunk] = field(default_factory=list)
    logits_index: torch.Tensor | None = None  # [R] tokens whose next-token logits are wanted
    # the paged kernel's programs as a list of (sequence, query tile) pairs (``attention.paged_attention_tiles``:
    # a captured pass, ``pass_graphs``); None: a launch sized by the sequences and ``max_query_len``
    tiles: torch.Tensor | None = None


class ModelRunner:
    """The language model over a pool of ``num_blocks`` KV blocks of ``block_size`` tokens."""

    def __init__(self, model, *, block_size: int, max_num_seqs: int, max_blocks: int, device: torch.device,
                 dtype: torch.dtype, compile: bool = False, quantize: str | None = None):
        tc = model.config.text_config
        if tc.hidden_act != "silu":
            raise ModelLoadError(f"unsupported activation {tc.hidden_act!r} in the text config (GLM-4.1V uses silu)")
        lm = model.model.language_model
        self.layers = list(lm.layers)
        self.embed = lm.embed_tokens
        # Each layer's input norm runs at the end of the layer before it, the final norm at the end of the last.
        self.first_norm = self.layers[0].input_layernorm.weight
        next_norms = [layer.input_layernorm.weight for layer in self.layers[1:]] + [lm.norm.weight]
        self.rotary = lm.rotary_emb
        self.device, self.dtype = device, dtype
        self.n_heads = tc.num_attention_heads
        self.kv_heads = tc.num_key_value_heads
        self.head_dim = tc.hidden_size // tc.num_attention_heads
        self.vocab = tc.vocab_size
        self.eps = tc.rms_norm_eps
        self.scaling = self.layers[0].self_attn.scaling
        self.prompt_pad = PROMPT_PAD_TOKENS if device.type == "cuda" else 1  # cuDNN's plans are per shape
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        # Rows of a graph step: every running sequence, or a short prompt chunk (one row per token) with room.
        self.max_rows = max(max_num_seqs, PAGED_CHUNK_TOKENS)
        self.pad_slot = max_num_seqs  # the extra slot padding rows of a graph batch use
        self.tile_rows = shared_row_tiles(self.n_heads, self.kv_heads)  # rows a shared-keys tile holds
        self.num_blocks = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.quantized = quantize == "fp8"
        self.layer_weights = [self._layer_weights(layer, nxt) for layer, nxt in zip(self.layers, next_norms)]
        if self.quantized:  # the 16-bit head and embedding table may still be on the host (``loading.load``)
            lm.embed_tokens = Int8Embedding.from_embedding(lm.embed_tokens, device)  # (tied to the head: a copy)
            model.lm_head = Fp8Linear.from_linear(model.lm_head, device)
            self.embed = lm.embed_tokens
        head = model.lm_head  # (weight, its scale or None, bias)
        self.head = ((head.qweight, head.scale, head.bias) if self.quantized else (head.weight, None, head.bias))
        ikw = dict(device=device, dtype=torch.long)
        # Per-slot state on the device: each sequence's block table and last sampled token.
        self.block_tables = torch.full((max_num_seqs + 1, max_blocks), TRASH_BLOCK, device=device, dtype=torch.int32)
        self.last_token = torch.zeros(max_num_seqs + 1, **ikw)
        # Static inputs and outputs of the captured decode steps.
        self.meta = torch.zeros(META_ROWS, self.max_rows, **ikw)
        self.query_start = torch.arange(self.max_rows + 1, device=device, dtype=torch.int32)
        self.logits = torch.zeros(self.max_rows, self.vocab, device=device, dtype=torch.float32)
        self.next = torch.zeros(self.max_rows, **ikw)
        self.given = torch.zeros(self.max_rows, tc.hidden_size, device=device, dtype=dtype)
        # On CUDA the per-layer pieces around attention are compiled (their elementwise work fused), for the decode
        # graphs and the eager passes alike (an eager pass launches layer by layer: fewer kernels, less host time);
        # the weights are arguments, so all layers share one compiled graph, and the token count is dynamic.
        wrap = (lambda f: torch.compile(f, dynamic=True)) if compile else (lambda f: f)
        self._norm = wrap(rms_norm)  # the first layer's input norm (each later one ends the layer before it)
        self._post = wrap(_post_attention)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.buckets: list[int] = []
        self.graph_pool = None  # the captured graphs' memory pool (``capture``), which ``pass_graphs`` shares

    def _layer_weights(self, layer, next_norm: torch.Tensor) -> tuple:
        """(qkv weight, its scale, qkv bias, o weight, its scale, post-attention norm, pre-MLP norm, gate_up
        weight, its scale, down weight, its scale, post-MLP norm, ``next_norm``: the norm after the layer); scales
        are None unless quantized. FP8: the fused qkv is quantized as one (per-output-channel scales concatenate),
        and the 16-bit originals are released, so only the e4m3 copies stay in memory (the HF modules of the decoder
        layers are not run again)."""
        qkv_w, qkv_b = fuse_qkv(layer.self_attn)
        projections = [qkv_w, layer.self_attn.o_proj.weight, layer.mlp.gate_up_proj.weight,
                       layer.mlp.down_proj.weight]
        scales: list[torch.Tensor | None] = [None] * 4
        if self.quantized:  # on the device, one projection at a time (the 16-bit ones may be on the host)
            pairs = [quantize_fp8(w, self.device) for w in projections]
            projections, scales = [q for q, _ in pairs], [s for _, s in pairs]
            for module in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                           layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
                module.weight.data = torch.empty(0, device=self.device, dtype=self.dtype)
            layer.self_attn.glyph_qkv = (None, qkv_b)
        qkv_w, o_w, gate_up_w, down_w = projections
        qkv_s, o_s, gate_up_s, down_s = scales
        return (qkv_w, qkv_s, qkv_b, o_w, o_s, layer.post_self_attn_layernorm.weight,
                layer.post_attention_layernorm.weight, gate_up_w, gate_up_s, down_w, down_s,
                layer.post_mlp_layernorm.weight, next_norm)

    def allocate_kv(self, num_blocks: int) -> None:
        """(Re)allocate the pool's tensors: per layer, K and V of [num_blocks, block_size, kv_heads, head_dim].
        Left uninitialised (no position is read before it is written; on CPU the memory is committed as used)."""
        self.k, self.v = [], []
        shape = (num_blocks, self.block_size, self.kv_heads, self.head_dim)
        self.k = [torch.empty(shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        self.v = [torch.empty(shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        self.num_blocks = num_blocks

    @staticmethod
    def bytes_per_block(model_config, block_size: int, dtype: torch.dtype) -> int:
        tc = model_config.text_config
        head_dim = tc.hidden_size // tc.num_attention_heads
        return 2 * tc.num_hidden_layers * block_size * tc.num_key_value_heads * head_dim * dtype.itemsize

    # --- per-slot state --------------------------------------------------------------------------------------

    def sync_block_tables(self, host: np.ndarray, slots: list[int]) -> None:
        """Copy the host block-table rows of ``slots`` (changed since the last step) to the device."""
        if slots:
            copy_rows(self.block_tables, slots, host[slots])

    # --- an eager step -----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, inp: StepInputs, logits_out: torch.Tensor | None = None) -> torch.Tensor:
        """Write every token's K/V, attend, and return the wanted rows' next-token logits [R, V] (float32; into
        ``logits_out``, a captured pass's static rows, without a float32 copy between).

        A step with long chunks runs its last layer past the K/V store only for the wanted rows: nothing reads
        the other rows' output (W200's 15,215-token prompt: 1/40 of its prefill's products and attention). Its
        paged rows (decode rows, short chunks) still all attend there, a few dozen at most."""
        x = inp.embeds
        cos, sin = self.rotary(x.unsqueeze(0), inp.positions.unsqueeze(1))
        cos, sin = cos[0], sin[0]
        h = self._norm(x, self.first_norm, self.eps)
        padded = self._padded_prompt(inp)
        last = len(self.layer_weights) - 1
        for li, (qkv_w, qkv_s, qkv_b, *post) in enumerate(self.layer_weights):
            q, k, v = self._qkv(li, h, qkv_w, qkv_s, qkv_b, cos, sin, inp.slot_mapping, padded)
            if li == last and inp.dense:
                x = x[inp.logits_index]
                if not x.shape[0]:  # a prompt chunk that samples nothing: its K/V was all it needed
                    return torch.empty(0, self.vocab, device=x.device, dtype=torch.float32)
                x, h = self._post(x, self._attend_wanted(li, inp, q, k, v).reshape(x.shape[0], -1), *post, self.eps)
                return linear(h, *self.head).float()
            out = self._attend(li, inp, q, k, v, padded)
            x, h = self._post(x, out.reshape(x.shape[0], -1), *post, self.eps)
        logits = linear(h[inp.logits_index], *self.head)
        return logits.float() if logits_out is None else logits_out.copy_(logits)

    def _padded_prompt(self, inp: StepInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """For a step that is one prompt's first chunk, where prompts are padded (CUDA): its queries', keys' and
        values' tensors [n padded to ``prompt_pad``, heads, d], their padding rows zero, which every layer's
        rotation writes into (``rotate_and_store``'s ``out``) and SDPA reads as they are. Padding each layer's q,
        k and v with ``F.pad`` filled and copied all three: 117 fills and as many copies of a W200 prompt's first
        token on an H200 (profile-h200-s15.md)."""
        if (self.prompt_pad == 1 or inp.paged_tokens or len(inp.dense) != 1 or inp.dense[0].start
                or inp.dense[0].n != inp.embeds.shape[0]):
            return None
        n = inp.dense[0].n
        rows = -(-n // self.prompt_pad) * self.prompt_pad
        out = tuple(torch.empty(rows, heads, self.head_dim, device=self.device, dtype=self.dtype)
                    for heads in (self.n_heads, self.kv_heads, self.kv_heads))
        for t in out:
            t[n:].zero_()  # finite: a padding key's value times a zero weight must stay zero
        return out

    def _qkv(self, layer: int, h, qkv_w, qkv_s, qkv_b, cos, sin, slots, out=None):
        """Rotated queries and keys (values as they are) of the normalised ``h``; the keys and values stored at
        ``slots`` in the pool (with ``out``, q, k and v written into its tensors: ``_padded_prompt``)."""
        return rotate_and_store(linear(h, qkv_w, qkv_s, qkv_b), cos, sin, self.k[layer], self.v[layer], slots,
                                self.n_heads, self.kv_heads, self.head_dim, out)

    def _attend(self, layer: int, inp: StepInputs, q, k, v, padded=None) -> torch.Tensor:
        p = inp.paged_tokens
        if not p and len(inp.dense) == 1 and inp.dense[0].n == q.shape[0]:  # one prompt's chunk: its output as is
            return self._attend_dense(layer, inp.dense[0], q, k, v, padded=padded)
        out = torch.empty_like(q)
        if p:
            self._attend_paged(layer, inp, q, out[:p])
        for c in inp.dense:
            out[c.offset : c.offset + c.n] = self._attend_dense(layer, c, q, k, v)
        return out

    def _attend_paged(self, layer: int, inp: StepInputs, q, out: torch.Tensor) -> torch.Tensor:
        """The paged kernel over the step's first ``inp.paged_tokens`` rows, into ``out``."""
        if inp.tiles is not None:
            return paged_attention_tiles(q[: inp.paged_tokens], self.k[layer], self.v[layer], inp.block_tables,
                                         inp.seq_lens, inp.query_start, inp.tiles, self.scaling, out=out)
        return paged_attention(q[: inp.paged_tokens], self.k[layer], self.v[layer], inp.block_tables, inp.seq_lens,
                               inp.query_start, self.scaling, inp.max_query_len, out=out)

    def _attend_wanted(self, layer: int, inp: StepInputs, q, k, v) -> torch.Tensor:
        """The attention output of the rows in ``logits_index`` only, in its order: the paged rows' (all computed,
        the wanted ones taken), then each sampling dense chunk's last row, which sees every key before it."""
        parts = []
        dense_rows = sum(c.samples for c in inp.dense)
        if inp.paged_tokens:
            out = self._attend_paged(layer, inp, q, torch.empty_like(q[: inp.paged_tokens]))
            parts.append(out[inp.logits_index[: inp.logits_index.shape[0] - dense_rows]])
        for c in inp.dense:
            if c.samples:
                parts.append(self._attend_dense(layer, c, q, k, v, last_row=True))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _attend_dense(self, layer: int, c: DenseChunk, q, k, v, last_row: bool = False,
                      padded=None) -> torch.Tensor:
        """SDPA over a long chunk: [n, heads, head_dim] (with ``last_row``, its last row's only: [1, heads,
        head_dim], which sees every key, so no mask). The K/V heads are shared by query-head groups inside the
        kernel (``enable_gqa``), not repeated per query head first: the repeats were two strided copies of 16x the
        chunk's K/V a layer (with the output's copy, 155 copy launches and 22.6 ms of a W200 question's first token
        on an H200, profile-h200-s12-row-kernel.md). A prompt's first chunk is padded to a multiple of
        ``prompt_pad`` (CUDA: ``PROMPT_PAD_TOKENS``, see there): ``padded`` holds its q, k and v so."""
        if c.start == 0:
            keys, values = k[c.offset : c.offset + c.n], v[c.offset : c.offset + c.n]
        else:
            pooled = (self.k[layer][c.blocks], self.v[layer][c.blocks])
            keys, values = (t.view(-1, self.kv_heads, self.head_dim)[: c.start + c.n] for t in pooled)
        if last_row:
            with sdpa_kernel(NO_PLAN_BACKENDS):
                return self._sdpa(q[c.offset + c.n - 1 : c.offset + c.n], keys, values, causal=False)
        queries = q[c.offset : c.offset + c.n]
        if c.start:
            return self._sdpa(queries, keys, values, mask=causal_lower_right(c.n, c.start + c.n))
        # Padded, or made contiguous: cuDNN's plans are per strides too (the values are a strided view of the
        # fused projection's output), and the plans built at load are for contiguous inputs.
        pad = -c.n % self.prompt_pad
        if padded is not None:
            queries, keys, values = padded
        else:
            queries, keys, values = (F.pad(t, (0, 0, 0, 0, 0, pad)) if pad else t.contiguous()
                                     for t in (queries, keys, values))
        return self._sdpa(queries, keys, values, causal=True)[: c.n]

    def _sdpa(self, q, k, v, causal: bool = False, mask=None) -> torch.Tensor:
        """SDPA of token-major [n, heads, head_dim] queries, keys and values (keys and values: K/V heads)."""
        res = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), attn_mask=mask,
                                             is_causal=causal, scale=self.scaling,
                                             enable_gqa=self.n_heads != self.kv_heads)
        return res[0].transpose(0, 1)

    @torch.inference_mode()
    def warm_prompt_attention(self, max_tokens: int) -> None:
        """Build cuDNN's plan for each padded length of a prompt's first chunk up to ``max_tokens``, so that no
        question pays for one (32 lengths for 16,384 tokens), on the calling thread (PyTorch keeps the plans per
        thread: ``Engine.plan_attention``); nothing where prompts are not padded (CPU)."""
        if self.prompt_pad == 1:
            return
        top = -(-max_tokens // self.prompt_pad) * self.prompt_pad
        q = torch.zeros(top, self.n_heads, self.head_dim, device=self.device, dtype=self.dtype)
        kv = torch.zeros(top, self.kv_heads, self.head_dim, device=self.device, dtype=self.dtype)
        for n in range(self.prompt_pad, top + 1, self.prompt_pad):
            self._sdpa(q[:n], kv[:n], kv[:n], causal=True)

    # --- captured decode steps ---------------------------------------------------------------------------------

    def bucket(self, rows: int) -> int | None:
        return next((b for b in self.buckets if b >= rows), None)

    def shares_keys(self, rows: int) -> bool:
        """Whether a step of ``rows`` rows reads shared keys once a tile (its staged share and tiles matter): on
        CUDA, from ``SHARED_KEYS_ROWS`` rows (elsewhere attention reads every row's keys as it is)."""
        return self.device.type == "cuda" and (self.bucket(rows) or rows) >= SHARED_KEYS_ROWS

    def pad_rows(self, n: int) -> torch.Tensor:
        """[META_ROWS, n] inputs of padding rows: the padding slot, the trash block, one key."""
        pad = torch.tensor([self.pad_slot, 0, 0, 0, TRASH_BLOCK * self.block_size, 1, LAST_SAMPLED, self.pad_slot,
                            0, 1], dtype=torch.long)
        return pad.view(-1, 1).expand(-1, n)

    def _decode_body(self, b: int, sampler: Sampler) -> None:
        slots = self.meta[0, :b]
        token = self.meta[6, :b]
        x = self.embed(torch.where(token >= 0, token, self.last_token[slots]))
        x = torch.where((token == GIVEN_EMBEDDING).unsqueeze(1), self.given[:b], x)
        cos, sin = self.rotary(x.unsqueeze(0), self.meta[1:4, :b].unsqueeze(1))
        cos, sin = cos[0], sin[0]
        block_tables = self.block_tables[slots]
        seq_lens = self.meta[5, :b].to(torch.int32)
        kv_slots = self.meta[4, :b]
        share, tiles = self.meta[8, :b].to(torch.int32), self.meta[9, :b].to(torch.int32)
        h = self._norm(x, self.first_norm, self.eps)
        for li, (qkv_w, qkv_s, qkv_b, *post) in enumerate(self.layer_weights):
            q, _, _ = self._qkv(li, h, qkv_w, qkv_s, qkv_b, cos, sin, kv_slots)
            out = torch.empty_like(q)
            if self.shares_keys(b):
                paged_attention_rows(q, self.k[li], self.v[li], block_tables, seq_lens, self.query_start[: b + 1],
                                     share, tiles, self.scaling, out=out)
            else:
                paged_attention(q, self.k[li], self.v[li], block_tables, seq_lens, self.query_start[: b + 1],
                                self.scaling, 1, out=out)
            x, h = self._post(x, out.reshape(b, -1), *post, self.eps)
        logits = linear(h, *self.head).float()
        self.logits[:b].copy_(logits)
        nxt = sampler.greedy(logits, slots)
        self.next[:b].copy_(nxt)
        self.last_token.index_copy_(0, self.meta[7, :b], nxt)  # duplicates only at the padding slot

    @torch.inference_mode()
    def decode(self, meta: torch.Tensor, rows: int, sampler: Sampler,
               given: list[tuple[int, torch.Tensor]] = ()) -> bool:
        """One step of ``rows`` single-token rows (at most ``max_rows``) whose staged inputs are ``meta``
        [META_ROWS, rows] (host), with the embeddings of its vision-token rows in ``given`` (first row, features
        [n, D] on the device); the greedy tokens land in ``next`` and at the output slots of ``last_token``, the
        logits in ``logits``. Returns whether a captured graph ran it (else it ran eagerly)."""
        b = self.bucket(rows) or rows
        if b > rows:
            meta = torch.cat([meta, self.pad_rows(b - rows)], dim=1)
        if self.device.type == "cuda":
            meta = meta.pin_memory()
        self.meta[:, :b].copy_(meta, non_blocking=True)
        for row, features in given:
            self.given[row : row + features.shape[0]].copy_(features)
        graph = self.graphs.get(b)
        if graph is not None:
            graph.replay()
        else:
            self._decode_body(b, sampler)
        return graph is not None

    @torch.inference_mode()
    def warm_attention(self, seq_counts: list[int], query_lens: list[int]) -> None:
        """Run the attention op once per launch shape a step can have, so Triton compiles its kernel variants at
        load rather than on a user's request (the first short prefill took 1.6 s on an H200 before this)."""
        for s in seq_counts:
            for n in query_lens:
                q = torch.zeros(s * n, self.n_heads, self.head_dim, device=self.device, dtype=self.dtype)
                tables = self.block_tables[torch.full((s,), self.pad_slot, device=self.device)]
                lens = torch.full((s,), n, device=self.device, dtype=torch.int32)
                starts = torch.arange(0, s * n + 1, n, device=self.device, dtype=torch.int32)
                paged_attention(q, self.k[0], self.v[0], tables, lens, starts, self.scaling, n)
                if s == n == 1:  # every split count (the only compile-time size that varies between launches)
                    compile_split_variants(q, self.k[0], self.v[0], tables, lens, starts, self.scaling, n)
                if n == 1 and self.shares_keys(s):  # the graph steps' shared-keys launches (none shared here)
                    ones = torch.ones(s, device=self.device, dtype=torch.int32)
                    paged_attention_rows(q, self.k[0], self.v[0], tables, lens, starts, ones - 1, ones,
                                         self.scaling, out=torch.empty_like(q))

    @torch.inference_mode()
    def capture(self, buckets: list[int], sampler: Sampler) -> None:
        """Capture the graph step for each row-count bucket (CUDA)."""
        self.buckets = sorted(b for b in set(buckets) if b <= self.max_rows)
        self.meta.copy_(self.pad_rows(self.max_rows))
        pool = self.graph_pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: compilation, kernels, cuBLAS workspaces
                for b in self.buckets:
                    self._decode_body(b, sampler)
        torch.cuda.current_stream(self.device).wait_stream(side)
        for b in reversed(self.buckets):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._decode_body(b, sampler)
            self.graphs[b] = graph
        torch.cuda.synchronize(self.device)
