"""``glyphserve bench serve``: the real server under a bounded loopback load.

Starts ``glyphserve serve --no-ui`` as a child process, stores ``--documents`` W50 documents through the API,
asks one warm-up question per document, then runs ``--sessions`` chat sessions (session i reads document
i mod documents and asks ``--questions`` questions in turn, each with the conversation so far) twice: one
request at a time, then all sessions at once. Every answer is exactly ``--new-tokens`` tokens (EOS ignored), so
both phases do the same work. Reports answers per minute and p50/p95 latency of each phase; with
``--repeats N`` the concurrent phase runs N times (new conversations) and the median round is reported.

``--ray --replicas N`` serves through Ray Serve (``serve --ray``: a local Ray, N engine replicas, one GPU
each). ``--scale-replicas N`` measures scale-out in one run: the same load on one GPU (an engine in the
server's process, on GPU 0), then on N Ray Serve replicas, and reports the ratio of their concurrent
throughputs (target ``TARGET_SCALING`` x N / 2).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from glyphserve.bench.engine import fixed, out_argument

TARGET_SPEEDUP = 25.0  # 64 sessions over 16 W50 documents against one at a time (issue 13)
TARGET_SCALING = 1.8  # two engine replicas against one engine
STEP_TRACE = 100_000  # steps the server keeps with --step-trace: a run's (a round of 64 sessions took ~200)
STEP_KINDS = {"graph": "graph steps (decode rows, prompt chunks as rows)", "rows": "row steps without a graph",
              "pass": "eager prompt passes", "graph pass": "prompt passes from captured graphs",
              "none": "reading back only"}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="throughput and latency of the server under concurrent sessions",
                              description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="checkpoint directory or Hugging Face id")
    source.add_argument("--random-weights", metavar="ARCH", help="e.g. glm-4.1v-9b (no checkpoint needed)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--workload", default="W50", help="document size (W50, W150, W200 or characters)")
    p.add_argument("--documents", type=int, default=4)
    p.add_argument("--sessions", type=int, default=16)
    p.add_argument("--questions", type=int, default=3, help="questions per session")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--max-num-seqs", "--max-batch", dest="max_num_seqs", type=int, default=256,
                   help="the server's --max-num-seqs (default: its default, 256)")
    p.add_argument("--ray", action="store_true", help="serve through Ray Serve (serve --ray: a local Ray instance)")
    p.add_argument("--replicas", type=int, default=1, help="engine replicas with --ray (one GPU each; default 1)")
    p.add_argument("--scale-replicas", type=int, metavar="N",
                   help="one engine in the server's process, then N Ray Serve replicas, in one run")
    p.add_argument("--no-sequential", action="store_true", help="skip the one-request-at-a-time phase")
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds of the concurrent phase; the round of median throughput is reported (default 1)")
    p.add_argument("--startup-timeout", type=float, default=600, help="seconds to wait for the server")
    p.add_argument("--step-trace", action="store_true",
                   help="the server records its engine's steps (serve --step-trace): each concurrent round's time "
                        "by kind of step (decode graph steps, eager prompt passes, ...) and outside steps")
    out_argument(p, "serve-<card>.json/.md")
    p.set_defaults(func=run)


@dataclass
class Phase:
    name: str
    latencies_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0

    def summary(self) -> dict:
        lat = sorted(self.latencies_s)
        return {
            "answers": len(lat),
            "wall_s": self.wall_s,
            "answers_per_min": len(lat) / self.wall_s * 60,
            "p50_s": statistics.median(lat),
            "p95_s": lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))],
            "mean_s": statistics.fmean(lat),
        }


class Server:
    """``glyphserve serve`` in a child process on a free loopback port; its output goes to ``log``."""

    def __init__(self, args: argparse.Namespace, data_dir: Path, log: Path, replicas: int | None,
                 visible: str | None = None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        model = ["--model", args.model] if args.model else ["--random-weights", args.random_weights]
        command = [sys.executable, "-m", "glyphserve.cli", "serve", "--no-ui", "--port", str(self.port),
                   "--data-dir", str(data_dir), "--max-num-seqs", str(args.max_num_seqs), "--device", args.device,
                   "--dtype", args.dtype, "--queue-size", str(max(64, 2 * args.sessions)), *model]
        if replicas:
            command += ["--ray", "--replicas", str(replicas)]
        if args.step_trace and not replicas:
            command += ["--step-trace", str(STEP_TRACE)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if visible is not None:
            env["CUDA_VISIBLE_DEVICES"] = visible
        self.log = log
        self._log_file = log.open("w")
        self.process = subprocess.Popen(command, stdout=self._log_file, stderr=subprocess.STDOUT, env=env)

    def wait(self, client, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}):\n{self.tail()}")
            try:
                reply = client.get(f"{self.base}/health", timeout=5)
                if reply.status_code == 200:
                    return reply.json()
            except Exception:  # not listening yet
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the server did not answer /health within {timeout:.0f} s:\n{self.tail()}")

    def tail(self, n: int = 30) -> str:
        self._log_file.flush()
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)  # a Ray front takes its application and Ray down first
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log_file.close()


def run(args: argparse.Namespace) -> int:
    import torch
    import transformers

    from glyphserve.bench.engine import card_slug

    cuda = args.device != "cpu" and torch.cuda.is_available()
    meta = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    if args.scale_replicas:
        one = measure(args, replicas=None, visible="0")
        many = measure(args, replicas=args.scale_replicas)
        device = torch.cuda.get_device_name(0) if cuda else "cpu"  # asked once the servers are gone
        result = {**meta, "device": device, "replicas": args.scale_replicas, "one_engine": one, "ray": many,
                  "scaling": many["concurrent"]["answers_per_min"] / one["concurrent"]["answers_per_min"]}
        stem = args.out / f"serve-{card_slug(device)}-ray{args.scale_replicas}-scale"
        markdown = scale_markdown(result)
    else:
        measured = measure(args, replicas=args.replicas if args.ray else None)
        device = torch.cuda.get_device_name(0) if cuda else "cpu"
        result = {**meta, "device": device, **measured}
        stem = args.out / (f"serve-{card_slug(device)}" + (f"-ray{args.replicas}" if args.ray else ""))
        markdown = to_markdown(result)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    stem.with_suffix(".md").write_text(markdown, encoding="utf-8")
    print(markdown)
    return 0


def measure(args: argparse.Namespace, replicas: int | None, visible: str | None = None) -> dict:
    """Start a server (``replicas``: on Ray Serve with that many engine replicas; ``visible``: the CUDA devices it
    sees), load it, stop it."""
    import httpx

    from glyphserve.bench.engine import workload_chars
    from glyphserve.bench.workloads import make_workload_text

    with tempfile.TemporaryDirectory(prefix="glyphserve-bench-serve-") as tmp:
        server = Server(args, Path(tmp) / "data", Path(tmp) / "server.log", replicas, visible)
        timeout = httpx.Timeout(600.0)
        limits = httpx.Limits(max_connections=args.sessions + 4)
        try:
            with httpx.Client(timeout=timeout, limits=limits) as client:
                started = time.perf_counter()
                health = server.wait(client, args.startup_timeout)
                startup_s = time.perf_counter() - started
                print(f"server up at {server.base} in {startup_s:.1f} s: {json.dumps(health)}", flush=True)
                if not health.get("model"):
                    raise RuntimeError("the server reports no model")
                while health.get("replicas_running", replicas or 0) < (replicas or 0):  # Ray: the engines start last
                    if time.perf_counter() - started > args.startup_timeout:
                        raise RuntimeError(f"{health['replicas_running']} of {replicas} replicas running")
                    time.sleep(1)
                    health = client.get(f"{server.base}/health").json()
                startup_s = time.perf_counter() - started
                doc_ids = []
                for i in range(args.documents):
                    text = make_workload_text(workload_chars(args.workload), seed=100 + i)
                    reply = client.post(f"{server.base}/v1/documents",
                                        json={"text": text, "name": f"bench-{i}", "preset": "glyph-en"})
                    reply.raise_for_status()
                    doc_ids.append(reply.json()["id"])
                pages = client.get(f"{server.base}/v1/documents/{doc_ids[0]}").json()["document"]

                def ask(doc: str, messages: list[dict]) -> tuple[float, str]:
                    t0 = time.perf_counter()
                    reply = client.post(f"{server.base}/v1/chat/completions", json={
                        "document": doc, "messages": messages, "max_tokens": args.new_tokens,
                        "ignore_eos": True, "temperature": 0})
                    latency = time.perf_counter() - t0
                    if reply.status_code != 200:
                        raise RuntimeError(f"HTTP {reply.status_code}: {reply.text[:500]}")
                    body = reply.json()
                    if body["usage"]["completion_tokens"] != args.new_tokens:
                        raise RuntimeError(f"expected {args.new_tokens} tokens: {body['usage']}")
                    return latency, body["choices"][0]["message"]["content"] or ""

                def session(phase: Phase, s: int, lock: threading.Lock) -> None:
                    doc = doc_ids[s % len(doc_ids)]
                    messages: list[dict] = []
                    for q in range(args.questions):
                        messages.append({"role": "user", "content":
                                         f"[{phase.name} s{s:02d} q{q}] Which names and numbers appear most "
                                         "often in the text, and where?"})
                        latency, text = ask(doc, messages)
                        messages.append({"role": "assistant", "content": text})
                        with lock:
                            phase.latencies_s.append(latency)

                lock = threading.Lock()
                warm = Phase("warm-up")
                for doc in doc_ids:  # pages rendered, vision features and document prefixes cached
                    warm.latencies_s.append(ask(doc, [{"role": "user", "content": "What is the text about?"}])[0])
                sequential = None
                if not args.no_sequential:
                    sequential = Phase("sequential")
                    t0 = time.perf_counter()
                    for s in range(args.sessions):
                        session(sequential, s, lock)
                    sequential.wall_s = time.perf_counter() - t0
                    print("sequential", json.dumps(sequential.summary()), flush=True)

                rounds: list[tuple[Phase, list[dict]]] = []
                for r in range(args.repeats):  # new conversations each round: the documents stay cached
                    phase = Phase(f"concurrent-{r}")
                    errors: list[BaseException] = []

                    def guarded(s: int) -> None:
                        try:
                            session(phase, s, lock)
                        except BaseException as exc:  # reported after join
                            errors.append(exc)

                    threads = [threading.Thread(target=guarded, args=(s,)) for s in range(args.sessions)]
                    mark = last_step(client, server.base) if args.step_trace and not replicas else None
                    counters_before = engine_counters(client, server.base)
                    t0 = time.perf_counter()
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                    phase.wall_s = time.perf_counter() - t0
                    if errors:
                        raise errors[0]
                    activity = engine_activity(counters_before, engine_counters(client, server.base), phase.wall_s)
                    if mark is not None:  # the round's steps, by kind
                        activity[0]["step_kinds"] = step_summary(steps_since(client, server.base, mark))
                    rounds.append((phase, activity))
                    print(phase.name, json.dumps(phase.summary()), flush=True)
                # The round of median throughput stands for the phase; all rounds' rates are kept.
                by_rate = sorted(rounds, key=lambda round_: round_[0].summary()["answers_per_min"])
                concurrent, engines = by_rate[(len(by_rate) - 1) // 2]
                metrics = client.get(f"{server.base}/metrics").text
                replica_states = client.get(f"{server.base}/health").json().get("replicas")
        except Exception:
            print(server.tail(), file=sys.stderr)
            raise
        finally:
            server.stop()

    result = {
        "server": {"model": health.get("model"), "backend": health.get("backend"), "dtype": args.dtype},
        "startup_s": startup_s,
        "workload": args.workload,
        "pages_per_document": pages.get("pages"),
        "documents": args.documents,
        "sessions": args.sessions,
        "questions_per_session": args.questions,
        "new_tokens": args.new_tokens,
        "max_num_seqs": args.max_num_seqs,
        "warm_up_latencies_s": warm.latencies_s,
        "sequential": sequential.summary() if sequential else None,
        "concurrent": concurrent.summary(),
        "concurrent_rounds_answers_per_min": [phase.summary()["answers_per_min"] for phase, _ in rounds],
        "ray_replicas": replicas,
        "replicas": replica_states,
        "engines": engines,
        "metrics_excerpt": [line for line in metrics.splitlines() if line.startswith(("glyphserve_", "vllm:")) and
                            ("cache" in line or "batch" in line or "joined" in line)][:24],
    }
    if sequential:
        result["speedup"] = result["concurrent"]["answers_per_min"] / result["sequential"]["answers_per_min"]
    return result


def last_step(client, base: str) -> float:
    """When the server's engine began its latest recorded step (-inf: none yet)."""
    steps = client.get(f"{base}/v1/engine/steps", params={"last": 1}).raise_for_status().json()["steps"]
    return steps[-1]["started"] if steps else float("-inf")


