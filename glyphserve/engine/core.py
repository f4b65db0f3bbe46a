"""The engine's loop: schedule a step, launch it on the device, then read back the step launched before it.

Decode runs one step ahead of the host: the tokens a step samples stay on the device as the next step's inputs,
so step N+1 is launched before step N's tokens are read, and the host work of a step (detokenizing, stop strings,
cancellation, delivery) overlaps the device's work on the next one. A sequence that finished at step N has one
wasted row in step N+1, whose token is dropped. Preemption needs the host to know every token, so the scheduler
asks for the launched steps to be read back first.

Per-row work on the host is the sequence's own bookkeeping and text; a failure there (a cancel callback that
raises, a token the detokenizer rejects) ends that request with an error event and leaves the others alone.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from glyphserve.engine.attention import shared_tiles
from glyphserve.engine.model_runner import (GIVEN_EMBEDDING, LAST_SAMPLED, META_ROWS, DenseChunk, ModelRunner,
                                            StepInputs, attends_paged)
from glyphserve.engine.output import Delta
from glyphserve.engine.pass_graphs import PassGraphs, PassInputs
from glyphserve.engine.sampler import Sampler
from glyphserve.engine.scheduler import NeedsDrain, Scheduler, StepPlan
from glyphserve.engine.sequence import Sequence, Status
from glyphserve.engine.stage_clock import Mark, StageClock
from glyphserve.engine.transfer import to_device
from glyphserve.engine.step_trace import StepTrace
from glyphserve.engine.types import TokenLogprob
from glyphserve.engine.vision import VisionEncoder
from glyphserve.errors import GlyphserveError, InternalError


@dataclass
class Event:
    """What the loop reports about a sequence: a text delta, its end ("done"), or its failure ("error")."""

    seq: Sequence
    channel: str  # "thinking" | "answer" | "done" | "error"
    text: str = ""
    logprobs: list[TokenLogprob] | None = None
    error: Exception | None = None
    tokens: list[int] = field(default_factory=list)  # the generated tokens the delta's text came from


@dataclass
class Launched:
    """A step on the device: the sequences its sampled rows belong to, and where their tokens will land."""

    sampled: list[Sequence]
    tokens: torch.Tensor  # host [R]
    logprobs: tuple[torch.Tensor, ...] | None  # host: chosen [R], top values [R, k], top ids [R, k]
    event: Mark  # passed when the step is done (``StageClock``)
    warmed: list[Sequence] = field(default_factory=list)  # warm sequences whose last chunk ran in this step
    decode_only: bool = False  # no prompt chunk in the step


@dataclass
class StepRows:
    """A step as single-token rows (``ModelRunner.decode``): their staged inputs [META_ROWS, n], the sequences
    of the first rows (those sampled), and the vision-token rows' features (first row, features)."""

    meta: np.ndarray
    sampled: list[Sequence]
    given: list[tuple[int, torch.Tensor]] = field(default_factory=list)


