"""Stage timings read on the device's own clock, so that timing a stage never makes the host wait for the device.

A mark is a point in the stream's order: on CUDA a timing event recorded there, elsewhere the host's time (work
off CUDA runs as it is issued). A span between two marks is read once the device has passed the later one. The
vision encoder used to synchronise twice a batch of pages to time its stages: on an H200 a cold W200 question's
prefill then started ~4 ms after its vision tower had finished (the host built the step's inputs while the device
idled), and every other sequence's step in flight was drained first.
"""

from __future__ import annotations

import time

import torch

Mark = torch.cuda.Event | float


class StageClock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self) -> Mark:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start: Mark, end: Mark) -> float:
        """The span between two marks the device has passed."""
        if self.cuda:
            return start.elapsed_time(end) / 1e3
        return end - start
