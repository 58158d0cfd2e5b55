"""Built-in multi-turn generation with tools: token in, token out over the run's Engine.

A generate hook (`--custom-generate-function-path furlong.rollout.multi_turn:generate`,
Miles' `generate_hub.multi_turn`), configured by Miles' flags --generate-max-turns,
--generate-tool-specs-path, --generate-tool-call-parser and
--generate-execute-tool-function-path (tools.py). One sample, up to max-turns model turns:

  1. the engine samples a turn after the tokens so far; its tokens are appended exactly
     as sampled (loss mask 1, the engine's log-probs); never re-tokenised;
  2. the turn's text is parsed for tool calls; a turn without any ends the sample;
  3. the calls run, and the chat template renders their tool messages after the token
     that closed the turn (chat_template.continuation_ids: only the new messages are
     tokenised, so earlier turns keep their sampled tokens); those tokens are appended
     with loss mask 0 and log-prob 0, and the next turn starts.

The prompt: a list of messages is rendered with the tool specs (as Miles does); a string
prompt keeps the tokens the data loader made (its chat template and --tool-key tools).
Turn t samples with seed + t (t from 0), so turns of one sample draw different noise.
Each turn may use max_new_tokens (Miles: the budget is per turn), capped by the context:
--rollout-max-context-len, else the engine's context length.

How a sample ends (metadata["finish_reason"], and the status):
  "stop"       the model answered without a tool call (COMPLETED); also a turn stopped by
               a stop string or token that is not its end-of-turn token, after which the
               conversation cannot continue in the sampled tokens;
  "length"     a turn hit max_new_tokens or the context, or the tool replies leave no
               room for another turn (TRUNCATED; the replies are then not appended);
  "max_turns"  --generate-max-turns turns, the last still calling tools (TRUNCATED; its
               calls are not run);
  "abort"      the engine aborted a turn (ABORTED: the sample comes back as it came, to
               be generated again from its prompt).
metadata also holds "messages" (the prompt's messages when it is a list, then each turn
and tool message), "num_turns" and "tool_call_parse_errors" (the session samples' keys).
"""
from __future__ import annotations

import copy
import dataclasses

from furlong.engine.base import GenerateOutput, SamplingParams
from furlong.engine.server import chat_template
from furlong.rollout.generate import max_context_len
from furlong.rollout.tools import ToolSetup, run_tool_calls
from furlong.sample import Sample, Status

_SEED_RANGE = 1 << 63


async def generate(args, sample: Sample, sampling_params: dict,
                   evaluation: bool = False) -> Sample:
    tools = ToolSetup.load(args.generate_tool_specs_path, args.generate_tool_call_parser,
                           args.generate_execute_tool_function_path)
    max_turns = args.generate_max_turns
    if not (isinstance(max_turns, int) and max_turns >= 1):
        raise ValueError(f"--generate-max-turns must be an integer >= 1, got {max_turns!r}")
    template_kwargs = args.apply_chat_template_kwargs or {}
    tokenizer = args.tokenizer
    turns = _Turns(copy.deepcopy(sample), tools.specs, tokenizer, template_kwargs,
                   _context_limit(args, evaluation))
    base = SamplingParams.from_dict(sampling_params)
    routes = {"return_routed_experts": True} if args.use_rollout_routing_replay else {}
    while True:
        params = turns.params(base)
        if params is None:
            return turns.finish("length", Status.TRUNCATED)
        output = await args.engine.generate(turns.tokens, params, **routes)
        if output.finish_reason == "abort":
            return _aborted(sample)
        turns.append_turn(output)
        parsed = tools.parse(output.text)
        end_token = chat_template.closing_token(tokenizer, output.output_ids,
                                                output.finish_reason)
        if output.finish_reason == "length":
            return turns.finish("length", Status.TRUNCATED, output.text)
        if not (parsed.tool_calls or parsed.errors) or end_token is None:
            return turns.finish("stop", Status.COMPLETED, output.text)
        if turns.num_turns == max_turns:
            return turns.finish("max_turns", Status.TRUNCATED, output.text)
        assistant, replies = await run_tool_calls(parsed, tools.execute)
        turns.num_errors += len(replies) - len(assistant.get("tool_calls", ()))
        if not turns.append_replies(assistant, replies, end_token, base.skip_special_tokens):
            return turns.finish("length", Status.TRUNCATED)


