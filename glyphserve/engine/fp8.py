"""FP8 weights for the language model: per-output-channel e4m3 weights, a bf16 (or fp32) activation path; the
token embedding table as int8 rows (``Int8Embedding``: why not e4m3 is in its docstring).

``quantize_fp8`` maps each output channel (row) of a weight to float8_e4m3fn with its own fp32 scale, absmax/448
(448 is e4m3's largest finite value; an all-zero row gets scale 1). Error of the round trip, per element:
e4m3 keeps 3 mantissa bits, so a scaled value in the normal range (|w|/s >= 2**-6) is rounded to within 2**-4 of
itself, and one below it lies on the subnormal grid of step 2**-9, within 2**-10 of it::

    |dequantize(quantize(w)) - w| <= 2**-4 * |w| + 2**-10 * s,    s = absmax(row) / 448

``fp8_linear`` is one custom op (``torch.ops.glyphserve.fp8_linear``), opaque to ``torch.compile`` and safe inside
CUDA graph capture (no host synchronisation, allocations fixed by the shapes). It picks by rows M = x's rows:

- CUDA, M <= 64 (decode), bf16/fp16 activations: a Triton kernel that streams the fp8 weights and multiplies
  in the activations' dtype with fp32 accumulation (cuBLAS's FP8 GEMM gains nothing at these sizes): one row
  ``gemv_kernel``'s, 2 to 64 rows ``rows_kernel``'s on the tensor cores (cards before sm_89, which have no FP8
  conversion, widen the weights' bytes with integer operations: ``gemv_kernel.widen``);
- CUDA, more rows (prefill), bf16, on cards with FP8 tensor cores (sm_89, sm_90 and later): ``torch._scaled_mm``
  with the activations quantized per row (dynamic per-token scales) and the weights' per-channel scales;
- anywhere else (CPU, fp32 activations, older cards, shapes cuBLAS refuses): the weights dequantized and
  ``F.linear``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glyphserve.engine.caches import tensor_bytes

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
DECODE_ROWS = 64  # rows up to which the weight-streaming kernel runs
QUANTIZE_ROWS = 4096  # rows quantized at a time (an fp32 copy of at most 4,096 x 13,696 values: 224 MB)
DEQUANTIZE_ROWS = 1024  # rows dequantized at a time (fp32: at most 56 MB of 1,024 x 13,696)


def quantize_fp8(weight: Tensor, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """``weight`` [out, in] -> (float8_e4m3fn [out, in], float32 scale [out]) with ``weight ~= q * scale[:, None]``,
    on ``device`` (default: the weight's). Rows go QUANTIZE_ROWS at a time (each row has its own scale, so the
    result is the same), so a weight on the host is never on the device whole in 16 bits, nor whole in fp32 (the
    head's fp32 copy alone is 2.5 GB)."""
    # Clamped first: absmax / scale can round to just above 448, and e4m3fn has no infinity to saturate to.
    return _quantize_rows(weight, device, FP8, FP8_MAX, lambda v: v.to(FP8))


def quantize_int8_rows(weight: Tensor, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """``weight`` [rows, cols] -> (int8 [rows, cols], float32 scale [rows]) with ``weight ~= q * scale[:, None]``,
    scale absmax(row)/127, rounded to nearest: every element within scale/2 of itself (as ``quantize_fp8``, a
    chunk of rows at a time)."""
    return _quantize_rows(weight, device, torch.int8, 127.0, lambda v: v.round_().to(torch.int8))


def _quantize_rows(weight: Tensor, device: torch.device | None, dtype: torch.dtype, top: float,
                   to_grid: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """Each row scaled so that its largest magnitude is ``top`` (an all-zero row gets scale 1), clamped to
    [-top, top] and put on the grid of ``dtype`` by ``to_grid``; QUANTIZE_ROWS rows at a time."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    device = weight.device if device is None else device
    q = torch.empty(weight.shape, dtype=dtype, device=device)
    scale = torch.empty(weight.shape[0], dtype=torch.float32, device=device)
    for start in range(0, weight.shape[0], QUANTIZE_ROWS):
        w = weight[start : start + QUANTIZE_ROWS].detach().to(device).float()
        s = w.abs().amax(dim=1) / top
        s = torch.where(s > 0, s, torch.ones_like(s))
        q[start : start + QUANTIZE_ROWS] = to_grid((w / s[:, None]).clamp_(-top, top))
        scale[start : start + QUANTIZE_ROWS] = s
    return q, scale


def dequantize_fp8(qweight: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """The weight ``qweight * scale[:, None]`` in ``dtype``, computed in fp32 DEQUANTIZE_ROWS rows at a time: the
    prefill of a card without FP8 tensor cores dequantizes each weight as it multiplies, and a whole fp32 copy of
    the fused gate_up (448 MB) beside its bf16 one would take a 24 GB card's room for the KV pool."""
    if dtype == torch.float32:
        return qweight.float().mul_(scale[:, None])
    out = torch.empty(qweight.shape, dtype=dtype, device=qweight.device)
    for start in range(0, qweight.shape[0], DEQUANTIZE_ROWS):
        rows = slice(start, start + DEQUANTIZE_ROWS)
        out[rows] = qweight[rows].float().mul_(scale[rows, None])
    return out


@lru_cache(maxsize=16)
def has_fp8_conversion(device: torch.device) -> bool:
    """Whether a CUDA card converts and multiplies e4m3 itself (Ada, sm_89, and later: FP8 tensor cores, and
    Triton's e4m3 type)."""
    return torch.cuda.get_device_capability(device) >= (8, 9)


def scaled_mm_fits(x: Tensor, qweight: Tensor) -> bool:
    """cuBLAS's row-wise scaled FP8 GEMM: bf16 output, both inner dimensions multiples of 16."""
    return (x.dtype == torch.bfloat16 and x.shape[1] % 16 == 0 and qweight.shape[0] % 16 == 0
            and has_fp8_conversion(x.device))


def scaled_mm_linear(x: Tensor, qweight: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """Activations quantized per row to e4m3 (absmax / 448; one Triton kernel,
    ``fp8_kernels.quantize_activations``), one FP8 GEMM with row and column scales. CUDA only."""
    from glyphserve.engine.fp8_kernels import quantize_activations

    xq, x_scale = quantize_activations(x)
    out = torch._scaled_mm(xq, qweight.t(), scale_a=x_scale, scale_b=scale[None, :], out_dtype=x.dtype)
    return out if bias is None else out.add_(bias)


@torch.library.custom_op("glyphserve::fp8_linear", mutates_args=())
def fp8_linear(x: Tensor, qweight: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x`` [..., in] times the fp8 weight [out, in] (per-row fp32 ``scale`` [out]) plus ``bias``: [..., out] in
    x's dtype."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] == 0:  # e.g. the head over a prompt chunk that samples nothing (the kernel's grid needs rows)
        return x.new_empty((*x.shape[:-1], qweight.shape[0]))
    if x.is_cuda and rows.shape[0] == 1 and x.dtype in (torch.bfloat16, torch.float16):
        from glyphserve.engine.gemv_kernel import row_matmul

        out = row_matmul(rows, qweight, scale, bias)
    elif x.is_cuda and rows.shape[0] <= DECODE_ROWS and x.dtype in (torch.bfloat16, torch.float16):
        from glyphserve.engine.rows_kernel import rows_matmul

        out = rows_matmul(rows, qweight, scale, bias)
    elif x.is_cuda and scaled_mm_fits(rows, qweight):
        out = scaled_mm_linear(rows.contiguous(), qweight, scale, bias)
    else:
        out = F.linear(rows, dequantize_fp8(qweight, scale, x.dtype), bias)
    return out.view(*x.shape[:-1], qweight.shape[0])


@fp8_linear.register_fake
def _(x: Tensor, qweight: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


class Fp8Linear(nn.Module):
    """An ``nn.Linear`` with its weight stored as e4m3 plus per-output-channel scales (the bias stays as it was)."""

    def __init__(self, qweight: Tensor, scale: Tensor, bias: Tensor | None):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, device: torch.device | None = None) -> Fp8Linear:
        """On ``device`` (default: the weight's)."""
        qweight, scale = quantize_fp8(linear.weight, device)
        bias = linear.bias.detach().to(qweight.device) if linear.bias is not None else None
        return cls(qweight, scale, bias)

    def forward(self, x: Tensor) -> Tensor:
        return fp8_linear(x, self.qweight, self.scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Embedding(nn.Module):
    """An ``nn.Embedding`` whose table is stored as int8 rows with per-row fp32 scales (``quantize_int8_rows``):
    half the bytes of a 16-bit table (GLM-4.1V-9B's 151,552 x 4,096: 1.16 GiB in bf16, 0.58 GiB), vectors returned
    in ``dtype``. Int8, not e4m3: a table is only looked up (no FP8 kernel to feed), rows without large outliers lose
    less to 255 even steps than to 3 mantissa bits, and the input embedding reaches the last layer through the
    residual stream. On the random full-size model (``bench fp8-drift``, CPU) the worst logit cosine against bf16
    was 0.9775 with a bf16 table, 0.9756 with this one, 0.9686 with e4m3 rows."""

    def __init__(self, qweight: Tensor, scale: Tensor, dtype: torch.dtype):
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.dtype = dtype
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, device: torch.device | None = None) -> Int8Embedding:
        """On ``device`` (default: the table's); vectors come out in the table's dtype."""
        qweight, scale = quantize_int8_rows(embedding.weight, device)
        return cls(qweight, scale, embedding.weight.dtype)

    def forward(self, ids: Tensor) -> Tensor:
        return self.qweight[ids].float().mul_(self.scale[ids].unsqueeze(-1)).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, dtype={self.dtype}"


def quantize_language_model(model: nn.Module, include_lm_head: bool = False) -> int:
    """Replace, in place, every ``nn.Linear`` of a GLM-4.1V model's decoder layers (attention projections, MLP),
    and with ``include_lm_head`` the output head, by an ``Fp8Linear``, and the token embedding table by an
    ``Int8Embedding``; the vision tower stays. The weights come out as ``--quantize fp8``'s where the head is
    included as the engine includes it (per-output-channel scales: q, k and v quantized apart equal the engine's
    fused qkv quantized as one), for running the Hugging Face model itself. Call it once the model has its final
    dtype and device: ``Module.to(dtype)`` would cast the quantized buffers too. Returns the bytes of weight memory
    saved."""
    before = _weight_bytes(model)
    lm = model.model.language_model
    lm.embed_tokens = Int8Embedding.from_embedding(lm.embed_tokens)  # (from a table tied to the head, a copy)
    targets = [(lm.layers, name) for name, module in lm.layers.named_modules() if isinstance(module, nn.Linear)]
    if include_lm_head:
        targets.append((model, "lm_head"))
    for root, name in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = root.get_submodule(parent_name)
        setattr(parent, attr, Fp8Linear.from_linear(getattr(parent, attr)))
    return before - _weight_bytes(model)


def _weight_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers, each tensor once."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(tensor_bytes(t) for t in tensors.values())
