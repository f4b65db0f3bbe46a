"""``python -m glyphserve.bench.attention --out DIR`` (or ``glyphserve bench attention``): the paged attention op
(``glyphserve.engine.attention``) on one CUDA GPU at GLM-4.1V-9B's shapes, in well under two minutes.

1. Correctness: the Triton op against the PyTorch reference on the GPU with fresh random inputs (never zeros) and
   ``out`` poisoned with NaN: ragged decode, short prefills, a mixed batch, block size 32, the tiny model's fp32
   shapes, and a CUDA graph replayed after its sequences' lengths and block tables changed on the device.
   Relative error ||op - ref|| / ||ref||: bf16 operands land near 2e-3; a check fails above 1e-2 (fp32: 1e-5)
   or on any unwritten element.
2. Decode, one query per row: 1, 8, 32, 64, 128 rows x 4,096 cached tokens and 1 row x 16,384 (``--long`` adds
   1 x 32,768 and 1 x 65,536). The op against dense SDPA (``enable_gqa``) over the same amount of K/V stored
   contiguously, and against the floor: K/V bytes read / the copy bandwidth measured in the same run. Each time is
   the median over CUDA-graph replays of one graph that runs the op over several layers' pools in turn (256 MiB of
   K/V or more), so K/V streams from memory rather than L2, as in a decode step. Block tables are as wide as a
   32,768-token context, blocks scattered through the pool.
3. Short prefill: one sequence, 32 and 128 queries after a 4,096-token prefix (a follow-up question), against
   dense SDPA over the whole K/V (non-causal: no more work than the causal op) and a floor that also counts FLOPs
   at the measured bf16 matmul rate.

A configuration that fails is reported with its error and the run goes on. Writes attention-<card>.json and .md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import statistics
import sys
import traceback

from glyphserve.bench.engine import out_argument

TABLE_TOKENS = 32768  # block-table width in tokens, as the engine sizes it for its longest context
MIN_BYTES_PER_GRAPH = 256 * 2**20  # K/V per timed graph: several times the 50-60 MB L2 of a Hopper card
DECODE_SHAPES = ((1, 4096), (8, 4096), (32, 4096), (64, 4096), (128, 4096), (1, 16384))
LONG_SHAPES = ((1, 32768), (1, 65536))
PREFILL_QUERIES = (32, 128)
PREFIX_TOKENS = 4096


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("attention", help="paged attention op vs dense SDPA on one GPU",
                              description=__doc__.split("\n\n")[0])
    _arguments(p)
    p.set_defaults(func=run)


def _arguments(p: argparse.ArgumentParser) -> None:
    out_argument(p, "attention-<card>.json/.md")
    p.add_argument("--long", action="store_true", help="also 1 row x 32,768 and x 65,536 tokens")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--replays", type=int, default=30, help="timed replays of each graph (median)")


@dataclasses.dataclass(frozen=True)
class Heads:
    n_heads: int
    kv_heads: int
    head_dim: int


@dataclasses.dataclass
class Check:
    name: str
    rel_error: float | None = None
    unwritten: int | None = None
    tolerance: float = 1e-2
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.unwritten == 0 and self.rel_error is not None \
            and self.rel_error <= self.tolerance


@dataclasses.dataclass
class Timing:
    kind: str  # "decode" | "prefill"
    rows: int
    cached_tokens: int  # keys per row before this step's queries
    queries: int  # per row
    layers: int = 0  # pools one graph runs through
    kv_bytes: int = 0  # K/V one layer reads
    splits: int | None = None
    op_us: float | None = None
    sdpa_us: float | None = None
    floor_us: float | None = None
    error: str | None = None

    @property
    def name(self) -> str:
        return f"{self.kind} {self.rows} x {self.cached_tokens:,}" + (f" + {self.queries} q" if self.queries > 1
                                                                       else "")


def model_heads(text_config) -> Heads:
    return Heads(text_config.num_attention_heads, text_config.num_key_value_heads,
                 text_config.hidden_size // text_config.num_attention_heads)


class Batch:
    """Random paged inputs: ``layers`` pools of K/V, one block table (blocks scattered, garbage past each length)."""

    def __init__(self, heads: Heads, seq_lens, query_lens, *, layers=1, block_size=16, dtype=None,
                 table_tokens=TABLE_TOKENS, device="cuda"):
        import torch

        dtype = dtype or torch.bfloat16
        needed = [-(-n // block_size) for n in seq_lens]
        width = max(-(-table_tokens // block_size), *needed)
        num_blocks = sum(needed) + 1
        order = torch.randperm(num_blocks, device=device).to(torch.int32)
        self.block_tables = torch.randint(0, num_blocks, (len(seq_lens), width), device=device, dtype=torch.int32)
        used = 0
        for i, n in enumerate(needed):
            self.block_tables[i, :n] = order[used : used + n]
            used += n
        shape = (num_blocks, block_size, heads.kv_heads, heads.head_dim)
        self.pools = [(torch.randn(shape, device=device, dtype=dtype), torch.randn(shape, device=device, dtype=dtype))
                      for _ in range(layers)]
        self.seq_lens = torch.tensor(seq_lens, device=device, dtype=torch.int32)
        self.query_start = torch.tensor([0, *query_lens], device=device).cumsum(0).to(torch.int32)
        self.q = torch.randn((sum(query_lens), heads.n_heads, heads.head_dim), device=device, dtype=dtype)
        self.max_query_len = max(1, *query_lens)
        self.scale = heads.head_dim**-0.5
        self.outs = [torch.empty_like(self.q) for _ in range(layers)]

    def args(self, layer: int = 0) -> tuple:
        k, v = self.pools[layer]
        return (self.q, k, v, self.block_tables, self.seq_lens, self.query_start, self.scale, self.max_query_len)

    def run_all(self) -> None:
        from glyphserve.engine.attention import paged_attention

        for layer, out in enumerate(self.outs):
            paged_attention(*self.args(layer), out=out)


def relative_error(out, ref) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def graph_us(fn, replays: int) -> float:
    """Median microseconds of one replay of a CUDA graph of ``fn`` (warmed up and compiled first)."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


