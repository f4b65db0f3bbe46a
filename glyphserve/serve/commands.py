"""``glyphserve serve`` and ``glyphserve doctor``."""

from __future__ import annotations

import argparse
import os
from contextlib import contextmanager
from pathlib import Path

from glyphserve.engine.commands import (REMOTE_CONTEXT, device_argument, engine_arguments, model_arguments,
                                       page_selection_argument, remote_arguments)
from glyphserve.errors import ConfigError, MissingExtraError
from glyphserve.serve import ask

# Top-level modules of each optional extra (pyproject.toml), for a one-line error when one is missing.
EXTRA_MODULES = {
    "serve": {"fastapi", "starlette", "uvicorn", "gradio", "prometheus_client", "multipart", "python_multipart",
              "httpx", "pydantic", "Stemmer", "swagger_ui_bundle"},
    "engine": {"torch", "transformers", "tokenizers", "safetensors", "jinja2", "huggingface_hub"},
    "cluster": {"ray"},
}


def register(subparsers) -> None:
    serve = subparsers.add_parser(
        "serve", help="web UI + OpenAI-compatible API in one process",
        description="Start the web UI (at /) and the HTTP API (at /v1) in one process, like `vllm serve MODEL`. "
                    "Without a model, documents are rendered and answered extractively (BM25 passages with their "
                    "pages).",
    )
    model_arguments(serve, without="extractive answers", positional=True)
    engine_arguments(serve, context_note=REMOTE_CONTEXT)
    serve.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                       help="the model name(s) the API answers to and names in replies (default: the last part of "
                            "the model id, e.g. Glyph for zai-org/Glyph; the official Glyph scripts send 'glyph')")
    page_selection_argument(serve, note="; requests may choose with page_selection")
    serve.add_argument("--max-num-seqs", "--max-batch", dest="max_num_seqs", type=int, default=256, metavar="N",
                       help="requests decoded together at most (default 256; the KV pool's free blocks decide "
                            "how many run at once)")
    serve.add_argument("--step-trace", type=int, default=0, metavar="N",
                       help="keep records of the engine's last N steps (what each ran, its time on the engine's "
                            "thread and how much of it waited for the GPU) for GET /v1/engine/steps (default 0: off)")
    serve.add_argument("--gpu-memory-utilization", type=float, default=0.9, metavar="FRACTION",
                       help="the share of the GPU's memory this server may use; the KV pool gets what the weights "
                            "and activations leave of it (default 0.9)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default 127.0.0.1; any other address requires --api-key)")
    serve.add_argument("--port", type=int, default=7860, help="port of the UI and the API (default 7860)")
    serve.add_argument("--data-dir", type=Path, default=None, metavar="DIR",
                       help="documents, pages and the SQLite index (default $XDG_DATA_HOME/glyphserve, else "
                            "~/.local/share/glyphserve, or ./data where that cannot be written)")
    serve.add_argument("--api-key", default=os.environ.get("GLYPHSERVE_API_KEY"), metavar="KEY",
                       help="require 'Authorization: Bearer KEY' on the API and this password in the UI "
                            "(default: $GLYPHSERVE_API_KEY)")
    serve.add_argument("--max-upload-mb", type=float, default=50, help="largest upload accepted (default 50)")
    serve.add_argument("--max-pages", type=int, default=500, help="most rendered pages per document (default 500)")
    limits = serve.add_argument_group("upload and image limits", "what one upload, or the images of one chat "
                                      "request, may cost; each checked before (or while) doing the work it bounds")
    limits.add_argument("--max-pdf-pages", type=int, default=2000,
                        help="most pages in an uploaded PDF, read from its page count (default 2000)")
    limits.add_argument("--max-scan-pages", type=int, default=100,
                        help="most PDF pages without a text layer, kept as images (default 100)")
    limits.add_argument("--max-characters", type=int, default=20_000_000,
                        help="most characters of text read from a PDF or DOCX (default 20000000)")
    limits.add_argument("--max-docx-paragraphs", type=int, default=200_000,
                        help="most paragraphs in a DOCX, counted while it streams (default 200000)")
    limits.add_argument("--max-unpacked-mb", type=float, default=128,
                        help="most MiB inflated from a DOCX, whatever its zip headers declare (default 128)")
    limits.add_argument("--max-parser-memory-mb", type=float, default=2048,
                        help="address space of the process that parses one PDF or DOCX (default 2048)")
    limits.add_argument("--ingest-timeout", type=float, default=60,
                        help="seconds to read and render one upload; its parser process is killed past it "
                             "(default 60)")
    limits.add_argument("--max-images", type=int, default=256, help="most image_url parts in one chat request "
                        "(default 256)")
    limits.add_argument("--max-image-mpx", type=float, default=25,
                        help="most megapixels in one image, read from its header before decoding (default 25)")
    limits.add_argument("--max-image-mb", type=float, default=256,
                        help="most MiB of pixels the images of one chat request decode to (default 256)")
    limits.add_argument("--header-timeout", type=float, default=10, metavar="SECONDS",
                        help="a connection whose request head has not arrived whole this long after it opened (or "
                             "after its last answer) is closed (default 10)")
    limits.add_argument("--body-timeout", type=float, default=30, metavar="SECONDS",
                        help="a request body that goes this long without bytes, or past it averages under 16 KiB/s, is "
                             "answered 408 (default 30)")
    limits.add_argument("--max-bodies-mb", type=float, default=None, metavar="MB",
                        help="MiB the bodies of all requests in flight may hold together, at least one largest "
                             "upload; past it, 503 server_busy, but for bodies of 64 KiB at most (questions, web UI "
                             "events: 16 MiB of their own) (default: 16 times --max-upload-mb)")
    serve.add_argument("--queue-size", type=int, default=64,
                       help="requests allowed to wait for the model; past it, 429 (default 64)")
    serve.add_argument("--request-timeout", type=float, default=300,
                       help="seconds before a request is answered 504 (default 300)")
    serve.add_argument("--shutdown-timeout", type=float, default=5.0, metavar="SECONDS",
                       help="on Ctrl-C or SIGTERM, seconds the answers in flight may still take (the port closes at "
                            "once); then each ends with a 503 shutting_down error, a stream's as its last event "
                            "(default 5)")
    serve.add_argument("--sse-keepalive", type=float, default=10.0, metavar="SECONDS",
                       help="a streamed answer still waiting for its first token gets an SSE comment this often, so "
                            "proxies keep the connection (default 10)")
    serve.add_argument("--no-ui", action="store_true", help="serve the API only")
    serve.add_argument("--allowed-hosts", type=_list, default=[], metavar="HOST,...",
                       help="Host header names this server answers to ('*': any; default: loopback names, and "
                            "--host when it is one address)")
    serve.add_argument("--allowed-origins", type=_list, default=[], metavar="ORIGIN,...",
                       help="web origins (https://app.example) whose pages may call the API (CORS) and post to "
                            "the server ('*': any; default: none but the server's own)")
    remote = serve.add_argument_group("remote servers", "answer on existing OpenAI-compatible servers: this server "
                                      "ingests, renders and stores, and sends each question to the least busy one")
    remote.add_argument("--backend", choices=("local", "openai"),
                        help="local: the model in this process (or on --ray replicas); openai: the --endpoint servers "
                             "(default: openai with --endpoint, else local)")
    # (serve's own --served-model-name and --api-key are the names it answers to and its key: no aliases here)
    remote_arguments(remote, several=True, aliases=False)
    remote.add_argument("--replica-concurrency", type=int, default=None, metavar="N",
                        help="requests in flight per --endpoint server (the front runs servers x N at once) or per "
                             "--ray engine replica (past it, a document's questions spill to its next replica); "
                             "default: twice --max-num-seqs with --ray, else 16")
    cluster = serve.add_argument_group("cluster", "engine replicas on Ray Serve (pip install 'glyphserve[cluster]')")
    cluster.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                         help="serve through Ray Serve: 'local' (the default) starts Ray here, an address (auto, "
                              "ray://head:10001) joins a cluster; this front stays on this machine")
    cluster.add_argument("--replicas", type=_replicas, default=1, metavar="N|auto",
                         help="engine replicas (one GPU each); auto: scaled on requests in flight (default 1)")
    cluster.add_argument("--min-replicas", type=int, default=1, metavar="N", help="with --replicas auto (default 1)")
    cluster.add_argument("--max-replicas", type=int, default=None, metavar="N",
                         help="with --replicas auto (default: one per GPU of the cluster)")
    serve.set_defaults(func=_serve)

    doctor = subparsers.add_parser("doctor", help="check GPU, libraries, fonts and model weights",
                                   description="Print what `glyphserve serve` will find on this machine.")
    model_arguments(doctor, without="the machine's checks alone", positional=True)
    device_argument(doctor)
    doctor.set_defaults(func=_doctor)
    ask.register(subparsers)


