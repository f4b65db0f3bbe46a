"""The one-row weight-streaming kernel (``gemv_kernel``), under Triton's CPU interpreter and on CUDA."""

import pytest
import torch

from tests.engine.triton_interpreter import run_interpreted

INTERPRETED = """
import torch
from glyphserve.engine.fp8 import dequantize_fp8, quantize_fp8
from glyphserve.engine.gemv_kernel import RowConfig, choose_row_config, row_matmul

torch.manual_seed(0)
configs = [RowConfig(4, 32, 4), RowConfig(8, 64, 4), RowConfig(16, 32, 8), RowConfig(4, 64, 4, lane_group=8)]
for n, k in [(40, 96), (37, 100), (8, 64)]:  # ragged N and K
    for config in configs:
        for dtype in (torch.float32, torch.float16):  # the interpreter has no bfloat16 (numpy has none)
            x = torch.randn(1, k).to(dtype)
            for bias in (None, torch.randn(n).to(dtype)):
                extra = 0 if bias is None else bias.float()
                w = torch.randn(n, k).to(dtype)  # 16-bit (and fp32) weights
                out = row_matmul(x, w, None, bias, config)
                ref = x.float() @ w.float().T + extra
                assert out.dtype == dtype and out.shape == (1, n)
                tol = 1e-5 if dtype == torch.float32 else 2e-3
                assert (out.float() - ref).norm() <= tol * ref.norm(), (n, k, config, dtype, "16-bit")
                q, scale = quantize_fp8(torch.randn(n, k))  # fp8 weights with per-channel scales
                out = row_matmul(x, q, scale, bias, config)
                ref = x.float() @ dequantize_fp8(q, scale, torch.float32).T + extra
                assert (out.float() - ref).norm() <= tol * ref.norm(), (n, k, config, dtype, "fp8")
assert choose_row_config(27392, 4096, 2).block_k * 2 == 4096  # 4 KB of a 16-bit row a step
assert all(choose_row_config(n, k, 1).lane_group == 8 for n, k in [(4608, 4096), (4096, 13696), (151552, 4096)])
try:
    row_matmul(torch.randn(2, 96), torch.randn(40, 96), None, None)
except ValueError as exc:
    assert "one row" in str(exc)
else:
    raise AssertionError("two rows were accepted")
print("interpreted ok")
"""

GATED = """
import torch
import torch.nn.functional as F
from glyphserve.engine.fp8 import dequantize_fp8, quantize_fp8
from glyphserve.engine.gemv_kernel import RowConfig, gated_row_matmul, row_matmul

torch.manual_seed(0)
for channels, k in [(20, 96), (37, 100), (4, 64)]:  # ragged channel counts and K
    for config in [RowConfig(4, 32, 4), RowConfig(8, 64, 4), RowConfig(2, 32, 4), RowConfig(4, 64, 4, lane_group=8)]:
        for dtype in (torch.float32, torch.float16):
            x = torch.randn(1, k).to(dtype)
            w = torch.randn(2 * channels, k).to(dtype)
            out = gated_row_matmul(x, w, None, config)
            gate, up = row_matmul(x, w, None, None, config).float().chunk(2, dim=-1)
            ref = up * F.silu(gate)  # the halves as the plain kernel rounds them, then fp32
            assert out.dtype == dtype and out.shape == (1, channels)
            tol = 1e-5 if dtype == torch.float32 else 2e-3
            assert (out.float() - ref).norm() <= tol * ref.norm(), (channels, k, config, dtype)
            q, scale = quantize_fp8(torch.randn(2 * channels, k))
            out = gated_row_matmul(x, q, scale, config)
            gate, up = (x.float() @ dequantize_fp8(q, scale, torch.float32).T).to(dtype).float().chunk(2, dim=-1)
            ref = up * F.silu(gate)
            assert (out.float() - ref).norm() <= tol * ref.norm(), (channels, k, config, dtype, "fp8")
try:
    gated_row_matmul(torch.randn(1, 96), torch.randn(41, 96), None)
except ValueError as exc:
    assert "even row count" in str(exc)
else:
    raise AssertionError("an odd row count was accepted")
print("interpreted ok")
"""


def test_row_kernel_under_the_interpreter():
    run_interpreted(INTERPRETED)


def test_gated_row_kernel_under_the_interpreter():
    """The MLP's ``up * silu(gate)`` straight from the fused projection equals the plain kernel's halves put
    through the activation, 16-bit and fp8 weights, for tilings whose programs end mid-way through the channels."""
    run_interpreted(GATED)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_one_row_matches_cublas_and_replays_in_a_graph():
    from glyphserve.engine.gemv_kernel import row_matmul

    device = torch.device("cuda")
    w = torch.randn(4608, 4096, device=device, dtype=torch.bfloat16) * 0.02
    b = torch.randn(4608, device=device, dtype=torch.bfloat16)
    x = torch.randn(1, 4096, device=device, dtype=torch.bfloat16)
    out = row_matmul(x, w, None, b)
    ref = x.float() @ w.float().T + b.float()
    assert (out.float() - ref).norm() <= 1e-2 * ref.norm()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = row_matmul(x, w, None, b)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, out)


