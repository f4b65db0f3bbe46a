"""Benchmarks: deterministic workloads and the drivers behind ``glyphserve bench``."""
