"""The model's forward passes over Hugging Face's GLM-4.1V modules, with a static KV cache.

The language model runs over the HF model's weights with the same arithmetic as its modules (the rotary
embedding, token embedding, final norm and head are the HF modules; q/k/v are fused into one projection whose
slices the HF modules keep as views): prefill writes a row of a static KV cache, decode advances several rows at
once with per-row cache positions, and on CUDA the pieces around attention are compiled and the whole one-token
step is captured as CUDA graphs (one per batch size and attention span), so a decode step is a single replay.

The vision tower runs batched over pages of one shape (one attention call for all pages) with per-shape
constants precomputed, so it can be compiled for the fixed page shapes of a preset.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from transformers.models.glm4v.modeling_glm4v import apply_rotary_pos_emb, apply_rotary_pos_emb_vision, repeat_kv
from transformers.vision_utils import get_vision_position_ids

from glyphserve.errors import ModelLoadError

# Longest prompt prefilled in one pass. A prompt that fits runs plain causal attention (cuDNN's kernel on H100/H200);
# the chunks after the first need the lower-right causal bias, which SDPA sends to a slower flash kernel (W200 on an
# H200: 4.5 ms per layer for 7k queries, against 2.4 ms for the whole 15k prompt in one pass).
PREFILL_CHUNK = 16384


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Glm4vRMSNorm's arithmetic: statistics in float32, scale applied in the input dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


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


def _pre_attention(x, norm_w, qkv_w, qkv_b, cos, sin, eps: float, n_heads: int, kv_heads: int, head_dim: int):
    """Input norm, fused QKV projection and rotary embedding: x [b,s,D] to q [b,H,s,d], k and v [b,KV,s,d]."""
    b, s = x.shape[:2]
    qkv = F.linear(rms_norm(x, norm_w, eps), qkv_w, qkv_b)
    q, k, v = qkv.split([n_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = q.view(b, s, n_heads, head_dim).transpose(1, 2)
    k = k.view(b, s, kv_heads, head_dim).transpose(1, 2)
    v = v.view(b, s, kv_heads, head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, v


def _post_attention(x, attn_out, o_w, post_attn_w, pre_mlp_w, gate_up_w, down_w, post_mlp_w, eps: float):
    """Output projection, the layer's three other norms, the gated MLP and both residuals."""
    x = x + rms_norm(F.linear(attn_out, o_w), post_attn_w, eps)
    gate, up = F.linear(rms_norm(x, pre_mlp_w, eps), gate_up_w).chunk(2, dim=-1)
    return x + rms_norm(F.linear(up * F.silu(gate), down_w), post_mlp_w, eps)


