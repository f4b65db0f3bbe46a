"""``glyphserve ask``: a question about a file, answered by a model loaded here (``--model``), by a running
OpenAI-compatible server (``--endpoint URL``: glyphserve, vLLM, SGLang), or without either, extractively (the best
BM25 passages of the document's text, as ``glyphserve serve`` answers without a model)."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Iterator

from glyphserve.engine.commands import (REMOTE_CONTEXT, engine_arguments, model_arguments, page_selection_argument,
                                       remote_arguments, sampling_arguments)
from glyphserve.engine.commands import check_local_flags, check_sampling, speaking_flags
from glyphserve.errors import ConfigError
from glyphserve.render.commands import page_arguments


def register(subparsers) -> None:
    ask = subparsers.add_parser(
        "ask",
        help="answer a question about a document with Glyph (or extractively without a model)",
        description="Ingest INPUT, render it into pages and answer QUESTION, streaming the answer (Glyph's thinking "
        "is shown dimmed, or prefixed when not on a terminal). With --model the model runs here; with --endpoint a "
        "running server reads the pages; with neither the answer is extractive (the best passages of the text).",
    )
    ask.add_argument("input", help="document: PDF, DOCX, Markdown or plain text, or - for stdin")
    ask.add_argument("question", nargs="?", help="the question (optional with --chat)")
    source = model_arguments(ask, without="an extractive answer (the best passages of the document's text)")
    remote_arguments(ask, group=source, key_dest="api_key")  # (_answerer reads args.api_key)
    sampling_arguments(ask)
    page_selection_argument(ask)
    engine_arguments(ask, context_note=REMOTE_CONTEXT)
    page_arguments(ask)
    ask.add_argument("--json", action="store_true",
                     help="print the answer, the pages shown, timings and cache statistics as JSON")
    ask.add_argument("--chat", action="store_true", help="then read follow-up questions from stdin until EOF")
    ask.set_defaults(func=_ask)


@speaking_flags
def _ask(args: argparse.Namespace) -> int:
    from glyphserve.engine import AnswerRequest, ChatMessage, GenerationSettings, engine_page
    from glyphserve.engine.prompt import page_budget
    from glyphserve.ingest import ingest_source
    from glyphserve.render import fit_scans, render_document, resolve_config
    from glyphserve.retrieve import DocumentPages, select_pages

    if not args.chat and not args.question:
        raise ConfigError("give a QUESTION (or --chat to read questions from stdin)")
    check_sampling(args)  # before the model loads
    check_local_flags(args)
    if args.chat and args.input == "-":
        raise ConfigError("--chat reads the questions from stdin: give the document as a file, not -")
    started = time.perf_counter()
    # Each scan becomes its page file as it is read (not all its pixels held until rendered), decoded only when a
    # model reads it (100 A4 scans, ask without a model: 782 MiB at its peak, now 93).
    document = ingest_source(args.input, keep=fit_scans(args.preset, args.dpi))
    if args.model and not args.endpoint:  # a missing folder or an unknown Hub id fails now, not after rendering
        from glyphserve.serve.weights import resolve_model

        args.model = resolve_model(args.model)
    rendered = render_document(document, resolve_config(document.text, preset=args.preset, dpi=args.dpi,
                                                         newline=args.newline)).pages
    selectable = DocumentPages(document.text, rendered)
    render_s = time.perf_counter() - started
    answerer = _answerer(args, document.text, rendered)
    pages = [engine_page(page) for page in rendered]
    keys = _page_keys(args, pages)
    if isinstance(answerer, _Extractive) and not document.text.strip():
        raise ConfigError(f"{args.input} has no text layer (scanned pages): without a model, ask searches the "
                          "document's text; read the pages with a model (--model PATH_OR_ID, or --endpoint URL)")
    settings = GenerationSettings(
        max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
        ignore_eos=args.ignore_eos, use_cache=not args.no_cache,
    )
    history: list[ChatMessage] = []
    question = args.question if args.question is not None else _read_question()
    if question is None:
        print("ask: no question came on stdin", file=sys.stderr)
    while question is not None:
        # A model loaded here counts with its tokenizer, a server's pages are chosen against an upper bound of the
        # prompt (when it reports its context length), the extractive answer reads the text.
        budget = page_budget(answerer, history, question, settings.max_tokens)
        selection = select_pages([selectable], mode=args.page_selection if budget else "all", question=question,
                                 history=[m.content for m in history], budget=budget)
        shown = selection.shown()
        if len(shown) < len(rendered) and not args.json:
            print(f"[pages shown: {_ranges(shown)} of {len(rendered)}]", file=sys.stderr)
        request = AnswerRequest(pages=[pages[n - 1] for n in shown], question=question,
                                page_keys=[keys[n - 1] for n in shown] if keys else None,
                                history=list(history), settings=settings)
        if args.chat and not args.json and not sys.stdin.isatty():
            # A transcript of piped questions: each answer under its question (a terminal shows the typed one).
            if history:
                print()  # a blank line between turns
            print(f"> {question}", flush=True)
        answer = _print_answer(answerer.stream(request), args.json)
        answer.timings.render = render_s
        if args.json:
            stats = answerer.stats() if hasattr(answerer, "stats") else {"backend": "extractive"}
            pages_shown = answerer.pages_shown if isinstance(answerer, _Extractive) else shown
            print(json.dumps({"question": question, **answer.to_dict(), "pages_shown": pages_shown,
                              "engine": stats}, ensure_ascii=False))
        render_s = 0.0  # the document is rendered once
        if not args.chat:
            break
        history += [ChatMessage("user", question), ChatMessage("assistant", answer.text)]
        question = _read_question()
    return 0


def _page_keys(args: argparse.Namespace, pages: list) -> list[str] | None:
    """The pages' identities in a local engine's caches, computed once for every question: given none, the engine
    hashes each page's pixels (a page file's bytes) again per question (a W200 document's 24 pages: 16 ms on the
    2-core VM, 7-18 ms on an H200 host, before a follow-up's first step). None for other answerers (a server keys
    what it is sent)."""
    if args.endpoint or not (args.model or args.random_weights):
        return None
    from glyphserve.engine.preprocess import page_keys

    return page_keys(pages)


def _answerer(args: argparse.Namespace, text: str, rendered: list):
    """What answers: anything with ``stream(AnswerRequest) -> Iterator[StreamEvent]`` (Engine, RemoteEngine)."""
    if args.endpoint:
        from glyphserve.engine.remote import RemoteConfig, RemoteEngine

        return RemoteEngine.load(RemoteConfig(endpoints=[args.endpoint], model=args.remote_model,
                                              api_key=args.api_key, max_context=args.max_context))
    if args.model or args.random_weights:
        from glyphserve.engine import Engine, EngineConfig

        return Engine.load(EngineConfig(model=args.model, random_weights=args.random_weights, dtype=args.dtype,
                                        device=args.device, max_context=args.max_context, max_num_seqs=1,
                                        quantize=args.quantize))
    from glyphserve.serve.errors import NO_MODEL_HINT

    print(f"glyphserve: {NO_MODEL_HINT.replace('glyphserve serve', 'glyphserve ask INPUT QUESTION --model')}",
          file=sys.stderr)
    return _Extractive(text, rendered)


class _Extractive:
    """The server's extractive backend over the document's text and its rendered pages, behind the engine's
    ``stream``: passages come with their pages, as the server cites them."""

    def __init__(self, text: str, rendered: list):
        from glyphserve.serve.backends import ExtractiveBackend
        from glyphserve.serve.retrieval import PageLayout

        self.text = text
        self.pages = [PageLayout.from_manifest(page.manifest()) for page in rendered]
        self.backend = ExtractiveBackend(store=None)
        self.pages_shown: list[int] = []  # the pages of the last answer's passages

    def stream(self, request) -> Iterator:
        from glyphserve.engine import StreamEvent
        from glyphserve.serve.backends import ChatJob, Reply

        for item in self.backend.stream(ChatJob(request, context=self.text, context_pages=self.pages)):
            if isinstance(item, Reply):
                self.pages_shown = item.pages_shown
                item = StreamEvent("done", result=item.answer)
            yield item


def _ranges(numbers: list[int]) -> str:
    """``[1, 2, 3, 7, 9, 10]`` -> ``1-3, 7, 9-10``."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def _read_question() -> str | None:
    while True:
        if sys.stdin.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return None
        if line.strip():
            return line.strip()


