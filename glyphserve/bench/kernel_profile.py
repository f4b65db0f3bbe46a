"""``glyphserve bench profile``: where one GPU's time goes in a cold question and in a decode step, kernel by kernel.

On the engine ``bench engine`` measures (random full-size weights or a checkpoint), under PyTorch's profiler:

- ``W50 cold`` and ``W200 cold`` (``--grow``): one question with caches cleared, answered with one token, so the
  trace is the time to first token (page upload and preprocessing, vision tower, prefill, head);
- ``decode``: a follow-up's decode steps, one row, replayed from CUDA graphs: the trace of an answer of
  ``--new-tokens`` tokens less that of one answered with one token (the follow-up's prefill), per step;
- ``decode, eager``: the same with the graphs set aside, so each kernel of the step is launched from Python (the
  kernels' own durations are the same; the graph row shows what the launches' gaps cost);
- ``N follow-ups at once`` (``--wave``): follow-up questions arriving together, as under many sessions, which
  run as a prompt pass, eager and replayed from a captured pass (``wave_phase``), with the host's side of the
  trace: the operators and runtime calls that took most of the CPU.

Per phase: wall time, the time some kernel ran (union of kernel intervals), the summed kernel time by kind (matrix
products, attention, Inductor's ``triton_*`` kernels as "compiled" (the project's own Triton kernels go by what
they do: the weight-streaming kernels are matrix products, the residual adds between norms "norm", the rotations and
K/V store "other"), copies, other) and the kernels that took most, with their launch counts. With ``--quantize fp8``
the decode phases run again with FP8 weights. Writes ``profile-<card>.json`` and ``.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import re
import sys
import tempfile
import time
from pathlib import Path

KINDS = (  # first match wins; names as CUPTI reports them
    ("attention", re.compile(r"flash|fmha|sdpa|attention|attn|_attend|_combine", re.I)),
    ("matmul", re.compile(r"gemm|gemv|cutlass|xmma|nvjet|_fp8_weight|_row_kernel|split_sum|splitk|sm\d+_", re.I)),
    ("norm", re.compile(r"_add_rms_norms", re.I)),  # the residual adds between norms (Inductor's before: compiled)
    ("compiled", re.compile(r"^triton_", re.I)),
    ("copy", re.compile(r"memcpy|memset|copy|index_put|scatter|gather|cat", re.I)),
)
KEPT_KERNELS = 50  # per phase, the most time first (the sums by kind count them all)
NAME_CHARS = 200  # of a kernel's name (C++ template names run to thousands)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("profile", help="kernel-level profile of a cold question and a decode step (GPU)",
                              description=__doc__.split("\n\n")[0])
    from glyphserve.bench.engine import model_arguments, out_argument

    model_arguments(p)
    p.add_argument("--workload", default="W50")
    p.add_argument("--grow", default="W200", help="a second, larger cold question ('' to skip)")
    p.add_argument("--new-tokens", type=int, default=64, help="answer length of the decode phases")
    p.add_argument("--max-context", type=int, default=16384)
    p.add_argument("--quantize", choices=["fp8"], help="also profile decode with quantized weights")
    p.add_argument("--wave", type=int, default=16, metavar="SESSIONS",
                   help="a wave of this many follow-ups at once, 4 sessions a document (0 to skip)")
    p.add_argument("--top", type=int, default=20, help="kernels listed per phase")
    p.add_argument("--font", help="font file for rendering")
    out_argument(p, "profile-<card>.json/.md")
    p.set_defaults(func=run, device="cuda", repeats=1)


def run(args: argparse.Namespace) -> int:
    import torch

    from glyphserve.bench.engine import card_slug
    from glyphserve.errors import ConfigError

    if not torch.cuda.is_available():
        raise ConfigError("glyphserve bench profile needs a CUDA GPU")
    if not (args.model or args.random_weights):
        raise ConfigError("give --model or --random-weights")
    res = profile(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"profile-{card_slug(res['device'])}"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    stem.with_suffix(".md").write_text(to_markdown(res, args.top))
    print(f"wrote {stem}.json and .md", flush=True)
    return 0


def kind(name: str) -> str:
    return next((k for k, pattern in KINDS if pattern.search(name)), "other")


def summarize(trace: dict, wall_s: float) -> dict:
    """Kernel events of a Chrome trace: wall time, busy time (union of intervals), kernel time and launches, sums by
    kind and by name (ms)."""
    kernels = [e for e in trace.get("traceEvents", []) if e.get("cat") == "kernel" and "dur" in e]
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in kernels)
    busy, end = 0.0, float("-inf")
    for a, b in spans:
        if b > end:
            busy += b - max(a, end)
            end = b
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        entry = by_name.setdefault(e["name"], [0, 0.0])
        entry[0] += 1
        entry[1] += e["dur"] / 1e3
    by_kind: dict[str, float] = {}
    for name, (_, ms) in by_name.items():
        by_kind[kind(name)] = by_kind.get(kind(name), 0.0) + ms
    return {"wall_ms": wall_s * 1e3, "busy_ms": busy / 1e3, "kernel_ms": sum(e["dur"] for e in kernels) / 1e3,
            "launches": len(kernels), "by_kind_ms": by_kind, "by_name": by_name}


def per_step(total: dict, steps: int, less: dict | None = None) -> dict:
    """A summary (less another one: what one run did beyond the other) divided by ``steps``, kinds and kernels
    sorted by time, the ``KEPT_KERNELS`` that took most listed."""
    less = less or {"wall_ms": 0, "busy_ms": 0, "kernel_ms": 0, "launches": 0, "by_kind_ms": {}, "by_name": {}}
    per = max(1, steps)
    out = {"steps": steps, **{k: (total[k] - less[k]) / per for k in ("wall_ms", "busy_ms", "kernel_ms", "launches")}}
    kinds = {k: (ms - less["by_kind_ms"].get(k, 0.0)) / per for k, ms in total["by_kind_ms"].items()}
    out["by_kind_ms"] = dict(sorted(kinds.items(), key=lambda kv: -kv[1]))
    names = {n: ((c - less["by_name"].get(n, (0, 0.0))[0]) / per, (ms - less["by_name"].get(n, (0, 0.0))[1]) / per)
             for n, (c, ms) in total["by_name"].items()}
    out["kernels"] = [{"name": n[:NAME_CHARS], "kind": kind(n), "launches": c, "ms": ms}
                      for n, (c, ms) in sorted(names.items(), key=lambda kv: -kv[1][1]) if c > 0][:KEPT_KERNELS]
    return out


def traced(bench, fn, host: bool = False) -> tuple[dict, object]:
    """(summary of ``fn()`` under the profiler, CUDA kernels only; what ``fn`` returned). With ``host``, the CPU's
    side too: the ``KEPT_KERNELS`` operators and runtime calls that took most of the host's own time (``host_ops``,
    ms and calls; the profiler's overhead is in them)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA if bench.cuda else ProfilerActivity.CPU]
    if host and bench.cuda:
        activities.append(ProfilerActivity.CPU)
    bench.sync()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        result = fn()
        bench.sync()
        wall = time.perf_counter() - t0
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        trace = json.loads(Path(f.name).read_text())
    summary = summarize(trace, wall)
    if host:
        ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:KEPT_KERNELS]
        summary["host_ops"] = [{"name": e.key[:NAME_CHARS], "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3}
                               for e in ops]
    return summary, result


def report(phase: dict, answer) -> dict:
    """``phase`` with the answer's stage timings, printed as a JSON line."""
    timings = getattr(answer, "timings", None)
    if timings is not None:
        phase["engine_timings_s"] = {k: v for k, v in dataclasses.asdict(timings).items() if isinstance(v, float)}
    print(json.dumps({k: v for k, v in phase.items() if k not in ("kernels", "host_ops")}), flush=True)
    return phase


def decode_phases(bench, engine, pages) -> dict:
    """A follow-up's decode steps with graphs, then without: the trace of a follow-up answered with every token less
    that of one answered with one token (its prefill and first token), per step after the first token."""
    runner = engine.runner
    ask = lambda tokens: (lambda: engine.answer(bench.api.request(pages, bench.question(), tokens)))  # noqa: E731
    ask(1)()  # the document's prefix cached: what follows decodes
    out = {}
    graphs = runner.graphs
    for label, captured in (("decode", graphs), ("decode, eager", {})):
        runner.graphs = captured
        try:
            ask(bench.args.new_tokens)()  # this path warm
            first, _ = traced(bench, ask(1))
            whole, answer = traced(bench, ask(bench.args.new_tokens))
        finally:
            runner.graphs = graphs
        out[label] = report(per_step(whole, answer.new_tokens - 1, less=first), answer)
    return out


def wave_phase(bench, engine, docs: list[list], sessions: int) -> dict:
    """Follow-ups as a server under many sessions gets them: ``sessions`` first questions on ``docs`` answered
    (``--new-tokens`` each; the documents' prefixes cached), then every session's second question at once, its
    first question and answer as history (a chunk of ~60-260 new tokens after a cached prefix each): more rows
    than a graph step holds, so a prompt pass (``bench serve``'s follow-up waves). Answered with one token,
    planned beforehand (a server plans on its request threads). Eager (launched kernel by kernel), then replayed
    from a captured pass where the engine has them (``pass_graphs``): each a warm wave, one timed without the
    profiler (wall time and the calling thread's CPU time), one traced with the host's side (``traced``'s
    ``host_ops``); each wave's first questions are new, so no follow-up prompt is cached."""
    from glyphserve.engine import AnswerRequest, ChatMessage, GenerationSettings

    def follow_ups():
        first = [bench.api.request(docs[i % len(docs)], bench.question(), bench.args.new_tokens)
                 for i in range(sessions)]
        answers = engine.answer_batch(first)
        return [engine.plan(AnswerRequest(pages=r.pages, question=bench.question(), settings=GenerationSettings(
            ignore_eos=True, max_tokens=1), history=[ChatMessage("user", r.question), ChatMessage("assistant", a.text)]))
            for r, a in zip(first, answers)]

    def timed_wave() -> dict:
        wave = follow_ups()
        before = engine.counters()
        bench.sync()
        t0, cpu0 = time.perf_counter(), time.thread_time()
        answers = engine.answer_batch(wave)
        bench.sync()
        after = engine.counters()
        return {"wall_ms": (time.perf_counter() - t0) * 1e3, "thread_cpu_ms": (time.thread_time() - cpu0) * 1e3,
                "passes": after["prefill_passes"] - before["prefill_passes"],
                "graph_passes": after.get("graph_passes", 0) - before.get("graph_passes", 0),
                "new_tokens": sum(a.prompt_tokens - a.cache.prefix_reused_tokens for a in answers)}

    captured = getattr(engine.core, "passes", None)
    phases = {}
    for mode, passes in (("eager", None), ("captured", captured)):
        if mode == "captured" and passes is None:
            continue
        engine.core.passes = passes
        engine.answer_batch(follow_ups())  # these shapes compiled and warm
        plain = timed_wave()
        wave = follow_ups()
        total, answers = traced(bench, lambda: engine.answer_batch(wave), host=True)
        phase = per_step(total, 1)
        phase["host_ops"] = total["host_ops"]
        phase["unprofiled"] = plain
        print(json.dumps({"wave": mode, **plain, "host_ops": phase["host_ops"][:12]}), flush=True)
        phases[mode] = report(phase, answers[0])
    engine.core.passes = captured
    return phases


def profile(args: argparse.Namespace) -> dict:
    import torch
    import transformers

    from glyphserve.bench.engine import Bench, release_memory, render_documents, workload_chars
    from glyphserve.engine import Engine

    bench = Bench(args)
    name = torch.cuda.get_device_name(bench.device) if bench.cuda else "cpu"
    res = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "device": name,
           "torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0],
           "model": args.model or f"random weights ({args.random_weights})", "new_tokens": args.new_tokens,
           "phases": {}}
    docs = render_documents(workload_chars(args.workload), range(2), args.font)
    grow = render_documents(workload_chars(args.grow), range(1), args.font) if args.grow else []
    engine = Engine.load(bench.api.config(args, max(8, args.wave)))  # the wave's sessions run together
    bench.ask(engine, docs[1])  # warm-up
    one = lambda pages: (lambda: engine.answer(bench.api.request(pages, bench.question(), 1)))  # noqa: E731
    for label, pages in [(f"{args.workload} cold", docs[0])] + ([(f"{args.grow} cold", grow[0])] if grow else []):
        engine.clear_caches()
        one(pages)()  # this shape compiled and warm
        engine.clear_caches()
        total, answer = traced(bench, one(pages))
        res["phases"][label] = report(per_step(total, 1), answer)
    for key, phase in decode_phases(bench, engine, docs[0]).items():
        res["phases"][key] = phase
    if args.wave:
        wave_docs = docs + render_documents(workload_chars(args.workload), range(2, -(-args.wave // 4)), args.font)
        for mode, phase in wave_phase(bench, engine, wave_docs, args.wave).items():
            res["phases"][f"{args.wave} follow-ups at once, {mode}"] = phase
    engine.close()
    release_memory()
    if args.quantize:
        quantized = Engine.load(bench.api.config(args, 8, quantize=args.quantize))
        bench.ask(quantized, docs[1])
        for key, phase in decode_phases(bench, quantized, docs[0]).items():
            res["phases"][f"{key}, {args.quantize}"] = phase
        quantized.close()
        release_memory()
    return res


def to_markdown(res: dict, top: int) -> str:
    lines = [f"# Kernel profile: {res['device']}", "",
             f"{res['date']}; torch {res['torch']}, transformers {res['transformers']}; {res['model']}. Decode phases: "
             f"a follow-up's {res['new_tokens']}-token answer, one row, figures per step; cold phases: one question "
             "answered with one token. Busy: time some kernel ran (union of intervals).", "",
             "| phase | wall ms | busy ms | kernel ms | launches | by kind (ms) |", "|---|---:|---:|---:|---:|---|"]
    for label, p in res["phases"].items():
        kinds = ", ".join(f"{k} {v:.3f}" for k, v in p["by_kind_ms"].items())
        lines.append(f"| {label} | {p['wall_ms']:.3f} | {p['busy_ms']:.3f} | {p['kernel_ms']:.3f} | "
                     f"{p['launches']:.0f} | {kinds} |")
    for label, p in res["phases"].items():
        lines += ["", f"## {label}", "", "| kernel | kind | launches | ms |", "|---|---|---:|---:|"]
        for k in p["kernels"][:top]:
            lines.append(f"| `{k['name'][:110]}` | {k['kind']} | {k['launches']:.1f} | {k['ms']:.4f} |")
        if "unprofiled" in p:
            u = p["unprofiled"]
            lines += ["", f"Without the profiler: {u['wall_ms']:.1f} ms wall, {u['thread_cpu_ms']:.1f} ms of the "
                          f"calling thread's CPU, {u['passes']} passes ({u['graph_passes']} replayed), "
                          f"{u['new_tokens']} prompt tokens computed."]
        if "host_ops" in p:
            lines += ["", "| host op (self time) | calls | ms |", "|---|---:|---:|"]
            lines += [f"| `{o['name'][:110]}` | {o['calls']} | {o['self_ms']:.3f} |" for o in p["host_ops"][:top]]
    return "\n".join(lines) + "\n"
