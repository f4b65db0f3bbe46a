"""``glyphserve bench engine``: the optimization ladder, one GPU, one process.

Each row adds one optimization to the one above, on the same W50 document workload (a deterministic
50,000-character English text rendered with ``glyph-en``; one question; a 64-token answer, EOS ignored):

0. processor + ``generate``, float32;  1. the same in bfloat16;  2. + the compiled vision encoder;
3. + the engine's static-cache CUDA-graph decode (caches off);  4. + vision-feature cache (same document, new
question);  5. + document-prefix KV cache (follow-up question);  6. + pinned-memory async copies and overlapped
preprocessing (everything on). Beside them: the same language model prefilling the document as text tokens, and
W200 (200,000 characters) for how cost grows. Every row is warmed up, then timed over several repeats (median);
documents and questions rotate so that caches are hit only where a row means to. Next to each stage stands its
floor from ceilings measured on the same card in the same run (weight bytes / copy bandwidth; FLOPs / matmul rate).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import gc
import itertools
import json
import re
import statistics
import sys
import time
from pathlib import Path

TARGETS = {
    "row6_cold_s": 0.8,
    "row6_speedup_over_row0": 7.0,
    "follow_up_s": 0.5,
    "follow_up_ttft_s": 0.05,
    "decode_over_floor": 1.3,
    "peak_gib": 22.0,
}
DOCUMENTS = 4  # W50 documents the rows rotate through


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("engine", help="optimization ladder of the engine on one GPU",
                              description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", help="checkpoint directory or Hugging Face id")
    source.add_argument("--random-weights", metavar="ARCH", help="e.g. glm-4.1v-9b (no checkpoint needed)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--workload", default="W50", help="main document size (W50, W150, W200 or characters)")
    p.add_argument("--grow", default="W200", help="larger document for how cost grows ('' to skip)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="timed repeats of each engine row")
    p.add_argument("--hf-repeats", type=int, default=3, help="timed repeats of the generate rows")
    p.add_argument("--fp32-repeats", type=int, default=2, help="timed repeats of row 0 (0 skips it)")
    p.add_argument("--max-context", type=int, default=16384)
    p.add_argument("--font", help="font file for rendering (default: glyph-en's font or its free substitute)")
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks"),
                   help="folder for engine-ladder-<card>.json/.md/.png")
    p.add_argument("--report-from", type=Path, metavar="JSON",
                   help="only rewrite the Markdown and chart from a saved JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from glyphserve.errors import ConfigError

    if args.report_from is not None:
        results = json.loads(args.report_from.read_text())
        write_reports(results, args.report_from.with_suffix(""))
        return 0
    if (args.model is None) == (args.random_weights is None):
        raise ConfigError("give --model or --random-weights")
    Ladder(args).run()
    return 0


def card_slug(device_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'; 'cpu' stays."""
    match = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]*)\b", device_name)
    return match.group(1).lower() if match else re.sub(r"\W+", "-", device_name.lower()).strip("-")


def workload_chars(name: str) -> int:
    from glyphserve.bench.workloads import WORKLOADS

    return WORKLOADS[name] if name in WORKLOADS else int(name)


@dataclasses.dataclass
class Document:
    name: str
    pages: list  # HxWx3 uint8
    text_tokens: int  # estimated tokens of the same text fed as text
    vision_tokens: int
    text: str = ""  # prepended to the question (the text-only row)


def render_documents(n_chars: int, seeds: range, font: str | None) -> list[Document]:
    """Rendered with glyph-en, the last page left uncropped so that every page has one shape (one compiled
    vision graph instead of one per last-page height)."""
    from glyphserve.bench.workloads import make_workload_text
    from glyphserve.render import count_text_tokens, preset, render_text

    config = dataclasses.replace(preset("glyph-en"), auto_crop_last_page=False)
    if font:
        config = dataclasses.replace(config, font_path=font)
    docs = []
    for seed in seeds:
        text = make_workload_text(n_chars, seed, "en")
        rendered = render_text(text, config)
        docs.append(Document(f"{n_chars // 1000}k#{seed}", [p.image for p in rendered.pages],
                             count_text_tokens(text)[0], rendered.stats.vision_tokens))
    return docs


