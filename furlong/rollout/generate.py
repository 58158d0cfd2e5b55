"""The default per-sample generate function, and the per-sample sampling seed.

Signature shared with --custom-generate-function-path hooks:
    async def generate(args, sample, sampling_params: dict) -> Sample | list[Sample]
(with an `evaluation` parameter, the manager passes evaluation=True in eval, as Miles does)
`sampling_params` is an SGLang request dict; `args.engine.generate` takes the prompt
ids and a SamplingParams. A sample that already holds part of a response (a partial
rollout returned to the buffer) continues from where it stopped.

With --use-rollout-routing-replay the engine also returns the experts it routed every
token to. A continued sample is sent whole (prompt and response so far), so the new
answer's routes cover all of its tokens and replace the earlier ones.
"""
from __future__ import annotations

import hashlib

from furlong.engine.base import SamplingParams
from furlong.sample import Sample, Status


def sample_seed(rollout_seed: int, group_index: int, index: int, offset: int = 0) -> int:
    """A 63-bit seed that is a pure function of the sample's identity and progress."""
    key = f"{rollout_seed}/{group_index}/{index}/{offset}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def max_context_len(args, evaluation: bool) -> int | None:
    """Prompt plus response at most: --eval-max-context-len in eval where given (Miles'),
    else --rollout-max-context-len; None for no limit."""
    if evaluation and args.eval_max_context_len is not None:
        return args.eval_max_context_len
    return args.rollout_max_context_len


async def generate(args, sample: Sample, sampling_params: dict,
                   evaluation: bool = False) -> Sample:
    params = dict(sampling_params)
    params["max_new_tokens"] -= sample.response_length
    limit = max_context_len(args, evaluation)
    if limit is not None:
        params["max_new_tokens"] = min(params["max_new_tokens"], limit - len(sample.tokens))
    if params["max_new_tokens"] <= 0:
        # Empty lists, not None: one None makes TrainBatch drop every sample's log-probs.
        sample.loss_mask = sample.loss_mask or []
        sample.rollout_log_probs = sample.rollout_log_probs or []
        sample.status = Status.TRUNCATED
        return sample
    # Asked only when on: engines written before routing replay take two arguments.
    routes = {"return_routed_experts": True} if args.use_rollout_routing_replay else {}
    output = await args.engine.generate(sample.tokens, SamplingParams.from_dict(params), **routes)
    sample.tokens = sample.tokens + output.output_ids
    sample.response += output.text
    sample.response_length += len(output.output_ids)
    sample.loss_mask = (sample.loss_mask or []) + [1] * len(output.output_ids)
    sample.rollout_log_probs = (sample.rollout_log_probs or []) + output.output_log_probs
    sample.status = Status.from_finish_reason(output.finish_reason)
    sample.weight_versions.append(str(output.weight_version))  # SGLang's form: a string
    # The routes cover the whole sample; an engine that returned new tokens without them
    # (aborted after a preemption) leaves none, so a continuation sends the sample whole.
    if output.routed_experts is not None or output.output_ids:
        sample.rollout_routed_experts = output.routed_experts
    return sample
