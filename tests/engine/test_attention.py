"""Paged attention: the PyTorch reference against a naive dense oracle, the custom op, and the Triton kernel
under Triton's CPU interpreter (in a subprocess: TRITON_INTERPRET must be set before Triton is imported)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from glyphserve.engine.attention import (paged_attention, paged_attention_batched, paged_attention_reference,
                                         paged_attention_rows, paged_attention_tiles, query_tiles, shared_row_tiles,
                                         shared_tiles, tile_tokens)
from tests.engine.paged_cases import CASES, make_case, make_rows_case

ROOT = Path(__file__).resolve().parents[2]


def dense_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start, scale):
    """Token by token: gather each sequence's K/V by position, then per query head a causal softmax in float64."""
    n_heads, kv_heads = q.shape[1], k_cache.shape[2]
    block_size = k_cache.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for i in range(block_tables.shape[0]):
        seq_len, first, last = int(seq_lens[i]), int(query_start[i]), int(query_start[i + 1])
        keys = torch.stack([k_cache[block_tables[i, p // block_size], p % block_size] for p in range(seq_len)]) \
            if seq_len else torch.zeros(0, kv_heads, q.shape[2])
        values = torch.stack([v_cache[block_tables[i, p // block_size], p % block_size] for p in range(seq_len)]) \
            if seq_len else torch.zeros(0, kv_heads, q.shape[2])
        for j in range(last - first):
            position = seq_len - (last - first) + j
            if position < 0:
                continue
            for h in range(n_heads):
                kv = h // (n_heads // kv_heads)
                scores = keys[: position + 1, kv].double() @ q[first + j, h].double() * scale
                out[first + j, h] = torch.softmax(scores, 0) @ values[: position + 1, kv].double()
    return out


@pytest.mark.parametrize("implementation", [paged_attention_reference, paged_attention_batched])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_reference_matches_dense_attention(case, implementation):
    inputs = make_case(case, seed=1)
    out = torch.full_like(inputs.q, float("nan"))
    implementation(*inputs.args, out=out)
    assert not out.isnan().any(), "every element of out is written"
    expected = dense_attention(inputs.q, inputs.k_cache, inputs.v_cache, inputs.block_tables, inputs.seq_lens,
                               inputs.query_start, inputs.scale)
    tolerance = 1e-5 if case.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), expected, atol=tolerance, rtol=tolerance)
    assert (out[inputs.zero_rows] == 0).all()


def test_op_on_cpu_runs_the_batched_path_and_fills_out():
    inputs = make_case(CASES[0], seed=2)
    out = torch.full_like(inputs.q, float("nan"))
    returned = paged_attention(*inputs.args, out=out)
    assert returned is out
    torch.testing.assert_close(out, paged_attention_batched(*inputs.args), rtol=0, atol=0)
    fresh = paged_attention(*inputs.args)
    torch.testing.assert_close(fresh, out, rtol=0, atol=0)


def test_op_is_a_registered_custom_op():
    inputs = make_case(CASES[0], seed=3)
    out = torch.empty_like(inputs.q)
    torch.library.opcheck(torch.ops.glyphserve.paged_attention, (*inputs.args, out),
                          test_utils=("test_schema", "test_faketensor"))


def test_bad_shapes_are_refused_before_any_work():
    inputs = make_case(CASES[0], seed=4)
    q, k_cache, v_cache, block_tables, seq_lens, query_start, scale, max_query_len = inputs.args
    with pytest.raises(ValueError, match="multiple of KV heads"):
        paged_attention(q[:, :3], k_cache, v_cache, block_tables, seq_lens, query_start, scale, max_query_len)
    with pytest.raises(ValueError, match="int32"):
        paged_attention(q, k_cache, v_cache, block_tables.long(), seq_lens, query_start, scale, max_query_len)
    with pytest.raises(ValueError, match=r"query_start \[S \+ 1\]"):
        paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start[:-1], scale, max_query_len)
    with pytest.raises(ValueError, match="caches are"):
        paged_attention(q, k_cache.double(), v_cache, block_tables, seq_lens, query_start, scale, max_query_len)
    mixed = make_case(next(c for c in CASES if c.name == "mixed-prefill-decode"), seed=4)
    with pytest.raises(ValueError, match="more than max_query_len"):
        paged_attention_reference(*mixed.args[:-1], 1)


def test_triton_kernel_under_the_interpreter_matches_the_reference():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-m", "tests.engine.paged_interpreted"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = {f"rows-sharing-keys-{h}-heads-{s}-sms" for h, s in ((32, 1), (32, 8), (4, 8))}
    tiles = {f"tiles-{c.name}-{s}-sms" for c in CASES if c.interpreted for s in (1, 64)}
    tiles |= {f"tiles-as-a-captured-pass-{s}-sms" for s in (1, 64)}
    assert {r["name"] for r in results} >= {c.name for c in CASES if c.interpreted} | rows | tiles
    assert all(r["shared"] > 0 for r in results if r["name"] in rows)  # the shared launch read keys
    for r in results:
        assert r["unwritten"] == 0 and r.get("padding_nonzero", 0) == 0, r
        assert r["max_error"] <= r["tolerance"], r


def test_shared_tiles_groups_consecutive_rows_over_the_blocks_they_all_hold():
    rows = make_rows_case()
    share, tiles = shared_tiles(rows.tables.numpy(), rows.seq_lens.numpy().astype("int64"), 4, tile_rows=4)
    # Five sessions on one document: a tile of four sharing its 4 blocks, then one alone (nothing shared); a
    # session of its own; a chunk's three rows share the 3 blocks all of them see whole (14 keys: 3 blocks).
    # Two rows that share all 16 of their keys (their own launch reads none).
    assert tiles.tolist() == [4, 0, 0, 0, 1, 1, 3, 0, 0, 2, 0, 1]
    assert share.tolist() == [16, 16, 16, 16, 0, 0, 12, 12, 12, 16, 16, 0]
    assert shared_row_tiles(32, 2) == 4 and shared_row_tiles(4, 2) == 32


def test_rows_op_off_triton_is_paged_attention():
    rows = make_rows_case()
    share, tiles = shared_tiles(rows.tables.numpy(), rows.seq_lens.numpy().astype("int64"), 4, tile_rows=4)
    args = (rows.q, rows.k_cache, rows.v_cache, rows.tables, rows.seq_lens, rows.query_start)
    out = paged_attention_rows(*args, torch.from_numpy(share).int(), torch.from_numpy(tiles).int(), rows.scale,
                               out=torch.empty_like(rows.q))
    torch.testing.assert_close(out, paged_attention_reference(*args, rows.scale, 1))


def test_query_tiles_list_each_sequences_tiles_then_none():
    assert tile_tokens(32, 2) == 4 and tile_tokens(4, 2) == 32  # 64-row tiles of (token, group head) pairs
    tiles = query_tiles([5, 1, 0, 8], 4, 8)
    assert tiles.dtype == "int32"
    assert [(t >> 16, t & 65535) if t >= 0 else None for t in tiles.tolist()] == [
        (0, 0), (0, 1), (1, 0), (3, 0), (3, 1), None, None, None]
    with pytest.raises(ValueError, match="do not fit"):
        query_tiles([5, 1, 0, 8], 4, 4)


def test_tiles_op_off_triton_is_paged_attention():
    case = make_case(next(c for c in CASES if c.name == "mixed-prefill-decode"), seed=2)
    lens = (case.query_start[1:] - case.query_start[:-1]).numpy()
    tiles = torch.from_numpy(query_tiles(lens, 4, 12))
    out = paged_attention_tiles(*case.args[:6], tiles, case.scale, out=torch.empty_like(case.q))
    torch.testing.assert_close(out, paged_attention_reference(*case.args))
    with pytest.raises(ValueError, match="tiles must be int32"):
        paged_attention_tiles(*case.args[:6], tiles.long(), case.scale, out=torch.empty_like(case.q))


def test_rows_op_checks_the_tiles_it_is_given():
    rows = make_rows_case()
    args = (rows.q, rows.k_cache, rows.v_cache, rows.tables, rows.seq_lens, rows.query_start)
    n = rows.q.shape[0]
    with pytest.raises(ValueError, match="share must be int32"):
        paged_attention_rows(*args, torch.zeros(n, dtype=torch.int64), torch.ones(n, dtype=torch.int32), rows.scale,
                             out=torch.empty_like(rows.q))
    with pytest.raises(ValueError, match="tiles must be int32"):
        paged_attention_rows(*args, torch.zeros(n, dtype=torch.int32), torch.ones(n - 1, dtype=torch.int32),
                             rows.scale, out=torch.empty_like(rows.q))


_ATTEND_ARGS = ["q_ptr", "k_ptr", "v_ptr", "tables_ptr", "seq_lens_ptr", "query_start_ptr", "key_start_ptr",
                "part_max_ptr", "part_sum_ptr", "part_acc_ptr", "qk_scale", "q_stride_t", "q_stride_h",
                "k_stride_b", "k_stride_s", "k_stride_h", "v_stride_b", "v_stride_s", "v_stride_h",
                "tables_stride", "query_tiles", "splits", "n_heads", "part_splits", "part_offset", "out_ptr",
                "out_stride_t", "out_stride_h"]


def test_decode_plans_with_a_step_a_split_run_unpipelined():
    """One or two decode rows spread over 132 SMs: their splits hold about one loop step, and the loop runs with one
    stage (measured faster inside a decode layer); more rows, and prompt tiles, keep three."""
    from glyphserve.engine.attention import plan_launch

    one = plan_launch(1, 32, 2, 1, 32768, 132)
    assert (one.splits, one.stages(2)) == (132, 1)
    assert plan_launch(2, 32, 2, 1, 32768, 132).stages(2) == 1
    assert plan_launch(8, 32, 2, 1, 32768, 132).stages(2) == 3
    assert plan_launch(1, 32, 2, 47, 32768, 132).stages(2) == 3  # a follow-up's queries
    assert plan_launch(1, 32, 2, 1, 4096, 132).splits == 32  # no more splits than steps in the table's capacity
    assert plan_launch(8, 32, 2, 1, 32768, 132).stages(4) == 1  # fp32 caches: see the next test


# Shared memory a block may take (the opt-in limit Triton checks at launch) on Ampere/Ada cards other than the A100.
SM86_SHARED_BYTES = 101_376


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="builds for a GPU: not under the interpreter")
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("rows,queries", [(8, 1), (1, 64)])  # decode rows; a prompt chunk's tiles
def test_the_kernel_fits_the_shared_memory_of_a_24_gb_ampere_or_ada_card(dtype, rows, queries):
    """GLM-4.1V-9B's heads at the stages the launcher picks, built for sm_86 (RTX 3090, A10; sm_89's limit is the
    same): with fp32 caches three stages took up to 148 KB, and the engine failed at its first launch there."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from glyphserve.engine.attention import _attend_kernel, line_values, plan_launch

    element = 4 if dtype == "fp32" else 2
    plan = plan_launch(rows, 32, 2, queries, 32768, 82)  # an RTX 3090's 82 SMs
    types = [f"*{dtype}"] * 3 + ["*i32"] * 4 + ["*fp32"] * 3 + ["fp32"] + ["i32"] * 14 + [f"*{dtype}"] + ["i32"] * 2
    constants = dict(DIRECT=False, GROUP=16, GROUP_PAD=plan.group_pad, HEAD_DIM=128, PAGE=16, BLOCK_M=plan.block_m,
                     BLOCK_N=plan.block_n, PRECISION="ieee" if dtype == "fp32" else "tf32", PDL=False, MODE=0,
                     LINE=line_values(128, element))
    signature = {**dict(zip(_ATTEND_ARGS, types)), **dict.fromkeys(constants, "constexpr")}
    try:
        kernel = triton.compile(ASTSource(fn=_attend_kernel, signature=signature, constexprs=constants),
                                target=GPUTarget("cuda", 86, 32),
                                options={"num_warps": 4, "num_stages": plan.stages(element)})
    except RuntimeError as exc:  # a Triton without its CUDA tool chain (ptxas) cannot build for a GPU at all
        if "ptxas" in str(exc):
            pytest.skip(str(exc))
        raise
    assert kernel.metadata.shared <= SM86_SHARED_BYTES, kernel.metadata.shared


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="builds for a GPU: not under the interpreter")
@pytest.mark.parametrize("head_dim,dtype,mode,stages,direct", [
    (16, "fp32", 0, 3, False), (32, "fp16", 3, 3, True), (32, "bf16", 2, 3, False), (64, "fp32", 1, 3, False),
    (128, "bf16", 0, 3, False), (128, "bf16", 0, 1, False), (128, "bf16", 3, 3, True), (128, "bf16", 3, 3, False)])
def test_kernel_with_programmatic_dependent_launch_compiles_for_hopper(head_dim, dtype, mode, stages, direct):
    """The kernel as a Hopper GPU runs it (PDL on: its key prefetch before the wait, which the interpreter never
    runs), compiled here for sm_90 (no GPU needed), for heads whose rows are shorter than a 128-byte line too (the
    tiny model's 32 values in 16 bits)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from glyphserve.engine.attention import _attend_kernel, line_values

    element = {"fp32": 4, "fp16": 2, "bf16": 2}[dtype]
    partials = [f"*{dtype}"] * 3 if direct else ["*fp32"] * 3  # (unused when direct: the launcher passes out)
    types = [f"*{dtype}"] * 3 + ["*i32"] * 4 + partials + ["fp32"] + ["i32"] * 14 + [f"*{dtype}"] + ["i32"] * 2
    signature = dict(zip(_ATTEND_ARGS, types))
    group = 16
    constants = dict(DIRECT=direct, GROUP=group, GROUP_PAD=group, HEAD_DIM=head_dim, PAGE=16,
                     BLOCK_M=16 if mode == 0 else 64, BLOCK_N=128 if mode == 0 else 64, PRECISION="ieee" if dtype == "fp32" else "tf32", PDL=True,
                     MODE=mode, LINE=line_values(head_dim, element))
    signature.update(dict.fromkeys(constants, "constexpr"))
    try:
        kernel = triton.compile(ASTSource(fn=_attend_kernel, signature=signature, constexprs=constants),
                                target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": stages})
    except RuntimeError as exc:  # a Triton without its CUDA tool chain (ptxas) cannot build for a GPU at all
        if "ptxas" in str(exc):
            pytest.skip(str(exc))
        raise
    ptx = kernel.asm["ptx"]
    assert "prefetch.global.L2" in ptx and "griddepcontrol.wait" in ptx
    assert ptx.index("prefetch.global.L2") < ptx.index("griddepcontrol.wait")  # the keys start before the wait
