"""``glyphserve bench engine``: latency, batching and memory of the engine on one GPU, next to their floors.

On deterministic W50 documents (50,000 characters rendered with glyph-en) and 64-token answers (EOS ignored):

- single requests: a cold question (vision and prefix caches empty; again on documents whose last page is cropped,
  as the renderer does by default, each to a height of its own), a follow-up (the document's blocks in the KV
  pool; again with its prefill in the eager pass instead of as rows of a graph step), the first question after the
  document was warmed at upload, and the same on W200 (``--grow``);
- the decode step with 1, 8, 32, 64, 128 rows busy (follow-ups over several cached documents, all decoding
  together), each next to its floor: the weights plus the KV each row reads, over the copy bandwidth measured in
  the same run;
- the KV pool's blocks in use for 1 and for 16 sessions on one document (its prefix is held once);
- with ``--quantize fp8``: the cold and follow-up rows, W200 cold and the decode step by rows with FP8 weights,
  and (CUDA) the most device memory a cold W50 question needs in the smallest engine that serves it, with FP8 and
  with 16-bit weights;
- with ``--memory-cap-gib``: a W200 question and 8 W50 questions at once under that memory budget (a 24 GB card's
  profile), with the quantized weights and with 16-bit ones.

``--baseline-tree PATH`` runs the same measurements with the glyphserve at PATH (an older checkout, in a child
process), so baseline and candidate come from one run. Every figure is a median over ``--repeats``; documents
and questions rotate so caches are hit only where a row means to.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

# The smallest engine's prompt pass: its activations (a 1,024-token pass holds ~0.1 GiB of MLP intermediates,
# 2,048 twice that) are the part of its peak a deployment sets; on an H200 with FP8 weights it held 12.55 GiB at
# 2,048-token passes.
FOOTPRINT_PREFILL_TOKENS = 1024
# The decode step is timed a second time with every row sampled as chat clients ask by default (temperature,
# nucleus, a seed): the sampled rows' extra kernels and their host work, which greedy rows never run.
SAMPLING = {"temperature": 0.8, "top_p": 0.95, "seed": 1}
TARGETS = {  # issues 13 and 14 (seconds, milliseconds, ratios)
    "w50_cold_s": 0.5,
    "w50_decode_ms": 7.0,
    "step_32_rows_over_1_row": 1.5,
    "step_64_rows_over_1_row": 2.0,
    "w50_followup_ttft_s": 0.025,
    "first_question_ttft_after_upload_s": 0.06,
    "w200_cold_s": 1.0,
    "decode_bf16_over_floor": 1.3,
    "fp8_decode_ms": 2.6,
    "fp8_peak_gib_w50": 12.5,
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("engine", help="latency, batching and memory of the engine on one GPU",
                              description=__doc__.split("\n\n")[0])
    model_arguments(p)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--workload", default="W50", help="main document size (W50, W150, W200 or characters)")
    p.add_argument("--grow", default="W200", help="larger document for how cost grows ('' to skip)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rows", default="1,8,32,64,128", help="decode batch sizes to time")
    p.add_argument("--max-context", type=int, default=16384)
    p.add_argument("--quantize", choices=["fp8"], help="also measure with quantized language-model weights")
    p.add_argument("--memory-cap-gib", type=float,
                   help="also run W200 plus 8 W50 sessions at once with --gpu-memory-utilization set to this "
                        "much of the card (a 24 GB card's profile), with --quantize's weights and with 16-bit ones")
    p.add_argument("--baseline-tree", type=Path, help="a glyphserve checkout to measure the same way (child process)")
    p.add_argument("--font", help="font file for rendering (default: glyph-en's font or its free substitute)")
    out_argument(p, "engine-<card>.json/.md")
    p.set_defaults(func=run)


# Where every benchmark writes unless told: the repository's results folder, when run from the checkout's root.
DEFAULT_OUT = Path("docs/benchmarks")


def out_argument(p: argparse.ArgumentParser, files: str, *, print_only: bool = False) -> None:
    """--out: the folder a benchmark writes ``files`` to (shared by the benchmarks; defined here, not in
    bench.commands, because this file also runs as a script under a baseline checkout's glyphserve).
    ``print_only``: '' writes nothing (args.out None)."""
    p.add_argument("--out", type=(lambda value: Path(value) if value else None) if print_only else Path,
                   default=DEFAULT_OUT, metavar="DIR",
                   help=f"folder for {files} (default: {DEFAULT_OUT}/ under the current directory"
                        + ("; '' to print only)" if print_only else ")"))


def model_arguments(p: argparse.ArgumentParser) -> None:
    """--model or --random-weights: the engine's weights (shared by the engine benchmarks)."""
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", help="checkpoint directory or Hugging Face id")
    source.add_argument("--random-weights", metavar="ARCH", help="e.g. glm-4.1v-9b (no checkpoint needed)")


def run(args: argparse.Namespace) -> int:
    from glyphserve.errors import ConfigError

    if (args.model is None) == (args.random_weights is None):
        raise ConfigError("give --model or --random-weights")
    args.out.mkdir(parents=True, exist_ok=True)
    results = measure(args)
    stem = args.out / f"engine-{results['card']}"
    write(stem, results)  # the candidate's figures survive a baseline that fails
    if args.baseline_tree is not None:
        release_memory()  # the child sizes its KV from free memory
        results["baseline"] = baseline(args)
        write(stem, results)
    print(f"wrote {stem}.json and .md")
    return 0


def release_memory() -> None:
    """Hand the freed engines' device memory back (the next engine sizes its KV pool from free memory)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def write(stem: Path, results: dict) -> None:
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    stem.with_suffix(".md").write_text(to_markdown(results), encoding="utf-8")


def baseline(args: argparse.Namespace) -> dict:
    """The same measurements by the glyphserve at ``--baseline-tree``, in a child process whose ``glyphserve`` is
    that tree's (this file runs there as a script; it only uses the public engine and render calls)."""
    out = args.out / "engine-baseline.json"
    command = [sys.executable, __file__, "--child", str(out), *child_arguments(args)]
    path = [str(args.baseline_tree.resolve()), *filter(None, [os.environ.get("PYTHONPATH")])]  # its glyphserve first
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    subprocess.run(command, check=True, env=env)
    return json.loads(out.read_text())


def child_arguments(args: argparse.Namespace) -> list[str]:
    source = ["--model", args.model] if args.model else ["--random-weights", args.random_weights]
    return [*source, "--device", args.device, "--workload", args.workload, "--grow", args.grow, "--new-tokens",
            str(args.new_tokens), "--repeats", str(args.repeats), "--rows", args.rows, "--max-context",
            str(args.max_context), *(["--font", args.font] if args.font else [])]


# --- the measurements ----------------------------------------------------------------------------------------

def card_slug(device_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'; 'cpu' stays."""
    match = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]*)\b", device_name)
    return match.group(1).lower() if match else re.sub(r"\W+", "-", device_name.lower()).strip("-")


