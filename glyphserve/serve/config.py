"""Settings of one ``glyphserve serve`` process."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from glyphserve.errors import ConfigError
from glyphserve.ingest.limits import IngestLimits
from glyphserve.serve.images import ImageLimits

LOCAL_HOSTS = {"localhost", "ip6-localhost"}
MAX_STEP_TRACE = 1_000_000  # steps a server may keep records of (--step-trace)
MAX_SHUTDOWN_S = 3600.0  # --shutdown-timeout at most


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/glyphserve`` (``~/.local/share/glyphserve``), or ``./data`` without a usable home."""
    base = os.environ.get("XDG_DATA_HOME") or (Path.home() / ".local" / "share")
    candidate = Path(base) / "glyphserve"
    try:
        candidate.mkdir(parents=True, exist_ok=True)
    except OSError:
        return Path("data")
    return candidate if os.access(candidate, os.W_OK) else Path("data")


def model_id_name(model: str) -> str:
    """The last part of a model id or folder (zai-org/Glyph -> Glyph): the name served by default."""
    return Path(model.rstrip("/\\")).name or model


def is_loopback(host: str) -> bool:
    if host.lower() in LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 7860
    data_dir: Path = Path("data")
    model: str | None = None
    random_weights: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    api_key: str | None = None
    # Names the API answers to; replies carry the first. Empty: the model id's last part (model_id_name).
    served_model_name: list[str] = field(default_factory=list)
    max_model_len: int | None = None  # prompt + answer tokens; None: the model's (engine's max_context)
    page_selection: str = "retrieve"  # requests' default when a document's pages do not fit (glyphserve.retrieve)
    gpu_memory_utilization: float = 0.9  # share of the GPU's memory the engine may use (vLLM's)
    quantize: str | None = None  # "fp8": the language model's weights in e4m3
    max_upload_mb: float = 50.0
    max_pages: int = 500
    # What reading one upload may cost (glyphserve.ingest.IngestLimits); the budget covers rendering too.
    max_pdf_pages: int = 2_000
    max_scan_pages: int = 100
    max_characters: int = 20_000_000
    max_docx_paragraphs: int = 200_000
    max_unpacked_mb: float = 128.0
    max_parser_memory_mb: float = 2048.0
    ingest_timeout: float = 60.0
    # What the data-URL images of one chat request may cost (glyphserve.serve.images.ImageLimits).
    max_images: int = 256
    max_image_mpx: float = 25.0
    max_image_mb: float = 256.0
    # What clients may hold on the server before their requests begin (glyphserve.serve.app): seconds a request's
    # head, or its body, may go without bytes; MiB the bodies of all requests in flight hold (None: 16 uploads').
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_bodies_mb: float | None = None
    # Same-origin protection (glyphserve.serve.origin): Host names served, web origins let in ("*": any).
    allowed_hosts: list[str] = field(default_factory=list)  # empty: loopback names, and --host if specific
    allowed_origins: list[str] = field(default_factory=list)  # empty: this server's own origin only
    queue_size: int = 64
    # Sequences the engine decodes together (its KV pool decides how many fit; vLLM's --max-num-seqs).
    max_num_seqs: int = 256
    # The local engine keeps records of its last this many steps (GET /v1/engine/steps; 0: none kept).
    step_trace: int = 0
    request_timeout: float = 300.0
    # On SIGINT/SIGTERM, seconds the answers in flight may still take; then each ends with a 503 (shutting_down).
    shutdown_timeout: float = 5.0
    sse_keepalive: float = 10.0  # seconds between keep-alive comments while a stream waits for its first token
    ui: bool = True
    # Answers from existing OpenAI-compatible servers (vLLM, SGLang, another glyphserve): glyphserve.engine.remote.
    backend: str = "local"  # "local" | "openai"
    endpoints: list[str] = field(default_factory=list)
    remote_model: str | None = None
    remote_api_key: str | None = None
    # Requests in flight per engine replica (Ray Serve) or --endpoint server; None: twice --max-num-seqs with
    # --ray, else 16.
    replica_concurrency: int | None = None
    # Ray Serve (glyphserve.serve.ray_serve): engine replicas as a deployment on a Ray cluster.
    ray: str | None = None  # "local" starts Ray here; else the address of a cluster to join
    replicas: int | str = 1  # or "auto": autoscaled on requests in flight within min/max
    min_replicas: int = 1
    max_replicas: int | None = None  # None: one per GPU of the cluster (at least min_replicas)

    def engine_config(self, model: str | None):
        """The engine this server loads (``model``: the checkpoint as found, else as given)."""
        from glyphserve.engine.types import EngineConfig

        return EngineConfig(model=model, random_weights=self.random_weights, dtype=self.dtype, device=self.device,
                            max_context=self.max_model_len, max_num_seqs=self.max_num_seqs,
                            gpu_memory_utilization=self.gpu_memory_utilization, quantize=self.quantize,
                            step_trace=self.step_trace)

    @property
    def default_model_name(self) -> str:
        """The name served when --served-model-name is not given."""
        return model_id_name(self.model) if self.model else f"random-{self.random_weights}"

    @property
    def remote(self) -> bool:
        """Answers come from --endpoint servers."""
        return self.backend == "openai"

    @property
    def concurrency_per_replica(self) -> int:
        """Requests in flight per replica: for an engine replica, one batch decoding and one waiting to join it
        (measured faster on two GPUs than holding the queue at the front: requests that trickle in one by one make
        a replica stall its batch for one prefill each, where a waiting batch joins in one pass)."""
        return self.replica_concurrency or (2 * self.max_num_seqs if self.ray else 16)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    @property
    def max_bodies_bytes(self) -> int:
        """What the bodies of the requests in flight may hold together: at least one largest upload."""
        if self.max_bodies_mb is None:
            return 16 * self.max_upload_bytes
        return max(int(self.max_bodies_mb * 2**20), self.max_upload_bytes)

    @property
    def ingest_limits(self) -> IngestLimits:
        return IngestLimits(
            max_bytes=self.max_upload_bytes, max_pdf_pages=self.max_pdf_pages, max_scan_pages=self.max_scan_pages,
            max_characters=self.max_characters, max_paragraphs=self.max_docx_paragraphs,
            max_unpacked_bytes=int(self.max_unpacked_mb * 2**20), timeout=self.ingest_timeout,
            max_parser_memory=int(self.max_parser_memory_mb * 2**20),
        )

    @property
    def image_limits(self) -> ImageLimits:
        return ImageLimits(max_images=self.max_images, max_pixels=int(self.max_image_mpx * 1e6),
                           max_decoded_bytes=int(self.max_image_mb * 2**20))

    @property
    def has_model(self) -> bool:
        return bool(self.model or self.random_weights)

    def validate(self) -> None:
        """Refuse settings that would make the service unsafe or unusable."""
        if not is_loopback(self.host) and not self.api_key:
            raise ConfigError(
                f"--host {self.host} exposes the service beyond this machine; "
                "set --api-key KEY (or GLYPHSERVE_API_KEY) so clients must send 'Authorization: Bearer KEY', "
                "or bind to 127.0.0.1"
            )
        for name, value in (
            ("--max-upload-mb", self.max_upload_mb),
            ("--max-pages", self.max_pages),
            ("--max-pdf-pages", self.max_pdf_pages),
            ("--max-scan-pages", self.max_scan_pages),
            ("--max-characters", self.max_characters),
            ("--max-docx-paragraphs", self.max_docx_paragraphs),
            ("--max-unpacked-mb", self.max_unpacked_mb),
            ("--max-parser-memory-mb", self.max_parser_memory_mb),
            ("--ingest-timeout", self.ingest_timeout),
            ("--max-images", self.max_images),
            ("--max-image-mpx", self.max_image_mpx),
            ("--max-image-mb", self.max_image_mb),
            ("--header-timeout", self.header_timeout),
            ("--body-timeout", self.body_timeout),
            ("--max-bodies-mb", 1 if self.max_bodies_mb is None else self.max_bodies_mb),
            ("--queue-size", self.queue_size),
            ("--max-num-seqs", self.max_num_seqs),
            ("--max-model-len", 1 if self.max_model_len is None else self.max_model_len),
            ("--request-timeout", self.request_timeout),
            ("--sse-keepalive", self.sse_keepalive),
            ("--replica-concurrency", 1 if self.replica_concurrency is None else self.replica_concurrency),
        ):
            if value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        if not 0 <= self.shutdown_timeout <= MAX_SHUTDOWN_S:
            raise ConfigError(f"--shutdown-timeout must be 0 to {MAX_SHUTDOWN_S:g} seconds, got "
                              f"{self.shutdown_timeout}")
        if not 0 <= self.step_trace <= MAX_STEP_TRACE:
            raise ConfigError(f"--step-trace must be 0 to {MAX_STEP_TRACE:,} steps (~220 bytes each), got "
                              f"{self.step_trace}")
        if self.step_trace and (self.remote or self.ray):
            raise ConfigError("--step-trace records a local engine's steps: not with --backend openai or --ray")
        if self.endpoints and self.backend != "openai":
            raise ConfigError("--endpoint needs --backend openai")
        if self.remote and not self.endpoints:
            raise ConfigError("--backend openai needs at least one --endpoint URL")
        if self.remote and self.has_model:
            raise ConfigError("--model/--random-weights are for --backend local; the servers choose their model")
        if self.quantize and not self.has_model:
            raise ConfigError("--quantize needs --model or --random-weights (it quantizes the model's weights)")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.served_model_name and not all(name.strip() for name in self.served_model_name):
            raise ConfigError("--served-model-name needs non-empty names")
        if self.ray is not None:
            if self.remote:
                raise ConfigError("--ray deploys its own engine replicas: it does not go with --backend openai")
            if not self.has_model:
                raise ConfigError("--ray deploys engine replicas: give --model PATH_OR_ID or --random-weights")
            if not (self.replicas == "auto" or (isinstance(self.replicas, int) and self.replicas >= 1)):
                raise ConfigError(f"--replicas must be a positive number or auto, got {self.replicas!r}")
            if self.min_replicas < 1 or (self.max_replicas is not None and self.max_replicas < self.min_replicas):
                raise ConfigError("--min-replicas must be at least 1 and at most --max-replicas")
        elif self.replicas != 1:
            raise ConfigError("--replicas needs --ray")
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port must be between 1 and 65535, got {self.port}")
