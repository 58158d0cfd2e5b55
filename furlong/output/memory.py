"""Peak GPU memory of this process per phase of a rollout: perf/<phase>_peak_memory_gib.

What the caching allocator held at most (reserved, not merely allocated: it is what a
phase needs to fit) while generating, training or pushing, for runs whose trainer or
engine is in this process on a GPU. Phases are measured one at a time, so only
synchronous runs get them (in train_async.py generation overlaps training).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

GIB = 2 ** 30


class PhaseMemory:
    def __init__(self, enabled: bool):
        self.enabled = enabled and torch.cuda.is_available() and torch.cuda.is_initialized()

    @contextmanager
    def measure(self, phase: str, metrics: dict):
        """Adds perf/{phase}_peak_memory_gib to `metrics` for the block's duration."""
        if not self.enabled:
            yield
            return
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        try:
            yield
        finally:
            torch.cuda.synchronize()
            metrics[f"perf/{phase}_peak_memory_gib"] = torch.cuda.max_memory_reserved() / GIB