class _Turns:
    """The sample being built: its tokens and per-token fields, the conversation (for
    the chat template), and how it ends."""

    def __init__(self, sample: Sample, tool_specs: list[dict] | None, tokenizer,
                 template_kwargs: dict, context_limit: int | None):
        self.sample = sample
        self.tool_specs, self.tokenizer = tool_specs, tokenizer
        self.template_kwargs = template_kwargs
        self.context_limit = context_limit
        # The conversation so far. A string prompt stands as one user message: the
        # template renders only what follows a response from it (continuation_ids).
        listed = isinstance(sample.prompt, list)
        self.messages = list(sample.prompt) if listed else [
            {"role": "user", "content": sample.prompt}]
        self.recorded_from = 0 if listed else 1  # metadata["messages"] starts here
        if listed and tool_specs:
            self.tokens = chat_template.prompt_ids(tokenizer, self.messages, tool_specs,
                                                   template_kwargs)
        else:
            self.tokens = sample.tokens[:sample.prompt_length]
        self.prompt_length = len(self.tokens)
        self.loss_mask: list[int] = []
        self.log_probs: list[float] = []
        self.response = ""
        self.weight_versions: list[str] = []
        self.routed_experts = None
        self.num_turns = 0
        self.num_errors = 0

    def params(self, base: SamplingParams) -> SamplingParams | None:
        """The next turn's sampling params: max_new_tokens within the context, the seed
        offset by the turn; None when the context leaves no room."""
        max_new_tokens = base.max_new_tokens
        if self.context_limit is not None:
            max_new_tokens = min(max_new_tokens, self.context_limit - len(self.tokens))
        if max_new_tokens <= 0:
            return None
        seed = base.sampling_seed
        if seed is not None:
            seed = (seed + self.num_turns) % _SEED_RANGE
        return dataclasses.replace(base, max_new_tokens=max_new_tokens, sampling_seed=seed)

    def append_turn(self, output: GenerateOutput) -> None:
        """The model's turn, its tokens as sampled."""
        self.tokens += output.output_ids
        self.loss_mask += [1] * len(output.output_ids)
        self.log_probs += list(output.output_log_probs)
        self.response += output.text
        self.weight_versions.append(str(output.weight_version))
        if output.routed_experts is not None or output.output_ids:
            self.routed_experts = output.routed_experts  # the last call's cover every token
        self.num_turns += 1

    def append_replies(self, assistant: dict, replies: list[dict], end_token: int,
                       skip_special_tokens: bool) -> bool:
        """The tool replies to the turn `assistant`, as the template writes them after
        `end_token` (with the next generation prompt); False, nothing appended, when
        they would leave no room for another turn."""
        ids = chat_template.continuation_ids(self.tokenizer, self.messages + [assistant],
                                             replies, end_token, self.tool_specs,
                                             self.template_kwargs)
        if ids is None:
            raise ValueError(
                f"multi-turn generation: the chat template does not write the token "
                f"{self.tokenizer.decode([end_token])!r} that closed the model's turn after "
                "an assistant message, so tool replies cannot follow the sampled tokens; "
                "use a template that ends assistant turns with the model's end-of-turn token")
        self.messages.append(assistant)
        if self.context_limit is not None and len(self.tokens) + len(ids) >= self.context_limit:
            return False
        self.messages += replies
        self.tokens += ids
        self.loss_mask += [0] * len(ids)
        self.log_probs += [0.0] * len(ids)
        self.response += self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        return True

    def finish(self, reason: str, status: Status, last_text: str | None = None) -> Sample:
        """The sample, ending with the turn whose text is `last_text` (None: the last
        turn is already in the conversation)."""
        if last_text is not None:
            self.messages.append({"role": "assistant", "content": last_text})
        sample = self.sample
        sample.tokens = self.tokens
        sample.response = self.response
        sample.response_length = len(self.tokens) - self.prompt_length
        sample.loss_mask = self.loss_mask
        sample.rollout_log_probs = self.log_probs
        sample.weight_versions = self.weight_versions
        sample.rollout_routed_experts = self.routed_experts
        sample.status = status
        sample.metadata.update({"messages": self.messages[self.recorded_from:],
                                "finish_reason": reason, "num_turns": self.num_turns,
                                "tool_call_parse_errors": self.num_errors})
        return sample


def _context_limit(args, evaluation: bool) -> int | None:
    """The run's context limit (generate.max_context_len), else the engine's context
    length (None: neither)."""
    return max_context_len(args, evaluation) or getattr(args.engine, "max_context_len", None)


def _aborted(sample: Sample) -> Sample:
    """The sample as it came, marked aborted: generated again from its prompt."""
    aborted = copy.deepcopy(sample)
    aborted.status = Status.ABORTED
    return aborted
