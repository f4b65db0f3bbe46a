"""``python -m glyphserve.bench.fp8 --out DIR`` (also ``glyphserve bench fp8``): FP8 linear layers and the device
page resize on one GPU, in about a minute, no checkpoint needed.

1. The language model's linear layers at GLM-4.1V-9B's sizes, random weights built on the GPU. For M = 1, 8, 32,
   64 rows: bf16 ``F.linear``, the FP8 weight-only kernel (``fp8_linear``) and ``torch._scaled_mm`` (activations
   quantized per row, as the prefill path does). Each is timed as one CUDA graph over one distinct weight per
   layer (40 of each shape, so nothing is served from L2), per shape and for the whole language model (every
   layer's qkv, o, gate_up and down, then the head). Floors: weight bytes / the copy bandwidth measured in the same
   run. Accuracy: relative error (Frobenius norm) against the dequantized weights applied in fp32.
2. Page resize of a W200-sized document (24 glyph-en pages, 842x595 -> 840x588): Pillow on the CPU, page by page
   as the processor does, against ``resize_bicubic`` on the GPU (with and without the upload), and whether the two
   agree bit for bit; the whole ``PagePreprocessor`` on the GPU against itself on the CPU.

Each configuration that fails is recorded with its error and the rest goes on. Writes ``fp8-<card>.json`` and
``fp8-<card>.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from glyphserve.bench.engine import out_argument

ROWS = (1, 8, 32, 64)
METHODS = ("bf16", "fp8", "scaled_mm")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("fp8", help="FP8 linear layers and the device page resize on one GPU",
                              description=__doc__.split("\n\n")[0])
    _arguments(p)
    p.set_defaults(func=run)


def _arguments(p: argparse.ArgumentParser) -> None:
    out_argument(p, "fp8-<card>.json/.md")
    p.add_argument("--rows", default=",".join(map(str, ROWS)), help="activation rows M, comma-separated")
    p.add_argument("--replays", type=int, default=7, help="timed graph replays per configuration (median)")
    p.add_argument("--pages", type=int, default=24, help="pages of the resize timing")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    import torch

    from glyphserve.bench.engine import card_slug
    from glyphserve.errors import ConfigError

    if not torch.cuda.is_available():
        raise ConfigError("glyphserve bench fp8 needs a CUDA GPU")
    name = torch.cuda.get_device_name(0)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"fp8-{card_slug(name)}"
    bench = Fp8Bench(name, [int(r) for r in args.rows.split(",") if r.strip()], args.replays, stem)
    bench.run(args.pages)
    return 0


def log(*parts) -> None:
    print(*parts, flush=True)


def language_model_shapes() -> tuple[dict[str, tuple[int, int, bool]], int]:
    """({layer: (out, in, bias)}, decoder layers) of GLM-4.1V-9B's language model; the head is "lm_head"."""
    from glyphserve.engine.tiny import build_tokenizer, glm41v_9b_config

    text = glm41v_9b_config(build_tokenizer()).text_config
    hidden, inter = text.hidden_size, text.intermediate_size
    head_dim = getattr(text, "head_dim", None) or hidden // text.num_attention_heads
    qkv = (text.num_attention_heads + 2 * text.num_key_value_heads) * head_dim
    shapes = {"qkv": (qkv, hidden, True), "o": (hidden, hidden, False), "gate_up": (2 * inter, hidden, False),
              "down": (hidden, inter, False), "lm_head": (text.vocab_size, hidden, False)}
    return shapes, text.num_hidden_layers


