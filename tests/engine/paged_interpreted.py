"""Runs the Triton paged-attention kernel under Triton's CPU interpreter against the reference; prints one JSON
line of per-case results. Started by tests/engine/test_attention.py in a subprocess with TRITON_INTERPRET=1."""

from __future__ import annotations

import json
import os

import torch
import triton.runtime.interpreter as interpreter

from tests.engine.paged_cases import CASES, make_case, make_rows_case


def _fix_scalar_index() -> None:
    """Triton 3.6's interpreter turns a loaded scalar (a 1-element array) into a loop bound with int(array), which
    numpy >= 2.4 refuses; fixed upstream after 3.6 (triton-lang/triton#9171)."""
    patch = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patched


def main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    _fix_scalar_index()
    from glyphserve.engine.attention import (paged_attention_reference, paged_attention_rows_triton,
                                             paged_attention_tiles_triton, paged_attention_triton, query_tiles,
                                             shared_row_tiles, shared_tiles, tile_tokens)

    results = []
    for case in CASES:
        if not case.interpreted:
            continue
        inputs = make_case(case, seed=5)
        out = torch.full_like(inputs.q, float("nan"))
        paged_attention_triton(*inputs.args, out, splits=case.splits)
        expected = paged_attention_reference(*inputs.args)
        results.append({
            "name": case.name,
            "unwritten": int(out.isnan().sum()),
            "max_error": float((out.float() - expected.float()).abs().nan_to_num(float("inf")).max()),
            "tolerance": 1e-5 if case.dtype == torch.float32 else 2e-3,
        })
    import glyphserve.engine.attention as attention

    # The programs from a list of tiles, with spare entries (-1) past them, on one SM and on 64 (splits).
    for sms in (1, 64):
        attention._sm_count = lambda device, sms=sms: sms
        for case in CASES:
            if not case.interpreted:
                continue
            inputs = make_case(case, seed=6)
            lens = (inputs.query_start[1:] - inputs.query_start[:-1]).numpy()
            tokens = tile_tokens(case.n_heads, case.kv_heads)
            tiles = query_tiles(lens, tokens, int((-(-lens // tokens)).sum()) + 3)
            out = torch.full_like(inputs.q, float("nan"))
            args = inputs.args[:6]
            paged_attention_tiles_triton(*args, torch.from_numpy(tiles), inputs.scale, out)
            expected = paged_attention_reference(*inputs.args)
            results.append({
                "name": f"tiles-{case.name}-{sms}-sms",
                "unwritten": int(out.isnan().sum()),
                "max_error": float((out.float() - expected.float()).abs().nan_to_num(float("inf")).max()),
                "tolerance": 1e-5 if case.dtype == torch.float32 else 2e-3,
            })
        # As a captured pass lays them out (``pass_graphs``): padding sequences (no queries, no keys, tables of
        # garbage) after the real ones, padding rows past the last query, spare tiles.
        inputs = make_case(next(c for c in CASES if c.name == "mixed-prefill-decode"), seed=7)
        n, seqs, rows, spare = int(inputs.query_start[-1]), inputs.seq_lens.shape[0], 32, 8
        lens = (inputs.query_start[1:] - inputs.query_start[:-1]).numpy()
        tokens = tile_tokens(inputs.q.shape[1], inputs.k_cache.shape[2])
        q = torch.randn(rows, *inputs.q.shape[1:])
        q[:n] = inputs.q[:n]
        tables = torch.randint(-(2**20), 2**20, (seqs + spare, inputs.block_tables.shape[1]), dtype=torch.int32)
        tables[:seqs] = inputs.block_tables
        seq_lens = torch.cat([inputs.seq_lens, torch.zeros(spare, dtype=torch.int32)])
        starts = torch.cat([inputs.query_start, torch.full((spare,), n, dtype=torch.int32)])
        tiles = query_tiles(lens, tokens, rows // tokens + seqs + spare)
        out = torch.full_like(q, float("nan"))
        paged_attention_tiles_triton(q, inputs.k_cache, inputs.v_cache, tables, seq_lens, starts,
                                     torch.from_numpy(tiles), inputs.scale, out)
        expected = paged_attention_reference(*inputs.args)
        results.append({
            "name": f"tiles-as-a-captured-pass-{sms}-sms",
            "unwritten": int(out.isnan().sum()),
            "padding_nonzero": int((out[n:] != 0).sum()),
            "max_error": float((out[:n] - expected[:n]).abs().nan_to_num(float("inf")).max()),
            "tolerance": 1e-5,
        })

    # GLM's group of 16 heads a KV head (tiles of 4 rows) and a group of 2 (tiles of 32), with the splits of one
    # SM and of eight (several splits in each launch: the partials' offsets).
    for heads, sms in ((32, 1), (32, 8), (4, 8)):
        attention._sm_count = lambda device, sms=sms: sms
        rows = make_rows_case(n_heads=heads)
        share, tiles = shared_tiles(rows.tables.numpy(), rows.seq_lens.numpy().astype("int64"),
                                    rows.k_cache.shape[1], shared_row_tiles(rows.q.shape[1], rows.k_cache.shape[2]))
        out = torch.full_like(rows.q, float("nan"))
        args = (rows.q, rows.k_cache, rows.v_cache, rows.tables, rows.seq_lens, rows.query_start)
        paged_attention_rows_triton(*args, torch.from_numpy(share).int(), torch.from_numpy(tiles).int(), rows.scale,
                                    out)
        expected = paged_attention_reference(*args, rows.scale, 1)
        results.append({"name": f"rows-sharing-keys-{heads}-heads-{sms}-sms", "unwritten": int(out.isnan().sum()),
                        "shared": int(share.sum()), "tolerance": 1e-5,
                        "max_error": float((out - expected).abs().nan_to_num(float("inf")).max())})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
