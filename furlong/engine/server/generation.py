"""The server's /generate and /abort_request: prompts in, SGLang-shaped results out.

Each prompt of a request is one `engine.generate` call, and the engine batches the calls
in flight. A request's calls are known by their `rid` until they finish, so an abort by
rid reaches them; a client that disconnects cancels them (the engine aborts). `lora_path`
names each prompt's LoRA adapter (loaded through lora_routes.py); a name the engine
does not hold is a 400 naming it. `return_logprob` with `logprob_start_len` >= 0 also
scores each prompt (`input_token_logprobs`, engine/scoring.py), which with
`max_new_tokens` 0 is how a teacher server answers on-policy distillation.
"""
from __future__ import annotations

import asyncio
from typing import Callable

from aiohttp import web

from furlong.engine.base import Engine, GenerateOutput
from furlong.engine.server.request_fields import (GENERATE_FIELDS, bad_request, field,
                                                  generate_item, json_body, lora_paths,
                                                  parse_batch_sampling_params, request_ids,
                                                  token_ids)


class GenerationRoutes:
    """/generate and /abort_request over `engine`. `weight_version()`: the version an
    output aborted by rid reports. `return_routed_experts`: requests may ask for the
    routes (SGLang's --enable-return-routed-experts)."""

    def __init__(self, engine: Engine, tokenizer, vocab_size: int,
                 weight_version: Callable[[], int], return_routed_experts: bool = False):
        self.engine = engine
        self.return_routed_experts = return_routed_experts
        self.tokenizer = tokenizer
        self.weight_version = weight_version
        self.vocab_size = vocab_size  # bounds the token ids of requests
        self.in_flight: dict[str, asyncio.Task] = {}  # rid -> its engine call

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/generate", self.generate),
                web.post("/abort_request", self.abort_request)]

    async def generate(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        unknown = set(body) - GENERATE_FIELDS
        if unknown:
            bad_request(f"unknown fields {sorted(unknown)}; known: {sorted(GENERATE_FIELDS)}")
        if field(body, "stream", bool, False):
            bad_request("stream: streaming is not supported; leave it out")
        prompts, batched = self._prompts(body)
        params = parse_batch_sampling_params(body.get("sampling_params"), len(prompts), batched)
        rids = request_ids(body.get("rid"), len(prompts), batched)
        return_logprob = field(body, "return_logprob", bool, False)
        routes = field(body, "return_routed_experts", bool, False)
        if routes and not self.return_routed_experts:
            bad_request("return_routed_experts: start the server with "
                        "--enable-return-routed-experts")
        adapters = lora_paths(body.get("lora_path"), len(prompts), batched)
        start = field(body, "logprob_start_len", int, -1)
        if return_logprob and start >= 0:
            inputs = await self._input_log_probs(prompts, start, adapters)
        else:
            inputs = [None] * len(prompts)
        tasks = [asyncio.ensure_future(self.engine.generate(ids, p, **_options(routes, lora)))
                 for ids, p, lora in zip(prompts, params, adapters, strict=True)]
        self.in_flight.update(zip(rids, tasks, strict=True))
        try:
            await asyncio.wait(tasks)
        finally:  # also when the client went away: the engine aborts what is left
            for rid, task in zip(rids, tasks, strict=True):
                task.cancel()
                if self.in_flight.get(rid) is task:
                    del self.in_flight[rid]
        items = [generate_item(self._outcome(task, len(ids)), rid, return_logprob, scored)
                 for task, ids, rid, scored in zip(tasks, prompts, rids, inputs, strict=True)]
        return web.json_response(items if batched else items[0])

    async def _input_log_probs(self, prompts: list[list[int]], start: int,
                               adapters: list[str | None]) -> list[list[list]]:
        """SGLang's input_token_logprobs of each prompt from position `start`: [log-prob,
        token id, None] per token, the log-prob of the first token None (nothing precedes
        it). The base model scores (a teacher for on-policy distillation)."""
        if any(adapter is not None for adapter in adapters):
            bad_request("logprob_start_len: input log-probs are the base model's; leave "
                        "out lora_path")
        for index, ids in enumerate(prompts):
            if start >= len(ids):
                bad_request(f"logprob_start_len {start} must be below the length of prompt "
                            f"{index} ({len(ids)} tokens)")
        score = getattr(self.engine, "score", None)
        if score is None:
            bad_request("logprob_start_len: this engine does not score prompts; ask a furlong "
                        "engine server or SGLang for input log-probs")
        scores = await asyncio.gather(*(score(ids) for ids in prompts),
                                      return_exceptions=True)
        refused = next((error for error in scores if isinstance(error, ValueError)), None)
        if refused is not None:
            bad_request(f"logprob_start_len: {refused}")
        failed = next((error for error in scores if isinstance(error, BaseException)), None)
        if failed is not None:
            raise failed
        return [[[None if i == 0 else values[i - 1], ids[i], None]
                 for i in range(start, len(ids))]
                for ids, values in zip(prompts, scores, strict=True)]

    def _outcome(self, task: asyncio.Task, prompt_tokens: int) -> GenerateOutput:
        """The engine's output, or an empty 'abort' one for a request aborted by rid; a
        request the engine refused (an unknown lora_path) is a 400 with its message."""
        if task.cancelled():
            return GenerateOutput([], [], "abort", "", prompt_tokens, self.weight_version())
        try:
            return task.result()
        except ValueError as error:
            bad_request(str(error))

    def _prompts(self, body: dict) -> tuple[list[list[int]], bool]:
        """(token ids of each prompt, whether the request is a batch)."""
        if (body.get("input_ids") is None) == (body.get("text") is None):
            bad_request("give exactly one of input_ids (token ids) and text")
        text = body.get("text")
        if isinstance(text, str):
            return [token_ids(self.tokenizer.encode(text), "text", self.vocab_size)], False
        if text is not None:
            if not (isinstance(text, list) and text and all(isinstance(t, str) for t in text)):
                bad_request(f"text must be a string or a non-empty list of strings, got {text!r}")
            return [token_ids(self.tokenizer.encode(t), f"text[{i}]", self.vocab_size)
                    for i, t in enumerate(text)], True
        ids = body["input_ids"]
        if isinstance(ids, list) and ids and all(isinstance(row, list) for row in ids):
            return [token_ids(row, f"input_ids[{i}]", self.vocab_size)
                    for i, row in enumerate(ids)], True
        return [token_ids(ids, "input_ids", self.vocab_size)], False

    async def abort_request(self, request: web.Request) -> web.Response:
        """{"abort_all": true}: every request, with the tokens made so far. {"rid": ID}:
        that request (or none if it already finished), which returns 'abort' empty."""
        body = await json_body(request)
        if field(body, "abort_all", bool, False):
            await self.engine.abort_all()
        elif isinstance(body.get("rid"), str):
            task = self.in_flight.get(body["rid"])
            if task is not None:
                task.cancel()
        else:
            bad_request('send {"abort_all": true} or {"rid": "<id of a /generate request>"}')
        return web.json_response({"success": True})


def _options(return_routed_experts: bool, lora_path: str | None) -> dict:
    """Engine.generate's optional arguments, given only when set (an engine without
    routes or adapters takes the plain call)."""
    options = {"return_routed_experts": True} if return_routed_experts else {}
    return options | ({"lora_path": lora_path} if lora_path is not None else {})
