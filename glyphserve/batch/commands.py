"""``glyphserve batch``: answer a list of questions about every document of a folder."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import signal
import sys
import threading

from glyphserve.engine.commands import (REMOTE_CONTEXT, answerer_argument, answerer_kind, check_local_flags,
                                       check_sampling, engine_arguments, engine_config, model_arguments,
                                       page_selection_argument, remote_arguments, sampling_arguments)
from glyphserve.render.commands import page_arguments, positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "batch",
        help="answer questions about many documents, resumably, into a JSONL file",
        description=(
            "Answer questions about every document of a folder, a glob or a JSONL manifest "
            '({"id", "path" or "text", "questions": [...]} per line). Results are appended to '
            "OUTPUT as they finish; rerunning with the same OUTPUT skips what is done (refused when that OUTPUT "
            "was answered by another backend, model or settings)."
        ),
    )
    parser.add_argument("input", metavar="INPUT", help="a folder, a glob (quote it), a file, or a .jsonl manifest")
    parser.add_argument("--questions", metavar="FILE",
                        help="questions for every document: one per line; a JSON list; JSON Lines ({\"question\": "
                             "...} per line); or a .csv/.tsv file with a header row naming a 'question' column")
    parser.add_argument("-o", "--output", required=True, metavar="RESULTS.jsonl",
                        help="results file (appended to; refused when it is one of the inputs or holds anything "
                             "but batch results)")

    engine = parser.add_argument_group("engine", "who answers: a model loaded here, OpenAI-compatible servers, or "
                                       "--backend extractive")
    source = model_arguments(engine, without="--endpoint URL, or --backend extractive")
    remote_arguments(engine, group=source, several=True)
    answerer_argument(engine, otherwise="; extractive only when named: a rerun skips what is done, so passages "
                                        "written by a run that forgot --model would stay")
    engine_arguments(engine, context_note=REMOTE_CONTEXT)

    run = parser.add_argument_group("run")
    run.add_argument("--batch-size", type=positive_int, default=4, metavar="N",
                     help="questions answered together (halved automatically on GPU out-of-memory); default 4")
    sampling_arguments(run)
    run.add_argument("--workers", type=int, default=max(1, min(4, (os.cpu_count() or 2) - 1)), metavar="N",
                     help="render processes working ahead of the model (0: render in this process; default: the "
                          "cores but one, 1 to 4)")
    run.add_argument("--prefetch", type=positive_int, metavar="N",
                     help="documents rendered ahead (default 2 x batch size + workers)")
    page_selection_argument(run, note=": a row records the error")
    run.add_argument("--retry-failed", action="store_true",
                     help="also retry items recorded with an error (server-side errors are always retried)")
    run.add_argument("--allow-mixed", action="store_true",
                     help="resume even when OUTPUT's rows were answered by another backend, model or settings "
                          "(refused otherwise, as one file would then mix answers; each row records what answered "
                          "it, in answered_by)")

    run.add_argument("--parquet", metavar="RESULTS.parquet",
                     help="also write every result of OUTPUT as a Parquet table when the run ends (needs pyarrow, "
                          "part of glyphserve[cluster])")

    cluster = parser.add_argument_group("cluster", "run on Ray Data (pip install 'glyphserve[cluster]')")
    cluster.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                         help="ingest and render as Ray tasks, answer on an actor pool of engines; 'local' (the "
                              "default) starts Ray here, an address (auto, ray://head:10001) joins a cluster whose "
                              "nodes see the input paths")
    cluster.add_argument("--engines", type=int, metavar="N",
                         help="engine actors with --ray (default: one per GPU of the cluster, 1 without GPUs)")

    page_arguments(parser.add_argument_group("rendering"))
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from glyphserve.batch.inputs import collect_documents, load_questions
    from glyphserve.batch.prefetch import RenderOptions
    from glyphserve.batch.results import ResultLog, write_parquet
    from glyphserve.batch.runner import BatchOptions, BatchRunner
    from glyphserve.errors import ConfigError
    from glyphserve.render import resolve_config

    resolve_config("", args.preset, dpi=args.dpi, newline=args.newline)  # bad settings fail now, not per document
    check_sampling(args)
    options = BatchOptions(
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
        workers=args.workers,
        prefetch=args.prefetch,
        use_cache=not args.no_cache,
        page_selection=args.page_selection,
        render=RenderOptions(preset=args.preset, dpi=args.dpi, newline=args.newline),
    )
    if args.engines is not None and (args.ray is None or args.engines < 1):
        raise ConfigError("--engines N (N >= 1) goes with --ray")
    # The input first (the command's first word): a missing folder is reported as such, model or not.
    documents = collect_documents(args.input, load_questions(args.questions, note=_note) if args.questions else None,
                                  exclude=_own_outputs(args), note=_note)
    _check_outputs(args, documents)
    check_local_flags(args)
    args.backend = answerer_kind(args, otherwise=None)
    if args.ray is not None:
        if args.backend not in ("local", None):  # (None: nothing chosen, which local_engine says)
            raise ConfigError(f"--ray runs engines on the cluster: it does not go with --backend {args.backend}")
        from glyphserve.cluster import require_ray

        require_ray()
        engine = local_engine(args, max_num_seqs=args.batch_size)
        if engine.model and args.ray == "local":  # a missing model is one line before Ray starts (as without --ray)
            from glyphserve.serve.weights import resolve_model

            engine = dataclasses.replace(engine, model=resolve_model(engine.model))
    else:
        load_engine = engine_loader(args, max_num_seqs=args.batch_size)

    def answerer():  # (called once -o is known to hold results: a file refused is so before servers are asked)
        return run_answerer(args, load_engine() if args.backend == "openai" else None)

    terminate = _TerminateAsInterrupt()
    try:
        with terminate, ResultLog(args.output, retry_failed=args.retry_failed, answerer=answerer,
                                  allow_mixed=args.allow_mixed) as log:
            if log.torn_bytes:
                _note(f"removed a torn last line ({log.torn_bytes} bytes) from {log.path}")
            if log.retrying:
                _note(f"retrying {log.retrying} questions that failed last time")
            if log.others:
                _note(f"--allow-mixed: {log.path} holds {sum(log.others.values())} rows answered otherwise than "
                      f"this run answers ({log.answerer.flags()}); each row says what answered it, in answered_by")
            if log.unrecorded:
                _note(f"{log.unrecorded} rows of {log.path} do not say what answered them (written before glyphserve "
                      f"recorded it), so they are not compared with this run ({log.answerer.flags()}): if another "
                      "backend, model or settings answered them, stop and give -o another file")
            if args.ray is not None:
                from glyphserve.batch.ray_data import RayBatchOptions, run_on_ray

                summary = run_on_ray(documents, log, options, engine, RayBatchOptions(args.ray, args.engines))
            else:
                summary = BatchRunner(load_engine, log, options).run(documents)
    except _Terminated:  # before the run had started (it catches its own)
        print("interrupted", file=sys.stderr)
        return 128 + signal.SIGTERM
    print(summary.text())
    if args.parquet:
        try:
            rows = write_parquet(args.output, args.parquet)
        except ConfigError as exc:  # (checked before the run; the disk may have filled since)
            exc.message += (f"; the results are in {args.output}: rerun the same command with --parquet naming "
                            "another file to write the table (a finished run only writes it)")
            raise
        print(f"batch: {rows} results written to {args.parquet}")
    if summary.interrupted:
        return 128 + signal.SIGTERM if terminate.received else 130
    return 1 if summary.stopped else 0


def _note(message: str) -> None:
    print(f"batch: {message}", file=sys.stderr)


def run_answerer(args: argparse.Namespace, remote=None):
    """What answers this run, as its rows record it (``glyphserve.batch.results.Answerer``); ``remote``: the
    servers' client, loaded (the name their /v1/models gives the model, when --remote-model does not)."""
    from pathlib import Path

    from glyphserve.batch.results import Answerer

    render = {"preset": args.preset, "dpi": args.dpi, "newline": args.newline}
    if args.backend == "extractive":  # (no model: the generation flags change nothing, pages are not selected)
        return Answerer("extractive", **render)
    if remote is not None:
        model = ", ".join(remote.models) or None
    elif args.random_weights:
        model = Answerer.RANDOM_WEIGHTS.format(args.random_weights)
    else:  # a folder by its absolute path (a rerun from another directory is the same model), else the Hub id
        model = str(Path(args.model).expanduser().resolve()) if Path(args.model).expanduser().exists() else args.model
    return Answerer(args.backend, model, quantize=args.quantize, max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, top_p=args.top_p, seed=args.seed, ignore_eos=args.ignore_eos,
                    max_context=args.max_context, page_selection=args.page_selection, **render)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt would be, so the run stops the same way."""


class _TerminateAsInterrupt:
    """While open, SIGTERM (what timeout, systemd and Kubernetes send) interrupts the run as Ctrl-C does:
    the summary is printed and the render workers are shut down, instead of the process dying mid-run."""

    def __init__(self):
        self.received = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # (only the main thread may set a handler)
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        if not self.received:  # a second SIGTERM while stopping is not a second interruption of the stopping
            self.received = True
            raise _Terminated

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _own_outputs(args: argparse.Namespace) -> list:
    """What this run writes that an earlier run may have left in its input folder, and so is no document there: -o
    holding batch results, its rewrite's .tmp, --parquet holding a table. An -o or --parquet holding anything else
    stays a document, for _check_outputs to refuse (left out, such a document went unread, and then -o was refused
    as no results file and --parquet was written over)."""
    from glyphserve.batch.results import holds_parquet, holds_results, written_files

    results, tmp = written_files(args.output)
    return [tmp, *([results] if holds_results(results) else []),
            *([args.parquet] if args.parquet and holds_parquet(args.parquet) else [])]


def _check_outputs(args: argparse.Namespace, documents) -> None:
    """-o and --parquet write files: neither may be a file this run reads, nor the other; and --parquet must be
    a path its table can be written to."""
    from pathlib import Path

    from glyphserve.batch.results import written_files
    from glyphserve.errors import ConfigError

    outputs = {Path(path).resolve(): f"-o {args.output}" for path in written_files(args.output)}
    if args.parquet:
        if Path(args.parquet).resolve() in outputs:
            raise ConfigError(f"--parquet {args.parquet} is the results file: give the table a file of its own")
        outputs[Path(args.parquet).resolve()] = f"--parquet {args.parquet}"
    manifest = Path(args.input).suffix.lower() == ".jsonl" and Path(args.input).is_file()
    named = [(args.input, "the input manifest" if manifest else "the input"), (args.questions, "the questions file")]
    named += [(doc.path, f"the document {doc.id!r}") for doc in documents if doc.path is not None]
    for path, what in named:
        flag = outputs.get(Path(path).resolve()) if path else None
        if flag:
            raise ConfigError(f"{flag} is {what}, which this run reads: give the results a file of their own")
    if args.parquet:
        _check_parquet(Path(args.parquet))


def _check_parquet(path) -> None:
    """--parquet is written when the run ends, maybe hours later: a table that could not be written then is
    refused now (pyarrow missing, a folder, someone's other file, a place that cannot be written). Its folder is
    made now, as the results file's is."""
    import importlib.util
    import tempfile

    from glyphserve.batch.results import holds_parquet
    from glyphserve.errors import ConfigError

    if importlib.util.find_spec("pyarrow") is None:
        raise ConfigError("--parquet needs pyarrow: pip install 'glyphserve[cluster]'")
    if path.is_dir():
        raise ConfigError(f"--parquet {path} is a folder: give the table a file (e.g. {path / 'results.parquet'})")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):  # (the table is written beside its path, then renamed)
            pass
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"--parquet {path}: cannot make its folder, a file stands in its path") from None
    except OSError as exc:
        raise ConfigError(f"--parquet {path}: cannot write in its folder {path.parent}: {exc.strerror}") from None
    if not holds_parquet(path):
        raise ConfigError(f"--parquet {path} holds something other than a Parquet table (or cannot be read); it was "
                          "left as it is: give the table a file of its own")