class Fp8Bench:
    def __init__(self, device_name: str, rows: list[int], replays: int, stem: Path):
        import torch

        self.torch = torch
        self.device = torch.device("cuda")
        self.rows = rows
        self.replays = replays
        self.stem = stem
        self.results: dict = {
            "benchmark": "fp8",
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "device": device_name,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "rows": rows,
            "linear": [],
            "language_model": [],
            "resize": {},
            "errors": [],
        }

    def save(self) -> None:
        self.stem.with_suffix(".json").write_text(json.dumps(self.results, indent=1), encoding="utf-8")
        self.stem.with_suffix(".md").write_text(to_markdown(self.results), encoding="utf-8")

    def attempt(self, what: str, fn: Callable[[], object]):
        """fn(), or None with the error recorded (one failing configuration does not stop the run)."""
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - a benchmark reports every failure and carries on
            self.results["errors"].append({"what": what, "error": repr(exc)[:500]})
            log("FAILED", what, repr(exc)[:300])
            traceback.print_exc(limit=3)
            return None
        finally:
            self.save()

    def run(self, pages: int) -> None:
        from glyphserve.bench.engine import copy_bandwidth

        t0 = time.perf_counter()
        self.results["copy_bandwidth_Bps"] = copy_bandwidth(self.device)
        log(f"copy bandwidth {self.results['copy_bandwidth_Bps'] / 1e12:.2f} TB/s")
        self.attempt("resize", lambda: self.resize(pages))
        self.attempt("linear layers", self.linear_layers)
        self.results["wall_s"] = time.perf_counter() - t0
        self.save()
        log(to_markdown(self.results))
        log("wrote", self.stem.with_suffix(".json"), self.stem.with_suffix(".md"))

    # --- timing ----------------------------------------------------------------------------------------------

    def graph_ms(self, calls: list[Callable[[], object]]) -> float:
        """Milliseconds of one replay of a CUDA graph holding ``calls`` in order (median of the replays)."""
        torch = self.torch
        for call in calls:  # warm-up: compiles kernels, settles the allocator
            call()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for call in calls:
                call()
        graph.replay()
        times = []
        for _ in range(self.replays):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        del graph
        return statistics.median(times)

    # --- linear layers ---------------------------------------------------------------------------------------

    def linear_layers(self) -> None:
        import torch.nn.functional as F

        from glyphserve.engine.fp8 import dequantize_fp8, fp8_linear, quantize_fp8, scaled_mm_fits, scaled_mm_linear

        torch = self.torch
        shapes, layers = language_model_shapes()
        self.results["shapes"] = {k: list(v) for k, v in shapes.items()}
        self.results["layers"] = layers
        bandwidth = self.results["copy_bandwidth_Bps"]
        gen = torch.Generator(self.device).manual_seed(0)
        weights: dict[str, list[dict]] = {}
        t0 = time.perf_counter()
        for name, (n, k, has_bias) in shapes.items():
            weights[name] = []
            for _ in range(1 if name == "lm_head" else layers):
                w = torch.randn(n, k, device=self.device, generator=gen, dtype=torch.bfloat16) * 0.02
                b = torch.randn(n, device=self.device, generator=gen, dtype=torch.bfloat16) * 0.02 if has_bias else None
                q, s = quantize_fp8(w)
                weights[name].append({"w": w, "b": b, "q": q, "s": s})
        self.results["weights_built_s"] = time.perf_counter() - t0
        log(f"weights built in {self.results['weights_built_s']:.1f} s, "
            f"{torch.cuda.memory_allocated() / 2**30:.1f} GiB on the GPU")

        def call(method: str, x, p):
            if method == "bf16":
                return lambda: F.linear(x, p["w"], p["b"])
            if method == "fp8":
                return lambda: fp8_linear(x, p["q"], p["s"], p["b"])
            if not scaled_mm_fits(x, p["q"]):
                raise RuntimeError("torch._scaled_mm's row-wise FP8 GEMM does not run on this card or shape")
            return lambda: scaled_mm_linear(x, p["q"], p["s"], p["b"])

        def floor_ms(method: str, weight_elements: int) -> float:
            return weight_elements * (2 if method == "bf16" else 1) / bandwidth * 1e3

        inputs = {m: {k: torch.randn(m, k, device=self.device, generator=gen, dtype=torch.bfloat16)
                      for k in {k for _, k, _ in shapes.values()}} for m in self.rows}
        for m in self.rows:
            for name, (n, k, _) in shapes.items():
                x, first = inputs[m][k], weights[name][0]
                ref = x.float() @ dequantize_fp8(first["q"], first["s"], torch.float32).T
                exact = x.float() @ first["w"].float().T
                if first["b"] is not None:
                    ref += first["b"].float()
                    exact += first["b"].float()
                for method in METHODS:
                    def measure(method=method, name=name, x=x, n=n, k=k, ref=ref, exact=exact):
                        calls = [call(method, x, p) for p in weights[name]]
                        out = calls[0]().float()
                        target = exact if method == "bf16" else ref
                        ms = self.graph_ms(calls) / len(calls)
                        row = {"shape": name, "m": m, "method": method, "ms": ms,
                               "floor_ms": floor_ms(method, n * k),
                               "rel_error": float((out - target).norm() / target.norm()),
                               "rel_error_vs_bf16_weights": float((out - exact).norm() / exact.norm())}
                        self.results["linear"].append(row)
                        log(json.dumps(row))
                    self.attempt(f"{name} m={m} {method}", measure)
            for method in METHODS:
                def whole(method=method, m=m):
                    calls = [call(method, inputs[m][shapes[name][1]], weights[name][i])
                             for i in range(layers) for name in ("qkv", "o", "gate_up", "down")]
                    calls.append(call(method, inputs[m][shapes["lm_head"][1]], weights["lm_head"][0]))
                    elements = sum(n * k * len(weights[name]) for name, (n, k, _) in shapes.items())
                    row = {"m": m, "method": method, "ms": self.graph_ms(calls), "floor_ms": floor_ms(method, elements)}
                    self.results["language_model"].append(row)
                    log(json.dumps(row))
                self.attempt(f"language model m={m} {method}", whole)

    # --- page resize -----------------------------------------------------------------------------------------

    def resize(self, count: int) -> None:
        import numpy as np
        from PIL import Image

        from glyphserve.bench.probe import synthetic_pages
        from glyphserve.engine.preprocess import PagePreprocessor, PreprocessParams
        from glyphserve.engine.resize import resize_bicubic

        torch = self.torch
        params = PreprocessParams()
        pages = synthetic_pages(count, 842, 595)
        height, width = params.resized_shape(842, 595)

        def pil():
            return [np.array(Image.fromarray(p).resize((width, height), Image.Resampling.BICUBIC)) for p in pages]

        host = torch.from_numpy(np.stack(pages)).pin_memory()

        def device(upload: bool):
            batch = host.to(self.device, non_blocking=True) if upload else resident
            return resize_bicubic(batch, height, width)

        resident = host.to(self.device)
        reference = pil()
        ours = device(False)
        torch.cuda.synchronize()

        def wall_ms(fn, repeats: int = 5) -> float:
            times = []
            for _ in range(repeats):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                torch.cuda.synchronize()
                times.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(times)

        cpu_pp = PagePreprocessor(params, torch.device("cpu"), torch.float32)
        gpu_pp = PagePreprocessor(params, self.device, torch.float32)
        gpu_bf16 = PagePreprocessor(params, self.device, torch.bfloat16)
        few = pages[:4]
        self.results["resize"] = {
            "pages": count,
            "from": [842, 595],
            "to": [height, width],
            "cpu_pil_ms": wall_ms(pil, 3),
            "gpu_resize_ms": wall_ms(lambda: device(False)),
            "gpu_upload_and_resize_ms": wall_ms(lambda: device(True)),
            "gpu_preprocess_bf16_ms": wall_ms(lambda: gpu_bf16(pages)),
            "bit_exact_vs_pil": bool(np.array_equal(ours.cpu().numpy(), np.stack(reference))),
            "preprocess_gpu_equals_cpu": bool(torch.equal(gpu_pp(few).cpu(), cpu_pp(few))),
        }
        log(json.dumps(self.results["resize"]))