class EngineCore:
    def __init__(self, runner: ModelRunner, sampler: Sampler, scheduler: Scheduler, vision: VisionEncoder,
                 clock: StageClock, device: torch.device, row_prefill: bool = True):
        self.runner = runner
        self.clock = clock
        self.row_prefill = row_prefill  # prompt chunks that fit as rows of graph steps (else the eager pass)
        self.sampler = sampler
        self.scheduler = scheduler
        self.vision = vision
        self.device = device
        self.cuda = device.type == "cuda"
        self.in_flight: deque[Launched] = deque()
        self._ended: list[Sequence] = []  # added already finished (resumed tokens that end the answer)
        # row_chunks: prompt chunks run one row per token in a graph step (eagerly where no graph is captured);
        # graph_passes: prompt passes replayed from a captured pass (``pass_graphs``);
        # step_s: seconds inside step(); gpu_wait_s: seconds blocked reading steps back from the device (inside
        # step(), and in drains between batches); decode_step_s / timed_decode_steps: the time from one step's
        # read-back to the next's, for steps without prompt chunks while the engine stays busy, unless a step with
        # chunks was launched in between (the decode step as the caller sees it, host work and hand-over included:
        # compare an engine alone with a served one)
        self.counters = {"steps": 0, "decode_steps": 0, "decode_rows": 0, "graph_steps": 0, "prefill_passes": 0,
                         "prefill_tokens": 0, "row_chunks": 0, "graph_passes": 0, "step_s": 0.0, "gpu_wait_s": 0.0,
                         "decode_step_s": 0.0, "timed_decode_steps": 0}
        self._last_read: float | None = None
        self.trace: StepTrace | None = None  # the last steps' records (``EngineConfig.step_trace``)
        self.passes: PassGraphs | None = None  # captured prompt passes (CUDA graphs)

    def has_work(self) -> bool:
        return self.scheduler.has_work or bool(self.in_flight)

    def add(self, seq: Sequence) -> None:
        self.scheduler.add(seq)
        if seq.finish_reason is not None:  # nothing to compute: it finishes at the next step
            self._ended.append(seq)

    # --- the loop --------------------------------------------------------------------------------------------

    def step(self) -> list[Event]:
        """Launch the next step and read back the one before it; the events that produced."""
        started = time.perf_counter()
        before = StepTrace.marks(self.counters) if self.trace is not None else None
        events = [event for seq in self._ended for event in self.abort(seq, seq.finish_reason)]
        self._ended.clear()
        self._poll_cancels(events)
        idle = not self.in_flight
        try:
            plan = self.scheduler.schedule(in_flight=bool(self.in_flight))
        except NeedsDrain:
            events += self.drain()
            plan = self.scheduler.schedule(in_flight=False)
        if not plan.empty:
            launched = self._launch(plan, events)
            if launched is not None:
                self.in_flight.append(launched)
            if plan.chunks:  # its host work (pages, chunk rows) falls before the next read: that step goes untimed
                self._last_read = None
        while self.in_flight and (len(self.in_flight) > 1 or plan.empty):
            events += self._read(self.in_flight.popleft())
        if plan.empty and idle and not events and self.scheduler.has_work:
            # Nothing ran, nothing is in flight, nothing changed (no request ended, not even one whose page could
            # not be decoded, which empties its step): nothing ever will (a bug, not a user error).
            for seq in [*self.scheduler.running, *self.scheduler.waiting]:
                events.append(self._fail(seq, RuntimeError("the scheduler could not place this request")))
        self.counters["step_s"] += time.perf_counter() - started
        if before is not None:
            self.trace.record(started, before, self.counters, plan)
        return events

    def drain(self) -> list[Event]:
        events: list[Event] = []
        while self.in_flight:
            events += self._read(self.in_flight.popleft())
        return events

    def abort(self, seq: Sequence, reason: str = "cancelled") -> list[Event]:
        if seq.status is Status.FINISHED:
            return []
        return self._finish(seq, reason)

    # --- launching -------------------------------------------------------------------------------------------

    def _launch(self, plan: StepPlan, events: list[Event]) -> Launched | None:
        """Put the step on the device (None if nothing is left of it: its every prompt chunk needed a page that
        could not be decoded; those requests end with an error in ``events``)."""
        if plan.chunks:
            wanted = [(c.seq, run[0]) for c in plan.chunks for run in c.seq.image_runs(c.start, c.end)]
            failed = self.vision.provide(wanted)
            if failed:  # a damaged page ends only its own request
                requeued = self.scheduler.withdraw(plan, [c for c in plan.chunks if id(c.seq) in failed])
                for seq, exc in failed.values():
                    events.append(self._fail(seq, exc))
                out = set(failed) | {id(s) for s in requeued}
                plan.chunks = [c for c in plan.chunks if id(c.seq) not in out]
                plan.admitted = [s for s in plan.admitted if id(s) not in out]
            if plan.empty:
                return None
        for seq in plan.admitted:
            self.sampler.admit(seq.slot, seq.settings, seq.prompt.ids, seq.seed, seq.greedy, seq.output)
            if seq.prefill_mark is None:
                seq.prefill_mark = self.clock.mark()
            if seq.cache.prefix_reused_tokens == 0:
                seq.cache.prefix_reused_tokens = seq.num_cached
        self.sampler.flush()
        sched = self.scheduler
        if sched.dirty:
            self.runner.sync_block_tables(sched.block_tables, sorted(sched.dirty))
            sched.dirty.clear()
        self.counters["steps"] += 1
        if plan.decode:
            self.counters["decode_steps"] += 1
            self.counters["decode_rows"] += len(plan.decode)
        # Sessions on one document decode side by side, so that their rows form tiles sharing its prefix.
        plan.decode.sort(key=lambda s: s.blocks[0])
        decode = self._decode_rows(plan.decode)
        rows = StepRows(decode, plan.decode)
        if plan.chunks:
            self.counters["prefill_passes"] += 1
            self.counters["prefill_tokens"] += sum(c.end - c.start for c in plan.chunks)
            rows = self._chunk_rows(plan, decode) if self.row_prefill else None
        if rows is not None:
            self._share_keys(rows.meta)
        if rows is None:
            inputs, sampled = self._step_inputs(plan, decode)
            if isinstance(inputs, PassInputs):
                logits = self.passes.run(inputs)
                self.counters["graph_passes"] += 1
            else:
                logits = self.runner.forward(inputs)
            greedy = None
        else:
            sampled = rows.sampled
            self.counters["graph_steps"] += self.runner.decode(torch.from_numpy(rows.meta), rows.meta.shape[1],
                                                               self.sampler, rows.given)
            self.counters["row_chunks"] += len(plan.chunks)
            logits, greedy = self.runner.logits[: len(sampled)], self.runner.next[: len(sampled)]
        warmed = [c.seq for c in plan.chunks if c.seq.request.warm and c.end == c.seq.total_tokens]
        if not sampled:
            return Launched([], torch.empty(0, dtype=torch.long), None, self.clock.mark(), warmed, not plan.chunks)
        slots = np.fromiter((s.slot for s in sampled), dtype=np.int64, count=len(sampled))
        sample_rows = self.sampler.rows(slots)
        if greedy is not None and sample_rows.plain:
            # The graph step's greedy tokens are the answer and already at their slots in ``last_token``: no
            # uploads, no sampling launches (each a GIL release on this thread, which under a server's request
            # threads can cost a switch interval to get back).
            tokens, logprobs = greedy, None
        else:
            answer_pos = np.fromiter((s.scheduled_outputs - 1 for s in sampled), dtype=np.int64, count=len(sampled))
            slots_dev = to_device(slots, self.device)
            tokens, logprobs = self.sampler(logits, slots_dev, to_device(answer_pos, self.device), sample_rows,
                                            tokens=greedy)
            self.runner.last_token.index_copy_(0, slots_dev, tokens)
        return Launched(sampled, self._to_host(tokens), None if logprobs is None else
                        tuple(self._to_host(t) for t in logprobs), self.clock.mark(), warmed, not plan.chunks)

    def _decode_rows(self, decode: list[Sequence]) -> np.ndarray:
        """[META_ROWS, n] per decode row: slot, rope positions, KV slot, KV length, input token (its last sampled
        one), output slot (its own); the scheduler has already counted the fed token in ``num_computed``."""
        n = len(decode)
        out = np.empty((META_ROWS, n), dtype=np.int64)
        if not n:
            return out
        out[0] = np.fromiter((s.slot for s in decode), dtype=np.int64, count=n)
        length = np.fromiter((s.num_computed for s in decode), dtype=np.int64, count=n)
        pos = length - 1
        out[1:4] = pos + np.fromiter((s.rope_delta for s in decode), dtype=np.int64, count=n)
        out[4] = self.scheduler.kv_slots(out[0], pos)
        out[5] = length
        out[6] = LAST_SAMPLED
        out[7] = out[0]
        return out

    def _share_keys(self, meta: np.ndarray) -> None:
        """Each row's shared keys and tile (``attention.shared_tiles``) into ``meta``: none for small steps."""
        n = meta.shape[1]
        if self.runner.shares_keys(n):
            bs = self.scheduler.block_size
            tables = self.scheduler.block_tables[:, : max(1, int(meta[5].max()) // bs)][meta[0]]  # blocks seen whole
            meta[8], meta[9] = shared_tiles(tables, meta[5], bs, self.runner.tile_rows)
        else:
            meta[8], meta[9] = 0, 1

    def _chunk_rows(self, plan: StepPlan, decode: np.ndarray) -> StepRows | None:
        """The step as single-token rows of a graph step, when its prompt chunks fit beside the decode rows: the
        decode rows, then the last token of each chunk that samples, then the chunks' other tokens (the sampled
        rows come first). None when the step must run eagerly (more rows than a graph step holds, or a chunk that
        samples after a vision token, which no prompt does: ``<|end_of_image|>`` follows every page).

        A later turn's chunk (its question and the earlier answers, often 100-200 tokens) goes as rows too: on an
        H200 under 64 sessions such chunks went to eager passes, each launched layer by layer (a lone W50
        follow-up: 60 ms eagerly, 11 ms as rows), while every row over a prefix reads only the prefix's K/V (a
        200-token chunk after a W50 prefix: ~30 GB, ~7 ms)."""
        chunks = plan.chunks
        if len(plan.decode) + sum(c.end - c.start for c in chunks) > self.runner.max_rows:
            return None
        lasts, rest, given = [], [], []
        sampled = list(plan.decode)
        at = len(plan.decode) + sum(c.samples for c in chunks)  # where the chunks' other tokens start
        for chunk in chunks:
            seq, start, end = chunk.seq, chunk.start, chunk.end
            pos = np.arange(start, end)
            rows = np.empty((META_ROWS, end - start), dtype=np.int64)
            rows[0] = seq.slot
            rows[1:4] = seq.positions_of(start, end).numpy()
            rows[4] = self.scheduler.kv_slots(seq.slot, pos)
            rows[5] = pos + 1
            rows[6] = seq.token_ids(start, end)
            rows[7] = self.runner.pad_slot
            for page, row0, count, index in seq.image_runs(start, end):
                if chunk.samples and index + count == end:  # its sampled row is a vision token: not placed here
                    return None
                rows[6, index - start : index - start + count] = GIVEN_EMBEDDING
                given.append((at + index - start, seq.features[page][row0 : row0 + count]))
            if chunk.samples:
                rows[7, -1] = seq.slot
                lasts.append(rows[:, -1:])
                rows = rows[:, :-1]
                sampled.append(seq)
            rest.append(rows)
            at += rows.shape[1]
        for chunk in chunks:
            if chunk.seq.num_computed >= chunk.seq.image_end:
                chunk.seq.features.clear()  # every vision token is in the pool after this step
        return StepRows(np.concatenate([decode, *lasts, *rest], axis=1), sampled, given)

    def _step_inputs(self, plan: StepPlan, decode: np.ndarray) -> tuple[StepInputs | PassInputs, list[Sequence]]:
        """A flat batch: decode rows, then chunks that attend through the paged kernel, then the others (SDPA);
        as ``PassInputs`` (host arrays) when every row attends through the paged kernel and a captured pass holds
        them."""
        short = [c for c in plan.chunks if attends_paged(c.start, c.end - c.start)]
        long = [c for c in plan.chunks if not attends_paged(c.start, c.end - c.start)]
        bs = self.scheduler.block_size
        n_dec = len(plan.decode)
        ids: list[int] = []
        kv_slots = [decode[4]]
        positions = [torch.from_numpy(decode[1:4])]
        logits_index = list(range(n_dec))
        sampled = list(plan.decode)
        offset = n_dec
        placed: list[tuple[int, torch.Tensor]] = []
        dense: list[DenseChunk] = []
        for chunk in short + long:
            seq, n = chunk.seq, chunk.end - chunk.start
            ids.extend(seq.token_ids(chunk.start, chunk.end))
            pos = np.arange(chunk.start, chunk.end)
            kv_slots.append(self.scheduler.kv_slots(seq.slot, pos))
            positions.append(seq.positions_of(chunk.start, chunk.end))
            for page, row0, rows, at in seq.image_runs(chunk.start, chunk.end):
                placed.append((offset + at - chunk.start, seq.features[page][row0 : row0 + rows]))
            if not attends_paged(chunk.start, n):
                blocks = None
                if chunk.start:
                    blocks = self.runner.block_tables[seq.slot, : -(-chunk.end // bs)].long()
                dense.append(DenseChunk(offset, n, chunk.start, blocks, samples=chunk.samples))
            if chunk.samples:
                logits_index.append(offset + n - 1)
                sampled.append(seq)
            offset += n
            if seq.num_computed >= seq.image_end:
                seq.features.clear()  # every vision token is in the pool now
        dev = self.device
        # Every host input goes through pinned memory (``to_device``): a copy from pageable memory waits for the
        # step in flight, which the host could otherwise run ahead of.
        tokens = to_device(np.asarray(ids, dtype=np.int64), dev)
        if n_dec:
            tokens = torch.cat([self.runner.last_token[to_device(decode[0], self.device)], tokens])
        with torch.inference_mode():
            embeds = self.runner.embed(tokens)
            for at, feats in placed:
                embeds[at : at + feats.shape[0]] = feats.to(embeds.dtype)
        paged = plan.decode + [c.seq for c in short]
        lens = [1] * n_dec + [c.end - c.start for c in short]
        seq_lens = list(decode[5]) + [c.end for c in short]
        if not dense and self.passes is not None and self.passes.bucket(offset, len(paged)) is not None:
            slots = np.fromiter((s.slot for s in paged), dtype=np.int64, count=len(paged))
            return PassInputs(embeds, torch.cat(positions, dim=1).numpy(), np.concatenate(kv_slots), slots,
                              np.asarray(seq_lens, dtype=np.int64), np.asarray(lens, dtype=np.int64),
                              np.asarray(logits_index, dtype=np.int64)), sampled
        inputs = StepInputs(
            embeds=embeds,
            positions=to_device(torch.cat(positions, dim=1).numpy(), dev),
            slot_mapping=to_device(np.concatenate(kv_slots), self.device),
            dense=dense,
            logits_index=to_device(np.asarray(logits_index, dtype=np.int64), dev),
        )
        if paged:
            inputs.paged_tokens = sum(lens)
            slots = to_device(np.fromiter((s.slot for s in paged), dtype=np.int64, count=len(paged)), self.device)
            inputs.block_tables = self.runner.block_tables[slots]
            inputs.seq_lens = to_device(np.asarray(seq_lens, dtype=np.int32), dev)
            inputs.query_start = to_device(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32), self.device)
            inputs.max_query_len = max(lens)
        return inputs, sampled

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        if not self.cuda:
            return t.clone()
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        return host

    # --- reading back ----------------------------------------------------------------------------------------

    def _read(self, step: Launched) -> list[Event]:
        if self.cuda:
            waited = time.perf_counter()
            step.event.synchronize()
            self.counters["gpu_wait_s"] += time.perf_counter() - waited
        events: list[Event] = []
        now = time.perf_counter()
        if step.decode_only and self._last_read is not None:  # busy since the last read: one step's time
            self.counters["decode_step_s"] += now - self._last_read
            self.counters["timed_decode_steps"] += 1
        self._last_read = now if self.in_flight else None  # nothing in flight: an idle gap may follow
        tokens = step.tokens.tolist()
        chosen = top_values = top_ids = None
        if step.logprobs is not None:
            chosen, top_values, top_ids = (t.tolist() for t in step.logprobs)
        for i, seq in enumerate(step.sampled):
            if seq.status is not Status.RUNNING:
                continue  # finished (or preempted, to be recomputed) after this step was launched
            try:
                if not seq.new_output:
                    self._settle(seq, step.event)
                    seq.timings.time_to_first_token = now - seq.arrived
                    seq.decode_started = now
                logprob = None
                if seq.out.logprobs is not None:
                    k = seq.settings.logprobs
                    out = seq.out
                    logprob = TokenLogprob(tokens[i], out.token_text(tokens[i]), chosen[i],
                                           [(t, out.token_text(t), v, out.token_bytes(t))
                                            for t, v in zip(top_ids[i][:k], top_values[i][:k])],
                                           out.token_bytes(tokens[i]))
                seq.output.append(tokens[i])
                seq.token_times.append(now)
                outcome = seq.out.push(tokens[i], logprob)
                events.extend(self._deltas(seq, outcome.deltas))
                if outcome.stop_reason is not None:
                    seq.stop_reason = outcome.stop_reason
                    events += self._finish(seq, "stop")
                elif len(seq.output) >= seq.max_tokens:
                    events += self._finish(seq, "length")
            except Exception as exc:  # this request's own failure: the others go on
                events.append(self._fail(seq, exc))
        for seq in step.warmed:
            if seq.status is Status.RUNNING:
                try:
                    self._settle(seq, step.event)
                except Exception as exc:  # this request's own failure: the others go on
                    events.append(self._fail(seq, exc))
                    continue
                events += self._finish(seq, "stop")
        return events

    def _settle(self, seq: Sequence, end) -> None:
        """Read ``seq``'s marked stages into its timings, and its prefill's span up to ``end`` (the mark of the
        step that finished it: the first token's, or a warmed prompt's last chunk's): the device has passed them."""
        for name, a, b in seq.stage_marks:
            setattr(seq.timings, name, getattr(seq.timings, name) + self.clock.seconds(a, b))
        seq.stage_marks.clear()
        if seq.prefill_mark is not None:
            seq.timings.prefill = self.clock.seconds(seq.prefill_mark, end)

    def _poll_cancels(self, events: list[Event]) -> None:
        for seq in [*self.scheduler.running, *self.scheduler.waiting]:
            cancel = seq.request.cancel
            if cancel is None:
                continue
            try:
                if cancel():
                    events += self._finish(seq, "cancelled")
            except Exception as exc:
                events.append(self._fail(seq, exc))

    @staticmethod
    def _deltas(seq: Sequence, deltas: list[Delta]) -> list[Event]:
        return [Event(seq, d.channel, d.text, d.logprobs, tokens=d.tokens) for d in deltas]

    def _finish(self, seq: Sequence, reason: str) -> list[Event]:
        self.scheduler.finish(seq, reason)
        seq.features.clear()
        events = self._deltas(seq, seq.out.finish())
        now = time.perf_counter()
        if not seq.new_output:
            seq.decode_started = now
        seq.timings.decode = now - seq.decode_started
        seq.timings.total = now - seq.arrived
        if self.cuda:
            seq.peak_gpu_bytes = torch.cuda.max_memory_allocated(self.device)
        events.append(Event(seq, "done"))
        return events

    def _fail(self, seq: Sequence, exc: Exception) -> Event:
        self.scheduler.finish(seq, "error")
        seq.features.clear()
        if not isinstance(exc, GlyphserveError):
            exc = InternalError(f"this request failed inside the engine ({type(exc).__name__}: {exc})")
        return Event(seq, "error", error=exc)
