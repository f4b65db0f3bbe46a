"""``bench profile``'s summary of a trace: busy time as the union of kernel intervals, sums by kind, per step."""

from glyphserve.bench.kernel_profile import kind, summarize, to_markdown


def kernel(name, ts, dur):
    return {"cat": "kernel", "name": name, "ts": ts, "dur": dur}


def test_busy_time_is_the_union_of_kernel_intervals_and_sums_go_by_kind():
    trace = {"traceEvents": [
        kernel("nvjet_sm90_tst_128x8_64x12_2x1_v_bz_TNT", 0, 10),
        kernel("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", 5, 10),  # overlaps the first
        kernel("_attend_kernel", 30, 4),
        kernel("nvjet_sm90_tst_128x8_64x12_2x1_v_bz_TNT", 40, 10),
        {"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 100},  # not a kernel
    ]}
    s = summarize(trace, wall_s=0.0001, steps=2)
    assert s["busy_ms"] == (15 + 4 + 10) / 1e3 / 2 and s["kernel_ms"] == 34 / 1e3 / 2
    assert s["launches"] == 2 and s["wall_ms"] == 0.05
    assert s["by_kind_ms"] == {"matmul": 0.01, "compiled": 0.005, "attention": 0.002}
    top = s["kernels"][0]
    assert top["kind"] == "matmul" and top["launches"] == 1 and top["ms"] == 0.01
    res = {"device": "card", "date": "today", "torch": "t", "transformers": "x", "model": "m", "new_tokens": 2,
           "phases": {"decode": s}}
    assert "| decode | 0.050 | 0.015 | 0.017 | 2 | matmul 0.010" in to_markdown(res, 5)


def test_kinds_of_the_engines_kernels():
    assert kind("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16") == "attention"
    assert kind("_combine_kernel") == "attention"
    assert kind("_fp8_weight_kernel") == "matmul"
    assert kind("void cublasLt::splitKreduce_kernel<32, 16>") == "matmul"
    assert kind("triton_poi_fused_mul_silu_split_1") == "compiled"
    assert kind("void at::native::index_elementwise_kernel<128, 4, index_copy_kernel_impl>") == "copy"
    assert kind("_rotate_store_kernel") == "other"
