"""The vision tower: pages (patches) to merged vision features, equal to ``get_image_features`` of the HF model.

It runs batched over pages (the token-wise work once over all of a batch's tokens, attention once per run of pages
of one shape) with per-shape constants precomputed. With ``compile`` (CUDA, 16-bit weights) the work of a block
around its attention is two compiled pieces (the previous block's residual, norm and qkv projection; output
projection, residual, norm and MLP)
that take the block's weights as arguments: one compiled graph serves all 24 blocks and, its token count dynamic,
every page shape and page count; the rotation is a Triton kernel (``rotary.rotate_vision``) and the patch embedding
and the 2 x 2 downsampling, convolutions whose kernel equals their stride, one matrix product each
(``conv_as_linear``; cuDNN's implicit-GEMM convolution took 2.4 ms for W50's 6 pages on an H200). Measured on an
H200 (``bench profile``) before any of it: uncompiled, the tower took 85 ms for W50's 6 pages and 341 ms for W200's
24 (its FLOPs at the card's matrix rate: ~35 and ~140 ms); its RMSNorms and float32 rotations ran as separate
elementwise launches over [tokens, 1536] tensors.
"""

from __future__ import annotations

import itertools
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel
from transformers.vision_utils import get_vision_position_ids

from glyphserve.engine.linear import dense_linear
from glyphserve.engine.model_runner import NO_PLAN_BACKENDS
from glyphserve.engine.norms import rms_norm
from glyphserve.engine.preprocess import try_decode
from glyphserve.engine.rotary import rotate_vision
from glyphserve.engine.stage_clock import StageClock
from glyphserve.errors import ModelLoadError


# The residual adds happen in the norms that read the residual stream next, not in the products: Inductor turned
# ``h + F.linear(...)`` into cuBLAS's addmm, which copies ``h`` into its output before the product adds to it (144
# copies of 62 MB, 4.1 ms of W200's 24 pages on an H200; a plain product and the add inside the norm's kernel
# read and write less). ``dense_linear`` is opaque to the compiler, so no such fusion is formed.


def _block_pre(h, y, norm_w, qkv_w, qkv_b, eps: float):
    """The residual stream ``h`` plus the previous block's MLP output ``y`` (None before the first block), its
    norm and the block's fused qkv projection: (h, [T, 3 C])."""
    if y is not None:
        h = h + y
    return h, F.linear(rms_norm(h, norm_w, eps), qkv_w, qkv_b)


def _block_post(h, attn_out, proj_w, norm_w, gate_w, up_w, down_w, eps: float):
    """Output projection and residual, norm and gated MLP (silu) of a block: (h, the MLP's output), whose sum is
    the block's output."""
    h = h + dense_linear(attn_out, proj_w)
    x = rms_norm(h, norm_w, eps)
    return h, dense_linear(F.silu(F.linear(x, gate_w)) * F.linear(x, up_w), down_w)


def conv_as_linear(conv: torch.nn.Conv2d | torch.nn.Conv3d, windows: torch.Tensor) -> torch.Tensor:
    """A convolution whose kernel equals its stride and its input (one output per window: the patch embedding, the
    2 x 2 downsampling) as one matrix product over the flattened windows [N, C * kernel elements] (the weight's own
    layout). cuDNN's convolution builds a plan for each new window count (a cropped page brings one), and its
    implicit GEMM took 2.4 ms for W50's patch embedding on an H200."""
    return F.linear(windows.to(conv.weight.dtype), conv.weight.view(conv.out_channels, -1), conv.bias)


