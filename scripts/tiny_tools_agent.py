"""An agent for the tiny tool-use task, written as any OpenAI-API agent is (docs/agents.md).

`--custom-generate-function-path furlong.rollout.agentic:generate
--custom-agent-function-path tiny_tools_agent:agent` (scripts/ on PYTHONPATH; needs the
`openai` package). The model's `lookup` calls are answered by furlong.tiny.execute_tool,
at most MAX_TURNS model turns, as `furlong.rollout.multi_turn` does with
--generate-max-turns 2: at temperature 0 both give the same tokens.
"""
from __future__ import annotations

import json

import openai

from furlong.rollout.agentic import openai_client_kwargs
from furlong.tiny import TOOL_SPECS, execute_tool

MAX_TURNS = 2


async def agent(base_url: str, prompt, request_kwargs: dict, metadata: dict) -> dict:
    """Ask; answer the model's tool calls; ask again. Returns how many lookups it ran,
    which the reward function finds in the sample's metadata."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    num_lookups = 0
    async with openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="none") as client:
        for turn in range(MAX_TURNS):
            reply = await client.chat.completions.create(
                model="tiny", messages=messages, tools=TOOL_SPECS,
                **openai_client_kwargs(request_kwargs))
            message = reply.choices[0].message
            if not message.tool_calls or turn == MAX_TURNS - 1:
                break
            messages.append(message.model_dump(exclude_none=True))
            for call in message.tool_calls:
                try:
                    arguments = json.loads(call.function.arguments)
                except json.JSONDecodeError:
                    arguments = None  # execute_tool answers "error"
                result = await execute_tool(call.function.name, arguments)
                messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
                num_lookups += 1
    return {"num_lookups": num_lookups}
