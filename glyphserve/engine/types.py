"""Public data types of the engine: configuration, requests, stream events and answers."""

from __future__ import annotations

import hashlib
import io
from dataclasses import asdict, dataclass, field
from collections.abc import Callable
from typing import Literal, Union

import numpy as np
from PIL import Image

from glyphserve.errors import GlyphserveError


NOT_A_MODEL = "no such folder, and not a Hugging Face id (organisation/name)"


def is_hub_id(name: str) -> bool:
    """Whether an ``EngineConfig.model`` has the form of a Hugging Face model id (organisation/name), not of a
    path."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


@dataclass
class EngineConfig:
    """How to load and run the model.

    ``model`` is a local directory or a Hugging Face id (e.g. ``zai-org/Glyph``); alternatively
    ``random_weights="glm-4.1v-9b"`` builds the full-size architecture with random weights
    (benchmarks without a checkpoint).
    """

    model: str | None = None
    random_weights: str | None = None
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    device: Literal["auto", "cuda", "cpu"] = "auto"
    # Longest sequence (prompt + answer) in tokens; None = the model's limit, capped at 32768.
    max_context: int | None = None
    # Sequences decoded together at most (vLLM's max_num_seqs); a CUDA graph is captured per power-of-two bucket
    # (and one of 64 rows beside fewer sequences, for short prompt chunks).
    max_num_seqs: int = 256
    # CUDA: the share of the GPU's memory the process may use; the KV pool gets what the weights, the largest
    # prefill's activations and the vision cache leave of it (vLLM's gpu_memory_utilization).
    gpu_memory_utilization: float = 0.9
    kv_block_size: int = 16  # tokens per KV block (the granularity of prefix sharing)
    num_kv_blocks: int | None = None  # a fixed pool size instead of the memory budget
    cpu_kv_cache_bytes: int = 1 << 30  # the pool's size on CPU
    enable_prefix_caching: bool = True  # share KV blocks of equal prefixes (documents, earlier turns)
    # Tokens per step while sequences decode (a joining document is prefilled this much at a time between their
    # steps), and per step when none decodes (a long prompt prefilled in one causal pass).
    max_num_batched_tokens: int = 2048
    max_prefill_tokens: int = 16384
    vision_cache_bytes: int = 2 * 2**30
    vision_cache_cpu_bytes: int = 0
    # "fp8": the language model's projections and head stored as e4m3 with per-output-channel scales, run by a
    # weight-streaming kernel at decode sizes (half the bytes a step reads); the vision tower stays 16-bit.
    quantize: Literal["fp8"] | None = None
    # Capture the decode step as CUDA graphs at load time, its elementwise work fused by torch.compile (CUDA only).
    cuda_graphs: bool = True
    compile_decode: bool = True
    # Prompt chunks that fit beside the decoding answers in a graph step (follow-ups, later turns: up to
    # max(max_num_seqs, 64) rows in all) run as rows of the decode graph steps instead of through the eager pass
    # (``EngineCore.row_prefill``, which a running engine may flip). None: where decode graphs are captured; without
    # them each row gathering the whole prefix only costs (a W50 follow-up's first token on the CPU: 0.19 s as rows,
    # 0.02 s eagerly, tiny model).
    graph_prefill: bool | None = None
    # torch.compile the vision tower's blocks (CUDA, 16-bit weights; one graph for every page shape and count),
    # warmed up at load on pages of these shapes (height, width), batches of 1 to vision_batch_pages of which attend
    # through cuDNN (fastest on Hopper, but it plans each new shape: others attend through flash). Default: a full
    # page of Glyph's renderer (595 x 842 points at 72 dpi, both presets); none given: warmed up on one small page,
    # every shape through flash.
    compile_vision: bool = True
    warmup_page_shapes: tuple[tuple[int, int], ...] = ((842, 595),)
    # Pages encoded per vision forward. W200's 24 pages on an H200 by 8 / 12 / 24 pages a forward: 211 / 196 / 203
    # ms (fourteenth session), 199.6 / 191.9 / 194.6 (eighteenth, vision_probe): two forwards of 12 each time.
    vision_batch_pages: int = 12
    # CUDA: pages go up on a side stream, and decode reads its tokens back through pinned buffers one step behind
    # the GPU. False: plain synchronous copies (the benchmark ladder's row without them).
    pinned_copies: bool = True
    seed: int = 0
    # Keep a record of the last this many steps (``StepRecord``: what each ran, its time on the engine's thread and
    # how much of it waited for the device; ``Engine.step_trace``), for finding where a busy engine's time goes.
    step_trace: int = 0


# The sampler keeps a repetition penalty in float32 and divides logits by it: 1e-46 would be stored as 0 (0/0 is
# NaN, which argmax takes). Beyond this range a penalty already sets seen tokens apart by 1,000 times.
REPETITION_PENALTY_RANGE = (1e-3, 1e3)
# vLLM's ranges, checked at every boundary a request comes through (the API's parameters, ask's flags).
MAX_TEMPERATURE = 2.0
DEFAULT_MAX_CONTEXT = 32768  # a context unset: the model's positions, at most this many
MAX_SEED = 2**64 - 1
PENALTY_RANGE = (-2.0, 2.0)  # presence_penalty, frequency_penalty
MAX_LOGPROBS = 20
# Below this a temperature means greedy decoding (as vLLM's sampling parameters treat it).
GREEDY_BELOW = 1e-5


@dataclass
class GenerationSettings:
    """How one answer is generated. Names and meanings follow vLLM's ``SamplingParams`` (and OpenAI's API)."""

    # New tokens at most; None: up to the end of the context (vLLM's default for a chat request without one).
    max_tokens: int | None = 512
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = all tokens
    min_p: float = 0.0  # tokens below min_p times the most likely token's probability are dropped
    # Hugging Face's rule over prompt and answer tokens: a seen token's logit is divided by the penalty when
    # positive and multiplied by it when negative (1 = off).
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0  # OpenAI's: subtracted from the logit of every token already in the answer
    frequency_penalty: float = 0.0  # OpenAI's: subtracted once per occurrence in the answer
    stop: tuple[str, ...] = ()  # the answer ends before (or with, see below) the first of these strings
    stop_token_ids: tuple[int, ...] = ()  # extra stop tokens beside the model's own
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True  # special tokens are left out of the text
    logprobs: int | None = None  # None: none; 0: the chosen token's; k: also the k most likely (at most 20)
    use_cache: bool = True  # vision-feature and prefix caches
    ignore_eos: bool = False  # the model's stop tokens are suppressed until max_tokens (not stop_token_ids)
    truncate_pages: bool = False  # keep the first pages that fit the context instead of failing
    seed: int | None = None  # sampling seed (0 <= seed < 2**64): the same seed gives the same answer

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # one stop string, as vLLM takes it (not one per character)
            self.stop = (self.stop,)
        self.stop, self.stop_token_ids = tuple(self.stop), tuple(self.stop_token_ids)


@dataclass
class StepRecord:
    """One engine step as its loop ran it (``EngineConfig.step_trace``)."""

    started: float  # time.perf_counter() on the engine's thread
    seconds: float  # in the step: scheduling, launching it, reading the step before it back (and their events)
    wait_s: float  # of which blocked on the device
    # CPU time of the engine's thread in the step: ``seconds`` less ``wait_s`` less this is time the thread was
    # ready but not running (waiting for the GIL held by a server's other threads, or for a core)
    cpu_s: float
    decode_rows: int
    chunks: int  # prompt chunks
    chunk_tokens: int
    # "graph": a captured graph step (prompt chunks as its rows too); "rows": such a step run eagerly (no graph of
    # its size); "pass": an eager pass over prompt chunks (and decode rows); "graph pass": such a pass replayed
    # from a captured one (``pass_graphs``); "none": nothing launched
    kind: str


@dataclass
class ChatMessage:
    role: Literal["system", "user", "assistant"]
    content: str


@dataclass(frozen=True, eq=False)
class EncodedPage:
    """A page as the bytes of its image file (PNG, JPEG, ...). An engine decodes it only when the page's
    vision features are not cached; a remote engine sends the bytes as they are."""

    data: bytes
    height: int
    width: int
    mime: str = "image/png"

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, 3)

    def key(self) -> str:
        """The page's identity in the engine's caches when the caller gives none: its bytes' hash."""
        return "bytes:" + hashlib.blake2b(self.data, digest_size=16).hexdigest()

    @classmethod
    def from_bytes(cls, data: bytes) -> EncodedPage:
        """Reads only the image header (size and format)."""
        try:
            with Image.open(io.BytesIO(data)) as image:
                return cls(data, image.height, image.width, Image.MIME.get(image.format, "image/png"))
        except Exception:
            raise GlyphserveError("the page is not a readable image") from None

    @classmethod
    def from_pixels(cls, pixels: np.ndarray) -> EncodedPage:
        """HxWx3 uint8 RGB as a lossless PNG (level 1: rendered text pages are mostly flat, so it compresses
        nearly as well as the default level, much faster)."""
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
        return cls(buffer.getvalue(), pixels.shape[0], pixels.shape[1])

    def pixels(self) -> np.ndarray:
        """HxWx3 uint8 RGB."""
        try:
            with Image.open(io.BytesIO(self.data)) as image:
                pixels = np.asarray(image.convert("RGB"))
        except Exception:
            raise GlyphserveError("the page is not a readable image") from None
        if pixels.shape != self.shape:
            raise GlyphserveError(f"the page decodes to {pixels.shape[1]}x{pixels.shape[0]} px, "
                                  f"not the {self.width}x{self.height} px it was given as")
        return pixels


