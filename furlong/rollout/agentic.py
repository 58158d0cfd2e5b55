"""Custom agents: an agent that speaks OpenAI's API, trained on the exact tokens it got.

A generate hook (`--custom-generate-function-path furlong.rollout.agentic:generate`,
Miles' `generate_hub.agentic_tool_call`) that runs the agent of
--custom-agent-function-path, Miles' contract:

    async def agent(base_url: str, prompt, request_kwargs: dict, metadata: dict) -> dict | None

For each sample, `generate`
  1. opens a session on the engine server the hooks see (`args.sglang_router_ip`,
     `args.sglang_router_port`): POST /sessions (engine/server/sessions.py);
  2. awaits the agent with base_url = {server}/sessions/{id} (OpenAI's clients take
     base_url + "/v1"), the sample's prompt, `request_kwargs` (the rollout's sampling
     params under the chat route's names: max_tokens, temperature, top_p, seed, stop, and
     SGLang's top_k, stop_token_ids, skip_special_tokens; `openai_client_kwargs` splits
     them for OpenAI's client) and a copy of the sample's metadata;
  3. collects the session's samples (POST /sessions/{id}/samples, with Miles'
     `args.max_seq_len` where given): one per trajectory, the tokens as sampled, loss
     mask 1 on sampled tokens only, the engine's log-probs;
  4. deletes the session, whatever happened (DELETE /sessions/{id}).

Each trajectory becomes a copy of the input Sample (group_index, index, label, prompt and
any attribute a hook added) with the trajectory's tokens, mask and log-probs; its
metadata is the input's, updated with the session's (messages, finish_reason, num_turns,
retokenize_mismatch_tokens, tool_call_parse_errors), then with the dict the agent
returned, so the reward function reads what the agent left there. One trajectory gives a
Sample; several (the agent rewrote the history, which starts a new trajectory) a list,
all in the prompt's group. An agent that never called the model gives the sample back
ABORTED (as Miles does): its group is dropped from the rollout. An exception of the agent
is not caught: a broken agent stops the run, after its session is deleted.

With --use-rollout-routing-replay the session routes record the engine's MoE routes
(the run's router front asks for them), and each sample carries its trajectory's.

The agent runs in the event loop of the rollout, which also serves the engine and the
session routes: it must await its I/O (openai.AsyncOpenAI, aiohttp, httpx.AsyncClient).
A blocking call (openai.OpenAI) would stop the loop that has to answer it.
"""
from __future__ import annotations

import asyncio
import copy
import logging

import aiohttp

from furlong.engine.client import decode_routed_experts
from furlong.engine.server.openai_request import CHAT_FIELDS
from furlong.hooks import load_function
from furlong.sample import Sample, Status

logger = logging.getLogger(__name__)

AGENT_FLAG = "--custom-agent-function-path"
SESSION_TIMEOUT_S = 120  # each session call (open, collect, delete); the agent has no limit
# SGLang's sampling-parameter names that the chat route spells OpenAI's way.
_CHAT_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens",
               "sampling_seed": "seed"}
# The keyword parameters of OpenAI's client (chat.completions.create) among CHAT_FIELDS.
_OPENAI_CLIENT = {"max_tokens", "max_completion_tokens", "temperature", "top_p", "seed",
                  "stop", "n", "logprobs", "top_logprobs", "presence_penalty",
                  "frequency_penalty", "logit_bias", "tools", "tool_choice", "user",
                  "metadata", "store", "service_tier", "parallel_tool_calls",
                  "response_format", "stream", "stream_options"}


async def generate(args, sample: Sample, sampling_params: dict) -> Sample | list[Sample]:
    path = args.custom_agent_function_path
    if not path:
        raise ValueError(f"furlong.rollout.agentic:generate runs the agent that {AGENT_FLAG} "
                         "names: give it (module:function, an async function(base_url, "
                         "prompt, request_kwargs, metadata) -> dict | None)")
    if args.sglang_router_ip is None:
        raise ValueError(f"{AGENT_FLAG}: the run serves no engine server for the agent to "
                         "call (args.sglang_router_ip is None)")
    server = f"http://{args.sglang_router_ip}:{args.sglang_router_port}"
    return await run_agent(load_function(path, AGENT_FLAG), server, sample, sampling_params,
                           args.max_seq_len)


