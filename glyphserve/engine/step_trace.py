"""The engine's record of its last steps (``EngineConfig.step_trace``): what each ran and where its time went."""

from __future__ import annotations

import time
from collections import deque

from glyphserve.engine.scheduler import StepPlan
from glyphserve.engine.types import StepRecord

Marks = tuple[float, float, int, int, int, int]  # the thread's CPU time and the core's counters a record differs by


class StepTrace:
    """The last ``steps`` steps' records (``StepRecord``), appended by the thread that runs the steps and read by
    any other (``records``)."""

    def __init__(self, steps: int):
        self._records: deque[StepRecord] = deque(maxlen=steps)

    @staticmethod
    def marks(counters: dict) -> Marks:
        return (time.thread_time(), counters["gpu_wait_s"], counters["steps"], counters["graph_steps"],
                counters["row_chunks"], counters["graph_passes"])

    def record(self, started: float, before: Marks, counters: dict, plan: StepPlan) -> None:
        """The step that began at ``started`` (``time.perf_counter``) with the counters at ``before``."""
        cpu, wait, steps, graphs, row_chunks, passes = (now - then for now, then in zip(self.marks(counters), before))
        if not steps:
            kind = "none"
        elif passes:
            kind = "graph pass"
        elif plan.chunks and not row_chunks:
            kind = "pass"
        else:
            kind = "graph" if graphs else "rows"
        self._records.append(StepRecord(started, time.perf_counter() - started, wait, cpu, len(plan.decode),
                                        len(plan.chunks), sum(c.end - c.start for c in plan.chunks), kind))

    def records(self) -> list[StepRecord]:
        """Oldest first; one C call copies them, so no step is appended halfway through (records never change)."""
        return list(self._records.copy())