class VisionRunner:
    """Pages (patches) to merged vision features, equal to ``get_image_features`` of the HF model."""

    def __init__(self, model, batch_pages: int, compile: bool, planned_grids=()):
        """``planned_grids``: page grids (t, h, w) whose batches of 1 to ``batch_pages`` pages attend through
        cuDNN (``plan_attention`` builds their plans); every other shape attends through flash."""
        self.visual = model.model.visual
        if self.visual.config.hidden_act != "silu":
            raise ModelLoadError(f"unsupported vision activation {self.visual.config.hidden_act!r} (GLM-4.1V: silu)")
        self.batch_pages = max(1, batch_pages)
        self.merge = self.visual.spatial_merge_size
        self._constants: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.blocks = [self._block_weights(blk) for blk in self.visual.blocks]
        self.compiled = compile
        self.planned_grids = list(dict.fromkeys(tuple(g) for g in planned_grids))
        # (pages, patches a page) that attend through cuDNN
        self.planned = {(n, t * h * w) for t, h, w in self.planned_grids for n in range(1, self.batch_pages + 1)}
        wrap = (lambda f: torch.compile(f, dynamic=True)) if compile else (lambda f: f)
        self._pre, self._post = wrap(_block_pre), wrap(_block_post)

    @staticmethod
    def _block_weights(blk) -> tuple:
        """((norm1, qkv weight, qkv bias), (proj, norm2, gate, up, down), (eps, heads, scaling))."""
        attn, mlp = blk.attn, blk.mlp
        return ((blk.norm1.weight, attn.qkv.weight, attn.qkv.bias),
                (attn.proj.weight, blk.norm2.weight, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight),
                (blk.norm1.variance_epsilon, attn.num_heads, attn.scaling))

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

    def _pages_forward(self, patches: torch.Tensor, groups: list[tuple[int, tuple]]) -> torch.Tensor:
        """Merged features of a batch of pages: ``groups`` lists runs of pages of one grid in the batch's order,
        each as (page count, the grid's constants). The work on tokens (projections, norms, MLP) runs once over
        all of the batch's tokens, attention once a group: a document's cropped last page goes through the tower
        with its other pages, not in a forward of its own (on an H200 one page alone took 17-22 ms, its launches
        and compiled calls' host time, against 39 ms for five full pages)."""
        visual = self.visual
        h = visual.post_conv_layernorm(conv_as_linear(visual.patch_embed.proj, patches) if self.compiled
                                        else visual.patch_embed(patches))
        spans = []
        start = 0
        for n, (pos_embed, cos, sin) in groups:
            seq = pos_embed.shape[0]
            h[start : start + n * seq].view(n, seq, -1).add_(pos_embed)
            # cuDNN's attention (0.58 ms a block for 8 pages of 2,520 patches on an H200, flash's 0.98) builds a
            # plan for each shape it meets, ~45 ms each time (shape-probe-h200.json); a document's last page is
            # usually cropped to a height of its own, so only the planned shapes (``plan_attention``) go to it.
            spans.append((start, start + n * seq, n, cos, sin, (n, seq) in self.planned))
            start += n * seq
        y = None
        for pre, post, (eps, heads, scaling) in self.blocks:
            h, qkv = self._pre(h, y, *pre, eps)
            if len(spans) == 1:
                out = self._attend(qkv, *spans[0][2:], heads, scaling)
            else:
                out = torch.empty_like(h)
                for a, b, *span in spans:
                    out[a:b] = self._attend(qkv[a:b], *span, heads, scaling)
            h, y = self._post(h, out, *post, eps)
        h = visual.post_layernorm(h + y)
        h = h.view(-1, self.merge, self.merge, h.shape[-1]).permute(0, 3, 1, 2)
        if self.compiled:
            h = conv_as_linear(visual.downsample, h.reshape(h.shape[0], -1))
        else:
            h = visual.downsample(h).view(-1, visual.config.out_hidden_size)
        return visual.merger(h)

    def _attend(self, qkv: torch.Tensor, n: int, cos, sin, planned: bool, heads: int, scaling: float):
        """Attention within each of ``n`` pages of one grid: [n * seq, C] of a block's fused projection rows."""
        q, k, v = rotate_vision(qkv, cos, sin, n, heads, kernel=self.compiled)
        with nullcontext() if planned else sdpa_kernel(NO_PLAN_BACKENDS):
            out = F.scaled_dot_product_attention(q, k, v, scale=scaling)
        return out.transpose(1, 2).reshape(qkv.shape[0], -1)

    @torch.inference_mode()
    def plan_attention(self) -> None:
        """Build cuDNN's attention plan for each planned shape (batches of 1 to ``batch_pages`` pages of a planned
        grid; ~45 ms each on an H200) on the calling thread: PyTorch keeps the plans per thread, so the thread that
        runs the steps calls it. Each is one attention call on a batch of zeros laid out as ``_pages_forward``'s
        (the plans are per strides too)."""
        heads, scaling = self.blocks[0][2][1:]
        qkv_w = self.blocks[0][0][1]
        for t, h, w in self.planned_grids:
            _, cos, sin = self._shape_constants(h, w)
            for n in range(1, self.batch_pages + 1):
                qkv = torch.zeros(n * t * h * w, qkv_w.shape[0], device=qkv_w.device, dtype=qkv_w.dtype)
                self._attend(qkv, n, cos, sin, True, heads, scaling)

    @torch.inference_mode()
    def encode(self, patches: torch.Tensor, grids: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        """Features [tokens, hidden] per page; ``patches`` holds the pages' patches in order. Pages go through the
        tower ``batch_pages`` at a time, those of one grid next to each other."""
        offsets = [0]
        for _, gh, gw in grids:
            offsets.append(offsets[-1] + gh * gw)
        out: list[torch.Tensor | None] = [None] * len(grids)
        order = sorted(range(len(grids)), key=lambda i: grids[i][1:])
        for start in range(0, len(order), self.batch_pages):
            chunk = order[start : start + self.batch_pages]
            groups = [(len(list(run)), self._shape_constants(gh, gw))
                      for (gh, gw), run in itertools.groupby(chunk, key=lambda i: grids[i][1:])]
            px = torch.cat([patches[offsets[i] : offsets[i + 1]] for i in chunk])
            feats = self._pages_forward(px, groups)
            row = 0
            for i in chunk:
                rows = self.tokens_per_page(grids[i])
                out[i] = feats[row : row + rows]
                row += rows
        return out


class VisionEncoder:
    """Vision features of the pages a step needs: cache hits by page identity (a hit never decodes the page), the
    misses decoded, preprocessed and encoded together."""

    def __init__(self, runner: VisionRunner, preprocessor, cache, key_prefix: str, clock: StageClock):
        self.runner = runner
        self.preprocessor = preprocessor
        self.cache = cache
        self.key_prefix = key_prefix
        self.clock = clock

    def provide(self, wanted: list[tuple[object, int]]) -> dict[int, tuple[object, Exception]]:
        """Make ``seq.features[page]`` available for every (sequence, page index) in ``wanted``; returns the
        sequences (by ``id``) one of whose pages could not be decoded, with the error: they cannot go on, the
        others are served all the same. The sequences' preprocess and vision stages are marked on the device's
        clock (``StageClock``) and read when their first token is: nothing here waits for the device's work in
        flight (but a page shape's constants, made once, and the staging buffer's copy of the batch before)."""
        missing: dict[str, tuple[object, tuple[int, int, int]]] = {}
        waiting: list[tuple[object, int, str, bool]] = []
        found: dict[str, torch.Tensor] = {}
        for seq, page in wanted:
            if page in seq.features:
                continue
            cached = seq.settings.use_cache
            key = self.key_prefix + seq.page_keys[page] if cached else f"{id(seq)}:{page}"
            hit = found.get(key)
            if hit is None and cached and key not in missing:
                hit = self.cache.get(key)
                if hit is not None:
                    found[key] = hit
            if hit is not None:
                seq.cache.vision_hits += 1
                seq.features[page] = hit
                continue
            if key in missing:
                seq.cache.vision_hits += 1  # encoded once for all the sequences of this step that show it
            else:
                seq.cache.vision_misses += 1
                missing[key] = (seq.pages[page], seq.prompt.image_grids[page])
            waiting.append((seq, page, key, cached))
        broken: dict[str, Exception] = {}
        stages = []
        if missing:
            start = self.clock.mark()  # the pages' decoding counts as preprocessing
            # The tower's batches (pages of one shape together, ``VisionRunner.encode``'s order), one at a time:
            # the next batch's pages are decoded and uploaded while the device encodes this one (a cold W200
            # question's 24 pages took ~6 ms to upload on an H200 host, with the device idle).
            keys = sorted(missing, key=lambda k: missing[k][1][1:])
            for at in range(0, len(keys), self.runner.batch_pages):
                batch = keys[at : at + self.runner.batch_pages]
                good = []
                for key, px in zip(batch, try_decode([missing[k][0] for k in batch])):
                    if isinstance(px, Exception):
                        broken[key] = px
                    else:
                        good.append((key, px))
                if not good:
                    continue
                patches = self.preprocessor([px for _, px in good])
                preprocessed = self.clock.mark()
                for (key, _), feat in zip(good, self.runner.encode(patches, [missing[k][1] for k, _ in good])):
                    found[key] = feat
                encoded = self.clock.mark()
                stages += [("preprocess", start, preprocessed), ("vision_encode", preprocessed, encoded)]
                start = encoded
        failed: dict[int, tuple[object, Exception]] = {}
        stored: set[str] = set()
        for seq, page, key, cached in waiting:
            if key in broken:
                failed[id(seq)] = (seq, broken[key])
                continue
            feat = found[key]
            if cached and key not in stored:
                feat = found[key] = feat.clone()  # a slice of the batch output would pin the whole batch
                self.cache.put(key, feat)
                stored.add(key)
            seq.features[page] = feat
        for seq in {id(s): s for s, _ in wanted}.values():
            if not seq.new_output:  # (pages encoded again after a preemption past its first token: not timed)
                seq.stage_marks += stages
        return failed
