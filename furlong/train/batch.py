"""TrainBatch: the per-sample tensors of one rollout, and packing into micro-batches.

A micro-batch is always packed: its samples are concatenated into one row with
position ids restarting at each sample, so attention never crosses samples and no
padding is computed. Response-token quantities are flattened the same way: tensors
of shape (N,) over the response tokens of the micro-batch, with `sample_ids` telling
each token's sample slot.

Routing replay: a sample's routes cover its tokens but the last, (L_i - 1, num_moe_layers,
k), as the engine returns them (the last token was never fed to the model). Packed, each
sample's last position gets a filler row of -1 (the router chooses on its own there:
that position predicts no target, so only the load-balancing loss sees its route).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from furlong.sample import Sample

# Per-sample list fields that are concatenated over response tokens when packing.
TOKEN_FIELDS = ("loss_masks", "advantages", "old_log_probs", "ref_log_probs",
                "rollout_log_probs")


@dataclass
class TrainBatch:
    """S samples. Lists hold one tensor per sample; response tensors have R_i entries."""
    tokens: list[torch.Tensor]             # (L_i,) prompt + response ids
    response_lengths: list[int]
    loss_masks: list[torch.Tensor]         # (R_i,) 1 on tokens the policy sampled
    rewards: torch.Tensor                  # (S,) scalar rewards
    rollout_log_probs: list[torch.Tensor] | None = None
    old_log_probs: list[torch.Tensor] | None = None
    ref_log_probs: list[torch.Tensor] | None = None
    advantages: list[torch.Tensor] | None = None
    teacher_log_probs: list[torch.Tensor] | None = None  # --use-opd
    routed_experts: list[torch.Tensor] | None = None  # (L_i - 1, layers, k) int32, to replay

    @classmethod
    def from_samples(cls, samples: list[Sample], reward_key: str | None,
                     routed_experts: bool = False,
                     raw_rewards: list[float] | None = None) -> "TrainBatch":
        """`routed_experts`: carry each sample's `rollout_routed_experts` (every sample
        must have them, one row per token but the last). `raw_rewards`: the rewards, where
        a reward post-process hook gave them (else each sample's scalar reward)."""
        if raw_rewards is None:
            raw_rewards = [s.scalar_reward(reward_key) if s.reward is not None else 0.0
                           for s in samples]
        def per_token(name: str) -> list[torch.Tensor] | None:  # if every sample has them
            values = [getattr(s, name) for s in samples]
            if any(v is None for v in values):
                return None
            return [torch.as_tensor(v, dtype=torch.float32) for v in values]
        return cls(
            tokens=[torch.tensor(s.tokens, dtype=torch.long) for s in samples],
            response_lengths=[s.response_length for s in samples],
            loss_masks=[torch.tensor(s.loss_mask if s.loss_mask is not None
                                     else [1] * s.response_length, dtype=torch.float32)
                        for s in samples],
            rewards=torch.tensor(raw_rewards, dtype=torch.float32),
            rollout_log_probs=per_token("rollout_log_probs"),
            teacher_log_probs=per_token("teacher_log_probs"),
            routed_experts=rollout_routes(samples) if routed_experts else None)

    def __len__(self) -> int:
        return len(self.tokens)

    def select(self, indices: list[int]) -> "TrainBatch":
        """The sub-batch of these sample indices, in this order."""
        values = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                value = [value[i] for i in indices]
            elif isinstance(value, torch.Tensor):
                value = value[indices]
            values[f.name] = value
        return replace(self, **values)

    def num_loss_tokens(self) -> int:
        return int(sum(mask.sum().item() for mask in self.loss_masks))


@dataclass
class PackedMicroBatch:
    """One packed row and the flattened response-token tensors of its samples."""
    input_ids: torch.Tensor          # (1, T)
    position_ids: torch.Tensor       # (1, T)
    target_positions: torch.Tensor   # (N,) row positions whose next token is a response token
    targets: torch.Tensor            # (N,) those next tokens
    sample_ids: torch.Tensor         # (N,) sample slot 0..num_samples-1
    cu_seq_lens: torch.Tensor        # (num_samples + 1,) where each sample starts in the row
    max_length: int                  # longest sample
    num_samples: int
    token_fields: dict               # name in TOKEN_FIELDS -> (N,) tensor, when the batch has it
    routed_experts: torch.Tensor | None = None  # (T, layers, k) int32 to replay; -1: none

    @property
    def loss_mask(self) -> torch.Tensor:
        return self.token_fields["loss_masks"]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]