def _ms(value: float | None, floor: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f} ({value / floor:.2f}x)" if floor else f"{value:.3f}"


def to_markdown(results: dict) -> str:
    lines = [f"# FP8 weight-only linear and device resize — {results['device']}", "",
             f"{results['date']}, torch {results['torch']}. Copy bandwidth "
             f"{results.get('copy_bandwidth_Bps', 0) / 1e12:.2f} TB/s (bytes read + written per second); floors are "
             "weight bytes / that bandwidth. Times: ms per call, CUDA graph replay, distinct weights per layer "
             "(no L2 reuse); in brackets: times the floor. Errors: relative (Frobenius) against the dequantized "
             "weights in fp32 (bf16: against its own weights in fp32); the last column: the FP8 kernel against the bf16 "
             "weights it was quantized from (kernel and quantization together).", ""]
    whole = {(r["m"], r["method"]): r for r in results.get("language_model", [])}
    if whole:
        lines += ["## Whole language model (every layer's qkv, o, gate_up, down, then the head)", "",
                  "| M | bf16 ms (x floor) | FP8 kernel ms (x floor) | _scaled_mm ms (x floor) | FP8 kernel vs bf16 |",
                  "|---:|---:|---:|---:|---:|"]
        for m in results["rows"]:
            cells = [whole.get((m, method)) for method in METHODS]
            speed = (f"{cells[0]['ms'] / cells[1]['ms']:.2f}x" if cells[0] and cells[1] else "-")
            lines.append(f"| {m} | " + " | ".join(_ms(c["ms"], c["floor_ms"]) if c else "-" for c in cells)
                         + f" | {speed} |")
        lines.append("")
    linear = {(r["shape"], r["m"], r["method"]): r for r in results.get("linear", [])}
    if linear:
        lines += ["## Per layer", "",
                  "| layer [out, in] | M | bf16 ms (x floor) | FP8 kernel ms (x floor) | _scaled_mm ms (x floor) "
                  "| FP8 kernel error | _scaled_mm error | FP8 kernel vs bf16 weights |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, (n, k, _) in results.get("shapes", {}).items():
            for m in results["rows"]:
                cells = [linear.get((name, m, method)) for method in METHODS]
                errors = [f"{c['rel_error']:.1e}" if c else "-" for c in cells[1:]]
                drift = f"{cells[1]['rel_error_vs_bf16_weights']:.1e}" if cells[1] else "-"
                lines.append(f"| {name} [{n}, {k}] | {m} | "
                             + " | ".join(_ms(c["ms"], c["floor_ms"]) if c else "-" for c in cells)
                             + f" | {errors[0]} | {errors[1]} | {drift} |")
        lines.append("")
    r = results.get("resize") or {}
    if r:
        lines += [f"## Page resize ({r['pages']} pages {r['from'][0]}x{r['from'][1]} -> {r['to'][0]}x{r['to'][1]})",
                  "", "| Pillow on the CPU, page by page | GPU resize | GPU upload + resize | GPU preprocess (bf16) "
                  "| bit-exact vs Pillow | GPU preprocess = CPU |", "|---:|---:|---:|---:|---|---|",
                  f"| {r['cpu_pil_ms']:.1f} ms | {r['gpu_resize_ms']:.2f} ms | {r['gpu_upload_and_resize_ms']:.2f} ms "
                  f"| {r['gpu_preprocess_bf16_ms']:.2f} ms | {r['bit_exact_vs_pil']} | {r['preprocess_gpu_equals_cpu']} |",
                  ""]
    for e in results.get("errors", []):
        lines.append(f"- FAILED {e['what']}: `{e['error']}`")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