def steps_since(client, base: str, mark: float) -> list[dict]:
    params = {"since": mark} if mark > float("-inf") else {}
    return client.get(f"{base}/v1/engine/steps", params=params).raise_for_status().json()["steps"]


def step_summary(steps: list[dict]) -> dict:
    """Steps by kind (``StepRecord.kind``): how many, their seconds on the engine's thread and how much of that
    waited for the device, their decode rows and prompt tokens; and the seconds between the first step's start and
    the last one's end spent outside steps (the server's loop handing requests in and answers out, or idle)."""
    kinds: dict[str, dict] = {}
    for s in steps:
        k = kinds.setdefault(s["kind"], {"steps": 0, "seconds": 0.0, "wait_s": 0.0, "cpu_s": 0.0, "decode_rows": 0,
                                          "chunk_tokens": 0})
        k["steps"] += 1
        k["seconds"] += s["seconds"]
        k["wait_s"] += s["wait_s"]
        k["cpu_s"] += s.get("cpu_s", 0.0)  # (older trees' records: none)
        k["decode_rows"] += s["decode_rows"]
        k["chunk_tokens"] += s["chunk_tokens"]
    span = steps[-1]["started"] + steps[-1]["seconds"] - steps[0]["started"] if steps else 0.0
    return {"kinds": kinds, "span_s": span, "outside_s": span - sum(s["seconds"] for s in steps)}