def pack(batch: TrainBatch, indices: list[int], device: torch.device | str) -> PackedMicroBatch:
    """Concatenate samples `indices` of `batch` into one packed row on `device`."""
    tokens = [batch.tokens[i] for i in indices]
    positions, target_positions, sample_ids = [], [], []
    offset = 0
    for slot, (i, ids) in enumerate(zip(indices, tokens, strict=True)):
        length, response = len(ids), batch.response_lengths[i]
        positions.append(torch.arange(length))
        # Position p predicts token p + 1: response tokens start at length - response.
        target_positions.append(torch.arange(length - response - 1, length - 1) + offset)
        sample_ids.append(torch.full((response,), slot))
        offset += length
    row = torch.cat(tokens)
    target_positions = torch.cat(target_positions)
    token_fields = {name: torch.cat([getattr(batch, name)[i] for i in indices]).to(device)
                    for name in TOKEN_FIELDS if getattr(batch, name) is not None}
    return PackedMicroBatch(
        input_ids=row[None].to(device), position_ids=torch.cat(positions)[None].to(device),
        target_positions=target_positions.to(device), targets=row[target_positions + 1].to(device),
        sample_ids=torch.cat(sample_ids).to(device),
        cu_seq_lens=torch.tensor([0] + [len(t) for t in tokens]).cumsum(0).to(device),
        max_length=max(len(t) for t in tokens), num_samples=len(indices),
        token_fields=token_fields, routed_experts=None if batch.routed_experts is None
        else packed_routes([batch.routed_experts[i] for i in indices]).to(device))


def split_tokens(values: torch.Tensor, micro: PackedMicroBatch) -> list[torch.Tensor]:
    """(N,) response-token values of a micro-batch -> one tensor per sample."""
    counts = torch.bincount(micro.sample_ids, minlength=micro.num_samples).tolist()
    return list(values.split(counts))


def rollout_routes(samples: list[Sample]) -> list[torch.Tensor]:
    """Each sample's rollout routes as int32 (L - 1, layers, k); a ValueError naming the
    first sample whose routes are missing or do not cover its tokens. A sample without
    response tokens (its prompt filled the context) may have none: it trains nothing, and
    its rows are -1 (the routers choose)."""
    given = [s.rollout_routed_experts for s in samples if s.rollout_routed_experts is not None]
    routes = []
    for sample in samples:
        found, expected = sample.rollout_routed_experts, len(sample.tokens) - 1
        if found is None and sample.response_length == 0 and given:
            found = torch.full((expected, *given[0].shape[1:]), -1)
        if found is None or len(found) != expected:
            raise ValueError(
                f"sample {sample.group_index}/{sample.index}: routing replay needs the "
                f"engine's routes of its {expected} tokens but the last, found "
                f"{'none' if found is None else len(found)}; the engine must return routed "
                "experts (a custom generate function must keep sample.rollout_routed_experts "
                "covering every token)")
        routes.append(torch.as_tensor(found, dtype=torch.int32))
    return routes


def packed_routes(routes: list[torch.Tensor]) -> torch.Tensor:
    """Per-sample routes (L_i - 1, layers, k) -> (sum L_i, layers, k) in packed order, a
    filler row of -1 at each sample's last position (see the module docstring)."""
    filler = torch.full((1, *routes[0].shape[1:]), -1, dtype=torch.int32)
    return torch.cat([part for r in routes for part in (r.to(torch.int32), filler)])


def split_routes(routes: torch.Tensor, micro: PackedMicroBatch) -> list[torch.Tensor]:
    """Routes of a packed row (T, layers, k) -> one (L_i - 1, layers, k) per sample (the
    route of each sample's last token is dropped, as the engine never has it)."""
    bounds = micro.cu_seq_lens.tolist()
    return [routes[start:end - 1] for start, end in zip(bounds[:-1], bounds[1:], strict=True)]