class Questions:
    """A new question each call, all of the same length in tokens."""

    def __init__(self):
        self._n = itertools.count()

    def __call__(self) -> str:
        return f"Question {next(self._n):04d}: which names and numbers appear most often in the text, and where?"


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def matmul_rate(dtype, device, n: int = 8192) -> float:
    """FLOP/s of an n x n x n matrix product on random data."""
    import torch

    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    end.synchronize()
    return 2 * n**3 * 10 / (start.elapsed_time(end) / 1e3)


def vision_flops(model, grids) -> float:
    """Patch embedding and blocks per patch, downsample and merger per merged token, attention within a page."""
    visual = model.model.visual
    merge = visual.spatial_merge_size
    tail = ("merger.", "downsample.")
    per_patch = sum(p.numel() for n, p in visual.named_parameters()
                    if not n.startswith(tail) and not n.startswith("embeddings."))
    per_token = sum(p.numel() for n, p in visual.named_parameters() if n.startswith(tail))
    width, depth = visual.config.hidden_size, len(visual.blocks)
    total = 0.0
    for t, gh, gw in grids:
        n = t * gh * gw
        total += 2 * per_patch * n + 2 * per_token * n / merge**2 + 4 * n * n * width * depth
    return total


def prefill_flops(model, tokens: int, cached: int = 0) -> float:
    """Layer weights per new token, causal attention over the cached + new positions, one row of logits."""
    cfg = model.config.text_config
    lm = model.model.language_model
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    layers = sum(p.numel() for p in lm.layers.parameters())
    attention = 2 * tokens * (tokens + 2 * cached) * cfg.num_attention_heads * head_dim * cfg.num_hidden_layers
    return 2 * layers * tokens + attention + 2 * model.lm_head.weight.numel()


def hf_processor(tokenizer, image_processor):
    """The HF Glm4vProcessor for images; it insists on a video processor, which needs torchvision."""
    from transformers.models.glm4v.processing_glm4v import Glm4vProcessor

    class ImageOnlyProcessor(Glm4vProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name != "video_processor":
                return super().check_argument_for_proper_class(argument_name, argument)

    return ImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                              chat_template=tokenizer.chat_template)


def decode_bytes(model) -> int:
    """Weights one decode step reads: the language model and head, one embedding row."""
    total = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "visual" not in n)
    embed = model.model.language_model.embed_tokens.weight
    return total - embed.numel() * embed.element_size()


