"""The residual add between two RMS norms (``norms.add_rms_norms``): the kernel under Triton's CPU interpreter and
on CUDA against the eager expressions, and the expressions off CUDA."""

import pytest
import torch

from tests.engine.triton_interpreter import run_interpreted


def kernel_arithmetic(y, x, post_w, next_w, eps):
    """The kernel's roundings in torch: ``rms_norm``'s, but the weight's product plus the residual rounded once."""
    from glyphserve.engine.norms import rms_norm

    normed = (y.float() * torch.rsqrt(y.float().pow(2).mean(-1, keepdim=True) + eps)).to(y.dtype)
    out = (x.float() + post_w.float() * normed.float()).to(x.dtype)
    return out, rms_norm(out, next_w, eps)


INTERPRETED = """
import torch
from glyphserve.engine.norm_kernel import add_rms_norms_rows
from glyphserve.engine.norms import kernel_add_rms_norms, rms_norm
from tests.engine.test_norm_kernel import kernel_arithmetic

torch.manual_seed(0)
for d in (64, 100, 4096):  # a power of two, a ragged row, GLM-4.1V's width (16 values a thread)
    for dtype in (torch.float32, torch.float16):  # the interpreter has no bfloat16 (numpy has none)
        for rows in (1, 3):
            y, x = (torch.randn(rows, d).to(dtype) * 3 for _ in range(2))
            post_w, next_w = (torch.rand(d).to(dtype) + 0.5 for _ in range(2))
            out, h = kernel_add_rms_norms(y, x, post_w, next_w, 1e-5)
            ref, ref_h = kernel_arithmetic(y, x, post_w, next_w, 1e-5)
            assert out.dtype == h.dtype == dtype and out.shape == h.shape == (rows, d)
            # the statistics are summed in another order: at most a rounding step of the dtype apart
            tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
            torch.testing.assert_close(out, ref, **tol)
            torch.testing.assert_close(h, ref_h, **tol)
            torch.testing.assert_close(out, x + rms_norm(y, post_w, 1e-5), **tol)  # the eager expressions
            if dtype == torch.float16:  # and most values bit for bit
                assert (out == ref).float().mean() > 0.95 and (h == ref_h).float().mean() > 0.95
# the op's schema and fake tensors; rows of a wider tensor (strided) and of three dimensions
y = torch.randn(2, 160)[:, :100]
x = torch.randn(2, 100)
w = torch.ones(100)
torch.library.opcheck(kernel_add_rms_norms, (y, x, w, w, 1e-6))
out, h = kernel_add_rms_norms(y, x, w, w, 1e-6)
torch.testing.assert_close(out, kernel_arithmetic(y, x, w, w, 1e-6)[0], rtol=1e-5, atol=1e-5)
y3, x3 = torch.randn(2, 3, 100), torch.randn(2, 3, 100)
out, h = kernel_add_rms_norms(y3, x3, w, w, 1e-6)
assert out.shape == h.shape == (2, 3, 100) and out.is_contiguous()
torch.testing.assert_close(out, kernel_arithmetic(y3, x3, w, w, 1e-6)[0], rtol=1e-5, atol=1e-5)
try:
    add_rms_norms_rows(y, x, torch.ones(64), w, 1e-6, torch.empty(2, 100), torch.empty(2, 100))
except ValueError as exc:
    assert "weights [D]" in str(exc)
else:
    raise AssertionError("a weight of another width was accepted")
print("interpreted ok")
"""


def test_add_rms_norms_kernel_under_the_interpreter():
    run_interpreted(INTERPRETED)


def test_add_rms_norms_off_cuda_is_the_eager_expressions():
    from glyphserve.engine.norms import add_rms_norms, rms_norm

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        y, x = torch.randn(2, 5, 32, dtype=dtype), torch.randn(2, 5, 32, dtype=dtype)
        post_w, next_w = torch.rand(32, dtype=dtype), torch.rand(32, dtype=dtype)
        out, h = add_rms_norms(y, x, post_w, next_w, 1e-5)
        assert torch.equal(out, x + rms_norm(y, post_w, 1e-5))
        assert torch.equal(h, rms_norm(out, next_w, 1e-5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_add_rms_norms_matches_eager_under_compile_and_in_a_graph():
    from glyphserve.engine.norms import add_rms_norms, kernel_add_rms_norms, rms_norm

    device = torch.device("cuda")
    torch.manual_seed(0)
    post_w, next_w = (torch.rand(4096, device=device, dtype=torch.bfloat16) + 0.5 for _ in range(2))
    compiled = torch.compile(lambda y, x: add_rms_norms(y * 1, x, post_w, next_w, 1e-5), dynamic=True)
    for rows in (1, 7):
        y, x = (torch.randn(rows, 4096, device=device, dtype=torch.bfloat16) for _ in range(2))
        torch.library.opcheck(kernel_add_rms_norms, (y, x, post_w, next_w, 1e-5))
        ref, ref_h = kernel_arithmetic(y, x, post_w, next_w, 1e-5)
        eager = x + rms_norm(y, post_w, 1e-5)
        for out, h in (add_rms_norms(y, x, post_w, next_w, 1e-5), compiled(y, x)):
            same = (out == ref).float().mean().item(), (h == ref_h).float().mean().item()
            assert same[0] > 0.99 and same[1] > 0.99, (rows, same)  # (all equal on an H200)
            torch.testing.assert_close(out, eager, rtol=0, atol=2**-4)  # a rounding step of values up to 16
    y, x = (torch.randn(1, 4096, device=device, dtype=torch.bfloat16) for _ in range(2))
    first = add_rms_norms(y, x, post_w, next_w, 1e-5)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = add_rms_norms(y, x, post_w, next_w, 1e-5)
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(captured, first))
