"""``glyphserve make-tiny-model`` (``glyphserve ask`` lives in serve: without a model it answers extractively), and
the model, engine and sampling flags of the commands that answer (serve, ask, batch, eval): defined here once, so a
flag has one name, one help text and one default wherever it applies."""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
import os
import re
from pathlib import Path

from glyphserve.engine.types import DEFAULT_MAX_CONTEXT, MAX_SEED, MAX_TEMPERATURE
from glyphserve.errors import ConfigError, GlyphserveError

RANDOM_WEIGHTS = ("glm-4.1v-9b",)
DTYPES = ("auto", "bfloat16", "float16", "float32")
DEVICES = ("auto", "cuda", "cpu")
PAGE_SELECTIONS = ("retrieve", "first", "all")  # glyphserve.retrieve.MODES (not imported: --help stays instant)
MAX_NEW_TOKENS = 512


def register(subparsers) -> None:
    tiny = subparsers.add_parser(
        "make-tiny-model",
        help="write a tiny random GLM-4.1V checkpoint (tests, smoke runs)",
        description="Write a tiny random checkpoint with GLM-4.1V's architecture, tokenizer tokens, processor and "
        "chat template; it loads with --model DIR like the real Glyph.",
    )
    tiny.add_argument("dir", type=Path, metavar="DIR",
                      help="a new or empty folder (an earlier tiny checkpoint there is replaced)")
    tiny.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    tiny.set_defaults(func=_make_tiny)


def _make_tiny(args: argparse.Namespace) -> int:
    from glyphserve.engine.tiny import make_tiny_model

    print(make_tiny_model(args.dir, seed=args.seed))
    return 0


def model_arguments(parser: argparse.ArgumentParser, *, without: str,
                    positional: bool = False) -> argparse._MutuallyExclusiveGroup:
    """--model (with ``positional``, also as the command's first word, as ``vllm serve MODEL`` takes it) or
    --random-weights; ``without``: what the command does with neither. Returns the group that makes the two
    exclusive, for a command whose --endpoint excludes them too."""
    model_help = f"model directory or Hugging Face id (e.g. zai-org/Glyph); none: {without}"
    if positional:
        parser.add_argument("model_tag", nargs="?", default=None, metavar="MODEL", help=model_help)
        model_help = "the same as MODEL"
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", default=None, metavar="PATH_OR_ID", help=model_help)
    source.add_argument("--random-weights", default=None, choices=RANDOM_WEIGHTS,
                        help="full-size architecture with random weights (benchmarks, no checkpoint needed)")
    return source


def device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", choices=DEVICES,
                        help="where the model runs (default auto: cuda when a GPU is there, else cpu)")


def engine_arguments(parser: argparse.ArgumentParser, *, context_note: str = "") -> None:
    """What a model loaded here is run with: --dtype, --device, --quantize and --max-model-len (also --max-context,
    dest ``max_context`` as ``EngineConfig`` names it); ``context_note`` ends the context's help with what it means
    to the command's other answerers."""
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="the weights' dtype (default auto: bfloat16 on a GPU, float32 on the CPU)")
    device_argument(parser)
    parser.add_argument("--quantize", choices=["fp8"], default=None,
                        help="fp8: the language model's weights in e4m3 (half the memory and decode bytes; for 24 GB "
                             "cards); answer quality against 16-bit weights is unmeasured without the real weights "
                             "(default: none, the weights as --dtype says)")
    parser.add_argument("--max-model-len", "--max-context", dest="max_context", type=int, default=None,
                        metavar="TOKENS",
                        help=f"context length: prompt + answer tokens (default: the model's, at most "
                             f"{DEFAULT_MAX_CONTEXT}){context_note}")


# The --max-model-len of an answerer without the model's tokenizer: the servers' (glyphserve.engine.prompt.page_budget).
REMOTE_CONTEXT = ("; with --endpoint: what pages are chosen for (default: the least context the servers report "
                  "in /v1/models)")


