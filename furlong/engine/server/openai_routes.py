"""OpenAI's API over any `Engine`: /v1/models, /v1/completions, /v1/chat/completions.

The server renders chat messages (and `tools`) with the tokenizer's chat template, asks
the engine for token ids and log-probs (`Engine.generate`, one call per choice), and lays
the outputs out as OpenAI responses (openai_response.py), whole or streamed. Tool calls
are parsed from the text when the request gives tools (tool_calls.py). Prompts longer
than the context limit get a 400 that says so; a response may use the rest of the
context (`max_tokens` caps it). A request whose `model` is the name of a loaded LoRA
adapter samples with it (as vLLM and SGLang select adapters); /v1/models lists the
adapters after the base model. Sessions (sessions.py) reuse these steps.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time

from aiohttp import web

from furlong.engine.base import Engine, GenerateOutput, SamplingParams
from furlong.engine.server import chat_template
from furlong.engine.server import openai_response as response
from furlong.engine.server.openai_request import (ChatRequest, chat_request,
                                                  completion_request)
from furlong.engine.server.request_fields import bad_request, json_body, token_ids


class OpenAIRoutes:
    """The /v1 routes over `engine`; `model_name` is the id /v1/models lists;
    `max_context_len` bounds prompt plus response; `adapters`: the loaded LoRA adapters
    by name (a live view, kept by lora_routes.py)."""

    def __init__(self, engine: Engine, tokenizer, vocab_size: int, model_name: str,
                 max_context_len: int, adapters: dict[str, str] | None = None):
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.adapters = {} if adapters is None else adapters
        self.max_context_len = max_context_len
        self.vocab_size = vocab_size
        self.created = int(time.time())

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/v1/models", self.models),
                web.post("/v1/completions", self.completions),
                web.post("/v1/chat/completions", self.chat_completions)]

    async def models(self, request: web.Request) -> web.Response:
        base = {"object": "model", "created": self.created, "owned_by": "furlong",
                "root": self.model_name, "max_model_len": self.max_context_len}
        return web.json_response({"object": "list", "data": [
            {"id": self.model_name, **base},
            *({"id": name, **base, "root": source, "parent": self.model_name}
              for name, source in self.adapters.items())]})

    def adapter_of(self, body: dict) -> str | None:
        """The LoRA adapter a request's `model` names; None (the base model) otherwise."""
        model = body.get("model")
        return model if isinstance(model, str) and model in self.adapters else None

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await json_body(request)
        chat = chat_request(body)
        prompt = self.chat_prompt_ids(chat.messages, chat)
        outputs = await self.generate(prompt, self._fitting(chat.params, chat.max_tokens,
                                                            len(prompt)), chat.output.n,
                                      self.adapter_of(body))
        return await self.send_chat(request, prompt, self.chat_choices(outputs, chat), chat)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await json_body(request)
        completion = completion_request(body)
        n = completion.output.n
        prompts = self._completion_prompts(completion.prompt)
        lora_path = self.adapter_of(body)
        per_prompt = await asyncio.gather(*(
            self.generate(ids, self._fitting(completion.params, completion.max_tokens, len(ids)),
                          n, lora_path) for ids in prompts))
        choices = [response.completion_choice(self.tokenizer, i * n + j, output,
                                              completion.output)
                   for i, outputs in enumerate(per_prompt) for j, output in enumerate(outputs)]
        header = response.Header.new("cmpl", self.model_name)
        if completion.output.stream:
            return await stream_events(request, response.completion_chunks(
                header, choices, prompts, completion.output))
        return web.json_response(response.completion(header, choices, prompts,
                                                     completion.output))

    # ---- the steps sessions share -----------------------------------------------------------

    def chat_prompt_ids(self, messages: list[dict], chat: ChatRequest) -> list[int]:
        """`messages` rendered with the request's tools, ending with the generation prompt."""
        try:
            return chat_template.prompt_ids(self.tokenizer, messages, chat.tools,
                                            chat.template_kwargs)
        except ValueError as error:
            bad_request(str(error))

    def sampling(self, params: SamplingParams, max_tokens: int | None,
                 prompt_length: int) -> SamplingParams | None:
        """`params` with max_new_tokens = max_tokens, capped by what the context has left;
        None when the prompt leaves no room."""
        room = self.max_context_len - prompt_length
        if room <= 0:
            return None
        return dataclasses.replace(params, max_new_tokens=min(max_tokens or room, room))

    def _fitting(self, params: SamplingParams, max_tokens: int | None,
                 prompt_length: int) -> SamplingParams:
        fitted = self.sampling(params, max_tokens, prompt_length)
        if fitted is None:
            bad_request(f"This model's maximum context length is {self.max_context_len} "
                        f"tokens; the prompt has {prompt_length}. Shorten the messages")
        return fitted

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       n: int, lora_path: str | None = None,
                       return_routed_experts: bool = False) -> list[GenerateOutput]:
        """n responses (with the adapter `lora_path`, if any; with their MoE routes if
        asked); with a seed, response i samples with seed + i. Cancelling (the client went
        away) aborts them in the engine."""
        seeds = [None if params.sampling_seed is None else params.sampling_seed + i
                 for i in range(n)]
        options = {} if lora_path is None else {"lora_path": lora_path}
        if return_routed_experts:
            options["return_routed_experts"] = True
        tasks = [asyncio.ensure_future(self.engine.generate(
            prompt_ids, dataclasses.replace(params, sampling_seed=seed), **options))
            for seed in seeds]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()

    def chat_choices(self, outputs: list[GenerateOutput],
                     chat: ChatRequest) -> list[response.Choice]:
        return [response.chat_choice(self.tokenizer, i, output, chat.parse_tool_calls,
                                     chat.output) for i, output in enumerate(outputs)]

    async def send_chat(self, request: web.Request, prompt_ids: list[int],
                        choices: list[response.Choice], chat: ChatRequest) -> web.StreamResponse:
        header = response.Header.new("chatcmpl", self.model_name)
        if chat.output.stream:
            return await stream_events(request, response.chat_chunks(header, choices,
                                                                     prompt_ids, chat.output))
        return web.json_response(response.chat_completion(header, choices, prompt_ids,
                                                          chat.output))

    def _completion_prompts(self, prompt) -> list[list[int]]:
        """A string, a list of ids, or a list of either -> the ids of each prompt."""
        batch = prompt if isinstance(prompt, list) and prompt and \
            all(isinstance(p, (str, list)) for p in prompt) else [prompt]
        prompts = []
        for i, item in enumerate(batch):
            name = "prompt" if batch is not prompt else f"prompt[{i}]"
            if isinstance(item, str):
                item = self.tokenizer.encode(item)
            prompts.append(token_ids(item, name, self.vocab_size))
        return prompts


