"""Which sequences run in the next step, and with how many tokens each.

Waiting and running queues in the shape of vLLM's scheduler: every step feeds each decoding sequence its last
token and fills the rest of a token budget with prompt chunks (sequences already prefilling first, then new ones
in arrival order), so a long document joining running answers is prefilled a chunk at a time between their
steps. A sequence is admitted only when the pool has blocks for its whole prompt (after taking its cached prefix
blocks by reference), and only while no other running sequence is still writing the blocks its prefix needs
(it then waits and shares them instead of computing a copy). Requests that only warm a document's caches run
only while no question waits or runs. When a decoding sequence needs a block and none is free, the most recently admitted
sequence is preempted: its blocks are released (its prompt's published blocks stay cached) and it waits to be
recomputed, prompt and answer so far, then continues; a preempted sequence's answer is unchanged.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from glyphserve.engine.kv_pool import TRASH_BLOCK, KVPool
from glyphserve.engine.sequence import Sequence, Status


@dataclass
class SchedulerConfig:
    max_num_seqs: int  # sequences running at once
    max_context: int  # tokens per sequence (prompt + answer)
    max_num_batched_tokens: int  # tokens per step while sequences decode (bounds their pause)
    max_prefill_tokens: int  # tokens per step when nothing decodes (a long prompt in one causal pass)


@dataclass
class Chunk:
    seq: Sequence
    start: int
    end: int
    samples: bool  # it completes what the sequence knows: its last position's logits give the next token


@dataclass
class StepPlan:
    decode: list[Sequence] = field(default_factory=list)  # each fed its last generated token
    chunks: list[Chunk] = field(default_factory=list)  # prompt (or recomputation) pieces, ids known on the host
    admitted: list[Sequence] = field(default_factory=list)  # sequences that started running in this step

    @property
    def empty(self) -> bool:
        return not self.decode and not self.chunks


class NeedsDrain(Exception):
    """Preemption is needed, and it needs every launched step read back first."""


class Scheduler:
    """Owns the waiting and running queues, the slots and block tables, and the pool's allocations."""

    def __init__(self, config: SchedulerConfig, pool: KVPool):
        self.config = config
        self.pool = pool
        self.block_size = pool.block_size
        self.max_blocks = -(-(config.max_context + 1) // self.block_size)  # one spare: a step may run one past the end
        self.block_tables = np.full((config.max_num_seqs, self.max_blocks), TRASH_BLOCK, dtype=np.int32)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._free_slots = list(range(config.max_num_seqs - 1, -1, -1))
        self.dirty: set[int] = set()  # slots whose block-table row changed since the device copy was refreshed
        self.preemptions = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def room(self) -> int:
        """How many more questions could be taken in now (by count; blocks decide admission). Warming sequences do
        not count: a question takes their place."""
        busy = sum(1 for q in (self.running, self.waiting) for s in q if not s.request.warm)
        return max(0, self.config.max_num_seqs - busy)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def kv_slots(self, slots, positions: np.ndarray) -> np.ndarray:
        """The pool slot (block * block_size + offset) of each position, in the block table of each slot."""
        bs = self.block_size
        return self.block_tables[slots, positions // bs] * bs + positions % bs

    def finish(self, seq: Sequence, reason: str) -> None:
        """Stop ``seq`` wherever it is; its blocks and slot are released."""
        if seq.status is Status.FINISHED:
            return
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self._release(seq)
        else:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = seq.finish_reason or reason

    # --- a step ----------------------------------------------------------------------------------------------

    def schedule(self, in_flight: bool) -> StepPlan:
        """The next step. Raises ``NeedsDrain`` when a preemption is due while launched steps are unread."""
        plan = StepPlan()
        decoding = [s for s in self.running if s.decoding and not s.done_scheduling]
        for seq in decoding:
            if seq.status is not Status.RUNNING:  # preempted below to make room for an earlier one
                continue
            while not self._slot_for_next_token(seq):
                if in_flight:
                    raise NeedsDrain
                self._preempt(self.running[-1])
                if seq.status is not Status.RUNNING:
                    break
            else:
                plan.decode.append(seq)
        budget = (self.config.max_num_batched_tokens if plan.decode else self.config.max_prefill_tokens)
        budget -= len(plan.decode)
        # Warming runs only while no question waits or runs: it never slows a live answer.
        urgent = any(not s.request.warm for s in self.waiting) or any(not s.request.warm for s in self.running)
        for seq in self.running:  # sequences part-way through their prompt (or recomputation)
            if budget <= 0:
                break
            if urgent and seq.request.warm:
                continue
            if not seq.decoding and seq.num_computed < seq.total_tokens:
                budget -= self._chunk(plan, seq, budget)
        self._admit(plan, budget, urgent)
        for seq in plan.decode:
            seq.num_computed += 1
            seq.scheduled_outputs += 1
        for chunk in plan.chunks:
            chunk.seq.num_computed = chunk.end
            if chunk.samples:
                chunk.seq.scheduled_outputs += 1
        return plan

    def _chunk(self, plan: StepPlan, seq: Sequence, budget: int) -> int:
        end = min(seq.total_tokens, seq.num_computed + budget)
        plan.chunks.append(Chunk(seq, seq.num_computed, end, end == seq.total_tokens and not seq.request.warm))
        # Published blocks this chunk fills can be shared from now on: every later step reads them after this
        # one has written them (one stream orders all device work).
        done = min(seq.published, end // self.block_size)
        self.pool.mark_ready(seq.blocks[:done])
        return end - seq.num_computed

    def _admit(self, plan: StepPlan, budget: int, urgent: bool) -> None:
        if budget <= 0 or not self.waiting:
            return
        for seq in list(self.waiting):
            if budget <= 0:
                return
            if urgent and seq.request.warm:
                continue
            while len(self.running) >= self.config.max_num_seqs and self._make_room(seq):
                pass
            if len(self.running) >= self.config.max_num_seqs:
                return
            admitted = self._allocate(seq)
            # Short of blocks, or its prefix half-written by a warming sequence that now pauses for it: a warming
            # sequence steps aside (its unwritten blocks are withdrawn, so the question writes them itself). A
            # question's prefix is never half-written here: budget is left only when every running question's
            # prompt chunk reached its end, and the chunk's blocks count as written once it is planned.
            while admitted is not True and self._make_room(seq):
                admitted = self._allocate(seq)
            if admitted is None:
                continue  # its prefix is being written by a running sequence: wait and share it
            if not admitted:
                return  # the pool is full: keep arrival order
            self.waiting.remove(seq)
            self.running.append(seq)
            plan.admitted.append(seq)
            if seq.num_computed < seq.total_tokens:
                budget -= self._chunk(plan, seq, budget)

    def _allocate(self, seq: Sequence) -> bool | None:
        """Give ``seq`` a slot and blocks for everything it knows, sharing its cached prefix; False when the pool
        is short, None when its prefix is still being written by another sequence."""
        cached: list[int] = []
        if seq.hashes:
            cached, ready = self.pool.match(seq.hashes)
            if not ready:
                return None
            # At least the last token is computed here: its logits give the first answer token.
            while cached and len(cached) * self.block_size >= seq.total_tokens:
                cached.pop()
        needed = -(-seq.total_tokens // self.block_size) - len(cached)
        idle_cached = sum(1 for b in cached if self.pool.refs(b) == 0)  # they leave the free list when shared
        # Keep a block per running sequence in reserve, so answers under way can grow without preemptions.
        if needed > self.pool.num_free - idle_cached - len(self.running):
            return False
        self.pool.share(cached)
        fresh = self.pool.allocate(needed)
        seq.blocks = cached + fresh
        for i in range(len(cached), min(len(seq.hashes), len(seq.blocks))):
            self.pool.publish(seq.blocks[i], seq.hashes[i])
        seq.published = min(len(seq.hashes), len(seq.blocks))
        seq.num_cached = len(cached) * self.block_size
        seq.num_computed = seq.num_cached
        seq.slot = self._free_slots.pop()
        self.block_tables[seq.slot, : len(seq.blocks)] = seq.blocks
        self.dirty.add(seq.slot)
        seq.status = Status.RUNNING
        return True

    def withdraw(self, plan: StepPlan, dropped: list[Chunk]) -> list[Sequence]:
        """Take chunks out of a step before it runs (their requests fail). The blocks they were to fill were
        marked ready when they were scheduled: they are not, so no later sequence takes them for written. A
        sequence admitted in this step onto those blocks goes back to the queue (out of the step) to compute them
        itself; those are returned."""
        bs = self.block_size
        unwritten: set[int] = set()
        requeued: list[Chunk] = []
        cut = {id(c.seq) for c in dropped}
        while dropped:
            for c in dropped:
                unwritten.update(c.seq.blocks[c.start // bs : min(c.seq.published, c.end // bs)])
            dropped = [c for c in plan.chunks
                       if id(c.seq) not in cut and not unwritten.isdisjoint(c.seq.blocks[: c.start // bs])]
            cut.update(id(c.seq) for c in dropped)
            requeued += dropped
        self.pool.mark_unwritten(sorted(unwritten))
        for c in requeued:
            c.seq.scheduled_outputs -= c.samples  # scheduled with this step, which it leaves
            self._requeue(c.seq, preempted=False)
        return [c.seq for c in requeued]

    def _slot_for_next_token(self, seq: Sequence) -> bool:
        """Make sure the block that position ``num_computed`` falls in exists."""
        if seq.num_computed < len(seq.blocks) * self.block_size:
            return True
        fresh = self.pool.allocate(1)
        if fresh is None:
            return False
        self.block_tables[seq.slot, len(seq.blocks)] = fresh[0]
        self.dirty.add(seq.slot)
        seq.blocks.append(fresh[0])
        return True

    def _make_room(self, seq: Sequence) -> bool:
        """A question needs a slot, blocks or a prefix a warming sequence has not written yet: the newest warming
        sequence gives its own back and waits to resume (the blocks it wrote stay cached). False when there is
        none."""
        warming = [s for s in self.running if s.request.warm]
        if seq.request.warm or not warming:
            return False
        self._requeue(warming[-1])
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Free the blocks of a warming sequence, else of ``seq``, and send it back to the front of the queue, to be
        recomputed. Needs every launched step read back (a decoding victim's tokens must all be known)."""
        victims = [s for s in self.running if s.request.warm] or [seq]
        self._requeue(victims[-1])

    def _requeue(self, victim: Sequence, preempted: bool = True) -> None:
        """Back to the front of the queue, its blocks released (those it wrote stay cached); ``preempted`` counts
        it (a sequence withdrawn from a step before it ran lost no work)."""
        self.running.remove(victim)
        self._release(victim)
        victim.status = Status.WAITING
        victim.num_computed = 0
        victim.preemptions += preempted
        self.preemptions += preempted
        self.waiting.appendleft(victim)

    def _release(self, seq: Sequence) -> None:
        self.pool.release(seq.blocks)
        seq.blocks = []
        self.block_tables[seq.slot] = TRASH_BLOCK
        self._free_slots.append(seq.slot)
        seq.slot = -1
