"""One linear trajectory of a session: the exact tokens of a multi-turn conversation.

A trajectory holds the token ids the model saw and sampled, turn after turn: the first
prompt, each response exactly as sampled (never re-tokenised), and between responses the
template tokens of the messages appended (tool results, user turns). The loss mask is 1
on sampled tokens only; the log-probs are the engine's, 0 where not sampled. Pure data
and functions: the session routes (sessions.py) decide when a request extends a
trajectory and when it starts a new one.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from furlong.engine.base import GenerateOutput
from furlong.engine.server.request_fields import encode_routed_experts
from furlong.sample import Status

# The message keys a chat template reads: two messages equal in these render the same.
_TEMPLATE_KEYS = ("role", "content", "reasoning_content", "name", "tool_call_id")


@dataclass
class Trajectory:
    prompt_length: int              # ids of the first prompt; the response is the rest
    messages: list[dict] = field(default_factory=list)  # the conversation as recorded
    tokens: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)    # per token: 1 where sampled
    log_probs: list[float] = field(default_factory=list)  # per token: 0 where not sampled
    finish_reason: str = "stop"     # of the last turn ("length" when cut by a limit)
    # The last sampled token when it closed the turn (an end-of-turn token): only then
    # can the conversation go on in this trajectory.
    end_token: int | None = None
    tools: list | None = None       # the last turn's tools and template kwargs, to
    template_kwargs: dict = field(default_factory=dict)  # re-render the conversation
    weight_versions: list[int] = field(default_factory=list)
    num_turns: int = 0
    num_tool_call_errors: int = 0
    # The last turn's MoE routes, when the engine returned them: (tokens - 1, layers, k)
    routed_experts: torch.Tensor | None = None

    def extends(self, messages: list[dict]) -> bool:
        """Whether `messages` continue this trajectory: its conversation, unchanged,
        followed by new messages, after a response that ended its turn."""
        return self.end_token is not None and len(messages) >= len(self.messages) and all(
            same_message(a, b)
            for a, b in zip(self.messages, messages[:len(self.messages)], strict=True))

    def record(self, new_messages: list[dict], context_ids: list[int], output: GenerateOutput,
               response: dict, end_token: int | None, num_tool_call_errors: int = 0,
               tools: list | None = None, template_kwargs: dict | None = None) -> None:
        """One turn: the messages the request added and their template ids
        (`context_ids`: the whole prompt in a new trajectory), then the response; the
        turn's tools and template kwargs render the conversation from now on."""
        self.tools, self.template_kwargs = tools, template_kwargs or {}
        self.messages += [*new_messages, response]
        self.tokens += [*context_ids, *output.output_ids]
        self.loss_mask += [0] * len(context_ids) + [1] * len(output.output_ids)
        self.log_probs += [0.0] * len(context_ids) + list(output.output_log_probs)
        self.finish_reason = output.finish_reason
        self.end_token = end_token
        self.weight_versions.append(output.weight_version)
        self.num_turns += 1
        self.num_tool_call_errors += num_tool_call_errors
        if output.routed_experts is not None:  # its prompt was every earlier token
            self.routed_experts = output.routed_experts

    def cut_by_limit(self) -> None:
        """The next turn did not fit the context: the trajectory ends truncated here."""
        self.finish_reason, self.end_token = "length", None

    def sample(self, tokenizer, retokenize_mismatch_tokens: int,
               max_seq_len: int | None = None) -> dict:
        """The training sample (Miles' field names; `metadata` holds the rest). With
        `max_seq_len`, tokens beyond it are cut and the sample is truncated. Recorded routes
        go as SGLang sends them (`rollout_routed_experts`, base64 of int32) with their
        shape (`routed_experts_shape`)."""
        end = len(self.tokens) if max_seq_len is None else min(len(self.tokens), max_seq_len)
        finish = "length" if end < len(self.tokens) else self.finish_reason
        routes = {} if self.routed_experts is None else {
            "rollout_routed_experts": encode_routed_experts(self.routed_experts[:end - 1]),
            "routed_experts_shape": list(self.routed_experts[:end - 1].shape)}
        return {**routes,
            "tokens": self.tokens[:end],
            "response": tokenizer.decode(self.tokens[self.prompt_length:end],
                                         skip_special_tokens=False),
            "response_length": max(0, end - self.prompt_length),
            "loss_mask": self.loss_mask[self.prompt_length:end],
            "rollout_log_probs": self.log_probs[self.prompt_length:end],
            "status": Status.from_finish_reason(finish).value,
            "weight_versions": [str(version) for version in self.weight_versions],
            "metadata": {"messages": self.messages, "finish_reason": finish,
                         "num_turns": self.num_turns,
                         "retokenize_mismatch_tokens": retokenize_mismatch_tokens,
                         "tool_call_parse_errors": self.num_tool_call_errors},
        }


def same_message(recorded: dict, given: dict) -> bool:
    """Whether a client's copy of a message renders as the recorded one: equal in the
    keys templates read (no content equals empty content), tool calls equal in function
    name and arguments (their ids and JSON spacing aside)."""
    for key in _TEMPLATE_KEYS:
        a, b = recorded.get(key), given.get(key)
        if key == "content":
            a, b = a or "", b or ""
        if a != b:
            return False
    return _calls(recorded) == _calls(given)


def _calls(message: dict) -> list[tuple]:
    calls = []
    for call in message.get("tool_calls") or []:
        function = call.get("function", call) if isinstance(call, dict) else {}
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass
        calls.append((function.get("name"), arguments))
    return calls