def remote_arguments(parser: argparse.ArgumentParser, *, group: argparse._ActionsContainer | None = None,
                     several: bool = False, aliases: bool = True, key_dest: str = "remote_api_key") -> None:
    """--endpoint (``several``: repeatable), --remote-model and --remote-api-key: OpenAI-compatible servers that
    answer instead of a model loaded here. ``group``: where --endpoint goes (the exclusive group of --model);
    ``aliases``: --served-model-name and --api-key too, where the command has no flags of its own by those names
    (serve has: the names it answers to, and its own key)."""
    (group or parser).add_argument(
        "--endpoint", action="append" if several else "store", default=[] if several else None, metavar="URL",
        help="an OpenAI-compatible server (vLLM, SGLang, glyphserve serve), e.g. http://127.0.0.1:7860/v1"
             + ("; repeat for more" if several else ""))
    parser.add_argument("--remote-model", *(["--served-model-name"] if aliases else []), dest="remote_model",
                        metavar="NAME", help="the model name sent to the servers (default: the first their /v1/models "
                                             "names)")
    parser.add_argument("--remote-api-key", *(["--api-key"] if aliases else []), dest=key_dest,
                        default=os.environ.get("OPENAI_API_KEY"), metavar="KEY",
                        help="bearer token for the servers (default: $OPENAI_API_KEY)")


def answerer_argument(parser: argparse.ArgumentParser, *, otherwise: str) -> None:
    """--backend of a command that answers with a model here, on servers or extractively (batch, eval);
    ``otherwise`` ends the default's help: what answers with neither a model nor an --endpoint."""
    parser.add_argument("--backend", choices=("local", "openai", "extractive"),
                        help="who answers: local, the model loaded here (--model, --random-weights); openai, the "
                             "--endpoint servers; extractive, the best passages of the document's text (BM25), no "
                             f"model (default: openai with --endpoint, local with a model{otherwise})")


def answerer_kind(args: argparse.Namespace, *, otherwise: str | None) -> str | None:
    """Who answers, by ``answerer_argument``'s --backend or what the other flags imply (``otherwise`` with neither a
    model nor an --endpoint; None: the command asks for one); flags that contradict it are refused."""
    has_model = bool(args.model or args.random_weights)
    kind = args.backend or ("openai" if args.endpoint else "local" if has_model else otherwise)
    if kind == "openai" and not args.endpoint:
        raise ConfigError("--backend openai needs --endpoint URL (e.g. http://127.0.0.1:8000/v1)")
    if kind == "local" and args.endpoint:
        raise ConfigError("--endpoint needs --backend openai")
    if kind == "local" and not has_model:
        raise ConfigError("--backend local needs --model PATH_OR_ID (e.g. zai-org/Glyph) or --random-weights "
                          "glm-4.1v-9b")
    if kind == "extractive" and (has_model or args.endpoint):
        raise ConfigError("--backend extractive answers without a model: it takes no --model, --random-weights or "
                          "--endpoint")
    return kind


def page_selection_argument(parser: argparse.ArgumentParser, *, note: str = "") -> None:
    parser.add_argument("--page-selection", choices=PAGE_SELECTIONS, default="retrieve",
                        help="when a document's pages do not fit the context: show the pages whose text best matches "
                             "the question and the conversation, with their neighbours (retrieve, default), the first "
                             f"pages that fit (first), or refuse (all){note}")


def max_new_tokens_argument(parser: argparse.ArgumentParser, default: int = MAX_NEW_TOKENS) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=default, metavar="N",
                        help=f"answer tokens at most, Glyph's thinking included (default {default})")


def sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """How answers are generated (``GenerationSettings``): --max-new-tokens, --temperature, --top-p, --seed,
    --ignore-eos and --no-cache; ``check_sampling`` checks them before anything loads."""
    max_new_tokens_argument(parser)
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T",
                        help=f"sampling temperature, 0 to {MAX_TEMPERATURE:g} (default 0: greedy)")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P",
                        help="sample from the likeliest tokens whose probabilities add up to P (default 1: all)")
    parser.add_argument("--seed", type=int, default=None,
                        help="sampling seed: the same seed gives the same answer (default: none)")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="always generate --max-new-tokens tokens (benchmarks)")
    parser.add_argument("--no-cache", action="store_true",
                        help="bypass the vision-feature and document-prefix caches (by default questions about the "
                             "same pages share one vision encode and the prefix)")


def check_sampling(args: argparse.Namespace) -> None:
    """The sampling flags in the API's ranges (vLLM's), refused before a model loads."""
    if args.max_new_tokens < 1:
        raise ConfigError("--max-new-tokens must be at least 1")
    if not 0 <= args.temperature <= MAX_TEMPERATURE:  # (NaN included)
        raise ConfigError(f"--temperature must be between 0 and {MAX_TEMPERATURE:g}, not {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p must be above 0 and at most 1, not {args.top_p}")
    if args.seed is not None and not 0 <= args.seed <= MAX_SEED:
        raise ConfigError(f"--seed must be between 0 and 2**64 - 1, not {args.seed}")


def check_local_flags(args: argparse.Namespace) -> None:
    """--quantize goes with a model loaded here (the servers and the extractive answers have no weights of ours)."""
    if args.quantize and not (args.model or args.random_weights):
        raise ConfigError("--quantize needs --model or --random-weights (it quantizes the model's weights)")


# The engine's and the page selection's messages name the API's request fields (max_tokens, truncate_pages,
# page_selection, max_context) and advise what a client of the API can do (ask about a stored document); at the
# command line the advice names the flags that do it. One table for the commands that answer: ask, batch and eval.
_CLI_WORDS = (
    (re.compile(r"Ask about fewer or smaller pages, keep the first (\d+) \(truncate_pages\), or, for a stored "
                r"document, let the pages that match the question be chosen \(page_selection retrieve\)"),
     r"Keep the first \1 (--page-selection first), or let the pages that match the question be chosen "
     r"(--page-selection retrieve)"),
    (re.compile(r"or ask about the first (\d+) of (\d+) pages"),
     r"or keep the first \1 of \2 pages (--page-selection first)"),
    (re.compile(r"mode first shows nothing past a page that does not fit; use retrieve"),
     "--page-selection first shows nothing past a page that does not fit; use --page-selection retrieve"),
    (re.compile(r"\bmax_tokens\b"), "--max-new-tokens"),
    (re.compile(r"max_context \(--max-model-len\)"), "--max-model-len"),
    (re.compile(r"\(max_context, --max-model-len\)"), "(--max-model-len)"),
    (re.compile(r"\buse a longer context\b"), "use a longer context (--max-model-len)"),
    (re.compile(r"a document rendered at a lower dpi"), "a lower --dpi"),
)


def speaking_flags(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``command``, an error that stops it put ``in_cli_words`` (what ask and eval run)."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except GlyphserveError as exc:
            exc.message = in_cli_words(exc.message)
            raise

    return run


def in_cli_words(message: str) -> str:
    """``message`` (an engine's, the page selection's or a server's) with the request fields and advice it names
    put as the command-line flags that answering commands share: ``max_tokens`` as ``--max-new-tokens``,
    ``truncate_pages`` as ``--page-selection first``, ``max_context`` as ``--max-model-len``."""
    for pattern, words in _CLI_WORDS:
        message = pattern.sub(words, message)
    return message


def engine_config(args: argparse.Namespace, **overrides):
    """The ``EngineConfig`` of ``engine_arguments`` and ``model_arguments`` (``overrides``: the command's own, such
    as max_num_seqs)."""
    from glyphserve.engine.types import EngineConfig

    return EngineConfig(model=args.model, random_weights=args.random_weights, dtype=args.dtype, device=args.device,
                        max_context=args.max_context, quantize=args.quantize, **overrides)
