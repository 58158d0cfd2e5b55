"""On-policy distillation from a teacher server (--use-opd --opd-type sglang).

What Miles' and slime's `rollout.on_policy_distillation` hooks do, under their paths
(hooks.ALIASES), so their launch scripts run unchanged:

    --custom-rm-path miles.rollout.on_policy_distillation.reward_func
    --custom-reward-post-process-path miles.rollout.on_policy_distillation.post_process_rewards
    --rm-url http://TEACHER:PORT/generate

`reward_func` sends each sample's tokens to the teacher's /generate (SGLang's, or
furlong's engine server) as a scoring request: no new tokens, the log-prob of every input
token (`logprob_start_len` 0); the reply is the sample's reward. With several teachers
(--opd-teacher-urls NAME=URL, --opd-teacher-adapters NAME=ADAPTER, a LoRA adapter of the
teacher server sent as `lora_path`) a sample goes to the teacher its
metadata[--opd-teacher-key] names, else to the one named `default`; one with neither is
an error rather than distilled from the wrong teacher. `post_process_rewards`
keeps the teacher's log-prob of each response token as `sample.teacher_log_probs` and
gives every sample the reward 0, so the distillation term alone trains (the teacher's
log-probs enter the advantages in train/advantage_estimator.py). Sampled-token
distillation only: --opd-log-prob-top-k stays 0.
"""
from __future__ import annotations

import aiohttp

from furlong.config.distillation_check import teacher_map
from furlong.rollout.rewards.remote import remote_rm
from furlong.sample import Sample

DEFAULT_TEACHER = "default"


def scoring_request(tokens: list[int], adapter: str | None = None) -> dict:
    """SGLang's /generate body that scores `tokens` and generates nothing; under LoRA
    adapter `adapter` of the server, if given."""
    request = {"input_ids": tokens, "return_logprob": True, "logprob_start_len": 0,
               "sampling_params": {"temperature": 0, "max_new_tokens": 0,
                                   "skip_special_tokens": False}}
    return request | ({"lora_path": adapter} if adapter is not None else {})


def teacher_for(args, sample: Sample) -> tuple[str, str | None]:
    """(the /generate URL, the LoRA adapter or None) of the teacher that scores `sample`."""
    urls = teacher_map(args.opd_teacher_urls, "--opd-teacher-urls")
    adapters = teacher_map(args.opd_teacher_adapters, "--opd-teacher-adapters")
    if not urls and not adapters:
        return args.rm_url, None
    known = set(urls) | set(adapters)
    named = sample.metadata.get(args.opd_teacher_key)
    name = str(named) if named is not None and str(named) in known else DEFAULT_TEACHER
    if name not in known:
        raise ValueError(f"sample {sample.group_index}/{sample.index}: metadata"
                         f"[{args.opd_teacher_key!r}] is {named!r}, which names none of the "
                         f"teachers {sorted(known)}, and none is named {DEFAULT_TEACHER!r}")
    return urls.get(name, args.rm_url), adapters.get(name)


async def reward_func(args, sample: Sample, **kwargs) -> dict:
    """The teacher server's reply to the scoring request of the sample's tokens."""
    url, adapter = teacher_for(args, sample)
    async with aiohttp.ClientSession() as session:
        return await remote_rm(session, url, scoring_request(sample.tokens, adapter),
                               args.rm_timeout)


def response_log_probs(reply: dict, sample: Sample) -> list[float]:
    """The teacher's log-prob of each response token of `sample`, read from its reply to
    `scoring_request`; a ValueError naming the sample if the reply holds none."""
    scored = reply.get("meta_info", {}).get("input_token_logprobs") \
        if isinstance(reply, dict) else None
    where = f"sample {sample.group_index}/{sample.index}"
    if scored is None:
        raise ValueError(f"{where}: the teacher's reply has no meta_info.input_token_logprobs; "
                         "--rm-url must be the teacher server's /generate, and the sample's "
                         "reward the reply of the on-policy distillation reward_func")
    if len(scored) != len(sample.tokens):
        raise ValueError(f"{where}: the teacher scored {len(scored)} tokens of "
                         f"{len(sample.tokens)}")
    return [float(entry[0]) for entry in scored[len(scored) - sample.response_length:]]


def post_process_rewards(args, samples: list[Sample], **kwargs
                         ) -> tuple[list[float], list[float]]:
    """Each sample's teacher_log_probs from its reward (the teacher's reply); rewards 0."""
    for sample in samples:
        sample.teacher_log_probs = response_log_probs(sample.reward, sample)
    zeros = [0.0] * len(samples)
    return zeros, zeros