def workload_chars(name: str) -> int:
    from glyphserve.bench.workloads import WORKLOADS

    return WORKLOADS[name] if name in WORKLOADS else int(name)


def render_documents(n_chars: int, seeds, font: str | None, shorten: int = 0) -> list[list]:
    """Pages of documents rendered with glyph-en. Without ``shorten``, last page uncropped: one page shape for the
    vision tower; with it, the ``i``-th document is ``(i + 1) * shorten`` characters shorter and its last page
    cropped as the renderer does by default, to a height of its own (a shape the vision tower has not seen)."""
    from glyphserve.bench.workloads import make_workload_text
    from glyphserve.render import preset, render_text

    config = dataclasses.replace(preset("glyph-en"), auto_crop_last_page=shorten > 0)
    if font:
        config = dataclasses.replace(config, font_path=font)
    return [[p.image for p in render_text(make_workload_text(n_chars - (i + 1) * shorten, seed, "en"), config).pages]
            for i, seed in enumerate(seeds)]


class Api:
    """The engine's public calls, under this tree's names or an older tree's (the baseline)."""

    def __init__(self):
        import glyphserve.engine as engine

        self.engine = engine
        fields = {f.name for f in dataclasses.fields(engine.GenerationSettings)}
        self.tokens_field = "max_tokens" if "max_tokens" in fields else "max_new_tokens"
        config_fields = {f.name for f in dataclasses.fields(engine.EngineConfig)}
        self.rows_field = "max_num_seqs" if "max_num_seqs" in config_fields else "max_batch_size"

    def config(self, args, rows: int, **extra):
        return self.engine.EngineConfig(model=args.model, random_weights=args.random_weights, device=args.device,
                                        max_context=args.max_context, **{self.rows_field: rows}, **extra)

    def request(self, pages, question: str, new_tokens: int, sampling: dict | None = None, **extra):
        settings = self.engine.GenerationSettings(ignore_eos=True, **{self.tokens_field: new_tokens},
                                                  **(sampling or {}))
        return self.engine.AnswerRequest(pages=pages, question=question, settings=settings, **extra)


