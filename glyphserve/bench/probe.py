"""Exactness of the engine on a GPU, and the reference helpers the benchmarks share.

``python -m glyphserve.bench.probe --out DIR``: the tiny checkpoint in float32 on CUDA, every fast path on (CUDA
graphs, the Triton paged-attention kernel, decode one step ahead, continuous batching, prefix sharing), against
processor + ``generate``, token for token. Helpers: HF processor inputs and ``generate``, copy bandwidth,
synthetic pages.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


class Results(dict):
    """Measurements so far, rewritten to disk after every stage (a run cut off by its time limit keeps them)."""

    path: Path | None = None

    def save(self) -> None:
        if self.path is not None:
            self.path.write_text(json.dumps(self, indent=2, default=str))


def log(*parts) -> None:
    print(*parts, flush=True)


def synthetic_pages(n: int, height: int = 840, width: int = 588, seed: int = 0) -> list[np.ndarray]:
    """Text-like pages: dark glyph-sized blobs on white lines (latency does not depend on content)."""
    rng = np.random.default_rng(seed)
    pages = []
    for _ in range(n):
        page = np.full((height, width, 3), 255, dtype=np.uint8)
        for top in range(20, height - 20, 18):
            ink = rng.random((11, width - 40)) < 0.35
            page[top : top + 11, 20 : width - 20][ink] = rng.integers(0, 90)
        pages.append(page)
    return pages


def hf_processor(tokenizer, image_processor):
    """Hugging Face's Glm4vProcessor for images alone (it insists on a video processor, which needs torchvision;
    images never touch it)."""
    from transformers.models.glm4v.processing_glm4v import Glm4vProcessor

    class ImageOnlyProcessor(Glm4vProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name != "video_processor":
                return super().check_argument_for_proper_class(argument_name, argument)

    return ImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                              chat_template=tokenizer.chat_template)


def hf_inputs(processor, pages, question, history=(), device="cuda"):
    from PIL import Image

    images = [{"type": "image", "image": Image.fromarray(p)} for p in pages]
    messages, placed = [], False
    for role, content in history:
        if role == "user" and not placed:
            messages.append({"role": role, "content": [*images, {"type": "text", "text": content}]})
            placed = True
        else:
            messages.append({"role": role, "content": content})
    messages.append({"role": "user", "content": [*([] if placed else images), {"type": "text", "text": question}]})
    inputs = processor.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    return inputs.to(device)


def hf_generate(model, inputs, n: int, ignore_eos: bool = True) -> tuple[list[int], list[float]]:
    """Greedy tokens of ``generate`` and, per step, the gap between its two best scores."""
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n if ignore_eos else None, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
    gaps = [float(step[0].float().topk(2).values.diff().abs()) for step in out.scores]
    return out.sequences[0, inputs["input_ids"].shape[1] :].tolist(), gaps


def agreement(answers: list, references: list[tuple[list[int], list[float]]]) -> bool | list[dict]:
    """True when every answer's tokens equal its reference's; else, per differing answer, where it first differs
    and how close ``generate``'s two best scores were there (a gap near float32 rounding is a tie that any
    reordered sum may break; a wide one is a bug)."""
    diffs = []
    for i, (answer, (tokens, gaps)) in enumerate(zip(answers, references, strict=True)):
        got = answer.token_ids
        if got != tokens:
            at = next((j for j, (a, b) in enumerate(zip(got, tokens)) if a != b), min(len(got), len(tokens)))
            diffs.append({"answer": i, "first_difference": at, "lengths": [len(got), len(tokens)],
                          "hf_top2_gap": gaps[at] if at < len(gaps) else None})
    return diffs or True


def check_tiny(results: dict) -> None:
    """Token-for-token equality with generate on CUDA (float32), every fast path on but the compiled vision tower
    (the engine compiles it for 16-bit weights only)."""
    from transformers import AutoTokenizer, Glm4vForConditionalGeneration
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    from glyphserve.engine import AnswerRequest, ChatMessage, Engine, EngineConfig, GenerationSettings
    from glyphserve.engine.tiny import make_tiny_model

    path = make_tiny_model(Path(tempfile.mkdtemp()) / "tiny")
    try:
        from transformers import AutoProcessor

        results["tiny_autoprocessor"] = type(AutoProcessor.from_pretrained(path)).__name__
    except Exception as exc:  # reported, not fatal: the engine does not use AutoProcessor
        results["tiny_autoprocessor"] = f"failed: {exc}"
    tokenizer = AutoTokenizer.from_pretrained(path)
    processor = hf_processor(tokenizer, Glm4vImageProcessorPil.from_pretrained(path))
    model = Glm4vForConditionalGeneration.from_pretrained(path, attn_implementation="sdpa").to("cuda").eval()
    engine = Engine.load(EngineConfig(model=str(path), device="cuda", dtype="float32", max_context=4096,
                                      max_num_seqs=16))
    rng = np.random.default_rng(1)
    pages = [rng.integers(0, 256, s + (3,), dtype=np.uint8) for s in [(112, 140), (168, 196), (140, 112)]]
    n = 24

    def req(p, q, history=(), **kw):
        return AnswerRequest(
            pages=p,
            question=q,
            history=[ChatMessage(r, c) for r, c in history],
            settings=GenerationSettings(**{"max_tokens": n, "ignore_eos": True, **kw}),
        )

    checks = {}
    cold = engine.answer(req(pages, "Who is the wolf?"))
    checks["cold_static_cache_graphs"] = agreement([cold], [hf_generate(
        model, hf_inputs(processor, pages, "Who is the wolf?"), n)])
    follow = engine.answer(req(pages, "What did the girl carry?"))
    checks["prefix_kv_follow_up"] = follow.cache.prefix_reused_tokens > 0 and agreement([follow], [hf_generate(
        model, hf_inputs(processor, pages, "What did the girl carry?"), n)])
    engine.clear_caches(vision=False, prefix=True)
    hit = engine.answer(req(pages, "Where?"))
    checks["vision_cache_hit"] = hit.cache.vision_hits == 3 and agreement([hit], [hf_generate(
        model, hf_inputs(processor, pages, "Where?"), n)])
    history = [("user", "Who is the wolf?"), ("assistant", cold.text)]
    turn = engine.answer(req(pages, "And the grandmother?", history))
    checks["multi_turn"] = turn.cache.prefix_reused_tokens > 0 and agreement([turn], [hf_generate(
        model, hf_inputs(processor, pages, "And the grandmother?", history), n)])
    cases = [
        (pages[:1], "Who?"),
        (pages, "Who pretended to be the grandmother?"),
        (pages[1:], "Why did the wolf run ahead?"),
    ]
    batch = engine.answer_batch([req(p, q) for p, q in cases])
    checks["batch_of_3"] = agreement(batch, [hf_generate(model, hf_inputs(processor, p, q), n) for p, q in cases])
    stops = [
        engine.answer(AnswerRequest(pages=pages[:1], question=q, settings=GenerationSettings(max_tokens=40)))
        for q in ("Who?", "Why did the wolf run?")
    ]
    checks["stop_tokens"] = agreement(stops, [
        hf_generate(model, hf_inputs(processor, pages[:1], q), 40, ignore_eos=False)
        for q in ("Who?", "Why did the wolf run?")
    ])
    many = [(pages[i % 3 :], f"Question {i}?") for i in range(16)]
    answers = engine.answer_batch([req(p, q) for p, q in many])
    checks["batch_of_16_sharing_prefixes"] = agreement(answers, [
        hf_generate(model, hf_inputs(processor, p, q), n) for p, q in many
    ])
    # Every session's next turn at once, the answers as history: more prompt tokens than a graph step has rows, so
    # one pass over paged chunks, replayed from a captured pass (``pass_graphs``)
    wave = [(p, f"And what happened next in part {i}?", [("user", q), ("assistant", a.text)])
            for i, ((p, q), a) in enumerate(zip(many, answers))]
    before = engine.stats()["graph_passes"]
    waved = engine.answer_batch([req(p, q, h) for p, q, h in wave])
    checks["follow_up_wave_as_a_captured_pass"] = engine.stats()["graph_passes"] > before and agreement(waved, [
        hf_generate(model, hf_inputs(processor, p, q, h), n) for p, q, h in wave
    ])
    small = Engine.load(EngineConfig(model=str(path), device="cuda", dtype="float32", max_context=320,
                                     num_kv_blocks=41, max_num_seqs=4))
    long = [(pages[i % 3 : i % 3 + 1], f"Tell me about part {i} of the story.") for i in range(4)]
    answers = small.answer_batch([req(p, q, max_tokens=120) for p, q in long])
    checks["preempted_and_recomputed"] = small.stats()["preemptions"] > 0 and agreement(answers, [
        hf_generate(model, hf_inputs(processor, p, q), 120) for p, q in long
    ])
    results["tiny_cuda_exactness"] = checks
    results["tiny_cuda_all_equal"] = all(value is True for value in checks.values())
    results["tiny_compiled_vision"] = engine.compiled_vision
    results["tiny_graphs"] = len(engine.runner.graphs)
    stats = engine.stats()
    results["tiny_stats"] = {k: stats[k] for k in ("steps", "graph_steps", "decode_steps", "decode_rows", "row_chunks",
                                                   "graph_passes")}
    log("tiny exactness on CUDA:", checks)
    results.save()
    del engine, model


def timed(fn, repeat: int = 3):
    """(median seconds, last result) of fn() with the device synchronised around each call."""
    times, result = [], None
    for _ in range(repeat):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main(argv=None) -> int:
    from glyphserve.bench.engine import copy_bandwidth

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args(argv)
    import transformers

    results = Results(
        {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(0),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": sys.version.split()[0],
        }
    )
    results["copy_bandwidth_Bps"] = copy_bandwidth("cuda")
    log(json.dumps(results))
    args.out.mkdir(parents=True, exist_ok=True)
    results.path = args.out / "engine-probe.json"
    try:
        check_tiny(results)
    finally:
        results.save()
        log("wrote", results.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