def is_openai_path(path: str) -> bool:
    """/v1/... and a session's /sessions/{id}/v1/..."""
    return path.startswith("/v1/") or (path.startswith("/sessions/") and "/v1/" in path)


_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                404: "not_found_error"}


@web.middleware
async def openai_errors(request: web.Request, handler):
    """Errors of the OpenAI paths in OpenAI's shape, `{"error": {"message": ...}}`, which
    OpenAI's clients show (the other routes keep SGLang's `{"error": message}`)."""
    try:
        answer = await handler(request)
    except web.HTTPException as error:
        if not is_openai_path(request.path) or error.status < 400:
            raise
        answer = error
    if not is_openai_path(request.path) or answer.status < 400:
        return answer
    try:
        message = json.loads(answer.text)["error"]
    except (TypeError, ValueError, KeyError):
        message = answer.text or answer.reason
    return web.json_response({"error": {
        "message": message, "type": _ERROR_TYPES.get(answer.status, "server_error"),
        "param": None, "code": answer.status}}, status=answer.status)


async def stream_events(request: web.Request, chunks: list[dict]) -> web.StreamResponse:
    """Server-sent events: one `data: {json}` per chunk, then `data: [DONE]`."""
    stream = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                         "Cache-Control": "no-cache"})
    await stream.prepare(request)
    for chunk in chunks:
        await stream.write(f"data: {json.dumps(chunk)}\n\n".encode())
    await stream.write(b"data: [DONE]\n\n")
    await stream.write_eof()
    return stream
