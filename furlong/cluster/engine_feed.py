"""The trainer ranks that feed one colocated engine its weights: a gloo group each.

Colocated, the TP rank t of engine e sits on the device of trainer rank feeders[e][t]
(`Placement.engine_feeders`). For each bucket of a push every one of them serializes its
own copy (CUDA IPC handles to its own memory on a GPU, bytes on the CPU); the payloads
are gathered, in TP order, to the first of them (the source), which posts the engine's
one /update_weights_from_tensor request; every engine's outcome then reaches every
trainer rank, so no rank frees or reuses its bucket before its engine has loaded it, and
a refusal stops every rank at that bucket (the next bucket's weights are gathered by all
ranks together, which would otherwise wait for the ones that stopped). The groups are
gloo whatever the trainer's backend: payloads are strings. `EngineFeed` is the `TPGather`
of furlong/engine/weights/send.py.
"""
from __future__ import annotations

import torch.distributed as dist


class EngineFeed:
    """This trainer rank's place among the ranks that feed its engine."""

    def __init__(self, engine_feeders: list[list[int]], rank: int):
        self.rank = rank
        self.ranks: list[int] = []
        self.group = None
        # Collective over all trainer ranks: each creates every engine's group, in order,
        # then the group of every feeder, for the outcomes.
        for feeders in engine_feeders:
            group = dist.new_group(feeders, backend="gloo")
            if rank in feeders:
                self.group, self.ranks = group, list(feeders)
        assert self.ranks, f"trainer rank {rank} feeds no engine ({engine_feeders})"
        self.all_ranks = sorted(r for feeders in engine_feeders for r in feeders)
        self.all = dist.new_group(self.all_ranks, backend="gloo")

    @property
    def is_source(self) -> bool:
        return self.rank == self.ranks[0]

    def gather(self, payload: str) -> list[str] | None:
        gathered = [None] * len(self.ranks) if self.is_source else None
        dist.gather_object(payload, gathered, dst=self.ranks[0], group=self.group)
        return gathered

    def share(self, error: str | None) -> str | None:
        """The bucket's outcome at every trainer rank: its engine's error, else another
        engine's (named by its source rank), else None."""
        outcomes: list = [None] * len(self.all_ranks)
        dist.all_gather_object(outcomes, error if self.is_source else None, group=self.all)
        errors = {rank: e for rank, e in zip(self.all_ranks, outcomes, strict=True)
                  if e is not None}
        if not errors or self.ranks[0] in errors:
            return errors.get(self.ranks[0])
        source, other = next(iter(errors.items()))
        return f"the engine fed from trainer rank {source} did not load it: {other}"