async def run_agent(agent, server_url: str, sample: Sample, sampling_params: dict,
                    max_seq_len: int | None = None) -> Sample | list[Sample]:
    """Steps 1-4 of the module docstring on the engine server at `server_url`."""
    timeout = aiohttp.ClientTimeout(total=SESSION_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        session_id = (await _call(http, "POST", f"{server_url}/sessions", {}))["session_id"]
        base_url = f"{server_url}/sessions/{session_id}"
        try:
            returned = await agent(base_url=base_url, prompt=copy.deepcopy(sample.prompt),
                                   request_kwargs=request_kwargs(sampling_params),
                                   metadata=copy.deepcopy(sample.metadata))
            if returned is not None and not isinstance(returned, dict):
                raise ValueError(f"{AGENT_FLAG}: the agent returned a "
                                 f"{type(returned).__name__}; return a dict of metadata "
                                 "for the reward, or None")
            body = {} if max_seq_len is None else {"max_seq_len": max_seq_len}
            collected = await _call(http, "POST", f"{base_url}/samples", body)
        finally:  # also after an error or a cancel; its own failure does not hide theirs
            try:
                await _call(http, "DELETE", base_url)
            except (aiohttp.ClientError, asyncio.TimeoutError, RuntimeError) as error:
                logger.warning("could not delete session %s: %s", base_url, error)
    samples = [_sample(sample, trajectory, returned or {})
               for trajectory in collected["samples"]]
    if not samples:
        logger.warning("%s: the agent made no model call for sample %s/%s; it is dropped",
                       AGENT_FLAG, sample.group_index, sample.index)
        aborted = copy.deepcopy(sample)
        aborted.status = Status.ABORTED
        return aborted
    return samples[0] if len(samples) == 1 else samples


def request_kwargs(sampling_params: dict) -> dict:
    """The rollout's sampling params (SGLang's names) as chat-completion fields: renamed
    where OpenAI's names differ, None values and fields the chat route does not take
    left out."""
    renamed = {_CHAT_NAMES.get(name, name): value for name, value in sampling_params.items()
               if value is not None}
    return {name: value for name, value in renamed.items()
            if name in CHAT_FIELDS and name not in ("messages", "model")}


def openai_client_kwargs(request_kwargs: dict) -> dict:
    """`request_kwargs` as keywords of OpenAI's client (`client.chat.completions.create(
    model=..., messages=..., **openai_client_kwargs(request_kwargs))`): its own
    parameters as keywords, the others (top_k, stop_token_ids...) in `extra_body`."""
    own = {name: value for name, value in request_kwargs.items() if name in _OPENAI_CLIENT}
    extra = {name: value for name, value in request_kwargs.items() if name not in own}
    return {**own, "extra_body": extra} if extra else own


def _sample(sample: Sample, trajectory: dict, agent_metadata: dict) -> Sample:
    """One of the session's trajectories as a Sample of the input's prompt and group (a
    copy of the input, so attributes hooks added to it stay)."""
    trained = copy.deepcopy(sample)
    trained.tokens, trained.response = trajectory["tokens"], trajectory["response"]
    trained.response_length = trajectory["response_length"]
    trained.loss_mask = trajectory["loss_mask"]
    trained.rollout_log_probs = trajectory["rollout_log_probs"]
    trained.status = Status(trajectory["status"])
    trained.weight_versions = list(trajectory["weight_versions"])
    trained.metadata = {**trained.metadata, **trajectory["metadata"],
                        **copy.deepcopy(agent_metadata)}
    if trajectory.get("rollout_routed_experts") is not None:  # routing replay
        tokens, _, top_k = trajectory["routed_experts_shape"]
        trained.rollout_routed_experts = decode_routed_experts(
            trajectory["rollout_routed_experts"], tokens, top_k)
    return trained


async def _call(http: aiohttp.ClientSession, method: str, url: str,
                body: dict | None = None) -> dict:
    """A session call's JSON answer ({} for none); a RuntimeError with the server's answer
    on an HTTP error."""
    async with http.request(method, url, json=body) as answer:
        if answer.status >= 400:
            raise RuntimeError(f"{method} {url}: HTTP {answer.status}: "
                               f"{(await answer.text())[:500]}")
        return await answer.json() if answer.status != 204 else {}