# What an engine reads: HxWx3 uint8 RGB pixels, or an encoded image of them.
Page = Union[np.ndarray, EncodedPage]


def engine_page(page) -> Page:
    """A rendered page (``glyphserve.render.RenderedPage``) as an engine reads it: the PNG file it keeps instead of
    pixels (a scan made into its page as it was read, ``glyphserve.render.fit_scans``; not decoded here), else its
    pixels."""
    if page.pixels is None:
        width, height = page.size
        return EncodedPage(page.encoded, height, width)
    return page.image


@dataclass
class AnswerRequest:
    """A question about rendered pages. ``history`` holds earlier turns (the pages belong to the first user turn)."""

    pages: list[Page]
    question: str
    history: list[ChatMessage] = field(default_factory=list)
    # Stable identity of each page (e.g. "<document content hash>:<page number>"), the key of its vision features
    # and of the prefix blocks that hold it: a page whose features are cached is then never decoded. Default: a
    # hash of the encoded bytes or of the pixels.
    page_keys: list[str] | None = None
    # Text placed just before each page in the prompt (e.g. which document of a collection it belongs to).
    page_labels: list[str] | None = None
    # Only compute and keep the pages' vision features and prefix KV, at low priority (a document made ready at
    # upload); nothing is generated and the question may be empty.
    warm: bool = False
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    # Answer tokens an earlier attempt generated and delivered (its replica died): computed as context, as after a
    # preemption, and counted in max_tokens; their text is not streamed again, and the answer continues after them
    # (or ends at once, when they end it: a stop, or max_tokens of them). ``resume_logprobs``, when the request asks
    # for logprobs: theirs, for the final Answer. ``resume_shown``: the characters of each channel's text the
    # caller received ({"thinking": n, "answer": m}); what their text holds beyond that is streamed first (a token
    # can release text in two deltas, only the first carrying it). None: all of it was received.
    resume_tokens: list[int] = field(default_factory=list)
    resume_logprobs: list[TokenLogprob] | None = None
    resume_shown: dict[str, int] | None = None
    # Polled once per decode step; returning True ends this request's generation (finish_reason "cancelled").
    cancel: Callable[[], bool] | None = field(default=None, compare=False, repr=False)

    def pages_key(self) -> str | None:
        """One key for all the pages, when their keys are given."""
        if not self.page_keys:
            return None
        return hashlib.blake2b("\x1f".join(self.page_keys).encode(), digest_size=16).hexdigest()