class Ladder:
    def __init__(self, args: argparse.Namespace):
        import torch
        import transformers

        from glyphserve.engine.loading import resolve_device

        self.args = args
        self.torch = torch
        self.device = resolve_device(args.device)
        self.cuda = self.device.type == "cuda"
        name = torch.cuda.get_device_name(self.device) if self.cuda else "cpu"
        self.questions = Questions()
        self.results = {
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "device": name,
            "card": card_slug(name),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": sys.version.split()[0],
            "model": args.model or f"random weights ({args.random_weights})",
            "new_tokens": args.new_tokens,
            "rows": [],
            "grow": [],
        }
        args.out.mkdir(parents=True, exist_ok=True)
        self.path = args.out / f"engine-ladder-{self.results['card']}.json"

    # --- plumbing --------------------------------------------------------------------------------------------

    def log(self, *parts) -> None:
        print(*parts, flush=True)

    def save(self) -> None:
        self.path.write_text(json.dumps(self.results, indent=1, default=str) + "\n")

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.cuda:
            self.sync()
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        return self.torch.cuda.max_memory_allocated(self.device) / 2**30 if self.cuda else None

    def clock(self, fn):
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - t0, out

    def load(self, dtype: str):
        from glyphserve.engine import EngineConfig
        from glyphserve.engine.loading import load

        config = EngineConfig(model=self.args.model, random_weights=self.args.random_weights, dtype=dtype,
                              device=self.args.device)
        return config, load(config)

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()

    # --- ceilings and floors ---------------------------------------------------------------------------------

    def ceilings(self) -> None:
        from glyphserve.bench.probe import copy_bandwidth

        if not self.cuda:
            return
        torch = self.torch
        self.results["copy_bandwidth_Bps"] = copy_bandwidth(self.device)
        self.results["matmul_flops"] = {
            "bfloat16": matmul_rate(torch.bfloat16, self.device),
            "float32": matmul_rate(torch.float32, self.device, 4096),
        }
        self.free()
        self.log("ceilings", json.dumps({k: self.results[k] for k in ("copy_bandwidth_Bps", "matmul_flops")}))

    def floors(self, model, doc: Document, grids, prompt_tokens: int, cached: int = 0) -> dict:
        if not self.cuda:
            return {}
        dtype = str(model.dtype).removeprefix("torch.")
        rate = self.results["matmul_flops"]["float32" if dtype == "float32" else "bfloat16"]
        return {
            "vision_s": vision_flops(model, grids) / rate,
            "prefill_s": prefill_flops(model, prompt_tokens - cached, cached) / rate,
            "decode_ms": decode_bytes(model) / self.results["copy_bandwidth_Bps"] * 1e3,
        }

    # --- rows ------------------------------------------------------------------------------------------------

    def record(self, row: dict, into: str = "rows") -> None:
        self.results[into].append(row)
        self.save()
        show = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "walls_s"}
        self.log(json.dumps(show))

    def hf_row(self, key: str, label: str, model, processor, docs: list[Document], repeats: int,
               vision=None) -> dict:
        """Processor + generate, timed whole (64 tokens) and to the first token; vision encode alone."""
        from glyphserve.bench.probe import hf_generate, hf_inputs

        n = self.args.new_tokens
        grids = None
        with self.vision_through(model, vision):
            self.clock(lambda: hf_generate(model, hf_inputs(processor, docs[0].pages, self.questions(),
                                                            device=self.device), 2))
            self.reset_peak()
            walls, ttfts, preps, visions, prompt = [], [], [], [], 0
            for i in range(repeats):
                doc = docs[i % len(docs)]
                question = self.questions()
                wall, _ = self.clock(lambda: hf_generate(
                    model, hf_inputs(processor, doc.pages, question, device=self.device), n))
                prep, inputs = self.clock(lambda: hf_inputs(processor, doc.pages, question, device=self.device))
                first, _ = self.clock(lambda: hf_generate(model, inputs, 1))
                with self.torch.inference_mode():
                    seconds, _ = self.clock(lambda: model.model.get_image_features(
                        inputs["pixel_values"], inputs["image_grid_thw"]))
                walls.append(wall)
                ttfts.append(prep + first)
                preps.append(prep)
                visions.append(seconds)
                prompt = int(inputs["input_ids"].shape[1])
                grids = [tuple(g) for g in inputs["image_grid_thw"].tolist()]
        wall, ttft, vis = median(walls), median(ttfts), median(visions)
        row = {
            "key": key, "label": label, "document": docs[0].name, "repeats": repeats, "walls_s": walls,
            "wall_s": wall, "ttft_s": ttft, "preprocess_s": median(preps), "vision_s": vis,
            "prefill_s": ttft - median(preps) - vis, "decode_ms": (wall - ttft) / (n - 1) * 1e3,
            "prompt_tokens": prompt, "peak_gib": self.peak_gib(),
            "floors": self.floors(model, docs[0], grids, prompt),
        }
        return row

    @contextlib.contextmanager
    def vision_through(self, model, vision):
        """generate with ``get_image_features`` answered by the engine's (compiled) vision runner."""
        if vision is None:
            yield
            return
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        def features(pixel_values, image_grid_thw=None, **_):
            grids = [tuple(g) for g in image_grid_thw.tolist()]
            return BaseModelOutputWithPooling(pooler_output=tuple(vision.encode(pixel_values.to(model.dtype), grids)))

        model.model.get_image_features = features
        try:
            yield
        finally:
            del model.model.get_image_features

    def engine_row(self, key: str, label: str, engine, docs: list[Document], setup, repeats: int,
                   use_cache: bool = True, warm_all: bool = False, follow_up: bool = False) -> dict:
        """engine.answer timed per repeat; ``setup(doc)`` runs untimed before each (cache state). ``warm_all``:
        every document is asked about once before the repeats; ``follow_up``: a first question about the document
        is asked (untimed) right before each timed one."""
        from glyphserve.engine import AnswerRequest, GenerationSettings

        settings = GenerationSettings(max_tokens=self.args.new_tokens, ignore_eos=True, use_cache=use_cache)

        def ask(doc):
            question = doc.text + self.questions()
            return engine.answer(AnswerRequest(pages=doc.pages, question=question, settings=settings))

        setup(docs[0])
        for doc in docs if warm_all else docs[:1]:  # warm-up
            ask(doc)
        self.reset_peak()
        walls, answers = [], []
        for i in range(repeats):
            doc = docs[i % len(docs)]
            setup(doc)
            if follow_up:
                ask(doc)
            wall, answer = self.clock(lambda: ask(doc))
            walls.append(wall)
            answers.append(answer)
        t = [a.timings for a in answers]
        last = answers[-1]
        grids = [engine.params.grid(*p.shape[:2]) for p in docs[0].pages]
        row = {
            "key": key, "label": label, "document": docs[0].name, "repeats": repeats, "walls_s": walls,
            "wall_s": median(walls), "ttft_s": median([x.time_to_first_token for x in t]),
            "preprocess_s": median([x.preprocess for x in t]), "vision_s": median([x.vision_encode for x in t]),
            "prefill_s": median([x.prefill for x in t]),
            "decode_ms": median([x.decode / max(1, a.new_tokens - 1) * 1e3 for x, a in zip(t, answers)]),
            "prompt_tokens": last.prompt_tokens, "peak_gib": self.peak_gib(),
            "vision_hits": last.cache.vision_hits, "vision_misses": last.cache.vision_misses,
            "prefix_reused_tokens": last.cache.prefix_reused_tokens,
            "floors": self.floors(engine.model, docs[0], grids, last.prompt_tokens,
                                  last.cache.prefix_reused_tokens),
        }
        return row

    # --- the run ---------------------------------------------------------------------------------------------

    def run(self) -> None:
        from glyphserve.engine import Engine

        args, torch = self.args, self.torch
        t0 = time.perf_counter()
        docs = render_documents(workload_chars(args.workload), range(DOCUMENTS), args.font)
        grow = render_documents(workload_chars(args.grow), range(2), args.font) if args.grow else []
        self.results["workload"] = {
            "name": args.workload, "characters": workload_chars(args.workload), "pages": len(docs[0].pages),
            "vision_tokens": docs[0].vision_tokens, "text_tokens_estimate": docs[0].text_tokens,
            "render_s": time.perf_counter() - t0,
        }
        self.log("workload", json.dumps(self.results["workload"]))
        self.ceilings()
        self.save()

        if args.fp32_repeats > 0:
            _, loaded = self.load("float32")
            processor = hf_processor(loaded.tokenizer, loaded.image_processor)
            self.record(self.hf_row("0", "processor + generate, float32, eager", loaded.model, processor, docs,
                                    args.fp32_repeats))
            del loaded, processor
            self.free()

        config, loaded = self.load("auto")
        model = loaded.model
        processor = hf_processor(loaded.tokenizer, loaded.image_processor)
        self.results["dtype"] = str(loaded.dtype).removeprefix("torch.")
        self.record(self.hf_row("1", f"processor + generate, {self.results['dtype']}", model, processor, docs,
                                args.hf_repeats))

        engine_config = dataclasses.replace(
            config, max_context=args.max_context, max_num_seqs=1, compile_vision=True,
            vision_batch_pages=len(docs[0].pages), pinned_copies=False,
        )
        t1 = time.perf_counter()
        engine = Engine(loaded, engine_config)
        self.results["engine_load_s"] = time.perf_counter() - t1
        self.results["engine_config"] = dataclasses.asdict(engine_config)
        t1 = time.perf_counter()
        with torch.inference_mode():
            engine.vision.encode(engine.preprocessor(docs[0].pages), [engine.params.grid(*p.shape[:2])
                                                                       for p in docs[0].pages])
        self.sync()
        self.results["vision_compile_s"] = time.perf_counter() - t1
        self.record(self.hf_row("2", "+ compiled vision encoder (generate)", model, processor, docs,
                                args.hf_repeats, vision=engine.vision))

        def clear_all(_doc):
            engine.clear_caches()

        def clear_prefix(_doc):
            engine.clear_caches(vision=False, prefix=True)

        def nothing(_doc):
            pass

        self.record(self.engine_row("3", "+ static-cache CUDA-graph decode (engine, caches off)", engine, docs,
                                    clear_all, args.repeats, use_cache=False))
        # warm_all: the vision features of every document are cached before the timed repeats
        self.record(self.engine_row("4", "+ vision-feature cache (same document, new question)", engine, docs,
                                    clear_prefix, args.repeats, warm_all=True))
        self.record(self.engine_row("5", "+ document-prefix KV cache (follow-up question)", engine, docs, nothing,
                                    args.repeats, follow_up=True))
        vision = engine.vision
        del engine
        self.free()

        # Row 6: everything on. The compiled vision encoder is handed over (compiling again costs ~17 s).
        engine = Engine(loaded, dataclasses.replace(engine_config, pinned_copies=True))
        engine.vision = vision
        self.results["engine_config"]["pinned_copies"] = True
        self.record(self.engine_row("6", "+ pinned async copies, overlapped preprocessing (cold)", engine, docs,
                                    lambda _d: engine.clear_caches(), args.repeats))
        self.record(self.engine_row("6b", "all on, vision-cache hit + new question", engine, docs,
                                    lambda _d: engine.clear_caches(vision=False, prefix=True), args.repeats,
                                    warm_all=True))
        self.record(self.engine_row("6c", "all on, prefix-KV follow-up", engine, docs, nothing, args.repeats,
                                    follow_up=True))
        self.record(self.engine_row("text", "text-only: the same LM prefilling the document as text tokens",
                                    engine, [self.as_text(d) for d in docs], clear_all, args.repeats,
                                    use_cache=False))

        if grow:
            self.record(self.engine_row("6", "all on, cold", engine, grow, lambda _d: engine.clear_caches(),
                                        max(2, args.repeats // 2)), "grow")
            self.record(self.engine_row("6c", "all on, prefix-KV follow-up", engine, grow, nothing,
                                        max(2, args.repeats // 2), follow_up=True), "grow")
            del engine, vision
            self.free()
            self.record(self.hf_row("1", f"processor + generate, {self.results['dtype']}", model, processor,
                                    grow, 2), "grow")
            self.results["grow_workload"] = {"name": args.grow, "pages": len(grow[0].pages),
                                             "vision_tokens": grow[0].vision_tokens}
        self.save()
        write_reports(self.results, self.path.with_suffix(""))

    def as_text(self, doc: Document) -> Document:
        """The document as text tokens. Random weights come with a small byte-level tokenizer that would split the
        text into far more tokens than GLM's; there the estimated count of filler tokens stands in (the cost of
        prefill depends on the count only)."""
        if self.args.model:
            from glyphserve.bench.workloads import make_workload_text

            seed = int(doc.name.split("#")[1])
            text = make_workload_text(workload_chars(self.args.workload), seed, "en")
        else:
            text = " the" * doc.text_tokens
        return dataclasses.replace(doc, pages=[], text=text + "\n\n")


def write_reports(results: dict, stem: Path) -> None:
    """Markdown table (and a PNG chart where matplotlib imports) next to the JSON."""
    stem.with_suffix(".md").write_text(to_markdown(results), encoding="utf-8")
    try:
        write_chart(results, stem.with_suffix(".png"))
    except ImportError:
        print("matplotlib missing: no chart (rerun with --report-from on a machine that has it)", file=sys.stderr)


def _fmt(value, digits: int = 3, floor=None) -> str:
    if value is None:
        return "-"
    text = f"{value:.{digits}f}"
    return f"{text} ({floor:.{digits}f})" if floor is not None else text


def targets(results: dict) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for issue 5's goals; met is None where a row is missing."""
    rows = {r["key"]: r for r in results["rows"]}
    out = []
    cold, base, follow = rows.get("6"), rows.get("0"), rows.get("6c")
    if cold:
        out.append((f"row 6 cold <= {TARGETS['row6_cold_s']} s", f"{cold['wall_s']:.3f} s",
                    cold["wall_s"] <= TARGETS["row6_cold_s"]))
        if base:
            speedup = base["wall_s"] / cold["wall_s"]
            out.append((f"row 6 >= {TARGETS['row6_speedup_over_row0']:.0f}x faster than row 0", f"{speedup:.1f}x",
                        speedup >= TARGETS["row6_speedup_over_row0"]))
        floor = cold["floors"].get("decode_ms")
        if floor:
            ratio = cold["decode_ms"] / floor
            out.append((f"decode <= {TARGETS['decode_over_floor']}x floor",
                        f"{cold['decode_ms']:.2f} ms = {ratio:.2f}x {floor:.2f} ms", ratio <= TARGETS["decode_over_floor"]))
    if follow:
        ok = follow["wall_s"] <= TARGETS["follow_up_s"] and follow["ttft_s"] <= TARGETS["follow_up_ttft_s"]
        out.append((f"follow-up <= {TARGETS['follow_up_s']} s, TTFT <= {TARGETS['follow_up_ttft_s'] * 1e3:.0f} ms",
                    f"{follow['wall_s']:.3f} s, TTFT {follow['ttft_s'] * 1e3:.0f} ms", ok))
    peaks = [rows[k]["peak_gib"] for k in ("6", "6b", "6c") if k in rows and rows[k]["peak_gib"] is not None]
    if peaks:
        out.append((f"peak GPU memory <= {TARGETS['peak_gib']:.0f} GiB ({results.get('dtype')})",
                    f"{max(peaks):.2f} GiB", max(peaks) <= TARGETS["peak_gib"]))
    return out


def _table(rows: list[dict], base: dict | None) -> list[str]:
    lines = [
        "| # | configuration | end-to-end s | TTFT s | vision encode s (floor) | prefill s (floor) "
        "| decode ms/token (floor) | prompt tokens | peak GiB | speed-up vs row 0 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        f = r.get("floors") or {}
        speedup = f"{base['wall_s'] / r['wall_s']:.1f}x" if base else "-"
        lines.append(
            f"| {r['key']} | {r['label']} | {_fmt(r['wall_s'])} | {_fmt(r['ttft_s'])} | "
            f"{_fmt(r['vision_s'], 3, f.get('vision_s'))} | {_fmt(r['prefill_s'], 3, f.get('prefill_s'))} | "
            f"{_fmt(r['decode_ms'], 2, f.get('decode_ms'))} | {r['prompt_tokens']} | {_fmt(r['peak_gib'], 2)} | "
            f"{speedup} |"
        )
    return lines


def to_markdown(results: dict) -> str:
    rows = results["rows"]
    base = next((r for r in rows if r["key"] == "0"), None)
    w = results["workload"]
    lines = [
        f"# Engine optimization ladder: {results['device']}",
        "",
        f"`glyphserve bench engine`, {results['date']}: torch {results['torch']}, transformers "
        f"{results['transformers']}, Python {results['python']}; model: {results['model']}, "
        f"{results.get('dtype', '?')} from row 1 on.",
        f"Workload {w['name']}: {w['characters']:,} characters of deterministic English "
        f"(`make_workload_text`, seeds 0-{DOCUMENTS - 1} rotated), glyph-en, last page uncropped: {w['pages']} pages, "
        f"{w['vision_tokens']:,} vision tokens (~{w['text_tokens_estimate']:,} tokens as text); one question; "
        f"{results['new_tokens']} answer tokens, EOS ignored. Rendering (not in the times) took "
        f"{w['render_s']:.2f} s for all documents.",
        "Each row warmed up, then the median of its repeats (documents and questions rotate; caches are cleared "
        "or filled before each repeat as the row says). Stages: TTFT includes preprocessing; decode ms/token = "
        "(end-to-end - TTFT) / (tokens - 1) for generate rows.",
    ]
    if "copy_bandwidth_Bps" in results:
        m = results["matmul_flops"]
        lines.append(
            f"Floors from ceilings measured in the same run: copy bandwidth {results['copy_bandwidth_Bps'] / 1e12:.2f} "
            f"TB/s (decode floor = weight bytes / it), matmul {m['bfloat16'] / 1e12:.0f} TFLOP/s bf16 and "
            f"{m['float32'] / 1e12:.0f} TFLOP/s fp32 (vision and prefill floor = FLOPs / it)."
        )
    lines += ["", *_table(rows, base), ""]
    if results.get("grow"):
        g = results.get("grow_workload", {})
        lines += [f"## How cost grows: {g.get('name')} ({g.get('pages')} pages, {g.get('vision_tokens', 0):,} "
                  "vision tokens)", "", *_table(results["grow"], None), ""]
    met = targets(results)
    if met:
        lines += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {t} | {m} | {'yes' if ok else 'no'} |" for t, m, ok in met]
        lines.append("")
    return "\n".join(lines)


def write_chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    base = next((r for r in rows if r["key"] == "0"), None)
    labels = [f"{r['key']}: {r['label']}" for r in rows][::-1]
    parts = {
        "preprocess + other": [max(0.0, r["ttft_s"] - r["vision_s"] - r["prefill_s"]) for r in rows],
        "vision encode": [r["vision_s"] for r in rows],
        "prefill": [r["prefill_s"] for r in rows],
        "decode": [r["wall_s"] - r["ttft_s"] for r in rows],
    }
    fig, ax = plt.subplots(figsize=(11, 0.55 * len(rows) + 1.6))
    left = [0.0] * len(rows)
    for (name, values), color in zip(parts.items(), ("#bbbbbb", "#4c72b0", "#dd8452", "#55a868")):
        values = values[::-1]
        ax.barh(labels, values, left=left[: len(values)], label=name, color=color)
        left = [a + b for a, b in zip(left, values)]
    for y, r in enumerate(rows[::-1]):
        note = f" {r['wall_s']:.2f} s" + (f"  ({base['wall_s'] / r['wall_s']:.1f}x)" if base else "")
        ax.text(r["wall_s"], y, note, va="center", fontsize=8)
    ax.set_xlabel("seconds, end to end")
    ax.set_xlim(0, max(r["wall_s"] for r in rows) * 1.25)
    ax.set_title(f"{results['workload']['name']} question, {results['new_tokens']} tokens: {results['device']}, "
                 f"torch {results['torch']}, transformers {results['transformers']}, {results['date'][:10]}",
                 fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