def test_dense_linear_is_f_linear_off_the_one_row_cuda_path():
    from glyphserve.engine.linear import linear

    torch.manual_seed(0)
    w, b = torch.randn(48, 32, dtype=torch.bfloat16), torch.randn(48, dtype=torch.bfloat16)
    for x in (torch.randn(1, 32, dtype=torch.bfloat16), torch.randn(5, 32, dtype=torch.bfloat16),
              torch.randn(2, 3, 32, dtype=torch.bfloat16)):
        assert torch.equal(linear(x, w, None, b), torch.nn.functional.linear(x, w, b))
        torch.library.opcheck(torch.ops.glyphserve.dense_linear.default, (x, w, b))  # schema and fake tensor


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_dense_linear_one_row_through_the_kernel_under_compile():
    from glyphserve.engine.linear import linear

    device = torch.device("cuda")
    w = torch.randn(4096, 13696, device=device, dtype=torch.bfloat16) * 0.02
    compiled = torch.compile(lambda x, w: linear(x, w, None) * 2, dynamic=True)
    for rows in (1, 3):
        x = torch.randn(rows, 13696, device=device, dtype=torch.bfloat16)
        ref = (x.float() @ w.float().T) * 2
        out = compiled(x, w)
        assert out.shape == (rows, 4096)
        assert (out.float() - ref).norm() <= 1e-2 * ref.norm()


def test_row_matmul_refuses_weights_past_32_bit_offsets():
    pytest.importorskip("triton")
    from glyphserve.engine.gemv_kernel import row_matmul

    x, w = torch.empty(1, 2**11, device="meta"), torch.empty(2**20, 2**11, device="meta")  # no memory: 2**31
    with pytest.raises(ValueError, match="fewer than 2\\*\\*31 elements"):
        row_matmul(x, w, None, None)


def test_gated_linear_off_the_one_row_cuda_path_is_hf_arithmetic():
    """Off CUDA (and for several rows) ``gated_linear`` is the projection, then ``up * silu(gate)`` as HF's MLP;
    the custom op's fake tensor has the activation's shape."""
    import torch.nn.functional as F
    from torch._subclasses.fake_tensor import FakeTensorMode

    from glyphserve.engine.linear import gated_linear

    torch.manual_seed(0)
    w = torch.randn(2 * 24, 32)
    for x in (torch.randn(1, 32), torch.randn(5, 32)):
        gate, up = F.linear(x, w).chunk(2, dim=-1)
        assert torch.equal(gated_linear(x, w, None), up * F.silu(gate))
    with FakeTensorMode():  # what torch.compile traces: [M, I] for a [2 I, K] weight (the op itself is CUDA's)
        for rows in (1, 5):
            fake = torch.ops.glyphserve.gated_rows(torch.empty(rows, 32), torch.empty(48, 32), None)
            assert fake.shape == (rows, 24)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows", [1, 2, 16, 17, 64, 65])
def test_cuda_gated_row_matches_the_projection_and_activation_under_compile(rows):
    """bf16 and FP8 weights of GLM-4.1V-9B's gate_up shape: the gated kernels (one row, a few rows) and past their
    bounds the plain path, compiled as the model runner compiles its layers, against the projection through
    cuBLAS rounded to bf16 by halves, then the activation; replayed from a CUDA graph, the same values."""
    import torch.nn.functional as F

    from glyphserve.engine.fp8 import DECODE_ROWS, dequantize_fp8, quantize_fp8
    from glyphserve.engine.linear import gated_linear

    device = torch.device("cuda")
    w = torch.randn(27392, 4096, device=device, dtype=torch.bfloat16) * 0.02
    q, scale = quantize_fp8(w)
    x = torch.randn(rows, 4096, device=device, dtype=torch.bfloat16)
    compiled = torch.compile(gated_linear, dynamic=True)
    for weight, s, dense in ((w, None, w), (q, scale, dequantize_fp8(q, scale, torch.bfloat16))):
        gate, up = F.linear(x, dense).float().chunk(2, dim=-1)
        ref = up * F.silu(gate)
        out = compiled(x, weight, s)
        assert out.shape == (rows, 13696)
        # Past DECODE_ROWS the FP8 product is _scaled_mm's, which also quantizes the activations to e4m3.
        tol = 6e-2 if s is not None and rows > DECODE_ROWS else 1e-2
        assert (out.float() - ref).norm() <= tol * ref.norm()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = compiled(x, weight, s)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, out)