def _step_kinds_table(summary: dict) -> list[str]:
    lines = ["| steps | count | s on the engine's thread | of which GPU wait s | host ms a step | CPU ms a step | "
             "decode rows | prompt tokens |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for kind, k in sorted(summary["kinds"].items(), key=lambda item: -item[1]["seconds"]):
        lines.append(f"| {STEP_KINDS.get(kind, kind)} | {k['steps']} | {k['seconds']:.3f} | {k['wait_s']:.3f} | "
                     f"{(k['seconds'] - k['wait_s']) / k['steps'] * 1e3:.2f} | {k['cpu_s'] / k['steps'] * 1e3:.2f} | "
                     f"{k['decode_rows']} | {k['chunk_tokens']} |")
    return lines + ["", "CPU ms: the engine thread's CPU time; host ms less CPU ms is time the thread was ready but "
                        "not running (waiting for the GIL or a core; a wait for the device counts as CPU time where "
                        "the CUDA runtime spins).", "",
                    f"From the round's first step to its last: {summary['span_s']:.3f} s, of which "
                    f"{summary['outside_s']:.3f} s outside steps (handing requests in and answers out, or idle).", ""]


def engine_counters(client, base: str) -> dict[str, dict]:
    """The engine counters (``/health``) of the server at ``base``, or of each Ray Serve replica behind it (as of
    its last answer)."""
    health = client.get(f"{base}/health").json()
    if health.get("backend") != "ray":
        return {base: health.get("engine") or {}}
    return {f"replica {r['id']}": r["engine"] for r in health["replicas"]}


def engine_activity(before: dict[str, dict], after: dict[str, dict], wall_s: float) -> list[dict]:
    """Per engine over a phase: requests, decode steps per second, rows busy per step, prefill passes."""
    out = []
    for base, end in after.items():
        start = before.get(base, {})
        delta = {k: end.get(k, 0) - start.get(k, 0) for k in end}
        steps = delta.get("decode_steps", 0)
        every = delta.get("steps", 0)
        out.append({"engine": base, "requests": delta.get("requests", 0), "decode_steps": steps,
                    "steps_per_s": steps / wall_s if wall_s else 0.0,
                    "rows_per_step": delta.get("decode_rows", 0) / steps if steps else 0.0,
                    "prefill_passes": delta.get("prefill_passes", 0), "row_chunks": delta.get("row_chunks", 0),
                    # where the engine thread's time went: inside steps (blocked on the GPU, or host work), planning
                    # requests that joined, and the rest of the phase (idle, or waiting for the GIL)
                    "steps": every, "step_s": delta.get("step_s", 0.0), "gpu_wait_s": delta.get("gpu_wait_s", 0.0),
                    "plan_s": delta.get("plan_s", 0.0),
                    "host_ms_per_step": (delta.get("step_s", 0.0) - delta.get("gpu_wait_s", 0.0)) / every * 1e3
                    if every else 0.0,
                    "decode_step_ms": delta.get("decode_step_s", 0.0) / delta["timed_decode_steps"] * 1e3
                    if delta.get("timed_decode_steps") else None})
    return out


def _engines_table(engines: list[dict]) -> list[str]:
    lines = ["| engine | requests | decode steps/s | rows busy per step | prefill passes (as rows) | "
             "s in steps (GPU wait) | host ms/step | s planning | decode step ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in engines:
        lines.append(f"| {e['engine']} | {e['requests']} | {e['steps_per_s']:.1f} | {e['rows_per_step']:.2f} | "
                     f"{e['prefill_passes']} ({e.get('row_chunks', 0)} chunks) | {e.get('step_s', 0):.2f} "
                     f"({e.get('gpu_wait_s', 0):.2f}) | {e.get('host_ms_per_step', 0):.2f} | "
                     f"{e.get('plan_s', 0):.2f} | {fixed(e.get('decode_step_ms'), 2)} |")
    return lines + [""]


def _load_description(r: dict) -> str:
    return (
        f"{r['documents']} {r['workload']} documents ({r['pages_per_document']} pages each) stored through the "
        f"API; {r['sessions']} chat sessions, session i on document i mod {r['documents']}, "
        f"{r['questions_per_session']} questions each with the conversation so far; answers of exactly "
        f"{r['new_tokens']} tokens (EOS ignored) through `/v1/chat/completions` over loopback. One warm-up "
        "question per document first, so both phases find pages, vision features and document prefixes cached."
    )


def _rounds_line(name: str, r: dict) -> list[str]:
    rates = r.get("concurrent_rounds_answers_per_min") or []
    if len(rates) < 2:
        return []
    return [f"{name}: {len(rates)} rounds of the concurrent phase, "
            f"{', '.join(f'{x:.1f}' for x in rates)} answers/min; the median round is shown."]


def _phase_row(name: str, p: dict) -> str:
    return (f"| {name} | {p['answers']} | {p['wall_s']:.1f} | {p['answers_per_min']:.1f} | "
            f"{p['p50_s']:.3f} | {p['p95_s']:.3f} |")


PHASE_HEADER = ["| phase | answers | wall s | answers/min | p50 latency s | p95 latency s |",
                "|---|---:|---:|---:|---:|---:|"]


def to_markdown(r: dict) -> str:
    seq, con = r["sequential"], r["concurrent"]
    lines = [
        f"# Server under load: {r['device']}",
        "",
        f"`glyphserve bench serve`, {r['date']}: torch {r['torch']}, transformers {r['transformers']}; server "
        f"{r['server'].get('model')} ({r['server'].get('dtype')}), `--max-num-seqs {r['max_num_seqs']}`, up in "
        f"{r['startup_s']:.1f} s.",
        _load_description(r),
        "",
        *PHASE_HEADER,
    ]
    if seq:
        lines.append(_phase_row("one at a time", seq))
    lines.append(_phase_row(f"{r['sessions']} sessions at once", con))
    rounds = _rounds_line("Concurrent", r)
    if rounds:
        lines += ["", *rounds]
    if seq:
        met = "met" if r["speedup"] >= TARGET_SPEEDUP else "missed"
        lines += ["", f"Throughput {r['speedup']:.1f}x the sequential rate (target >= {TARGET_SPEEDUP:.0f}x: {met})."]
    lines += ["", "During the concurrent phase:", "", *_engines_table(r.get("engines") or [])]
    for e in r.get("engines") or []:
        if e.get("step_kinds"):
            lines += [f"The engine's steps in that round (`--step-trace`, {e['engine']}):", "",
                      *_step_kinds_table(e["step_kinds"])]
    return "\n".join(lines)


def scale_markdown(r: dict) -> str:
    one, many = r["one_engine"], r["ray"]
    n = r["replicas"]
    target = TARGET_SCALING * n / 2
    met = "met" if r["scaling"] >= target else "missed"
    lines = [
        f"# Scale-out: {n} Ray Serve replicas against one engine, {r['device']}",
        "",
        f"`glyphserve bench serve --scale-replicas {n}`, {r['date']}: torch {r['torch']}, "
        f"transformers {r['transformers']}; {one['server'].get('model')}, `--max-num-seqs {one['max_num_seqs']}`; "
        "both rows in one run. One engine: in the server's process, on GPU 0. Ray Serve: `serve --ray --replicas "
        f"{n}` (a local Ray; the front sends each question with its stored page files to the replica that holds "
        "its document).",
        _load_description(one),
        "",
        *PHASE_HEADER,
    ]
    served = f"{n} Ray Serve replicas" if n > 1 else "1 Ray Serve replica"
    for name, m in (("one engine", one), (served, many)):
        if m["sequential"]:
            lines.append(_phase_row(f"{name}, one at a time", m["sequential"]))
        lines.append(_phase_row(f"{name}, {m['sessions']} sessions at once", m["concurrent"]))
    rounds = _rounds_line("One engine", one) + _rounds_line(served, many)
    if rounds:
        lines += ["", *rounds]
    if n == 1:
        lines += ["", f"One Ray Serve replica: {r['scaling']:.2f}x the in-process server (what Ray Serve, the front "
                  "and the page transfers cost).", ""]
    else:
        lines += ["", f"Scaling: {r['scaling']:.2f}x one engine (target >= {target:.1f}x: {met}).", ""]
    if many.get("replicas"):
        lines += ["| replica | requests | documents (recent) | lost |", "|---|---:|---:|---|"]
        for replica in many["replicas"]:
            lines.append(f"| {replica['id']} | {replica['requests']} | {len(replica['recent_documents'])} | "
                         f"{'yes' if replica['lost'] else 'no'} |")
        lines.append("")
    lines += ["Engines during the concurrent phases (one engine, then the replicas):", "",
              *_engines_table((one.get("engines") or []) + (many.get("engines") or []))]
    return "\n".join(lines)
