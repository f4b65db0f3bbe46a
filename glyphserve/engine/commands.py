"""``glyphserve ask`` and ``glyphserve make-tiny-model``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from glyphserve.errors import ConfigError


def register(subparsers) -> None:
    ask = subparsers.add_parser(
        "ask",
        help="answer a question about a document with Glyph",
        description="Ingest INPUT, render it into pages and answer QUESTION with the model, streaming the answer "
        "(Glyph's thinking is shown dimmed, or prefixed when not on a terminal).",
    )
    ask.add_argument("input", type=Path, help="document: PDF, DOCX, Markdown or plain text")
    ask.add_argument("question", nargs="?", help="the question (optional with --chat)")
    source = ask.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="model directory or Hugging Face id (e.g. zai-org/Glyph)")
    source.add_argument(
        "--random-weights", choices=["glm-4.1v-9b"], help="full-size architecture with random weights (benchmarks)"
    )
    ask.add_argument("--max-new-tokens", type=int, default=512)
    ask.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ask.add_argument("--top-p", type=float, default=1.0)
    ask.add_argument("--seed", type=int, default=None)
    ask.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    ask.add_argument("--no-cache", action="store_true", help="bypass the vision-feature and document-prefix caches")
    ask.add_argument("--truncate-pages", action="store_true", help="keep the first pages that fit the context")
    ask.add_argument("--max-context", type=int, default=None, help="tokens of context (default: the model's, <= 32768)")
    ask.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    ask.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ask.add_argument("--preset", default="auto", help="render preset: auto, glyph-en or glyph-zh")
    ask.add_argument("--dpi", type=float, default=None, help="render resolution (default: the preset's)")
    ask.add_argument("--json", action="store_true", help="print the answer, timings and cache statistics as JSON")
    ask.add_argument("--chat", action="store_true", help="then read follow-up questions from stdin until EOF")
    ask.set_defaults(func=_ask)

    tiny = subparsers.add_parser(
        "make-tiny-model",
        help="write a tiny random GLM-4.1V checkpoint (tests, smoke runs)",
        description="Write a tiny random checkpoint with GLM-4.1V's architecture, tokenizer tokens, processor and "
        "chat template; it loads with --model DIR like the real Glyph.",
    )
    tiny.add_argument("dir", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_make_tiny)


def _make_tiny(args: argparse.Namespace) -> int:
    from glyphserve.engine.tiny import make_tiny_model

    print(make_tiny_model(args.dir, seed=args.seed))
    return 0


def _render_pages(args: argparse.Namespace):
    from glyphserve.ingest import ingest_path
    from glyphserve.render import render_document, resolve_config

    document = ingest_path(args.input)
    config = resolve_config(document.text, preset=args.preset, dpi=args.dpi)
    return [page.image for page in render_document(document, config).pages]


def _ask(args: argparse.Namespace) -> int:
    from glyphserve.engine import AnswerRequest, ChatMessage, Engine, EngineConfig, GenerationSettings

    if not args.chat and not args.question:
        raise ConfigError("give a QUESTION (or --chat to read questions from stdin)")
    started = time.perf_counter()
    pages = _render_pages(args)
    render_s = time.perf_counter() - started
    engine = Engine.load(
        EngineConfig(
            model=args.model,
            random_weights=args.random_weights,
            dtype=args.dtype,
            device=args.device,
            max_context=args.max_context,
            max_num_seqs=1,
        )
    )
    settings = GenerationSettings(
        max_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
        use_cache=not args.no_cache,
        truncate_pages=args.truncate_pages,
    )
    history: list[ChatMessage] = []
    question = args.question
    if question is None:
        question = _read_question()
    while question is not None:
        request = AnswerRequest(pages=pages, question=question, history=list(history), settings=settings)
        answer = _print_answer(engine, request, args.json)
        answer.timings.render = render_s
        if args.json:
            print(json.dumps({**answer.to_dict(), "engine": engine.stats()}, ensure_ascii=False))
        render_s = 0.0  # the document is rendered once
        if not args.chat:
            break
        history += [ChatMessage("user", question), ChatMessage("assistant", answer.text)]
        question = _read_question()
    return 0


def _read_question() -> str | None:
    while True:
        if sys.stdin.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return None
        if line.strip():
            return line.strip()


def _print_answer(engine, request, as_json: bool):
    """Stream the answer to stdout (unless JSON was asked for); returns the Answer."""
    out = sys.stdout
    tty = out.isatty()
    channel = None
    for event in engine.stream(request):
        if event.channel == "done":
            if channel == "thinking" and tty:
                out.write("\x1b[0m")
            if not as_json:
                out.write("\n")
                out.flush()
            return event.result
        if as_json:
            continue
        if event.channel != channel:
            if channel == "thinking":
                out.write("\x1b[0m\n" if tty else "\n")
            if event.channel == "thinking":
                out.write("\x1b[2m" if tty else "[thinking] ")
            channel = event.channel
        out.write(event.text)
        out.flush()
    raise RuntimeError("the engine's stream ended without a result")
