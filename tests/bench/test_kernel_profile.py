"""``bench profile``'s summary of a trace: busy time as the union of kernel intervals, sums by kind, and a decode
step as what a long answer's trace holds beyond a one-token answer's, per step."""

import pytest

from glyphserve.bench.kernel_profile import kind, per_step, summarize, to_markdown


def kernel(name, ts, dur):
    return {"cat": "kernel", "name": name, "ts": ts, "dur": dur}


GEMV = "nvjet_sm90_tst_128x8_64x12_2x1_v_bz_TNT"
NORM = "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0"


def test_busy_time_is_the_union_of_kernel_intervals_and_sums_go_by_kind():
    trace = {"traceEvents": [
        kernel(GEMV, 0, 10),
        kernel(NORM, 5, 10),  # overlaps the first
        kernel("_attend_kernel", 30, 4),
        kernel(GEMV, 40, 10),
        {"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 100},  # not a kernel
    ]}
    s = per_step(summarize(trace, wall_s=0.0001), steps=2)
    assert s["busy_ms"] == pytest.approx((15 + 4 + 10) / 1e3 / 2) and s["kernel_ms"] == pytest.approx(34 / 1e3 / 2)
    assert s["launches"] == 2 and s["wall_ms"] == pytest.approx(0.05)
    assert s["by_kind_ms"] == pytest.approx({"matmul": 0.01, "compiled": 0.005, "attention": 0.002})
    top = s["kernels"][0]
    assert top["name"] == GEMV and top["kind"] == "matmul" and top["launches"] == 1
    res = {"device": "card", "date": "today", "torch": "t", "transformers": "x", "model": "m", "new_tokens": 2,
           "phases": {"decode": s}}
    assert "| decode | 0.050 | 0.015 | 0.017 | 2 | matmul 0.010" in to_markdown(res, 5)


def test_a_decode_step_is_the_long_answer_less_the_one_token_answer():
    prefill = [kernel(GEMV, 0, 100), kernel("_attend_kernel", 100, 50)]  # the follow-up's prompt pass
    steps = [kernel(GEMV, 200 + 20 * i, 8) for i in range(3)] + [kernel(NORM, 210 + 20 * i, 2) for i in range(3)]
    first = summarize({"traceEvents": prefill}, wall_s=0.001)
    whole = summarize({"traceEvents": prefill + steps}, wall_s=0.0013)
    s = per_step(whole, 3, less=first)
    assert s["launches"] == 2 and s["kernel_ms"] == pytest.approx(0.010) and s["wall_ms"] == pytest.approx(0.1)
    assert s["by_kind_ms"] == pytest.approx({"matmul": 0.008, "compiled": 0.002, "attention": 0.0})
    assert [k["name"] for k in s["kernels"]] == [GEMV, NORM]  # the prompt's attention launched no more: not listed


def test_kinds_of_the_engines_kernels():
    assert kind("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16") == "attention"
    assert kind("_combine_kernel") == "attention"
    assert kind("_fp8_weight_kernel") == "matmul"
    assert kind("void cublasLt::splitKreduce_kernel<32, 16>") == "matmul"
    assert kind("triton_poi_fused_mul_silu_split_1") == "compiled"
    assert kind("void at::native::index_elementwise_kernel<128, 4, index_copy_kernel_impl>") == "copy"
    assert kind("_rotate_store_kernel") == "other"
