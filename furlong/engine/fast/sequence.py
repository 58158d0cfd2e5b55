"""Sequence: one request inside the fast engine, from waiting to finished."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

import torch

from furlong.engine.base import SamplingParams

_ids = itertools.count()


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Prompt, generated tokens so far, and the KV blocks holding them.

    While running, generated tokens live on the device (the runner's slot state) and
    reach `output_ids` when the sequence finishes or is preempted; `num_generated`
    counts them all the time (exact at every decode-window boundary).
    `max_new_tokens` is already capped by the context length.
    """
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    max_new_tokens: int
    on_finish: Callable[["Sequence"], None]
    request_id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    output_log_probs: list[float] = field(default_factory=list)
    num_generated: int = 0
    block_table: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    slot: int | None = None          # device state row while running
    # Length the KV blocks must cover by the end of the current decode window.
    reserved_length: int = 0
    # Leading block-table entries already copied to the device (and unchanged since).
    table_synced: int = 0
    # Generated tokens already searched for stop strings (see needs_host_tokens).
    stop_checked: int = 0
    # Routing replay: the routes are read off the device when it finishes (MoE models).
    return_routed_experts: bool = False
    routed_experts: torch.Tensor | None = None
    # LoRA: the adapter's name (None: the base model) and its slot, set on arrival (-1: base).
    lora_name: str | None = None
    lora_slot: int = -1

    @property
    def token_ids(self) -> list[int]:
        """What a (re-)prefill processes: the prompt and the tokens already on the host."""
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + self.num_generated

    @property
    def remaining(self) -> int:
        """New tokens this sequence may still generate."""
        return self.max_new_tokens - self.num_generated

    @property
    def needs_host_tokens(self) -> bool:
        """Stop strings are checked on the host, so its tokens come back every window."""
        return bool(self.params.stop)

    def groups_with(self, other: "Sequence") -> bool:
        """Whether `other` can share this sequence's prefill (same prompt and adapter,
        nothing generated)."""
        return (not self.num_generated and not other.num_generated
                and self.lora_slot == other.lora_slot and self.prompt_ids == other.prompt_ids)
