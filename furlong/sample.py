"""Sample: one response and everything known about it, with Miles' field names, so that
hooks written for Miles read and fill it unchanged."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy
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

    `teacher_log_probs` (one per response token) is what --use-opd --opd-type sglang
    distills from; a reward hook sets it. Fields furlong carries for Miles' hooks without
    acting on them: `rollout_id`, `multimodal_inputs`, `multimodal_train_inputs` (furlong
    trains on text) and `train_metadata`.
    """
    Status = Status  # Miles nests the enum: Sample.Status.COMPLETED

    group_index: int | None = None
    index: int | None = None
    rollout_id: int | None = None
    prompt: str | list = ""
    tokens: list[int] = field(default_factory=list)
    multimodal_inputs: dict | None = None
    multimodal_train_inputs: dict | None = None
    response: str = ""
    response_length: int = 0
    label: Any = None
    reward: float | dict | None = None
    loss_mask: list[int] | None = None
    # The weight version of each generation call that made the response, as the engine
    # reports it (SGLang's meta_info.weight_version, a string); a continued partial sample
    # has one per call.
    weight_versions: list[str] = field(default_factory=list)
    rollout_log_probs: list[float] | None = None
    # Routing replay: the experts the engine routed each token to, every token but the
    # last (prompt and response); int32 (len(tokens) - 1, num_moe_layers, top_k), a tensor
    # or (from a Miles hook) a numpy array.
    rollout_routed_experts: torch.Tensor | numpy.ndarray | None = None
    # Miles' meaning: the sample stays in the batch and its reward in its group's advantage
    # statistics, but it trains no token (its loss mask becomes 0 before training).
    remove_sample: bool = False
    teacher_log_probs: list[float] | None = None
    status: Status = Status.PENDING
    metadata: dict = field(default_factory=dict)
    # A generate function for this sample instead of --custom-generate-function-path.
    generate_function_path: str | None = None
    train_metadata: dict | None = None

    @property
    def prompt_length(self) -> int:
        return len(self.tokens) - self.response_length

    @property
    def response_tokens(self) -> list[int]:
        return self.tokens[self.prompt_length:]

    @property
    def effective_response_length(self) -> int:
        """The response tokens that train: those of the loss mask (all without one)."""
        return sum(self.loss_mask) if self.loss_mask is not None else self.response_length

    @property
    def latest_weight_version(self) -> int | None:
        """The numbered weight version of the last generation call; None if there was
        none or the engine's version is not a number."""
        if not self.weight_versions or not str(self.weight_versions[-1]).isdigit():
            return None
        return int(self.weight_versions[-1])

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

    def get_reward_value(self, args) -> float | dict:
        """Miles' reward reader: the reward under `args.reward_key`, or without a key the
        reward as it is (a dict reward stays a dict, which Miles' post-process hooks read)."""
        if args.reward_key is None:
            return self.reward
        return self.scalar_reward(args.reward_key)

    def validate(self) -> None:
        """A ValueError naming the first per-token field whose length does not match the
        response (or, for routes, the tokens but the last)."""
        if not 0 <= self.response_length <= len(self.tokens):
            raise ValueError(f"sample {self.group_index}/{self.index}: response_length "
                             f"{self.response_length} must be in [0, len(tokens) = "
                             f"{len(self.tokens)}]")
        expected = {"loss_mask": self.response_length,
                    "rollout_log_probs": self.response_length,
                    "teacher_log_probs": self.response_length,
                    "rollout_routed_experts": len(self.tokens) - 1}
        for name, length in expected.items():
            value = getattr(self, name)
            if value is not None and len(value) != length:
                raise ValueError(f"sample {self.group_index}/{self.index}: {name} has "
                                 f"{len(value)} entries, expected {length}")

    def to_dict(self) -> dict:
        """Every attribute (those a hook added too), copied; the status as its value.
        A numpy array becomes a tensor: the files furlong writes load weights-only."""
        import numpy
        import torch
        data = copy.deepcopy(self.__dict__)
        data["status"] = self.status.value
        for name, value in data.items():
            if isinstance(value, numpy.ndarray):
                data[name] = torch.from_numpy(value)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Sample":
        """The sample of `to_dict`; keys that name no field become attributes (Miles)."""
        data = dict(data)
        data["status"] = Status(data["status"])
        if "weight_version" in data:  # written before weight_versions replaced it
            version = data.pop("weight_version")
            data.setdefault("weight_versions", [] if version is None else [str(version)])
        names = {f.name for f in fields(cls)}
        sample = cls(**{k: v for k, v in data.items() if k in names})
        for key, value in data.items():
            if key not in names:
                setattr(sample, key, value)
        return sample
