"""Prometheus metrics, on the default registry (so the process and Python collectors come along).

What a request costs carries vLLM's names and ``model_name`` label (``vllm:time_to_first_token_seconds``,
``vllm:num_requests_running``, ...), so dashboards made for ``vllm serve`` read a glyphserve server unchanged;
what only this server has (HTTP routes, stages, batching, documents, GPU readings) is ``glyphserve_*``.
No ``_created`` series.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import prometheus_client
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from glyphserve.serve.backends import ExtractiveBackend, Reply

prometheus_client.disable_created_metrics()

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
_MODEL = ["model_name"]
# Stages with a histogram of their own: time to first token and the total have vLLM's.
_STAGES = ("render", "preprocess", "vision_encode", "prefill", "decode")
# vLLM's finished_reason values (a cancelled request is an "abort").
_FINISHED = {"stop": "stop", "length": "length", "cancelled": "abort"}


@dataclass(frozen=True)
class _Collectors:
    """Every metric, registered once per process (the default registry is the process's)."""

    running: Gauge
    waiting: Gauge
    ttft: Histogram
    e2e: Histogram
    tpot: Histogram
    request_tpot: Histogram
    itl: Histogram
    queue_time: Histogram
    prompt_tokens: Counter
    generation_tokens: Counter
    request_prompt_tokens: Histogram
    request_generation_tokens: Histogram
    success: Counter
    prefix_queries: Counter
    prefix_hits: Counter
    mm_queries: Counter
    mm_hits: Counter
    requests: Counter
    errors: Counter
    latency: Histogram
    stages: Histogram
    batch_size: Histogram
    cancelled: Counter
    joined: Counter
    documents: Gauge
    pages_rendered: Counter
    files_reading: Gauge
    files_rendering: Gauge
    files_waiting: Gauge
    kv_usage: Gauge
    engines: "_EngineCounters"


@functools.cache
def _collectors() -> _Collectors:
    gpu = NvmlCollector.create()
    if gpu is not None:
        REGISTRY.register(gpu)
    engines = _EngineCounters()
    REGISTRY.register(engines)
    return _Collectors(
        running=Gauge("vllm:num_requests_running", "Requests being answered", _MODEL),
        waiting=Gauge("vllm:num_requests_waiting", "Requests waiting for the model", _MODEL),
        ttft=Histogram("vllm:time_to_first_token_seconds", "Time from arrival to the first token", _MODEL,
                       buckets=_LATENCY_BUCKETS),
        e2e=Histogram("vllm:e2e_request_latency_seconds", "Time from arrival to the last token", _MODEL,
                      buckets=_LATENCY_BUCKETS),
        # vLLM's names since V1: time_per_output_token is inter_token_latency under its old name (per token), and
        # the per-answer mean is request_time_per_output_token (observed once per answer under the old name, it
        # left a V1 dashboard's TPOT panel empty and an older one request-weighted: a new user's trial).
        tpot=Histogram("vllm:time_per_output_token_seconds",
                       "Time between consecutive generated tokens, per token (inter_token_latency's old name)",
                       _MODEL, buckets=_TOKEN_GAP_BUCKETS),
        request_tpot=Histogram("vllm:request_time_per_output_token_seconds",
                               "Time per token after the first, once per request (its mean)", _MODEL,
                               buckets=_TOKEN_GAP_BUCKETS),
        itl=Histogram("vllm:inter_token_latency_seconds", "Time between consecutive generated tokens, per token",
                      _MODEL, buckets=_TOKEN_GAP_BUCKETS),
        queue_time=Histogram("vllm:request_queue_time_seconds", "Time a request waited before the model took it",
                             _MODEL, buckets=_LATENCY_BUCKETS),
        prompt_tokens=Counter("vllm:prompt_tokens", "Prompt tokens (vision tokens included)", _MODEL),
        generation_tokens=Counter("vllm:generation_tokens", "Generated tokens", _MODEL),
        request_prompt_tokens=Histogram("vllm:request_prompt_tokens", "Prompt tokens per request", _MODEL,
                                        buckets=_TOKEN_BUCKETS),
        request_generation_tokens=Histogram("vllm:request_generation_tokens", "Generated tokens per request",
                                            _MODEL, buckets=_TOKEN_BUCKETS),
        success=Counter("vllm:request_success", "Finished requests by finish reason",
                        ["model_name", "finished_reason"]),
        prefix_queries=Counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache", _MODEL),
        prefix_hits=Counter("vllm:prefix_cache_hits", "Prompt tokens whose KV came from the prefix cache", _MODEL),
        mm_queries=Counter("vllm:mm_cache_queries", "Pages looked up in the vision-feature cache", _MODEL),
        mm_hits=Counter("vllm:mm_cache_hits", "Pages whose vision features were cached", _MODEL),
        requests=Counter("glyphserve_http_requests", "HTTP requests by route, method and status",
                         ["route", "method", "status"]),
        errors=Counter("glyphserve_http_errors", "HTTP error answers (4xx/5xx) by route, status and code",
                       ["route", "status", "code"]),
        latency=Histogram("glyphserve_http_request_seconds", "HTTP request latency by route", ["route"],
                          buckets=_LATENCY_BUCKETS),
        stages=Histogram("glyphserve_stage_seconds", "Time per answering stage (render: per document)", ["stage"],
                         buckets=_LATENCY_BUCKETS),
        batch_size=Histogram("glyphserve_batch_size", "Requests answered together", buckets=(1, 2, 4, 8, 16, 32)),
        cancelled=Counter("glyphserve_requests_cancelled", "Generations stopped early (client gone or deadline "
                          "passed)"),
        joined=Counter("glyphserve_requests_joined", "Requests that joined a batch already decoding "
                       "(continuous batching)"),
        documents=Gauge("glyphserve_documents_stored", "Documents in the store"),
        pages_rendered=Counter("glyphserve_pages_rendered", "Pages rendered from uploads (those of uploads refused "
                               "while rendering included)"),
        files_reading=Gauge("glyphserve_upload_files_reading", "Uploaded files being read (parsed)"),
        files_rendering=Gauge("glyphserve_upload_files_rendering", "Uploads being rendered"),
        files_waiting=Gauge("glyphserve_upload_files_waiting", "Uploads waiting for a thread to read or render them"),
        kv_usage=Gauge("vllm:kv_cache_usage_perc", "Share of the KV pool's blocks in use (1 = all)", _MODEL),
        engines=engines,
    )


class _EngineCounters:
    """Counters a local engine keeps itself, read at scrape time: ``vllm:num_preemptions``."""

    def __init__(self):
        self.sources: dict[str, Callable[[], dict]] = {}  # model name -> the engine's ``counters``

    def collect(self):
        family = CounterMetricFamily("vllm:num_preemptions", "Sequences preempted (their KV freed, recomputed "
                                     "later) to make room in the KV pool", labels=_MODEL)
        for model, counters in self.sources.items():
            family.add_metric([model], counters()["preemptions"])
        yield family


class Metrics:
    """The metrics of the one service in this process, labelled with its model name."""

    def __init__(self, model_name: str, documents: Callable[[], int]):
        self.model_name = model_name
        self.c = _collectors()
        self.c.documents.set_function(documents)
        c = self.c
        # Every series at zero from the start: a dashboard's increase() sees the first request too.
        for metric in (c.ttft, c.e2e, c.tpot, c.request_tpot, c.itl, c.queue_time, c.prompt_tokens, c.generation_tokens,
                       c.request_prompt_tokens, c.request_generation_tokens, c.prefix_queries, c.prefix_hits,
                       c.mm_queries, c.mm_hits):
            metric.labels(model_name)
        for reason in set(_FINISHED.values()):
            c.success.labels(model_name, reason)
        # A local engine's readings are this service's alone (a service before it in the process, e.g. in tests or a
        # library's use, left its engine's, which would stay reported and alive).
        c.engines.sources.clear()
        c.kv_usage.clear()

    def watch(self, running: Callable[[], int], waiting: Callable[[], int]) -> None:
        """Read the scheduler's running and waiting requests at scrape time."""
        self.c.running.labels(self.model_name).set_function(running)
        self.c.waiting.labels(self.model_name).set_function(waiting)

    def watch_files(self, reading: Callable[[], int], rendering: Callable[[], int], waiting: Callable[[], int]) -> None:
        """Read the uploads being read, rendered and waiting for either (``UploadQueue``) at scrape time."""
        self.c.files_reading.set_function(reading)
        self.c.files_rendering.set_function(rendering)
        self.c.files_waiting.set_function(waiting)

    def watch_engine(self, counters: Callable[[], dict]) -> None:
        """A local engine's own readings (``Engine.counters``) at scrape time: KV pool usage, preemptions."""
        self.c.kv_usage.labels(self.model_name).set_function(lambda: counters()["kv_usage"])
        self.c.engines.sources[self.model_name] = counters

    def observe_reply(self, reply: Reply, seconds: float) -> None:
        """A finished answer, ``seconds`` after its request arrived (the engine's timings start when it was
        taken from the queue). A document's warm-up at upload is no request: not counted."""
        if reply.warm:
            return
        answer, c, model = reply.answer, self.c, self.model_name
        timings = answer.timings
        queued = max(0.0, seconds - timings.total)
        c.e2e.labels(model).observe(seconds)
        c.queue_time.labels(model).observe(queued)
        c.ttft.labels(model).observe(queued + timings.time_to_first_token)
        # Token latencies of generated answers only: the extractive backend's passages have no tokens in time (its
        # 239 zero gaps pulled a dashboard's every inter-token quantile to 0).
        if answer.new_tokens > 1 and reply.backend != ExtractiveBackend.name:
            per_token = (timings.total - timings.time_to_first_token) / (answer.new_tokens - 1)
            c.request_tpot.labels(model).observe(per_token)
            # Each token's interval where the engine timed them (a step's read-back), else the request's mean
            # for each (a remote server's answers, resumed tokens): the histograms count tokens either way.
            times = answer.token_times
            gaps = [b - a for a, b in zip(times, times[1:])] or [per_token] * (answer.new_tokens - 1)
            itl, tpot = c.itl.labels(model), c.tpot.labels(model)
            for gap in gaps:
                itl.observe(gap)
                tpot.observe(gap)
        c.prompt_tokens.labels(model).inc(answer.prompt_tokens)
        c.generation_tokens.labels(model).inc(answer.new_tokens)
        c.request_prompt_tokens.labels(model).observe(answer.prompt_tokens)
        c.request_generation_tokens.labels(model).observe(answer.new_tokens)
        c.success.labels(model, _FINISHED.get(answer.finish_reason, "stop")).inc()
        for stage in _STAGES:
            value = getattr(timings, stage)
            if value:
                c.stages.labels(stage).observe(value)
        if reply.backend == "extractive":
            return
        cache = answer.cache
        c.prefix_queries.labels(model).inc(answer.prompt_tokens)
        c.prefix_hits.labels(model).inc(cache.prefix_reused_tokens)
        c.mm_queries.labels(model).inc(cache.vision_hits + cache.vision_misses)
        c.mm_hits.labels(model).inc(cache.vision_hits)

    def cancelled(self) -> None:
        self.c.cancelled.inc()
        self.c.success.labels(self.model_name, "abort").inc()

    def render(self) -> bytes:
        return generate_latest(REGISTRY)


class NvmlCollector:
    """GPU memory, utilisation, SM clock, power and throttle reasons, read through NVML at scrape time."""

    def __init__(self, nvml, handles):
        self.nvml = nvml
        self.handles = handles

    @classmethod
    def create(cls) -> "NvmlCollector | None":
        try:
            import pynvml

            pynvml.nvmlInit()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:  # no nvidia-ml-py, no driver or no GPU: no GPU metrics
            return None
        return cls(pynvml, handles) if handles else None

    def collect(self):
        nvml = self.nvml
        families = {
            "memory_used": GaugeMetricFamily("glyphserve_gpu_memory_used_bytes", "GPU memory in use", labels=["gpu"]),
            "memory_total": GaugeMetricFamily("glyphserve_gpu_memory_total_bytes", "GPU memory", labels=["gpu"]),
            "util": GaugeMetricFamily("glyphserve_gpu_utilization_ratio", "GPU busy fraction", labels=["gpu"]),
            "sm_clock": GaugeMetricFamily("glyphserve_gpu_sm_clock_hertz", "Current SM clock", labels=["gpu"]),
            "sm_clock_max": GaugeMetricFamily("glyphserve_gpu_sm_clock_max_hertz", "Maximum SM clock", labels=["gpu"]),
            "power": GaugeMetricFamily("glyphserve_gpu_power_watts", "Power draw", labels=["gpu"]),
            "power_limit": GaugeMetricFamily("glyphserve_gpu_power_limit_watts", "Power limit", labels=["gpu"]),
            "temperature": GaugeMetricFamily("glyphserve_gpu_temperature_celsius", "GPU temperature", labels=["gpu"]),
            "throttle": GaugeMetricFamily("glyphserve_gpu_clock_event_reasons", "NVML clock event (throttle) "
                                          "reason bitmask; 0 or 1 (idle) means not throttled", labels=["gpu"]),
        }
        readers = {
            "memory_used": lambda h: nvml.nvmlDeviceGetMemoryInfo(h).used,
            "memory_total": lambda h: nvml.nvmlDeviceGetMemoryInfo(h).total,
            "util": lambda h: nvml.nvmlDeviceGetUtilizationRates(h).gpu / 100,
            "sm_clock": lambda h: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM) * 1e6,
            "sm_clock_max": lambda h: nvml.nvmlDeviceGetMaxClockInfo(h, nvml.NVML_CLOCK_SM) * 1e6,
            "power": lambda h: nvml.nvmlDeviceGetPowerUsage(h) / 1000,
            "power_limit": lambda h: nvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000,
            "temperature": lambda h: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU),
            "throttle": lambda h: nvml.nvmlDeviceGetCurrentClocksEventReasons(h),
        }
        for index, handle in enumerate(self.handles):
            for key, read in readers.items():
                try:
                    families[key].add_metric([str(index)], float(read(handle)))
                except Exception:  # a reading this GPU or driver does not support
                    continue
        yield from families.values()