def _list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _model(args: argparse.Namespace) -> str | None:
    """MODEL or --model (the same one if both are given)."""
    if args.model_tag and args.model and args.model_tag != args.model:
        raise ConfigError(f"two models given: {args.model_tag} and --model {args.model}; give one")
    return args.model_tag or args.model


@contextmanager
def needs_extras(command: str):
    """Turns a missing package of an optional extra into one line that names the pip command."""
    try:
        yield
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".")[0]
        extra = next((name for name, modules in EXTRA_MODULES.items() if top in modules), None)
        if extra is None:
            raise
        raise MissingExtraError(f"`glyphserve {command}` needs the {extra} extra ({top} is not installed): "
                                f"pip install 'glyphserve[{extra}]'") from None


def _replicas(value: str) -> int | str:
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number or auto (got {value!r})")
    return int(value)


def _serve(args: argparse.Namespace) -> int:
    with needs_extras("serve"):
        return _run_server(args)


def _run_server(args: argparse.Namespace) -> int:
    config = serve_config(args)
    if config.ray is not None:
        from glyphserve.serve.ray_serve import run  # needs the cluster extra (ray)
    else:
        from glyphserve.serve.app import run
    return run(config)


def serve_config(args: argparse.Namespace):
    """The ServeConfig the command line asks for."""
    from glyphserve.serve.config import ServeConfig, default_data_dir

    return ServeConfig(
        host=args.host, port=args.port, data_dir=args.data_dir or default_data_dir(), model=_model(args),
        random_weights=args.random_weights, dtype=args.dtype, device=args.device, api_key=args.api_key or None,
        served_model_name=args.served_model_name or [], max_model_len=args.max_context,
        page_selection=args.page_selection,
        gpu_memory_utilization=args.gpu_memory_utilization, quantize=args.quantize,
        max_upload_mb=args.max_upload_mb, max_pages=args.max_pages, max_pdf_pages=args.max_pdf_pages,
        max_scan_pages=args.max_scan_pages, max_characters=args.max_characters,
        max_docx_paragraphs=args.max_docx_paragraphs, max_unpacked_mb=args.max_unpacked_mb,
        max_parser_memory_mb=args.max_parser_memory_mb, ingest_timeout=args.ingest_timeout,
        max_images=args.max_images, max_image_mpx=args.max_image_mpx, max_image_mb=args.max_image_mb,
        header_timeout=args.header_timeout, body_timeout=args.body_timeout, max_bodies_mb=args.max_bodies_mb,
        allowed_hosts=args.allowed_hosts, allowed_origins=args.allowed_origins, queue_size=args.queue_size,
        max_num_seqs=args.max_num_seqs, step_trace=args.step_trace, request_timeout=args.request_timeout,
        shutdown_timeout=args.shutdown_timeout,
        sse_keepalive=args.sse_keepalive,
        ui=not args.no_ui,
        backend=args.backend or ("openai" if args.endpoint else "local"), endpoints=args.endpoint,
        remote_model=args.remote_model, remote_api_key=args.remote_api_key or None,
        replica_concurrency=args.replica_concurrency,
        ray=args.ray, replicas=args.replicas, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
    )


def _doctor(args: argparse.Namespace) -> int:
    from glyphserve.serve.doctor import report

    text, ok = report(model=_model(args), random_weights=args.random_weights, device=args.device)
    print(text)
    return 0 if ok else 1
