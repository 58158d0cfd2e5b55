"""BlockManager: the paged KV cache's blocks, shared between the samples of one prompt.

A block holds `block_size` consecutive tokens of one or more sequences. The n samples
of a prompt share its blocks after a single prefill (`fork`); the first write into a
shared block copies it for the writer (copy-on-write), so samples diverge only where
their tokens do. Block 0 is scratch: padded rows of a captured decode batch write
there, so it is never handed out.
"""
from __future__ import annotations

from collections import deque

from furlong.engine.fast.sequence import Sequence


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks, got {num_blocks}: give the "
                             "engine more memory (--mem-fraction-static)")
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.free_ids: deque[int] = deque(range(1, num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    def _take(self) -> int:
        block = self.free_ids.popleft()
        self.ref_counts[block] = 1
        return block

    def _release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self.free_ids.append(block)

    # ---- prefill ------------------------------------------------------------------------
    def can_allocate(self, num_tokens: int) -> bool:
        return blocks_for(num_tokens, self.block_size) <= self.num_free

    def allocate(self, seq: Sequence) -> None:
        """Blocks for all of `seq`'s tokens (the prefill writes them)."""
        assert not seq.block_table
        seq.block_table = [self._take() for _ in range(blocks_for(seq.num_tokens,
                                                                   self.block_size))]
        seq.reserved_length = seq.num_tokens
        seq.table_synced = 0

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """`child` shares every block of `parent` (same prompt)."""
        child.block_table = list(parent.block_table)
        child.reserved_length = parent.reserved_length
        child.table_synced = 0
        for block in child.block_table:
            self.ref_counts[block] += 1

    def free(self, seq: Sequence) -> None:
        for block in seq.block_table:
            self._release(block)
        seq.block_table = []
        seq.reserved_length = 0

    # ---- decode -------------------------------------------------------------------------
    def blocks_needed(self, seq: Sequence, new_length: int) -> int:
        """New blocks for `seq` to hold `new_length` tokens, counting a copy-on-write."""
        extra = blocks_for(new_length, self.block_size) - len(seq.block_table)
        return max(extra, 0) + int(self._write_block_is_shared(seq))

    def _write_block_is_shared(self, seq: Sequence) -> bool:
        """Whether the block receiving the next write is shared with another sequence."""
        index = (seq.num_tokens - 1) // self.block_size  # the last token's KV is written next
        return index < len(seq.block_table) and self.ref_counts[seq.block_table[index]] > 1

    def reserve(self, seq: Sequence, new_length: int) -> tuple[int, int] | None:
        """Make `seq`'s blocks cover `new_length` tokens. Returns (source, copy) block ids
        when a shared block had to be copied for it, else None."""
        copy = None
        if self._write_block_is_shared(seq):
            index = (seq.num_tokens - 1) // self.block_size
            source = seq.block_table[index]
            seq.block_table[index] = self._take()
            seq.table_synced = min(seq.table_synced, index)
            self._release(source)
            copy = (source, seq.block_table[index])
        while len(seq.block_table) < blocks_for(new_length, self.block_size):
            seq.block_table.append(self._take())
        seq.reserved_length = new_length
        return copy
