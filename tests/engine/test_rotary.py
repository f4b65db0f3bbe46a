"""The rotation of queries and keys with the store of K/V in the pool, and the vision tower's rotation
(``rotary``): HF's arithmetic on the CPU, and the Triton kernels under Triton's interpreter against it; the
vision patch embedding as a matrix product."""

from __future__ import annotations

import torch
from transformers.models.glm4v.modeling_glm4v import apply_rotary_pos_emb, apply_rotary_pos_emb_vision

from glyphserve.engine.rotary import rotate, rotate_and_store, rotate_vision
from tests.engine.triton_interpreter import run_interpreted


def case(t=5, heads=4, kv=2, dim=16, blocks=8, block_size=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(t, (heads + 2 * kv) * dim, generator=g).to(dtype)
    angles = torch.randn(t, dim // 4, generator=g).repeat_interleave(2, dim=-1)  # pairs share an angle (GLM's layout)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    k_cache = torch.zeros(blocks, block_size, kv, dim, dtype=dtype)
    slots = torch.randperm(blocks * block_size, generator=g)[:t]
    return qkv, cos, sin, k_cache, k_cache.clone(), slots


def test_rotate_is_hf_arithmetic():
    qkv, cos, sin, *_ = case()
    q, k, v = rotate(qkv, cos, sin, 4, 2, 16)
    ref_q, ref_k = apply_rotary_pos_emb(qkv[:, :64].view(5, 4, 16), qkv[:, 64:96].view(5, 2, 16), cos, sin)
    assert torch.equal(q, ref_q) and torch.equal(k, ref_k) and torch.equal(v, qkv[:, 96:].view(5, 2, 16))
    assert torch.equal(q[..., 8:], qkv[:, :64].view(5, 4, 16)[..., 8:])  # the second half of each head passes


def test_rotate_and_store_writes_each_token_to_its_slot():
    qkv, cos, sin, k_cache, v_cache, slots = case()
    q, k, v = rotate_and_store(qkv, cos, sin, k_cache, v_cache, slots, 4, 2, 16)
    assert torch.equal(k_cache.view(-1, 2, 16)[slots], k) and torch.equal(v_cache.view(-1, 2, 16)[slots], v)
    others = torch.ones(32, dtype=torch.bool)
    others[slots] = False
    assert not k_cache.view(-1, 2, 16)[others].any() and not v_cache.view(-1, 2, 16)[others].any()


INTERPRETED = """
import itertools
import torch
from glyphserve.engine.rotary import rotate
from glyphserve.engine.rotary_kernel import launch
from tests.engine.test_rotary import case

shapes = [(4, 2, 16, 4), (4, 2, 12, 4), (32, 2, 16, 4), (32, 2, 16, 8), (3, 1, 8, 2)]  # 8 heads: a prompt's launch
for dtype in (torch.float32, torch.float16):
    for (heads, kv, dim, per_program), copy_values in itertools.product(shapes, (False, True)):
        qkv, cos, sin, k_cache, v_cache, slots = case(heads=heads, kv=kv, dim=dim, dtype=dtype)
        # into padded outputs (7 rows for 5 tokens), the values copied too where given
        q, k, v = (torch.full((7, n, dim), -9.0, dtype=dtype) for n in (heads, kv, kv))
        launch(qkv, cos, sin, q, k, v if copy_values else None, k_cache, v_cache, slots, heads, kv, dim, per_program)
        ref_q, ref_k, ref_v = rotate(qkv.float(), cos.float(), sin.float(), heads, kv, dim)
        tol = 0 if dtype == torch.float32 else 1e-3
        pairs = [(q[:5], ref_q), (k[:5], ref_k), (k_cache.view(-1, kv, dim)[slots], ref_k),
                 (v_cache.view(-1, kv, dim)[slots], ref_v)] + [(v[:5], ref_v)] * copy_values
        for got, want in pairs:
            assert (got.float() - want).abs().max() <= tol, (dtype, heads, kv, dim)
        assert (q[5:] == -9).all() and (k[5:] == -9).all() and (v[5:] == -9).all()  # rows past T untouched
        others = torch.ones(k_cache.shape[0] * k_cache.shape[1], dtype=torch.bool)
        others[slots] = False
        assert not k_cache.view(-1, kv, dim)[others].any() and not v_cache.view(-1, kv, dim)[others].any()
print("interpreted ok")
"""


def test_triton_kernel_under_the_interpreter():
    run_interpreted(INTERPRETED)


def vision_case(pages=3, seq=6, heads=3, dim=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(pages * seq, 3 * heads * dim, generator=g).to(dtype)
    angles = torch.randn(seq, dim // 2, generator=g).repeat(1, 2)  # halves share angles (the vision layout)
    return qkv, angles.cos().to(dtype), angles.sin().to(dtype)


def test_rotate_vision_is_hf_arithmetic_in_attention_layout():
    qkv, cos, sin = vision_case()
    q, k, v = rotate_vision(qkv, cos, sin, 3, 3, kernel=True)  # on the CPU: HF's arithmetic whatever ``kernel``
    ref_q, ref_k = apply_rotary_pos_emb_vision(*qkv.view(18, 3, 3, 16).unbind(1)[:2], cos.repeat(3, 1),
                                               sin.repeat(3, 1))
    page = lambda t: t.view(3, 6, 3, 16).transpose(1, 2)  # noqa: E731
    assert q.shape == (3, 3, 6, 16)
    assert torch.equal(q, page(ref_q)) and torch.equal(k, page(ref_k))
    assert torch.equal(v, page(qkv.view(18, 3, 3, 16)[:, 2]))


VISION_INTERPRETED = """
import torch
from glyphserve.engine.rotary import rotate_vision
from glyphserve.engine.rotary_kernel import launch_vision
from tests.engine.test_rotary import vision_case

for dtype in (torch.float32, torch.float16):
    for pages, seq, heads, dim, per_program in [(3, 6, 3, 16, 4), (1, 5, 4, 8, 2), (2, 4, 12, 32, 4)]:
        qkv, cos, sin = vision_case(pages, seq, heads, dim, dtype)
        out = torch.empty(pages * seq, 2, heads, dim, dtype=dtype)
        launch_vision(qkv, cos, sin, out, seq, heads, dim, per_program)
        refs = rotate_vision(qkv.float(), cos.float(), sin.float(), pages, heads, kernel=False)
        tol = 1e-6 if dtype == torch.float32 else 1e-3  # (the kernel may fuse a multiply and add)
        for got, want in zip(out.unbind(1), refs[:2]):
            got = got.view(pages, seq, heads, dim).transpose(1, 2)
            assert (got.float() - want).abs().max() <= tol * max(1.0, want.abs().max()), (dtype, pages, heads, dim)
print("interpreted ok")
"""


def test_vision_kernel_under_the_interpreter():
    run_interpreted(VISION_INTERPRETED)


def test_window_convolutions_as_one_matrix_product():
    """The patch embedding and the 2 x 2 downsampling, as the compiled tower runs them."""
    from transformers.models.glm4v.modeling_glm4v import Glm4vVisionModel, Glm4vVisionPatchEmbed

    from glyphserve.engine.tiny import build_tokenizer, tiny_config
    from glyphserve.engine.vision import conv_as_linear

    torch.manual_seed(0)
    config = tiny_config(build_tokenizer()).vision_config
    embed = Glm4vVisionPatchEmbed(config).eval()
    patches = torch.randn(10, embed.in_channels * embed.temporal_patch_size * embed.patch_size**2)
    down = Glm4vVisionModel(config).downsample.eval()
    merge = config.spatial_merge_size
    windows = torch.randn(6, config.hidden_size, merge, merge)
    with torch.inference_mode():
        assert torch.allclose(conv_as_linear(embed.proj, patches), embed(patches), atol=1e-5, rtol=1e-5)
        want = down(windows).view(6, -1)
        assert torch.allclose(conv_as_linear(down, windows.reshape(6, -1)), want, atol=1e-5, rtol=1e-5)