class AttentionBench:
    def __init__(self, args: argparse.Namespace):
        import torch
        import triton

        from glyphserve.bench.engine import card_slug

        if not torch.cuda.is_available():
            raise SystemExit("glyphserve bench attention needs a CUDA GPU")
        self.args = args
        self.torch = torch
        from glyphserve.engine.tiny import build_tokenizer, glm41v_9b_config, tiny_config

        tokenizer = build_tokenizer()
        self.heads = model_heads(glm41v_9b_config(tokenizer).text_config)  # GLM-4.1V-9B's language model
        self.tiny_heads = model_heads(tiny_config(tokenizer).text_config)
        name = torch.cuda.get_device_name(0)
        self.results = {
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "device": name,
            "card": card_slug(name),
            "sms": torch.cuda.get_device_properties(0).multi_processor_count,
            "torch": torch.__version__,
            "triton": triton.__version__,
            "heads": dataclasses.asdict(self.heads),
            "block_size": args.block_size,
            "table_tokens": TABLE_TOKENS,
            "checks": [],
            "timings": [],
        }
        args.out.mkdir(parents=True, exist_ok=True)
        self.stem = args.out / f"attention-{self.results['card']}"

    def log(self, *parts) -> None:
        print(*parts, flush=True)

    def save(self) -> None:
        self.stem.with_suffix(".json").write_text(json.dumps(self.results, indent=1) + "\n")
        self.stem.with_suffix(".md").write_text(to_markdown(self.results), encoding="utf-8")

    def run(self) -> None:
        from glyphserve.bench.engine import matmul_rate
        from glyphserve.bench.engine import copy_bandwidth

        torch = self.torch
        self.bandwidth = copy_bandwidth("cuda")
        self.matmul = matmul_rate(torch.bfloat16, "cuda")
        self.results["copy_bandwidth_Bps"] = self.bandwidth
        self.results["matmul_bf16_flops"] = self.matmul
        self.log(f"{self.results['device']}: copy {self.bandwidth / 1e12:.2f} TB/s, bf16 matmul "
                 f"{self.matmul / 1e12:.0f} TFLOP/s")
        self.checks()
        for rows, tokens in DECODE_SHAPES + (LONG_SHAPES if self.args.long else ()):
            self.timing(Timing("decode", rows, tokens, 1))
        for queries in PREFILL_QUERIES:
            self.timing(Timing("prefill", 1, PREFIX_TOKENS, queries))
        self.save()
        self.log("\n" + to_markdown(self.results))

    # --- correctness -----------------------------------------------------------------------------------------

    def checks(self) -> None:
        torch = self.torch
        glm, tiny = self.heads, self.tiny_heads
        gen = torch.Generator().manual_seed(0)
        ragged = [0, 1, 15, 16, 17] + torch.randint(1, 5000, (32,), generator=gen).tolist()
        bs = self.args.block_size
        cases = [
            ("decode, 37 ragged rows (0..5k keys)", glm, ragged, [1] * len(ragged), bs, torch.bfloat16),
            ("prefill, 128 queries after 4,096", glm, [4096 + 128], [128], bs, torch.bfloat16),
            ("mixed: decode + prefills + empty", glm, [300, 4096 + 17, 0, 2000, 64, 9],
             [1, 17, 1, 1, 64, 3], bs, torch.bfloat16),
            ("decode, block size 32", glm, ragged[:12], [1] * 12, 32, torch.bfloat16),
            ("tiny model shapes, fp32", tiny, [5, 300, 0, 77], [1, 20, 1, 4], bs, torch.float32),
        ]
        for name, heads, seq_lens, query_lens, block_size, dtype in cases:
            check = Check(name, tolerance=1e-2 if dtype == torch.bfloat16 else 1e-5)
            try:
                batch = Batch(heads, seq_lens, query_lens, block_size=block_size, dtype=dtype)
                self.compare(check, batch, lambda b=batch: b.run_all())
            except Exception as exc:  # report and go on
                check.error = _describe(exc)
            self.record_check(check)
        self.graph_check()

    def compare(self, check: Check, batch: Batch, run) -> None:
        from glyphserve.engine.attention import paged_attention_reference

        batch.outs[0].fill_(float("nan"))
        run()
        self.torch.cuda.synchronize()
        ref = paged_attention_reference(*batch.args())
        check.unwritten = int(batch.outs[0].isnan().sum())
        check.rel_error = relative_error(batch.outs[0].nan_to_num(), ref)

    def graph_check(self) -> None:
        """One graph captured for 16 rows, replayed after lengths and tables changed in place on the device."""
        torch = self.torch
        check = Check("CUDA graph replayed with new lengths/tables")
        try:
            batch = Batch(self.heads, [4096] * 16, [1] * 16, block_size=self.args.block_size)
            batch.run_all()  # compiles outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                batch.run_all()
            fresh = Batch(self.heads, torch.randint(1, 4097, (16,)).tolist(), [1] * 16, layers=0,
                          block_size=self.args.block_size)  # its block numbers fit the first batch's pool
            batch.seq_lens.copy_(fresh.seq_lens)
            batch.block_tables.copy_(fresh.block_tables)
            batch.q.copy_(torch.randn_like(batch.q))
            self.compare(check, batch, graph.replay)
        except Exception as exc:
            check.error = _describe(exc)
        self.record_check(check)

    def record_check(self, check: Check) -> None:
        self.results["checks"].append({**dataclasses.asdict(check), "ok": check.ok})
        state = "ok" if check.ok else "FAILED"
        self.log(f"check {check.name}: {state} rel {check.rel_error} unwritten {check.unwritten}"
                 + (f" error {check.error}" if check.error else ""))
        self.torch.cuda.empty_cache()

    # --- speed -----------------------------------------------------------------------------------------------

    def timing(self, row: Timing) -> None:
        from glyphserve.engine.attention import plan_launch

        torch, h = self.torch, self.heads
        seq_len = row.cached_tokens + (row.queries if row.kind == "prefill" else 0)
        row.kv_bytes = row.rows * seq_len * h.kv_heads * h.head_dim * 2 * 2  # K and V, bf16
        row.layers = max(1, -(-MIN_BYTES_PER_GRAPH // row.kv_bytes))
        try:
            batch = Batch(h, [seq_len] * row.rows, [row.queries] * row.rows, layers=row.layers,
                          block_size=self.args.block_size)
            row.splits = plan_launch(row.rows, h.n_heads, h.kv_heads, row.queries,
                                     batch.block_tables.shape[1] * self.args.block_size, self.results["sms"]).splits
            row.op_us = graph_us(batch.run_all, self.args.replays) / row.layers
            del batch
            row.sdpa_us = self.dense_sdpa_us(row, seq_len)
            row.floor_us = row.kv_bytes / self.bandwidth * 1e6
            if row.kind == "prefill":
                flops = 4 * row.queries * h.n_heads * seq_len * h.head_dim
                row.floor_us = max(row.floor_us, flops / self.matmul * 1e6)
        except Exception as exc:  # report and go on
            row.error = _describe(exc)
        self.results["timings"].append({**dataclasses.asdict(row), "name": row.name})
        self.log(f"{row.name}: op {_us(row.op_us)} sdpa {_us(row.sdpa_us)} floor {_us(row.floor_us)} us "
                 f"(splits {row.splits}, {row.layers} layers)" + (f" error {row.error}" if row.error else ""))
        self.save()
        torch.cuda.empty_cache()

    def dense_sdpa_us(self, row: Timing, seq_len: int) -> float:
        import torch.nn.functional as F

        torch, h = self.torch, self.heads
        q = torch.randn(row.rows, h.n_heads, row.queries, h.head_dim, device="cuda", dtype=torch.bfloat16)
        kv = [(torch.randn(row.rows, h.kv_heads, seq_len, h.head_dim, device="cuda", dtype=torch.bfloat16),
               torch.randn(row.rows, h.kv_heads, seq_len, h.head_dim, device="cuda", dtype=torch.bfloat16))
              for _ in range(row.layers)]

        def run():
            for k, v in kv:
                F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

        return graph_us(run, self.args.replays) / row.layers


def _describe(exc: BaseException) -> str:
    traceback.print_exc()
    return f"{type(exc).__name__}: {exc}"[:500]


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}x"


def to_markdown(results: dict) -> str:
    h = results["heads"]
    lines = [
        f"# Paged attention: {results['device']}",
        "",
        f"`python -m glyphserve.bench.attention`, {results['date']}: torch {results['torch']}, Triton "
        f"{results['triton']}; {h['n_heads']} query heads, {h['kv_heads']} KV heads, head_dim {h['head_dim']}, bf16, "
        f"block size {results['block_size']}, block tables {results['table_tokens']:,} tokens wide.",
    ]
    if "copy_bandwidth_Bps" in results:
        lines.append(f"Floor: K/V bytes read / copy bandwidth {results['copy_bandwidth_Bps'] / 1e12:.2f} TB/s measured "
                     f"in the same run (prefill: or FLOPs / {results['matmul_bf16_flops'] / 1e12:.0f} TFLOP/s bf16 "
                     "matmul, whichever is larger). Times per layer, median of CUDA-graph replays over pools of "
                     ">= 256 MiB in all.")
    lines += ["", "## Correctness (Triton op vs PyTorch reference on the GPU)", "",
              "| check | relative error | unwritten | ok |", "|---|---:|---:|---|"]
    for c in results["checks"]:
        rel = "-" if c["rel_error"] is None else f"{c['rel_error']:.1e}"
        lines.append(f"| {c['name']} | {rel} | {c['unwritten'] if c['unwritten'] is not None else '-'} | "
                     f"{'yes' if c['ok'] else 'NO: ' + (c['error'] or 'above ' + str(c['tolerance']))} |")
    lines += ["", "## Speed (us per layer)", "",
              "| rows x cached tokens | splits | paged op | dense SDPA | floor | op / SDPA | op / floor |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for t in results["timings"]:
        if t["error"]:
            lines.append(f"| {t['name']} | - | failed: {t['error']} | | | | |")
            continue
        lines.append(f"| {t['name']} | {t['splits']} | {_us(t['op_us'])} | {_us(t['sdpa_us'])} | "
                     f"{_us(t['floor_us'])} | {_ratio(t['op_us'], t['sdpa_us'])} | "
                     f"{_ratio(t['op_us'], t['floor_us'])} |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    bench = AttentionBench(args)
    bench.run()
    return 0 if all(c["ok"] for c in bench.results["checks"]) else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
