"""Sample: one response and everything known about it."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class Status(str, Enum):
    PENDING = "pending"
    COMPLETED = "completed"   # the engine stopped on a stop token or string
    TRUNCATED = "truncated"   # hit the response or context length limit
    ABORTED = "aborted"       # cut off by an abort (over-sampling surplus, shutdown)
    FAILED = "failed"

    @classmethod
    def from_finish_reason(cls, reason: str) -> "Status":
        return {"stop": cls.COMPLETED, "length": cls.TRUNCATED, "abort": cls.ABORTED}[reason]


@dataclass
class Sample:
    """A prompt and one response to it, filled in as it moves through the loop.

    `tokens` holds prompt + response ids; `loss_mask` and `rollout_log_probs` have one
    entry per response token (the mask is 0 on tokens the policy did not sample, such
    as tool outputs spliced in by a multi-turn generate function).
    """
    group_index: int | None = None
    index: int | None = None
    prompt: str | list = ""
    tokens: list[int] = field(default_factory=list)
    response: str = ""
    response_length: int = 0
    label: Any = None
    reward: float | dict | None = None
    loss_mask: list[int] | None = None
    rollout_log_probs: list[float] | None = None
    status: Status = Status.PENDING
    metadata: dict = field(default_factory=dict)
    # Version of the engine weights that generated the response (async training).
    weight_version: int | None = None
    # Routing replay: the experts the engine routed each token to, every token but the
    # last (prompt and response); int32 (len(tokens) - 1, num_moe_layers, top_k).
    rollout_routed_experts: torch.Tensor | None = None

    @property
    def prompt_length(self) -> int:
        return len(self.tokens) - self.response_length

    @property
    def response_tokens(self) -> list[int]:
        return self.tokens[self.prompt_length:]

    def scalar_reward(self, reward_key: str | None) -> float:
        """The reward as one number; dict rewards need --reward-key."""
        if isinstance(self.reward, dict):
            if reward_key is None or reward_key not in self.reward:
                raise ValueError(f"sample {self.group_index}/{self.index}: reward is a dict with "
                                 f"keys {sorted(self.reward)}; set --reward-key to one of them")
            return float(self.reward[reward_key])
        if self.reward is None:
            raise ValueError(f"sample {self.group_index}/{self.index} has no reward yet")
        return float(self.reward)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["status"] = self.status.value
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Sample":
        return cls(**{**data, "status": Status(data["status"])})