def _print_answer(events, as_json: bool):
    """Stream the answer to stdout (unless JSON was asked for); returns the Answer."""
    out = sys.stdout
    tty = out.isatty()
    channel = None
    for event in events:
        if event.channel == "done":
            if channel == "thinking" and tty:
                out.write("\x1b[0m")
            if not as_json:
                out.write("\n")
                out.flush()
                if not event.result.text:  # said, not a bare blank line
                    print(f"[empty answer: finish_reason {event.result.finish_reason}]", file=sys.stderr)
            return event.result
        if as_json:
            continue
        if event.channel != channel:
            if channel == "thinking":
                out.write("\x1b[0m\n" if tty else "\n")
            if event.channel == "thinking":
                out.write("\x1b[2m" if tty else "[thinking] ")
            channel = event.channel
        out.write(_TERMINAL_CONTROLS.sub(_escaped, event.text) if tty else event.text)
        out.flush()
    raise RuntimeError("the stream ended without a result")


# Controls but tab and newline: a document's (or a model's) text could otherwise move the cursor, retitle or
# recolour the terminal, or write its clipboard (OSC 52); shown as escapes there, kept as they are in a pipe.
_TERMINAL_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _escaped(match: re.Match) -> str:
    return f"\\x{ord(match.group()):02x}"
