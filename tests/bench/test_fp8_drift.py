"""``bench fp8-drift`` on the tiny architecture (at the real weight scale): the FP8 copy's logits stay close to the
16-bit copy's, and a full-size result lands in targets.json beside the other entries."""

from __future__ import annotations

import json

import torch

from glyphserve.bench.fp8_drift import measure, to_markdown, write


def test_fp8_logits_stay_close_to_bf16_and_the_full_size_figure_is_recorded(tmp_path):
    result = measure("tiny", prompt=80, steps=8, device=torch.device("cpu"))
    fp8, bf16 = result["fp8_vs_bf16"], result["bf16_vs_fp32"]
    assert len(fp8["cosine_per_position"]) == 9  # each forced token's logits and the next
    assert 0.98 <= fp8["cosine_min"] <= fp8["cosine_median"] <= 1.0 and 0.0 <= fp8["top1_agreement"] <= 1.0
    assert bf16["cosine_min"] > fp8["cosine_min"]  # 16-bit weights move the logits less than e4m3 ones
    (tmp_path / "targets.json").write_text('{\n "other": {"measured": 1}\n}\n')
    write(result, to_markdown(result), tmp_path)  # tiny: files, no target
    assert json.loads((tmp_path / "targets.json").read_text()) == {"other": {"measured": 1}}
    write({**result, "arch": "glm-4.1v-9b"}, to_markdown(result), tmp_path)
    targets = json.loads((tmp_path / "targets.json").read_text())
    assert targets["other"] == {"measured": 1}
    entry = targets["fp8_logit_cosine"]
    assert entry["measured"] == fp8["cosine_min"] and entry["met"] and "weight rounding only" in entry["card"]
    assert (tmp_path / "fp8-drift-cpu.json").is_file() and (tmp_path / "fp8-drift-cpu.md").is_file()