@dataclass
class StageTimings:
    """Seconds per stage. ``render`` is filled by callers that rendered the pages."""

    render: float = 0.0
    preprocess: float = 0.0
    vision_encode: float = 0.0
    prefill: float = 0.0
    decode: float = 0.0
    time_to_first_token: float = 0.0
    total: float = 0.0


@dataclass
class CacheReport:
    vision_hits: int = 0
    vision_misses: int = 0
    prefix_reused_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (OpenAI's cached_tokens)


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model (before sampling settings), and the most likely
    alternatives when asked for (``GenerationSettings.logprobs``)."""

    token_id: int  # -1 where a remote server gave only the text
    token: str
    logprob: float
    # (token id, text, logprob, bytes), most likely first
    top: list[tuple[int, str, float, list[int] | None]] = field(default_factory=list)
    # The token's own bytes (part of a character's, for a token that splits one); None: its text's UTF-8
    bytes: list[int] | None = None


@dataclass
class Answer:
    text: str
    thinking: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length", "cancelled"]
    timings: StageTimings
    prompt_tokens: int
    new_tokens: int
    vision_tokens: int
    pages_used: int
    cache: CacheReport
    peak_gpu_bytes: int | None = None
    stop_reason: str | int | None = None  # the stop string or token id that ended it (None: end-of-text, as vLLM)
    logprobs: list[TokenLogprob] | None = None  # one per generated token when asked for
    # Seconds after the request reached the engine at which each token generated here was read back from the
    # device (a step's tokens share a time; tokens resumed from an earlier attempt have none): the inter-token
    # latencies are their differences.
    token_times: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class StreamEvent:
    """A text delta on the "thinking" or "answer" channel; the last event has channel "done" and the Answer, or
    (for a request admitted into a running batch that could not run) channel "error" and the error."""

    channel: Literal["thinking", "answer", "done", "error"]
    text: str = ""
    result: Answer | None = None
    error: Exception | None = None
    logprobs: list[TokenLogprob] | None = None  # of the tokens this delta's text came from, when asked for
    # The generated token ids this delta's text came from: every token since the previous delta, none when a
    # token's text spans deltas and an earlier one carried it (a request that resumes an answer sends them back as
    # ``resume_tokens``).
    tokens: list[int] = field(default_factory=list)
