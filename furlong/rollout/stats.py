"""Rollout and eval statistics (metric names as in Miles), as pure functions of samples."""
from __future__ import annotations

import itertools
import math
from statistics import mean

from furlong.algo.advantages import has_zero_std
from furlong.sample import Sample, Status


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n - c, k) / C(n, k)."""
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - math.comb(num_samples - num_correct, k) / math.comb(num_samples, k)


def response_stats(samples: list[Sample], prefix: str) -> dict[str, float]:
    lengths = [s.response_length for s in samples]
    return {f"{prefix}/response_len/mean": mean(lengths),
            f"{prefix}/response_len/max": max(lengths),
            f"{prefix}/response_len/min": min(lengths),
            f"{prefix}/truncated_ratio": mean(s.status == Status.TRUNCATED for s in samples)}


def rollout_stats(groups: list[list[Sample]], reward_key: str | None,
                  drops: dict[str, int], scalar_rewards: bool = True) -> dict[str, float]:
    """`scalar_rewards` False: the samples' rewards are not scores yet (a reward
    post-process hook makes them; `reward_stats` of its raw rewards then)."""
    samples = [s for group in groups for s in group]
    stats = response_stats(samples, "rollout")
    if scalar_rewards:
        stats.update(reward_stats(groups, [s.scalar_reward(reward_key) for s in samples]))
    stats.update({f"rollout/dynamic_filter/drop_{reason}": count
                  for reason, count in sorted(drops.items())})
    stats.update(multi_turn_stats(samples))
    return stats


def reward_stats(groups: list[list[Sample]], raw_rewards: list[float]) -> dict[str, float]:
    """rollout/raw_reward and rollout/zero_std/count of the rewards, one per sample in the
    groups' order. A sample's metadata["raw_reward"] is what rollout/raw_reward counts of
    it, as in Miles (a hook's own score, e.g. correctness beside a distillation reward).
    Groups are counted with the zero-std filter's rule (float64 std <= 1e-8), equal rewards
    being what gives a group zero advantage."""
    samples = [s for group in groups for s in group]
    logged = [float(s.metadata.get("raw_reward", reward))
              for s, reward in zip(samples, raw_rewards, strict=True)]
    bounds = list(itertools.accumulate(len(group) for group in groups))
    return {"rollout/raw_reward": mean(logged),
            "rollout/zero_std/count": sum(has_zero_std(raw_rewards[end - len(group):end])
                                          for group, end in zip(groups, bounds, strict=True))}


# Sample metadata of multi-turn and agent rollouts (furlong.rollout.multi_turn, sessions)
# -> the mean logged as rollout/<key>: turns, malformed tool calls, and the tokens where a
# re-rendering of the conversation differs from what was sampled (template drift).
MULTI_TURN_METADATA = ("num_turns", "tool_call_parse_errors", "retokenize_mismatch_tokens")


def multi_turn_stats(samples: list[Sample]) -> dict[str, float]:
    stats = {}
    for key in MULTI_TURN_METADATA:
        values = [s.metadata[key] for s in samples if key in s.metadata]
        if values:
            stats[f"rollout/{key}"] = mean(values)
    return stats


def eval_stats(name: str, groups: list[list[Sample]], reward_key: str | None,
               log_passrate: bool) -> dict[str, float]:
    """eval/NAME is the mean reward; pass@k counts a sample correct when its reward > 0."""
    samples = [s for group in groups for s in group]
    stats = {f"eval/{name}": mean(s.scalar_reward(reward_key) for s in samples),
             **response_stats(samples, f"eval/{name}")}
    if log_passrate:
        n = min(len(group) for group in groups)
        k = 1
        while k <= n:
            stats[f"eval/{name}/pass@{k}"] = mean(
                pass_at_k(len(g), sum(s.scalar_reward(reward_key) > 0 for s in g), k)
                for g in groups)
            k *= 2
    return stats
