"""``glyphserve batch --ray``: the same batch on Ray Data, across the machines of a Ray cluster.

The documents still to do become a dataset, one row each. Ingest and render run as CPU tasks (one per
document) wherever the cluster has room; the pages travel as PNG files (lossless, a fraction of the pixels'
size). An actor pool of engines (one per GPU, ``num_gpus=1``; CPU actors when there is no GPU) answers the
questions of a few documents per task, batched as in a local run (``ItemAnswerer``: same requests, same page
keys, so the same answers). Each task returns one result line per (document, question); this process writes
them to the results file as they arrive, through the same ``Tally`` as a local run, so reruns skip what is
done and failed items are retried on ``--retry-failed``.

A lost engine actor (its process or its node) costs only the tasks it had in flight: Ray Data restarts the
actor and runs those tasks again; a line that arrives twice (a retried task that had finished elsewhere) is
written once.
"""

from __future__ import annotations

import json
import math
import pickle
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from glyphserve.batch.inputs import BatchDocument
from glyphserve.batch.prefetch import Item, PreparedDocument, RenderOptions, prepare_document
from glyphserve.batch.results import ResultLog, item_record
from glyphserve.batch.runner import BatchOptions, BatchSummary, ItemAnswerer, StopRun, Tally, pending
from glyphserve.engine.types import EncodedPage, EngineConfig

RENDER_TASK_MEMORY = 512 * 2**20


@dataclass(frozen=True)
class RayBatchOptions:
    """Where and how wide the run goes."""

    address: str = "local"  # "local" starts Ray here; else the address of a cluster to join
    engines: int | None = None  # engine actors; None: one per GPU of the cluster (1 without GPUs)


def _document_row(document: BatchDocument) -> dict[str, Any]:
    return {"id": document.id, "document": pickle.dumps(document)}


def _prepare_row(row: dict[str, Any], render: RenderOptions) -> dict[str, Any]:
    """Ray task: ingest and render one document; its pages as PNG files. Failures travel in the row."""
    prepared = prepare_document(pickle.loads(row["document"]), render, render_workers=1)
    started = time.perf_counter()
    prepared.pages = [page if isinstance(page, EncodedPage) else EncodedPage.from_pixels(page)
                      for page in prepared.pages]
    if prepared.error is None:
        prepared.timings["encode"] = time.perf_counter() - started
    return {"id": row["id"], "prepared": pickle.dumps(prepared)}


class BatchEngine:
    """Ray Data actor: one engine; each call answers every question of a few prepared documents."""

    def __init__(self, config: EngineConfig, options: BatchOptions):
        from glyphserve.engine import Engine

        self.engine = Engine.load(config)
        self.answerer = ItemAnswerer(self.engine, options, note=lambda m: print(m, file=sys.stderr))

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        # Ray Data calls a synchronous actor on a thread of its own, not the one that loaded the engine: cuDNN's
        # attention plans are per thread (built here the first time, ``Engine.plan_attention``).
        self.engine.plan_attention()
        records: list[str] = []
        engine_errors: list[bool] = []
        items = []
        for blob in batch["prepared"]:
            prepared: PreparedDocument = pickle.loads(blob)
            if prepared.error is not None:
                for question in prepared.document.questions:
                    records.append(json.dumps(item_record(Item(prepared, question), None, prepared.error)))
                    engine_errors.append(False)
            else:
                items += [Item(prepared, question) for question in prepared.document.questions]
        for item, answer, error in self.answerer.answer(items):
            records.append(json.dumps(item_record(item, answer, error), ensure_ascii=False))
            engine_errors.append(error is not None)
        return {"record": records, "engine_error": engine_errors}


def engine_resources(config: EngineConfig) -> dict[str, float]:
    """What one engine actor asks of the cluster: a GPU when it will run on one, else a CPU."""
    from glyphserve.cluster import cluster_gpus

    gpu = config.device == "cuda" or (config.device == "auto" and cluster_gpus() > 0)
    return {"num_gpus": 1, "num_cpus": 1} if gpu else {"num_gpus": 0, "num_cpus": 1}


def run_on_ray(documents: list[BatchDocument], log: ResultLog, options: BatchOptions, engine: EngineConfig,
               ray_options: RayBatchOptions = RayBatchOptions(), *, progress_stream=None) -> BatchSummary:
    """Answer every (document, question) not yet in ``log`` on Ray; the same summary as ``BatchRunner.run``."""
    from glyphserve.cluster import cluster_gpus, connect, require_ray

    todo, skipped = pending(documents, log)
    tally = Tally(log, todo, skipped, options.batch_size, progress_stream=progress_stream)
    summary = tally.summary
    if not todo:
        return summary
    ray = require_ray()
    engines = ray_options.engines
    sigterm = signal.getsignal(signal.SIGTERM)
    disconnect = connect(ray_options.address, min_cpus=(engines or 1) + 1)
    if threading.current_thread() is threading.main_thread():
        # ray.init makes SIGTERM a plain exit; the caller's handler (batch's: stop as Ctrl-C does) goes back.
        signal.signal(signal.SIGTERM, sigterm)
    start = time.monotonic()
    try:
        resources = engine_resources(engine)
        if engines is None:
            engines = max(1, cluster_gpus()) if resources["num_gpus"] else 1
        most_questions = max(len(document.questions) for document in todo)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        dataset = (
            ray.data.from_items([_document_row(document) for document in todo], override_num_blocks=len(todo))
            # A render task's memory (one document's pages in flight) is declared, which also keeps Ray Data
            # from fusing rendering into the engine actors (they declare none): a CPU engine never renders.
            .map(_prepare_row, fn_kwargs={"render": options.render}, num_cpus=1, memory=RENDER_TASK_MEMORY)
            .map_batches(
                BatchEngine,
                fn_constructor_kwargs={"config": engine, "options": options},
                # A task holds about one engine batch of questions.
                batch_size=max(1, math.ceil(options.batch_size / most_questions)),
                # Ray Data restarts a dead actor and runs its tasks again (max_restarts and max_task_retries
                # default to -1 for actor pools).
                compute=ray.data.ActorPoolStrategy(size=engines),
                **resources,
            )
        )
        for row in dataset.iter_rows():
            tally.add(json.loads(row["record"]), engine_error=bool(row["engine_error"]))
    except KeyboardInterrupt:
        summary.interrupted = True
    except StopRun as stop:
        summary.stopped = str(stop)
    finally:
        summary.elapsed_s = time.monotonic() - start
        tally.progress.finish()
        disconnect()
    return summary

