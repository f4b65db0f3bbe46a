"""First GPU measurements of the engine: ``python -m glyphserve.bench.probe --out DIR``.

1. Exactness on the device: the tiny checkpoint in float32 on CUDA (CUDA graphs, pipelined decode, batching)
   against processor + ``generate``, token for token.
2. Speed with ``--random-weights glm-4.1v-9b`` (bf16): an 8-page document (840x588 synthetic pages, 630 vision
   tokens each) and a 64-token answer with EOS ignored; plain ``generate`` against the engine (cold, vision-cache
   hit + new question, prefix-KV follow-up, batch of 4), decode ms/token against the weight-streaming floor,
   vision encode eager / compiled, peak memory.
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


def copy_bandwidth(device) -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    src = torch.randn(2**28, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * 2**30 / statistics.median(times)


def hf_processor(tokenizer, image_processor):
    from transformers.models.glm4v.processing_glm4v import Glm4vProcessor
    from transformers.models.glm4v.video_processing_glm4v import Glm4vVideoProcessor

    return Glm4vProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Glm4vVideoProcessor(),
        chat_template=tokenizer.chat_template,
    )


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


def hf_generate(model, inputs, n: int, ignore_eos: bool = True) -> list[int]:
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n if ignore_eos else None, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def check_tiny(results: dict) -> None:
    """Token-for-token equality with generate on CUDA (float32), every fast path on."""
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
    engine = Engine.load(EngineConfig(model=str(path), device="cuda", dtype="float32", max_context=4096))
    rng = np.random.default_rng(1)
    pages = [rng.integers(0, 256, s + (3,), dtype=np.uint8) for s in [(112, 140), (168, 196), (140, 112)]]
    n = 24

    def req(p, q, history=(), **kw):
        return AnswerRequest(
            pages=p,
            question=q,
            history=[ChatMessage(r, c) for r, c in history],
            settings=GenerationSettings(max_tokens=n, ignore_eos=True, **kw),
        )

    checks = {}
    cold = engine.answer(req(pages, "Who is the wolf?"))
    checks["cold_static_cache_graphs"] = cold.token_ids == hf_generate(
        model, hf_inputs(processor, pages, "Who is the wolf?"), n
    )
    follow = engine.answer(req(pages, "What did the girl carry?"))
    checks["prefix_kv_follow_up"] = follow.cache.prefix_reused_tokens > 0 and follow.token_ids == hf_generate(
        model, hf_inputs(processor, pages, "What did the girl carry?"), n
    )
    engine.clear_caches(vision=False, prefix=True)
    hit = engine.answer(req(pages, "Where?"))
    checks["vision_cache_hit"] = hit.cache.vision_hits == 3 and hit.token_ids == hf_generate(
        model, hf_inputs(processor, pages, "Where?"), n
    )
    history = [("user", "Who is the wolf?"), ("assistant", cold.text)]
    turn = engine.answer(req(pages, "And the grandmother?", history))
    checks["multi_turn"] = turn.cache.prefix_reused_tokens > 0 and turn.token_ids == hf_generate(
        model, hf_inputs(processor, pages, "And the grandmother?", history), n
    )
    cases = [
        (pages[:1], "Who?"),
        (pages, "Who pretended to be the grandmother?"),
        (pages[1:], "Why did the wolf run ahead?"),
    ]
    batch = engine.answer_batch([req(p, q) for p, q in cases])
    checks["batch_of_3"] = [a.token_ids for a in batch] == [
        hf_generate(model, hf_inputs(processor, p, q), n) for p, q in cases
    ]
    stops = [
        engine.answer(AnswerRequest(pages=pages[:1], question=q, settings=GenerationSettings(max_tokens=40)))
        for q in ("Who?", "Why did the wolf run?")
    ]
    checks["stop_tokens"] = [a.token_ids for a in stops] == [
        hf_generate(model, hf_inputs(processor, pages[:1], q), 40, ignore_eos=False)
        for q in ("Who?", "Why did the wolf run?")
    ]
    results["tiny_cuda_exactness"] = checks
    results["tiny_graphs"] = len(engine.runner.graphs)
    log("tiny exactness on CUDA:", checks)
    results.save()
    del engine, model


def decode_variants(results: dict, engine, prompt_tokens: int) -> None:
    """ms per decode step (graph replay, span 8192) with the pieces around attention eager or compiled, and the
    compiled step's kernel time from the profiler (what graph replay cannot remove)."""
    from glyphserve.engine.runner import LMRunner

    def per_step(runner, b: int) -> float:
        runner.tokens[:b] = 100
        runner.cache_pos[:b] = prompt_tokens
        runner.rope_pos[:b] = prompt_tokens
        runner.active[:b] = 1
        graph = runner.graphs[(b, 8192)]
        for _ in range(3):
            graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 50

    out = {}
    t0 = time.perf_counter()
    plain = LMRunner(engine.model, 4, 16384, engine.device, engine.dtype, compile=False)
    plain.capture_graphs([1, 4], spans=[8192])
    out["eager_pieces_capture_s"] = time.perf_counter() - t0
    for b in (1, 4):
        out[f"eager_pieces_b{b}_ms"] = per_step(plain, b)
        out[f"compiled_pieces_b{b}_ms"] = per_step(engine.runner, b)
    del plain
    torch.cuda.empty_cache()
    runner = engine.runner
    runner.cache_pos[:1] = prompt_tokens
    with torch.inference_mode(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        runner._decode_body(1, 8192)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    out["compiled_step_kernels"] = len(kernels)
    out["compiled_step_kernel_ms"] = sum(e.device_time for e in kernels) / 1e3
    top: dict[str, float] = {}
    for e in kernels:
        top[e.name[:80]] = top.get(e.name[:80], 0.0) + e.device_time / 1e3
    out["compiled_step_top_kernels_ms"] = dict(sorted(top.items(), key=lambda kv: -kv[1])[:12])
    results["decode_variants"] = out
    log("decode variants", json.dumps(out, indent=1))


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


def full_size(results: dict, n_pages: int, new_tokens: int, compile_vision: bool, skip_hf: bool) -> None:
    from glyphserve.engine import AnswerRequest, Engine, EngineConfig, GenerationSettings

    t0 = time.perf_counter()
    engine = Engine.load(EngineConfig(random_weights="glm-4.1v-9b", max_context=16384, max_batch_size=4))
    results["load_s_incl_compile_and_graph_capture"] = time.perf_counter() - t0
    results["graphs"] = len(engine.runner.graphs)
    model = engine.model
    lm_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "visual" not in n)
    lm_bytes -= model.model.language_model.embed_tokens.weight.numel() * 2  # one row read per token
    results["decode_weight_bytes"] = lm_bytes
    results["decode_floor_ms"] = lm_bytes / results["copy_bandwidth_Bps"] * 1e3
    pages = synthetic_pages(n_pages)
    grids = [engine.params.grid(*p.shape[:2]) for p in pages]
    settings = GenerationSettings(max_tokens=new_tokens, ignore_eos=True)
    questions = [
        f"Question {i}: who pretended to be the grandmother, and why did the wolf run ahead?" for i in range(8)
    ]

    def ask(q, **kw):
        return engine.answer(
            AnswerRequest(
                pages=pages, question=q, settings=GenerationSettings(max_tokens=new_tokens, ignore_eos=True, **kw)
            )
        )

    ask(questions[0])  # warm-up (kernels, allocator)
    rows = {}

    def cold():
        engine.clear_caches()
        return ask(questions[1])

    rows["engine_cold"] = timed(cold)

    def vision_hit():
        engine.clear_caches(vision=False, prefix=True)
        return ask(questions[2])

    rows["engine_vision_cache_hit_new_question"] = timed(vision_hit)
    rows["engine_prefix_kv_follow_up"] = timed(lambda: ask(questions[3]))
    rows["engine_no_cache"] = timed(lambda: ask(questions[4], use_cache=False), repeat=2)
    for name, (secs, answer) in rows.items():
        t = answer.timings
        results[name] = {
            "wall_s": secs,
            "prompt_tokens": answer.prompt_tokens,
            "new_tokens": answer.new_tokens,
            "preprocess_s": t.preprocess,
            "vision_s": t.vision_encode,
            "prefill_s": t.prefill,
            "decode_s": t.decode,
            "ttft_s": t.time_to_first_token,
            "decode_ms_per_token": t.decode / max(1, answer.new_tokens - 1) * 1e3,
            "vision_hits": answer.cache.vision_hits,
            "vision_misses": answer.cache.vision_misses,
            "prefix_reused_tokens": answer.cache.prefix_reused_tokens,
            "peak_gpu_GiB": (answer.peak_gpu_bytes or 0) / 2**30,
        }
        log(name, json.dumps(results[name]))
        results.save()

    def batch():
        return engine.answer_batch([AnswerRequest(pages=pages, question=q, settings=settings) for q in questions[4:8]])

    walls = []
    for _ in range(2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        answers = batch()
        walls.append(time.perf_counter() - t0)
    results["engine_batch4_same_document"] = {
        "wall_s_per_run": walls,
        "new_tokens": sum(a.new_tokens for a in answers),
        "decode_s": answers[0].timings.decode,
        "decode_ms_per_step": answers[0].timings.decode / (new_tokens - 1) * 1e3,
        "tokens_per_s": sum(a.new_tokens for a in answers) / walls[-1],
        "per_answer": [
            {
                "ttft_s": a.timings.time_to_first_token,
                "prefill_s": a.timings.prefill,
                "preprocess_s": a.timings.preprocess,
                "prefix_reused_tokens": a.cache.prefix_reused_tokens,
            }
            for a in answers
        ],
    }
    log("batch4", json.dumps(results["engine_batch4_same_document"]))
    results.save()

    if not skip_hf:
        from glyphserve.engine.tiny import build_image_processor

        processor = hf_processor(engine.tokenizer, build_image_processor())
        inputs = hf_inputs(processor, pages, questions[5])
        hf_generate(model, inputs, 4)  # warm-up
        secs, tokens = timed(lambda: hf_generate(model, inputs, new_tokens), repeat=2)
        one, _ = timed(lambda: hf_generate(model, inputs, 1), repeat=2)
        ours = engine.answer(AnswerRequest(pages=pages, question=questions[5], settings=settings))
        agree = next((i for i, (a, b) in enumerate(zip(tokens, ours.token_ids)) if a != b), len(tokens))
        results["hf_generate"] = {
            "wall_s": secs,
            "first_token_s": one,
            "decode_ms_per_token": (secs - one) / (new_tokens - 1) * 1e3,
            "prompt_tokens": int(inputs["input_ids"].shape[1]),
            "engine_tokens_agreeing_before_first_difference": agree,
            "prompt_ids_equal": inputs["input_ids"][0].tolist()
            == engine.prompts.build(
                [{"role": "user", "content": [{"type": "image"}] * n_pages + [{"type": "text", "text": questions[5]}]}],
                grids,
            ).ids,
        }
        log("hf", json.dumps(results["hf_generate"]))
        results.save()

    # Vision encode of the 8 pages: HF get_image_features, ours eager, ours compiled.
    patches = engine.preprocessor(pages)
    grid_t = torch.tensor(grids, device="cuda")
    with torch.inference_mode():
        results["vision_hf_get_image_features_s"] = timed(lambda: model.model.get_image_features(patches, grid_t))[0]
        results["vision_ours_eager_s"] = timed(lambda: engine.vision.encode(patches, grids))[0]
        results["preprocess_8_pages_s"] = timed(lambda: engine.preprocessor(pages))[0]
    if compile_vision:
        from glyphserve.engine.runner import VisionRunner

        compiled = VisionRunner(model, 8, compile=True)
        t0 = time.perf_counter()
        with torch.inference_mode():
            ref = engine.vision.encode(patches, grids)
            out = compiled.encode(patches, grids)
            torch.cuda.synchronize()
            results["vision_compile_s"] = time.perf_counter() - t0
            results["vision_ours_compiled_s"] = timed(lambda: compiled.encode(patches, grids))[0]
            diff = max(float((a.float() - b.float()).norm() / b.float().norm()) for a, b in zip(out, ref))
            results["vision_compiled_rel_err"] = diff
    log("vision", {k: v for k, v in results.items() if k.startswith("vision") or k.startswith("preprocess")})
    results.save()

    decode_variants(results, engine, results["engine_cold"]["prompt_tokens"])
    results.save()
    results["engine_stats"] = engine.stats()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--pages", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--skip-tiny", action="store_true")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--compile-vision", action="store_true")
    args = parser.parse_args(argv)
    import transformers

    results = Results(
        {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(0),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": sys.version.split()[0],
            "pages": args.pages,
            "new_tokens": args.new_tokens,
        }
    )
    results["copy_bandwidth_Bps"] = copy_bandwidth("cuda")
    log(json.dumps(results))
    args.out.mkdir(parents=True, exist_ok=True)
    results.path = args.out / "engine-probe.json"
    try:
        if not args.skip_tiny:
            check_tiny(results)
        full_size(results, args.pages, args.new_tokens, args.compile_vision, args.skip_hf)
    finally:
        results.save()
        log("wrote", results.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