class Bench:
    def __init__(self, args: argparse.Namespace):
        import torch

        self.args, self.torch = args, torch
        self.api = Api()
        from glyphserve.engine.loading import resolve_device

        self.device = resolve_device(args.device)
        self.cuda = self.device.type == "cuda"
        self.counter = itertools.count()
        self.fresh = itertools.count(1)

    def question(self, fresh: bool = False) -> str:
        """A question; ``fresh``: one filler word more than the fresh one before, so that every cold prompt has a
        length the process has not seen, as users' questions do, and a kernel that plans per shape pays for it
        here too (cuDNN's attention did: 45 ms a new length on an H200, hidden while every question had the same
        length). Other questions keep one length (a follow-up stays a short chunk)."""
        extra = next(self.fresh) if fresh else 0
        return (f"Question {next(self.counter):04d}: which names and numbers appear most often in the text, and "
                "where?" + " Please" * extra)

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def ask(self, engine, pages, fresh: bool = False, **extra):
        return engine.answer(self.api.request(pages, self.question(fresh), self.args.new_tokens, **extra))

    def single(self, engine, docs: list[list], mode: str) -> dict:
        """Median timings of one question at a time: ``cold`` (caches cleared), ``follow`` (a question on the same
        document just before) or ``warm`` (the document warmed at upload just before)."""
        answers, walls = [], []
        for i in range(self.args.repeats):
            pages = docs[i % len(docs)]
            engine.clear_caches()
            if mode == "follow":
                self.ask(engine, pages)
            elif mode == "warm":
                engine.answer(self.api.engine.AnswerRequest(pages=pages, question="", warm=True))
            if self.cuda:
                self.torch.cuda.reset_peak_memory_stats(self.device)
            self.sync()
            t0 = time.perf_counter()
            answer = self.ask(engine, pages, fresh=mode == "cold")
            self.sync()
            walls.append(time.perf_counter() - t0)
            answers.append(answer)
        t = [a.timings for a in answers]
        med = lambda xs: statistics.median(xs)  # noqa: E731
        row = {
            "wall_s": med(walls), "walls_s": walls,
            "ttft_s": med([x.time_to_first_token for x in t]), "preprocess_s": med([x.preprocess for x in t]),
            "vision_s": med([x.vision_encode for x in t]), "prefill_s": med([x.prefill for x in t]),
            "decode_ms": med([x.decode / max(1, a.new_tokens - 1) * 1e3 for x, a in zip(t, answers)]),
            "prompt_tokens": answers[-1].prompt_tokens, "prefix_reused_tokens": answers[-1].cache.prefix_reused_tokens,
            "vision_misses": answers[-1].cache.vision_misses,
            "peak_gib": self.torch.cuda.max_memory_allocated(self.device) / 2**30 if self.cuda else None,
        }
        print(json.dumps({"mode": mode, **row}), flush=True)
        return row

    def step_rows(self, engine, docs: list[list], rows: int, sampling: dict | None = None) -> dict:
        """Decode step time with ``rows`` follow-ups decoding together (documents cached beforehand), greedy or
        with ``sampling``'s settings (``SAMPLING``)."""
        requests = [self.api.request(docs[i % len(docs)], self.question(), self.args.new_tokens, sampling)
                    for i in range(rows)]
        steps = []
        before = engine.stats()
        timed = before.get("timed_decode_steps")  # the engine's own step clock (older trees: none)
        spent = before.get("decode_step_s")
        for _ in range(max(1, self.args.repeats - 1)):
            answers = engine.answer_batch(requests)
            steps.append(statistics.median(a.timings.decode / max(1, a.new_tokens - 1) * 1e3 for a in answers))
            requests = [self.api.request(r.pages, self.question(), self.args.new_tokens, sampling)
                        for r in requests]
        row = {"rows": rows, "step_ms": statistics.median(steps), "steps_ms": steps,
               "context_tokens": answers[0].prompt_tokens + self.args.new_tokens // 2}
        if timed is not None:  # every decode step of these batches, from one read-back to the next
            stats = engine.stats()
            n = stats["timed_decode_steps"] - timed
            row["engine_decode_step_ms"] = (stats["decode_step_s"] - spent) / n * 1e3 if n else None
        return row

    def capped(self, docs: list[list], large: list, cap_gib: float, quantize: str | None) -> dict:
        """A question on the large document with 8 questions on 8 W50 documents, all at once, in an engine
        whose memory budget is ``cap_gib`` of the card (``gpu_memory_utilization``): whether it runs, its pool,
        and what the process holds on the device at the end (the allocator keeps its peak cached)."""
        torch = self.torch
        total = torch.cuda.get_device_properties(self.device).total_memory
        out = {"cap_gib": cap_gib, "weights": quantize or "bf16", "utilization": cap_gib * 2**30 / total}
        torch.cuda.reset_peak_memory_stats(self.device)
        try:
            engine = self.api.engine.Engine.load(self.api.config(self.args, 16, quantize=quantize,
                                                                 gpu_memory_utilization=out["utilization"]))
        except Exception as exc:  # reported: the cap does not fit this configuration
            out["error"] = f"{type(exc).__name__}: {exc}"
            print(json.dumps(out), flush=True)
            return out
        out["pool_tokens"] = engine.stats()["kv_pool"]["tokens"]
        requests = [self.api.request(large, self.question(), self.args.new_tokens)]
        requests += [self.api.request(docs[i % len(docs)], self.question(), self.args.new_tokens) for i in range(8)]
        t0 = time.perf_counter()
        try:
            answers = engine.answer_batch(requests)
            self.sync()
            out["wall_s"] = time.perf_counter() - t0
            out["answered"] = sum(a.new_tokens == self.args.new_tokens for a in answers)
            out["preemptions"] = engine.stats()["preemptions"]
        except Exception as exc:
            out["error"] = f"{type(exc).__name__}: {exc}"
        free, _ = torch.cuda.mem_get_info(self.device)
        out["device_used_gib"] = (total - free) / 2**30
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved(self.device) / 2**30
        print(json.dumps(out), flush=True)
        del engine
        release_memory()
        return out

    def footprint(self, pages, quantize: str | None) -> dict:
        """A cold W50 question in the smallest engine that serves it (what a card with little memory runs): a KV
        pool of one 8,192-token context, the prompt prefilled ``FOOTPRINT_PREFILL_TOKENS`` tokens a pass, pages
        encoded one at a time, a 256 MiB vision cache, one sequence. The most the process held on the device while
        answering (the allocator's peak from the end of loading, its cache of freed blocks emptied, plus what the
        card held outside the allocator before loading: the CUDA context, and any other process's memory; kernels
        loaded later are not counted), and while loading (random weights are drawn on the device in 16 bits first;
        a checkpoint to quantize is loaded on the host, ``loading.load``)."""
        torch = self.torch
        release_memory()
        total = torch.cuda.get_device_properties(self.device).total_memory
        outside = total - torch.cuda.mem_get_info(self.device)[0] - torch.cuda.memory_reserved(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        context, block = 8192, 16
        config = dataclasses.replace(self.api.config(self.args, 1, quantize=quantize), max_context=context,
                                     max_prefill_tokens=FOOTPRINT_PREFILL_TOKENS, vision_batch_pages=1,
                                     kv_block_size=block, num_kv_blocks=-(-(context + 1) // block) + 1,
                                     vision_cache_bytes=256 * 2**20)
        out = {"weights": quantize or "bf16", "max_context": context, "prefill_tokens": FOOTPRINT_PREFILL_TOKENS,
               "context_gib": outside / 2**30}
        engine = None
        try:
            engine = self.api.engine.Engine.load(config)
            self.sync()
            out["load_peak_gib"] = (outside + torch.cuda.max_memory_reserved(self.device)) / 2**30
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            answer = engine.answer(self.api.request(pages, self.question(fresh=True), self.args.new_tokens))
            self.sync()
            out["wall_s"], out["new_tokens"] = answer.timings.total, answer.new_tokens
            out["peak_gib"] = (outside + torch.cuda.max_memory_reserved(self.device)) / 2**30
        except Exception as exc:  # reported
            out["error"] = f"{type(exc).__name__}: {exc}"
        del engine
        print(json.dumps(out), flush=True)
        release_memory()
        return out

    def pool_blocks(self, engine, pages, sessions: int) -> int | None:
        """Most KV blocks in use while ``sessions`` questions about one document run (None: no pool)."""
        if "kv_pool" not in engine.stats() or not hasattr(engine.pool, "reset_peak"):  # no pool, or no peak kept
            return None
        engine.clear_caches()
        engine.pool.reset_peak()
        engine.answer_batch([self.api.request(pages, self.question(), 2) for _ in range(sessions)])
        return engine.pool.stats().peak_in_use


def measure(args: argparse.Namespace) -> dict:
    import torch
    import transformers

    from glyphserve.engine import Engine

    bench = Bench(args)
    name = torch.cuda.get_device_name(bench.device) if bench.cuda else "cpu"
    rows = [int(r) for r in args.rows.split(",") if r]
    res = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "device": name,
           "card": card_slug(name), "torch": torch.__version__, "transformers": transformers.__version__,
           "python": sys.version.split()[0], "model": args.model or f"random weights ({args.random_weights})",
           "new_tokens": args.new_tokens, "repeats": args.repeats}
    docs = render_documents(workload_chars(args.workload), range(8), args.font)
    grow = render_documents(workload_chars(args.grow), range(2), args.font) if args.grow else []
    res["workload"] = {"name": args.workload, "pages": len(docs[0]), "grow_pages": len(grow[0]) if grow else 0}
    if bench.cuda:
        res["copy_bandwidth_Bps"] = copy_bandwidth(bench.device)
    t0 = time.perf_counter()
    engine = Engine.load(bench.api.config(args, max(rows)))
    res["load_s"] = time.perf_counter() - t0
    res["engine"] = {k: v for k, v in engine.stats().items() if not isinstance(v, dict)}
    bench.ask(engine, docs[0])  # warm-up
    res["cold"] = bench.single(engine, docs, "cold")
    chars = workload_chars(args.workload)  # W50: the i-th document 416 * (i + 1) characters shorter
    cropped = render_documents(chars, range(100, 100 + args.repeats), args.font, shorten=max(1, chars // 120))
    res["cold_cropped"] = bench.single(engine, cropped, "cold")
    res["follow"] = bench.single(engine, docs, "follow")
    core = getattr(engine, "core", None)
    if getattr(core, "row_prefill", False):  # follow-ups as rows of the decode graphs: the eager pass beside them
        core.row_prefill = False
        res["follow_eager"] = bench.single(engine, docs, "follow")
        core.row_prefill = True
    if hasattr(bench.api.engine.AnswerRequest, "pages_key"):  # this tree: warming at upload exists
        res["warm"] = bench.single(engine, docs, "warm")
    if grow:
        res["grow_cold"] = bench.single(engine, grow, "cold")
        res["grow_follow"] = bench.single(engine, grow, "follow")
    weights = decode_bytes(engine.model)
    kv_per_token = kv_bytes_per_token(engine.model)
    res["rows"] = []
    for pages in docs:  # every document's prefix cached first: the timed batches decode, they do not prefill pages
        engine.answer(bench.api.request(pages, bench.question(), 2))
    for n in rows:
        row = bench.step_rows(engine, docs, n)
        if bench.cuda:
            row["floor_ms"] = (weights + n * row["context_tokens"] * kv_per_token) / res["copy_bandwidth_Bps"] * 1e3
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
    res["rows_sampled"] = [bench.step_rows(engine, docs, n, SAMPLING) for n in rows]
    print(json.dumps({"rows_sampled": res["rows_sampled"]}), flush=True)
    res["pool_blocks"] = {str(s): bench.pool_blocks(engine, docs[0], s) for s in (1, 16)}
    if bench.cuda:
        res["decode_floor_ms"] = weights / res["copy_bandwidth_Bps"] * 1e3
    res["stats"] = engine.stats()
    del engine, core  # the core holds the model and the KV pool
    release_memory()
    if args.quantize:
        quantized = Engine.load(bench.api.config(args, max(rows, default=8), quantize=args.quantize))
        bench.ask(quantized, docs[0])
        res["quantized"] = {"mode": args.quantize, "cold": bench.single(quantized, docs, "cold"),
                            "follow": bench.single(quantized, docs, "follow")}
        if grow:
            res["quantized"]["grow_cold"] = bench.single(quantized, grow, "cold")
        for pages in docs:  # the decode step by rows with these weights (their own kernels from 2 to 64 rows)
            quantized.answer(bench.api.request(pages, bench.question(), 2))
        res["quantized"]["rows"] = [bench.step_rows(quantized, docs, n) for n in rows]
        del quantized
        release_memory()
        if bench.cuda:
            res["footprint"] = [bench.footprint(docs[0], mode) for mode in (args.quantize, None)]
    if args.memory_cap_gib and bench.cuda and grow:
        res["capped"] = [bench.capped(docs, grow[0], args.memory_cap_gib, mode)
                         for mode in dict.fromkeys([args.quantize, None])]
    return res


def copy_bandwidth(device) -> float:
    """Bytes read + written per second by a large device-to-device copy: the best of 20, the floors' bandwidth. (A
    median of 10 read 4.01 TB/s in one process and 4.13 in the next on one H200, two minutes apart: nineteenth
    session.)"""
    import torch

    src = torch.randn(2**28, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(20):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * 2**30 / min(times)


def decode_bytes(model) -> int:
    """Weights one decode step reads: the language model and head, not the embedding table (one row a token)."""
    total = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "visual" not in n)
    embed = model.model.language_model.embed_tokens.weight
    return total - embed.numel() * embed.element_size()


def kv_bytes_per_token(model) -> int:
    tc = model.config.text_config
    head_dim = tc.hidden_size // tc.num_attention_heads
    return 2 * tc.num_hidden_layers * tc.num_key_value_heads * head_dim * model.dtype.itemsize


# --- the report ----------------------------------------------------------------------------------------------

def targets(res: dict) -> list[tuple[str, float | None, float, bool | None]]:
    """(name, measured, target, met) for the named targets this run measures."""
    by_rows = {r["rows"]: r["step_ms"] for r in res.get("rows", [])}
    out = {
        "w50_cold_s": res.get("cold", {}).get("wall_s"),
        "w50_decode_ms": res.get("cold", {}).get("decode_ms"),
        "w50_followup_ttft_s": res.get("follow", {}).get("ttft_s"),
        "first_question_ttft_after_upload_s": res.get("warm", {}).get("ttft_s"),
        "w200_cold_s": res.get("grow_cold", {}).get("wall_s"),
        "step_32_rows_over_1_row": by_rows[32] / by_rows[1] if 32 in by_rows and 1 in by_rows else None,
        "step_64_rows_over_1_row": by_rows[64] / by_rows[1] if 64 in by_rows and 1 in by_rows else None,
        "decode_bf16_over_floor": (res["cold"]["decode_ms"] / res["decode_floor_ms"]
                                   if "decode_floor_ms" in res and "cold" in res else None),
        "fp8_decode_ms": res.get("quantized", {}).get("cold", {}).get("decode_ms"),
        "fp8_peak_gib_w50": next((f["peak_gib"] for f in res.get("footprint", [])
                                  if f["weights"] == "fp8" and "error" not in f), None),
    }
    return [(k, v, TARGETS[k], None if v is None else v <= TARGETS[k]) for k, v in out.items()]


def fixed(value, digits: int = 3) -> str:
    """``value`` with ``digits`` decimals; "-" for None (a row the run did not measure)."""
    return "-" if value is None else f"{value:.{digits}f}"


def to_markdown(res: dict) -> str:
    base = res.get("baseline", {})
    lines = [
        f"# Engine benchmark: {res['device']}",
        "",
        f"{res['date']}; torch {res['torch']}, transformers {res['transformers']}, Python {res['python']}; "
        f"{res['model']}; {res['workload']['name']} ({res['workload']['pages']} pages), answers of "
        f"{res['new_tokens']} tokens (EOS ignored); medians of {res['repeats']} repeats.",
        "",
        "| row | candidate wall s | TTFT s | decode ms/token | peak GiB | baseline wall s | baseline TTFT s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, label in (("cold", "W50 cold"), ("cold_cropped", "W50 cold, last page cropped (a new height each time)"),
                       ("follow", "W50 follow-up"),
                       ("follow_eager", "W50 follow-up, prefill in the eager pass"),
                       ("warm", "W50 first question after warm-up"),
                       ("grow_cold", "W200 cold"), ("grow_follow", "W200 follow-up")):
        row, old = res.get(key), base.get(key, {})
        if row:
            lines.append(f"| {label} | {fixed(row['wall_s'])} | {fixed(row['ttft_s'])} | "
                         f"{fixed(row['decode_ms'], 2)} | {fixed(row['peak_gib'], 1)} | {fixed(old.get('wall_s'))} | "
                         f"{fixed(old.get('ttft_s'))} |")
    lines += ["", "| rows decoding | step ms | engine's step clock ms | floor ms | x 1-row step | baseline step ms |",
              "|---:|---:|---:|---:|---:|---:|"]
    one = next((r["step_ms"] for r in res.get("rows", []) if r["rows"] == 1), None)
    old_rows = {r["rows"]: r["step_ms"] for r in base.get("rows", [])}
    for r in res.get("rows", []):
        lines.append(f"| {r['rows']} | {fixed(r['step_ms'], 2)} | {fixed(r.get('engine_decode_step_ms'), 2)} | "
                     f"{fixed(r.get('floor_ms'), 2)} | "
                     f"{fixed(r['step_ms'] / one if one else None, 2)} | {fixed(old_rows.get(r['rows']), 2)} |")
    if res.get("rows_sampled"):
        old_s = {r["rows"]: r["step_ms"] for r in base.get("rows_sampled", [])}
        settings = ", ".join(f"{k} {v}" for k, v in SAMPLING.items())
        lines += ["", f"Decode step by rows, every row sampled ({settings}): " + ", ".join(
            f"{r['rows']}: {fixed(r['step_ms'], 2)} ms" + (f" (baseline {fixed(old_s[r['rows']], 2)})"
                                                             if r["rows"] in old_s else "")
            for r in res["rows_sampled"]) + "."]
    blocks = res.get("pool_blocks", {})
    if blocks.get("1") is not None:
        lines += ["", f"KV pool blocks in use: {blocks['1']} for 1 session, {blocks['16']} for 16 sessions on one "
                      "document (its prefix held once)."]
    for c in res.get("capped", []):
        if "pool_tokens" not in c:
            lines += ["", f"Capped at {c['cap_gib']} GiB ({c['weights']} weights): did not run: {c['error']}"]
        else:
            lines += ["", f"Capped at {c['cap_gib']} GiB ({c['weights']} weights): W200 + 8 W50 questions at once "
                          f"{fixed(c.get('wall_s'))} s, {c.get('answered', 0)} of 9 answered, KV pool "
                          f"{c['pool_tokens']} tokens, {c.get('preemptions', 0)} preemptions; the process held "
                          f"{fixed(c['device_used_gib'], 1)} GiB on the device (allocator peak "
                          f"{fixed(c['peak_reserved_gib'], 1)} GiB)"
                          + (f"; error: {c['error']}" if "error" in c else "") + "."]
    if "quantized" in res:
        q = res["quantized"]
        grown = q.get("grow_cold")
        lines += ["", f"With {q['mode']} weights: W50 cold {fixed(q['cold']['wall_s'])} s (TTFT "
                      f"{fixed(q['cold']['ttft_s'])} s), decode {fixed(q['cold']['decode_ms'], 2)} ms/token, peak "
                      f"{fixed(q['cold']['peak_gib'], 1)} GiB; follow-up TTFT {fixed(q['follow']['ttft_s'])} s"
                      + (f"; W200 cold {fixed(grown['wall_s'])} s (TTFT {fixed(grown['ttft_s'])} s)."
                         if grown else ".")]
        if q.get("rows"):
            old_q = {r["rows"]: r["step_ms"] for r in base.get("quantized", {}).get("rows", [])}
            lines += ["", f"Decode step by rows with {q['mode']} weights: " + ", ".join(
                f"{r['rows']}: {fixed(r['step_ms'], 2)} ms" + (f" (baseline {fixed(old_q[r['rows']], 2)})"
                                                                 if r["rows"] in old_q else "")
                for r in q["rows"]) + "."]
    for f in res.get("footprint", []):
        lines += ["", f"Smallest engine for a cold W50 question ({f['weights']} weights; KV pool of one "
                      f"{f['max_context']:,}-token context, prefill passes of {f.get('prefill_tokens', 2048):,} "
                      "tokens, pages encoded one at a time, 256 MiB vision cache): "
                      + (f"did not run: {f['error']}." if "error" in f else
                         f"{fixed(f['wall_s'])} s; the process held at most {fixed(f['peak_gib'], 2)} GiB on the "
                         f"device while answering (CUDA context {fixed(f['context_gib'], 2)} GiB included), "
                         f"{fixed(f['load_peak_gib'], 2)} GiB while loading.")]
    lines += ["", "## Targets", "", "| target | measured | goal | met |", "|---|---:|---:|---|"]
    for name, value, goal, met in targets(res):
        lines.append(f"| {name} | {fixed(value)} | {goal} | {'-' if met is None else ('yes' if met else 'no')} |")
    return "\n".join(lines) + "\n"


def _child(argv: list[str]) -> int:
    """Entry point of the baseline child process: measure with whatever glyphserve is on PYTHONPATH."""
    out = Path(argv[0])
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    add_parser(sub)
    args = parser.parse_args(["engine", *argv[1:]])
    out.write_text(json.dumps(measure(args), indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "--child":
    sys.exit(_child(sys.argv[2:]))
