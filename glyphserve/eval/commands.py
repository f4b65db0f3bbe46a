"""``glyphserve eval``: accuracy per suite and document length, and rendering legibility."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from glyphserve.engine.commands import (answerer_argument, answerer_kind, check_local_flags, engine_arguments,
                                       max_new_tokens_argument, model_arguments, remote_arguments, speaking_flags)
from glyphserve.errors import ConfigError, GlyphserveError

SUITES = ("niah", "niah-multi", "mdqa", "freqword", "longbench", "mrcr", "ocr")
DATA_SUITES = ("longbench", "mrcr")
DEFAULT_LENGTHS = "4k,8k,16k,32k"
DEFAULT_SAMPLES = 5
DEFAULT_CONTEXT = 32768
# Longer than ask's and batch's: an answer cut in Glyph's thinking scores 0 for want of tokens, not of reading.
DEFAULT_MAX_NEW_TOKENS = 1024
# What --max-model-len means to eval's answerers without a model here (make_backend).
EVAL_CONTEXT = ("; with --endpoint or the extractive backend: what pages are chosen for (default "
                f"{DEFAULT_CONTEXT} with --page-selection, and no more than the server reports; the prompt's tokens "
                "bounded from above for a server, estimated for extractive); without --page-selection, documents "
                "that do not fit are scored 0 and reported")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="measure answer accuracy against document length and rendering legibility",
        description=(
            "Generate seeded test suites (or load LongBench/MRCR files), render each document, ask a backend, "
            "and report accuracy, text and vision tokens, compression and latency per suite and length "
            "(results.json, report.md, accuracy.png). The ocr suite reads rendered pages back with Tesseract."
        ),
    )
    p.add_argument("--suite", default="niah",
                   help=f"comma-separated suites: {', '.join(SUITES)}, or all (default: niah). "
                        "all = the generated suites and ocr, plus longbench or mrcr when --data is given")
    p.add_argument("--lengths", default=DEFAULT_LENGTHS,
                   help=f"document lengths in text tokens, e.g. 4k,8k,128k (k = 1024; default {DEFAULT_LENGTHS}), "
                        "or as multiples of the context, e.g. 2x,4x,8x: documents whose pages need that many times "
                        "the context; for --data files these are the length buckets")
    p.add_argument("--page-selection", default=None, metavar="MODES",
                   help="comma-separated page selections to compare, e.g. first,retrieve: each sample is asked once "
                        "per mode, showing the pages that mode selects for the context (mdqa as a collection of its "
                        "documents); reports whether the evidence's pages were shown (default: every page)")
    p.add_argument("--samples", type=int, default=None,
                   help=f"samples per suite and length (default {DEFAULT_SAMPLES}; --data files: all)")
    p.add_argument("--ocr-pages", type=int, default=2, help="pages the ocr suite reads per preset and dpi (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated suites (default 0)")
    p.add_argument("--data", type=Path, help="LongBench or MRCR file (JSON Lines) for --suite longbench|mrcr")
    answerer_argument(p, otherwise=", else extractive")
    source = model_arguments(p, without="the extractive backend")
    remote_arguments(p, group=source)
    engine_arguments(p, context_note=EVAL_CONTEXT)
    max_new_tokens_argument(p, default=DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--preset", default=None,
                   help="comma-separated render presets: auto, glyph-en, glyph-zh "
                        "(default: auto for accuracy suites, glyph-en,glyph-zh for ocr)")
    p.add_argument("--dpi", default=None,
                   help="comma-separated dpi values (default: the preset's for accuracy suites, 72,96 for ocr)")
    p.add_argument("-o", "--output", type=Path, default=Path("eval-results"),
                   help="output folder (default eval-results)")
    p.set_defaults(func=speaking_flags(run))


def check_output(output: Path) -> None:
    """-o must be a folder, or a path where one can be made: a file there (or in its way) is refused."""
    if output.exists() and not output.is_dir():
        raise ConfigError(f"-o {output} is a file: give a folder for the results")
    blocking = next((parent for parent in output.parents if parent.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise ConfigError(f"-o {output}: {blocking} is a file, so the folder cannot be made there")


def parse_lengths(value: str) -> list[int | float]:
    """``4k,8k,100`` -> [4096, 8192, 100]; multiples of the context stay floats: ``2x,4x`` -> [2.0, 4.0]."""
    lengths: list[int | float] = []
    for part in value.split(","):
        part = part.strip().lower()
        try:
            if part.endswith("x"):
                lengths.append(float(part[:-1]))
                if lengths[-1] <= 0:
                    raise ValueError
                continue
            tokens = int(float(part[:-1]) * 1024) if part.endswith("k") else int(part)
        except ValueError:
            raise ConfigError(f"--lengths takes token counts like 4k,8k,32k or context multiples like 2x,4x, "
                              f"not {part!r}") from None
        if tokens < 256:
            raise ConfigError(f"--lengths: {part!r} is too short; use at least 256 tokens")
        lengths.append(tokens)
    if any(isinstance(x, float) for x in lengths) and not all(isinstance(x, float) for x in lengths):
        raise ConfigError("--lengths: give token counts (4k,8k) or context multiples (2x,4x), not both")
    return sorted(set(lengths))


def parse_modes(value: str | None) -> list[str]:
    from glyphserve.retrieve import MODES

    modes = list(dict.fromkeys(_split(value)))
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ConfigError(f"--page-selection: unknown {unknown[0]!r}; choose from {', '.join(MODES)}")
    return modes


def lengths_beyond(multiples: list[float], context: int, setting) -> list[int]:
    """Text tokens of the suites' text whose pages need ``multiples`` of ``context`` tokens with ``setting``'s
    rendering (its compression measured on a needle haystack: filler in paragraphs, sized by the renderer's
    estimate as the suites size theirs)."""
    from glyphserve.eval import suites
    from glyphserve.render import render_text

    probe = suites.niah(0, 16_384, 0, 1).text
    config, _ = setting.resolve(probe)
    stats = render_text(probe, config).stats
    return [round(m * context * stats.text_tokens / stats.vision_tokens) for m in multiples]


def parse_suites(value: str, data: Path | None) -> list[str]:
    names = [s.strip() for s in value.split(",") if s.strip()]
    if "all" in names:
        names = ["niah", "niah-multi", "mdqa", "freqword", "ocr"]
        if data is not None:
            from glyphserve.eval.loaders import detect_format

            names.insert(4, detect_format(data))
    unknown = [s for s in names if s not in SUITES]
    if unknown or not names:
        raise ConfigError(f"--suite: unknown {', '.join(unknown) or 'empty'}; choose from {', '.join(SUITES)}, all")
    data_suites = [s for s in names if s in DATA_SUITES]
    if data_suites and data is None:
        raise ConfigError(f"--suite {data_suites[0]} needs --data FILE.jsonl with the benchmark's records")
    if len(data_suites) > 1:
        raise ConfigError("--data is one file: run longbench and mrcr separately")
    return list(dict.fromkeys(names))


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


def _parse_dpis(value: str | None) -> list[int]:
    try:
        return [int(v) for v in _split(value)]
    except ValueError:
        raise ConfigError(f"--dpi takes whole numbers like 72,96, not {value!r}") from None


def make_backend(args: argparse.Namespace):
    from glyphserve.eval import backends

    check_local_flags(args)
    kind = answerer_kind(args, otherwise="extractive")
    if kind == "local":
        from glyphserve.serve.weights import resolve_model

        model = resolve_model(args.model) if args.model else None  # before torch loads: fails fast
        return backends.LocalBackend(model, args.random_weights, args.max_new_tokens, args.max_context, args.device,
                                     args.dtype, args.quantize)
    # Without a model here, pages are selected for the context given (or the engine's default).
    context = args.max_context or (DEFAULT_CONTEXT if args.page_selection else None)
    if kind == "openai":
        return backends.OpenAIBackend(args.endpoint, args.remote_model, args.remote_api_key, args.max_new_tokens,
                                      context)
    return backends.ExtractiveBackend(context=context, max_tokens=args.max_new_tokens)


def run(args: argparse.Namespace) -> int:
    from glyphserve.eval import loaders, ocr, report, suites
    from glyphserve.eval.runner import RenderSetting, evaluate, summarize
    from glyphserve.render import count_text_tokens

    check_output(args.output)  # before a run that may take hours
    names = parse_suites(args.suite, args.data)
    lengths = parse_lengths(args.lengths)
    modes = parse_modes(args.page_selection)
    if lengths and isinstance(lengths[0], float) and not modes:
        raise ConfigError("--lengths in context multiples (2x,4x) are for --page-selection runs")
    if (args.samples is not None and args.samples < 1) or args.ocr_pages < 1:
        raise ConfigError("--samples and --ocr-pages must be at least 1")
    presets, dpis = _split(args.preset), _parse_dpis(args.dpi)
    accuracy_suites = [s for s in names if s != "ocr"]
    meta: dict = {"suites": ",".join(names), "seed": args.seed, "notes": []}
    if "ocr" in names:  # checked first: the accuracy suites may run for a long time
        ocr_presets = presets if presets and presets != ["auto"] else list(ocr.OCR_LANGUAGES)
        unknown = [p for p in ocr_presets if p not in ocr.OCR_LANGUAGES]
        if unknown:
            raise ConfigError(
                f"--preset {unknown[0]} has no OCR language; the ocr suite reads {', '.join(ocr.OCR_LANGUAGES)}"
            )
        ocr.require_tesseract({ocr.OCR_LANGUAGES[p] for p in ocr_presets})

    results, legibility = [], []
    if accuracy_suites:
        backend = make_backend(args)
        meta["backend"] = backend.name
        meta.update(backend.describe())
        meta["lengths"] = args.lengths
        settings = [RenderSetting(p, d) for p in (presets or ["auto"]) for d in (dpis or [None])]
        if modes:
            meta["page_selection"] = ",".join(modes)
            meta["context"] = backend.context
        if isinstance(lengths[0], float):
            multiples, lengths = lengths, lengths_beyond(lengths, backend.context, settings[0])
            meta["notes"].append(
                "lengths " + ", ".join(f"{m:g}x" for m in multiples) + f" of the {backend.context:,}-token context: "
                + ", ".join(f"{t:,}" for t in lengths) + " text tokens")

        def progress(r) -> None:
            shown = "" if r.pages_shown is None or r.pages_shown == r.pages else f" ({r.pages_shown} shown)"
            evidence = {True: ", evidence shown", False: ", evidence not shown", None: ""}[r.evidence_shown]
            print(f"{r.suite} {report.format_length(r.length)} #{r.index} [{r.setting}]: score {r.score:.2f}, "
                  f"{r.pages} pages{shown}{evidence}, answer {r.answer_s:.2f} s", file=sys.stderr)

        for name in accuracy_suites:
            if name in DATA_SUITES:
                load = loaders.load_longbench if name == "longbench" else loaders.load_mrcr
                samples, too_long = loaders.bucket_by_length(
                    load(args.data), lengths, lambda text: count_text_tokens(text, backend.tokenizer)[0], args.samples
                )
                if too_long:
                    meta["notes"].append(
                        f"{name}: {too_long} record(s) longer than {lengths[-1]:,} tokens were skipped"
                    )
            else:
                samples = list(suites.generate(name, lengths, args.samples or DEFAULT_SAMPLES, args.seed))
            for setting in settings:
                results += evaluate(samples, backend, setting, progress, modes)
    else:
        meta["backend"] = "none (ocr only)"

    if "ocr" in names:
        for preset in ocr_presets:
            for dpi in dpis or [72, 96]:
                row = ocr.legibility(preset, dpi, pages=args.ocr_pages, seed=args.seed)
                print(f"ocr {preset} @ {dpi} dpi: CER {row.cer:.1%} (2x: {row.cer_upscaled:.1%})", file=sys.stderr)
                legibility.append(row)

    rows = summarize(results)
    try:
        written = report.write_report(args.output, meta, rows, results, legibility)
    except OSError as exc:  # (e.g. no permission): the tables still go to stdout, not to lose a long run
        print(report.markdown(meta, rows, legibility))
        raise GlyphserveError(f"cannot write the results to {args.output}: {exc.strerror or exc}") from None
    print(report.markdown(meta, rows, legibility))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