class VisionRunner:
    """Pages (patches) to merged vision features, equal to ``get_image_features`` of the HF model."""

    def __init__(self, model, batch_pages: int, compile: bool):
        self.visual = model.model.visual
        self.batch_pages = max(1, batch_pages)
        self.merge = self.visual.spatial_merge_size
        self._constants: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._forward = torch.compile(self._pages_forward, dynamic=False) if compile else self._pages_forward

    def tokens_per_page(self, grid: tuple[int, int, int]) -> int:
        return grid[0] * grid[1] * grid[2] // self.merge**2

    def _shape_constants(self, gh: int, gw: int):
        """Position embedding (interpolated) and rotary cos/sin of one page: they depend only on the grid."""
        key = (gh, gw)
        if key not in self._constants:
            visual = self.visual
            weight = visual.embeddings.position_embedding.weight
            grid = torch.tensor([[1, gh, gw]], device=weight.device)
            pos = get_vision_position_ids(grid, self.merge)
            zeros = torch.zeros(gh * gw, visual.config.hidden_size, device=weight.device, dtype=weight.dtype)
            seqlens = torch.tensor([gh * gw], device=weight.device)
            pos_embed = visual.embeddings(zeros, seqlens, grid, pos[:, 0], pos[:, 1])
            cos, sin = visual.rotary_pos_emb(zeros, pos)
            self._constants[key] = (pos_embed, cos, sin)
        return self._constants[key]

    def _pages_forward(self, patches: torch.Tensor, pos_embed, cos, sin, n: int) -> torch.Tensor:
        visual = self.visual
        seq = pos_embed.shape[0]
        h = visual.post_conv_layernorm(visual.patch_embed(patches))
        h = (h.view(n, seq, -1) + pos_embed).view(n * seq, -1)
        cos, sin = cos.repeat(n, 1), sin.repeat(n, 1)
        for blk in visual.blocks:
            attn = blk.attn
            x = blk.norm1(h)
            q, k, v = attn.qkv(x).reshape(n * seq, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
            q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
            q, k, v = (t.reshape(n, seq, attn.num_heads, -1).transpose(1, 2) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, scale=attn.scaling)
            h = h + attn.proj(out.transpose(1, 2).reshape(n * seq, -1))
            h = h + blk.mlp(blk.norm2(h))
        h = visual.post_layernorm(h)
        h = h.view(-1, self.merge, self.merge, h.shape[-1]).permute(0, 3, 1, 2)
        h = visual.downsample(h).view(-1, visual.config.out_hidden_size)
        return visual.merger(h)

    @torch.inference_mode()
    def encode(self, patches: torch.Tensor, grids: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        """Features [tokens, hidden] per page; ``patches`` holds the pages' patches in order."""
        offsets = [0]
        for _, gh, gw in grids:
            offsets.append(offsets[-1] + gh * gw)
        out: list[torch.Tensor | None] = [None] * len(grids)
        by_grid: dict[tuple[int, int], list[int]] = {}
        for i, (_, gh, gw) in enumerate(grids):
            by_grid.setdefault((gh, gw), []).append(i)
        for (gh, gw), idx in by_grid.items():
            pos_embed, cos, sin = self._shape_constants(gh, gw)
            for start in range(0, len(idx), self.batch_pages):
                chunk = idx[start : start + self.batch_pages]
                px = torch.cat([patches[offsets[i] : offsets[i + 1]] for i in chunk])
                feats = self._forward(px, pos_embed, cos, sin, len(chunk))
                per_page = feats.shape[0] // len(chunk)
                for j, i in enumerate(chunk):
                    out[i] = feats[j * per_page : (j + 1) * per_page]
        return out


class LMRunner:
    """Language model with a static KV cache of ``max_batch`` rows and ``max_context`` (+2 spare) positions."""

    def __init__(
        self, model, max_batch: int, max_context: int, device: torch.device, dtype: torch.dtype, compile: bool = False
    ):
        tc = model.config.text_config
        lm = model.model.language_model
        self.layers = list(lm.layers)
        self.embed = lm.embed_tokens
        self.norm = lm.norm
        self.rotary = lm.rotary_emb
        self.lm_head = model.lm_head
        self.device, self.dtype = device, dtype
        self.n_heads = tc.num_attention_heads
        self.kv_heads = tc.num_key_value_heads
        self.head_dim = tc.hidden_size // tc.num_attention_heads
        self.n_rep = self.n_heads // self.kv_heads
        self.vocab = tc.vocab_size
        self.max_batch = max_batch
        # A pipelined decode may run one step past a row's end; multiples of 64 keep attention spans aligned.
        self.capacity = (max_context + 2 + 63) // 64 * 64
        shape = (max_batch, self.kv_heads, self.capacity, self.head_dim)
        kw = dict(device=device, dtype=dtype)
        self.k = [torch.zeros(shape, **kw) for _ in self.layers]
        self.v = [torch.zeros(shape, **kw) for _ in self.layers]
        ikw = dict(device=device, dtype=torch.long)
        # Decode state, read and advanced in place by every step (and by its CUDA graph replays).
        self.tokens = torch.zeros(max_batch, 1, **ikw)
        self.cache_pos = torch.zeros(max_batch, **ikw)
        self.rope_pos = torch.zeros(max_batch, **ikw)
        self.active = torch.ones(max_batch, **ikw)
        self.bias = torch.zeros(max_batch, self.vocab, device=device, dtype=torch.float32)
        self.logits = torch.zeros(max_batch, self.vocab, device=device, dtype=torch.float32)
        self.next = torch.zeros(max_batch, **ikw)
        self.rows = torch.arange(max_batch, **ikw)
        self.positions = torch.arange(self.capacity, **ikw)
        self.eps = tc.rms_norm_eps
        if tc.hidden_act != "silu":
            raise ModelLoadError(f"unsupported activation {tc.hidden_act!r} in the text config (GLM-4.1V uses silu)")
        self.layer_weights = [
            (
                layer.input_layernorm.weight,
                *fuse_qkv(layer.self_attn),
                layer.self_attn.o_proj.weight,
                layer.post_self_attn_layernorm.weight,
                layer.post_attention_layernorm.weight,
                layer.mlp.gate_up_proj.weight,
                layer.mlp.down_proj.weight,
                layer.post_mlp_layernorm.weight,
            )
            for layer in self.layers
        ]
        self.scaling = self.layers[0].self_attn.scaling
        # On CUDA the per-layer pieces around attention are compiled (their elementwise work fused), once per batch
        # size: the weights are arguments, so all layers share one compiled graph.
        wrap = (lambda f: torch.compile(f, dynamic=False)) if compile else (lambda f: f)
        self._pre = wrap(_pre_attention)
        self._post = wrap(_post_attention)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.graph_batches: list[int] = []
        self.spans: list[int] = []

    # --- prefill -------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, row: int, embeds: torch.Tensor, positions: torch.Tensor, start: int) -> torch.Tensor:
        """Run ``embeds`` [1, S, D] at cache positions start.. of ``row``, ``PREFILL_CHUNK`` tokens at a time (each
        chunk attends to the ones before it in the cache); returns the last token's logits."""
        for c in range(0, embeds.shape[1], PREFILL_CHUNK):
            x = embeds[:, c : c + PREFILL_CHUNK]
            logits = self.prefill_rows([row], x, positions[:, :, c : c + PREFILL_CHUNK], [start + c], [x.shape[1]])
        return logits[0]

    @torch.inference_mode()
    def prefill_rows(
        self, rows: list[int], embeds: torch.Tensor, positions: torch.Tensor, starts: list[int], lengths: list[int]
    ) -> torch.Tensor:
        """Several rows' prompts (or prompt suffixes after their cached prefixes) in one pass: ``embeds``
        [1, sum(lengths), D] holds them one after another, row i's at cache positions starts[i]... The
        token-wise work (projections, MLP, norms) runs once over all of them, so the weights are read once
        instead of once per row; attention runs per row. Returns each row's last-token logits [rows, vocab]."""
        cos, sin = self.rotary(embeds, positions)
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        x = embeds
        total = embeds.shape[1]
        for li, (norm_w, qkv_w, qkv_b, o_w, *post) in enumerate(self.layer_weights):
            q, k, v = _pre_attention(x, norm_w, qkv_w, qkv_b, cos, sin, self.eps, self.n_heads, self.kv_heads, self.head_dim)
            outs = []
            for row, start, n, off in zip(rows, starts, lengths, offsets):
                end = start + n
                self.k[li][row, :, start:end] = k[0, :, off : off + n]
                self.v[li][row, :, start:end] = v[0, :, off : off + n]
                outs.append(self._causal_attention(q[:, :, off : off + n], row, li, end))
            out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
            x = _post_attention(x, out.transpose(1, 2).reshape(1, total, -1), o_w, *post, self.eps)
        last = torch.tensor([off + n - 1 for off, n in zip(offsets, lengths)], device=x.device)
        return self.lm_head(self.norm(x[0, last])).float()

    def _causal_attention(self, q: torch.Tensor, row: int, layer: int, end: int) -> torch.Tensor:
        """Queries for cache positions end - len(q)..end-1 of ``row`` over its keys 0..end-1, causally. The
        lower-right causal bias lets SDPA pick a flash kernel even when the queries follow a cached prefix (a
        materialized mask would force a kernel that reads it for every head)."""
        s = q.shape[2]
        mask = None if s == end else causal_lower_right(s, end)
        keys = repeat_kv(self.k[layer][row : row + 1, :, :end], self.n_rep)
        values = repeat_kv(self.v[layer][row : row + 1, :, :end], self.n_rep)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=mask is None, scale=self.scaling)

    # --- prefix KV ---------------------------------------------------------------------------------------

    def read_kv(self, row: int, length: int) -> torch.Tensor:
        """[layers, 2, kv_heads, length, head_dim] copy of a row's first ``length`` positions."""
        out = torch.empty(
            len(self.layers), 2, self.kv_heads, length, self.head_dim, device=self.device, dtype=self.dtype
        )
        for li in range(len(self.layers)):
            out[li, 0].copy_(self.k[li][row, :, :length])
            out[li, 1].copy_(self.v[li][row, :, :length])
        return out

    def write_kv(self, row: int, kv: torch.Tensor) -> None:
        length = kv.shape[3]
        for li in range(len(self.layers)):
            self.k[li][row, :, :length].copy_(kv[li, 0])
            self.v[li][row, :, :length].copy_(kv[li, 1])

    # --- decode --------------------------------------------------------------------------------------------

    def park_row(self, row: int) -> None:
        """Keep decode steps off a row whose prompt is being prefilled in slices: inactive, and its (ignored) KV
        writes aimed at the last cache position, which no prompt or answer reaches (see ``capacity``)."""
        self.cache_pos[row] = self.capacity - 1
        self.active[row] = 0

    def start_row(self, row: int, token: int, cache_pos: int, rope_pos: int, bias: torch.Tensor | None) -> None:
        self.tokens[row, 0] = token
        self.cache_pos[row] = cache_pos
        self.rope_pos[row] = rope_pos
        self.active[row] = 1
        if bias is None:
            self.bias[row].zero_()
        else:
            self.bias[row].copy_(bias)

    def _decode_body(self, b: int, span: int) -> None:
        x = self.embed(self.tokens[:b])
        cos, sin = self.rotary(x, self.rope_pos[:b].view(1, b, 1).expand(3, b, 1))
        cpos = self.cache_pos[:b]
        valid = self.positions[:span].view(1, span) <= cpos.view(b, 1)
        mask = torch.zeros(b, 1, 1, span, device=self.device).masked_fill_(~valid.view(b, 1, 1, span), float("-inf"))
        rows = self.rows[:b]
        for li, (norm_w, qkv_w, qkv_b, o_w, *post) in enumerate(self.layer_weights):
            q, k, v = self._pre(x, norm_w, qkv_w, qkv_b, cos, sin, self.eps, self.n_heads, self.kv_heads, self.head_dim)
            self.k[li][rows, :, cpos] = k[:, :, 0]
            self.v[li][rows, :, cpos] = v[:, :, 0]
            # Attention as two batched matmuls: they spread the span over the whole GPU, where a fused
            # attention kernel gets one block per KV head. The query heads sharing a KV head ride along the
            # query axis, so the cache is never repeated.
            qg = q.reshape(b, self.kv_heads, self.n_rep, self.head_dim)
            scores = torch.matmul(qg, self.k[li][:b, :, :span].transpose(2, 3)).float() * self.scaling + mask
            probs = torch.softmax(scores, dim=-1).to(self.dtype)
            out = torch.matmul(probs, self.v[li][:b, :, :span])
            x = self._post(x, out.reshape(b, 1, -1), o_w, *post, self.eps)
        logits = self.lm_head(self.norm(x[:, 0])).float() + self.bias[:b]
        self.logits[:b].copy_(logits)
        nxt = logits.argmax(-1)
        self.next[:b].copy_(nxt)
        self.tokens[:b, 0].copy_(nxt)
        self.cache_pos[:b] += self.active[:b]
        self.rope_pos[:b] += self.active[:b]

    def _pick(self, b: int, max_pos: int) -> tuple[int, int]:
        """Graph batch size and attention span covering rows [:b] at cache positions <= max_pos."""
        gb = next((x for x in self.graph_batches if x >= b), None)
        span = next((x for x in self.spans if x > max_pos), None)
        if gb is None or span is None:
            return b, max_pos + 1  # no graph covers it: run eagerly
        return gb, span

    @torch.inference_mode()
    def step(self, b: int, max_pos: int) -> None:
        """Advance rows [:b] by one token (greedy result in ``next``, logits in ``logits``)."""
        gb, span = self._pick(b, max_pos)
        graph = self.graphs.get((gb, span))
        if graph is not None:
            graph.replay()
        else:
            self._decode_body(gb, span)

    @torch.inference_mode()
    def capture_graphs(self, batch_sizes: list[int], spans: list[int] | None = None) -> None:
        """Capture the decode step for each batch size and attention span (default: powers of two from 1024 up
        to the capacity)."""
        if spans is None:
            spans, s = [], 1024
            while s < self.capacity:
                spans.append(s)
                s *= 2
            spans.append(self.capacity)
        self.spans = sorted(spans)
        self.graph_batches = sorted(b for b in set(batch_sizes) if b <= self.max_batch)
        if self.graph_batches[-1] != self.max_batch:
            self.graph_batches.append(self.max_batch)
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: compilation, kernels, cuBLAS workspaces
                for b in self.graph_batches:
                    self._decode_body(b, self.spans[0])
        torch.cuda.current_stream(self.device).wait_stream(side)
        for b in reversed(self.graph_batches):
            for span in self.spans:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._decode_body(b, span)
                self.graphs[(b, span)] = graph
        self.cache_pos.zero_()
        self.rope_pos.zero_()
        torch.cuda.synchronize(self.device)
