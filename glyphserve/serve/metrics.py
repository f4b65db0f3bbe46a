"""Prometheus metrics of one service instance (its own registry, so several apps can coexist)."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from glyphserve.serve.backends import Reply

STAGES = ("render", "preprocess", "vision", "prefill", "decode", "ttft", "retrieve", "total")
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self, documents: Callable[[], int]):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("glyphserve_http_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.errors = Counter("glyphserve_http_errors", "HTTP error answers (4xx/5xx) by route, status and code",
                              ["route", "status", "code"], registry=r)
        self.latency = Histogram("glyphserve_http_request_seconds", "HTTP request latency by route",
                                 ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.stages = Histogram("glyphserve_stage_seconds", "Time per answering stage", ["stage"],
                                buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("glyphserve_queue_depth", "Requests waiting for the scheduler", registry=r)
        self.batch_size = Histogram("glyphserve_batch_size", "Requests answered together",
                                    buckets=(1, 2, 4, 8, 16, 32), registry=r)
        self.cancelled = Counter("glyphserve_requests_cancelled", "Generations stopped early "
                                 "(client gone or deadline passed)", registry=r)
        self.joined = Counter("glyphserve_requests_joined", "Requests that joined a batch already decoding "
                              "(continuous batching)", registry=r)
        self.tokens = Counter("glyphserve_generated_tokens", "Tokens generated", registry=r)
        self.cache_lookups = Counter("glyphserve_cache_lookups", "Cache lookups by cache and result",
                                     ["cache", "result"], registry=r)
        self.cache_ratio = Gauge("glyphserve_cache_hit_ratio", "Hits over lookups since start "
                                 "(prefix: reused prompt tokens over prompt tokens)", ["cache"], registry=r)
        self.documents = Gauge("glyphserve_documents_stored", "Documents in the store", registry=r)
        self.documents.set_function(documents)
        self._totals = {"vision": [0, 0], "prefix": [0, 0]}  # [hits, lookups]
        gpu = NvmlCollector.create()
        if gpu is not None:
            r.register(gpu)

    def observe_reply(self, reply: Reply) -> None:
        for stage, seconds in reply.timings.items():
            if stage in STAGES and seconds:
                self.stages.labels(stage).observe(seconds)
        self.tokens.inc(reply.completion_tokens)
        if reply.backend != "engine":
            return
        hits, misses = int(reply.cache.get("vision_hits", 0)), int(reply.cache.get("vision_misses", 0))
        reused = int(reply.cache.get("prefix_reused_tokens", 0))
        self.cache_lookups.labels("vision", "hit").inc(hits)
        self.cache_lookups.labels("vision", "miss").inc(misses)
        self._totals["vision"][0] += hits
        self._totals["vision"][1] += hits + misses
        self._totals["prefix"][0] += reused
        self._totals["prefix"][1] += reply.prompt_tokens
        for cache, (hit, total) in self._totals.items():
            if total:
                self.cache_ratio.labels(cache).set(hit / total)

    def render(self) -> bytes:
        return generate_latest(self.registry)


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