# Batch, unlike ask, serve and eval, answers extractively only when asked to.
CHOOSE_ANSWERER = (
    "choose who answers: --model PATH_OR_ID, --random-weights glm-4.1v-9b or --endpoint URL (a running server); or "
    "--backend extractive for the best passages of each document's text, without a model. Unlike ask and serve, batch "
    "does not fall back to it: a rerun skips the questions already answered, so a run that forgot --model would leave "
    "passages where the model's answers belong"
)


def local_engine(args: argparse.Namespace, *, max_num_seqs: int):
    """The EngineConfig of the model to load here."""
    from glyphserve.errors import ConfigError

    if not (args.model or args.random_weights):
        raise ConfigError(CHOOSE_ANSWERER)
    return engine_config(args, max_num_seqs=max_num_seqs)


def engine_loader(args: argparse.Namespace, *, max_num_seqs: int):
    """A function that loads what answers (an engine here, the servers' client, or the extractive answers): checked
    now, loaded later (the servers' client once, whatever the calls)."""
    if args.backend == "openai":
        from glyphserve.engine.remote import RemoteConfig, RemoteEngine

        config = RemoteConfig(args.endpoint, model=args.remote_model, api_key=args.remote_api_key,
                              max_concurrency=max(16, max_num_seqs), max_context=args.max_context)
        # Connected once, at the first call (a few requests, no weights): the rows record the model the servers
        # answer as, so a resume compares it with the file's before anything runs, and the run answers with it.
        return functools.cache(lambda: RemoteEngine.load(config))
    if args.backend == "extractive":
        from glyphserve.batch.extractive import ExtractiveAnswers

        return ExtractiveAnswers
    from glyphserve.serve.weights import resolve_model

    config = local_engine(args, max_num_seqs=max_num_seqs)
    if config.model:  # a missing folder or an unreachable Hub id fails now, as for ask and serve
        config = dataclasses.replace(config, model=resolve_model(config.model))

    def load():
        from glyphserve.engine import Engine  # torch and transformers: only once there is work to do

        return Engine.load(config)

    return load
