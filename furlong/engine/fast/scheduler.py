"""Scheduler: which sequences prefill next, and the KV blocks of each decode window.

Prefill has priority: waiting sequences are admitted while KV blocks, sequence slots
and the prefill token budget allow. Waiting requests with the same prompt (the n
samples of one group) are admitted together as a fork group: one prefill, shared
prompt blocks. Before each decode window every running sequence reserves the blocks
its next `window` tokens need; when blocks run out, the most recently admitted
sequences are preempted (their tokens so far kept; they are recomputed later).
"""
from __future__ import annotations

from collections import deque
from typing import Callable

from furlong.engine.fast.block_manager import BlockManager
from furlong.engine.fast.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_prefill_tokens: int):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preempted = 0  # over the engine's life, for logs and tests

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def admit(self) -> list[list[Sequence]]:
        """Fork groups to prefill now (blocks allocated, moved to running)."""
        groups: list[list[Sequence]] = []
        tokens = 0
        while self.waiting and len(self.running) < self.max_num_seqs:
            leader = self.waiting[0]
            if groups and tokens + leader.num_tokens > self.max_prefill_tokens:
                break
            if not self.blocks.can_allocate(leader.num_tokens):
                break
            self.waiting.popleft()
            group = [leader] + self._take_same_prompt(leader, self.max_num_seqs
                                                      - len(self.running) - 1)
            self.blocks.allocate(leader)
            for member in group[1:]:
                self.blocks.fork(leader, member)
            for member in group:
                member.status = SequenceStatus.RUNNING
            self.running += group
            tokens += leader.num_tokens
            groups.append(group)
        return groups

    def _take_same_prompt(self, leader: Sequence, limit: int) -> list[Sequence]:
        same = [seq for seq in self.waiting if leader.groups_with(seq)][:max(limit, 0)]
        if same:
            chosen = set(map(id, same))
            self.waiting = deque(seq for seq in self.waiting if id(seq) not in chosen)
        return same

    def reserve_window(self, window: int, preempt: Callable[[Sequence], None]
                       ) -> list[tuple[int, int]]:
        """Blocks for the next `window` tokens of every running sequence.

        Returns the (source, destination) block copies that copy-on-write needs; the
        runner performs them before the window. `preempt(seq)` is called for each
        sequence evicted for lack of blocks (it must fetch the sequence's tokens).
        """
        def target(seq: Sequence) -> int:
            return seq.num_tokens - 1 + min(window, seq.remaining)

        while sum(self.blocks.blocks_needed(s, target(s)) for s in self.running) \
                > self.blocks.num_free:
            victim = self.running.pop()
            if not self.running and self.blocks.blocks_needed(victim, target(victim)) \
                    > self.blocks.num_free + len(victim.block_table):
                raise RuntimeError(f"one sequence of {victim.num_tokens} tokens does not fit "
                                   "the KV cache: give the engine more memory or lower the "
                                   "context length")
            preempt(victim)
            self.num_preempted += 1
            self.blocks.free(victim)
            victim.status = SequenceStatus.WAITING
            self.waiting.appendleft(victim)
        copies = []
        for seq in self.running:
            copy = self.blocks.reserve(seq, target(seq))
            if copy is not None:
                copies.append(copy)
        return copies

    def finish(self, seq: Sequence, reason: str) -> None:
        """Release a sequence (running or waiting) with a finish reason."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
