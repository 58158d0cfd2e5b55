"""EngineServer: SGLang's HTTP API over one furlong `Engine`, as an aiohttp application.

The server reaches the engine only through the `Engine` protocol plus `engine.model`
(vocabulary size, device, `/get_weights_by_name`). Its routes come from six places:
generation (generation.py), OpenAI's /v1 API (openai_routes.py), sessions of exact tokens
for agents (sessions.py), weights (weight_routes.py over a `WeightReceiver`), LoRA
adapters (lora_routes.py), and the health, cache, memory and model-info calls here. Bad
requests get HTTP 400 and `{"error": message}` naming the field (on the OpenAI paths in
OpenAI's shape, `{"error": {"message": ...}}`); failures inside the server get 500. With an
`api_key`, requests without `Authorization: Bearer KEY` get 401, as from SGLang
(furlong/engine/api_key.py); the health checks stay open.
"""
from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from furlong.engine.api_key import api_key_middleware
from furlong.engine.base import Engine, SamplingParams
from furlong.engine.server.request_fields import bad_request, field, json_body
from furlong.engine.server.generation import GenerationRoutes
from furlong.engine.server.lora_routes import LoraRoutes
from furlong.engine.server.openai_routes import OpenAIRoutes, is_openai_path, openai_errors
from furlong.engine.server.sessions import SessionRoutes
from furlong.engine.server.weight_routes import WeightRoutes
from furlong.engine.weights.group import WeightUpdateGroup
from furlong.engine.weights.receive import WeightReceiver

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 40  # serialized weights travel in request bodies


@web.middleware
async def only_generate_cancels(request: web.Request, handler):
    """With handler cancellation on, a client that disconnects cancels its handler: right
    for generation, /generate and the OpenAI routes (the engine aborts the request; a
    session records nothing), wrong for weight and memory calls, whose work (and group
    state) must finish whoever is still listening."""
    if request.path == "/generate" or is_openai_path(request.path):
        return await handler(request)
    return await asyncio.shield(handler(request))


@web.middleware
async def errors_as_json(request: web.Request, handler):
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception as error:
        logger.exception("%s %s failed", request.method, request.path)
        return web.json_response({"error": f"{type(error).__name__}: {error}"}, status=500)


class EngineServer:
    """SGLang's HTTP API over one engine. `build_app` gives the aiohttp application.
    `api_key`: requests must carry it as a Bearer token (None: the server is open).
    `accept_ipc_weights`: take CUDA IPC weight payloads (a trainer on the same GPU).
    `return_routed_experts`: /generate may return routes (--enable-return-routed-experts).
    `served_model_name`: the model id of /v1/models (default: `model_path`).
    `max_context_len`: prompt plus response, for the /v1 routes and sessions (default: the
    engine's `max_context_len`, else the model's max_position_embeddings).
    `tp_size`: the TP ranks of the engine this server stands in for (one weight payload
    each; on the CPU, for colocated engines of several devices)."""

    def __init__(self, engine: Engine, tokenizer, model_path: str,
                 tokenizer_path: str | None = None, health_timeout_s: float = 20.0,
                 weights_group_timeout_s: float = 600.0, accept_ipc_weights: bool = False,
                 api_key: str | None = None, return_routed_experts: bool = False,
                 served_model_name: str | None = None, max_context_len: int | None = None,
                 tp_size: int = 1):
        self.engine = engine
        self.api_key = api_key
        self.tokenizer_path = tokenizer_path or model_path
        self.health_timeout_s = health_timeout_s
        self.weights = WeightReceiver(engine, model_path, accept_ipc_weights,
                                      weights_group_timeout_s, tp_size)
        vocab_size = engine.model.config.vocab_size
        self.generation = GenerationRoutes(engine, tokenizer, vocab_size,
                                           lambda: self.weight_version, return_routed_experts)
        self.lora = LoraRoutes(engine, accept_ipc_weights, self.weights.tp_size)
        context = max_context_len or getattr(engine, "max_context_len", None) \
            or engine.model.config.max_position_embeddings
        self.openai = OpenAIRoutes(engine, tokenizer, vocab_size,
                                   served_model_name or model_path, context,
                                   adapters=self.lora.loaded)
        self.sessions = SessionRoutes(self.openai, return_routed_experts)

    @property
    def weight_version(self) -> int:
        return self.weights.weight_version

    @property
    def in_flight(self) -> dict[str, asyncio.Task]:
        """The engine calls of the /generate requests in flight, by rid."""
        return self.generation.in_flight

    @property
    def groups(self) -> dict[str, WeightUpdateGroup]:
        """The weight-update groups this server joined, by name."""
        return self.weights.groups

    def build_app(self) -> web.Application:
        # The key is checked first: a refused request reads no body and runs nothing.
        guard = [api_key_middleware(self.api_key)] if self.api_key else []
        app = web.Application(client_max_size=MAX_BODY_BYTES,
                              middlewares=[*guard, only_generate_cancels, openai_errors,
                                           errors_as_json])
        app.add_routes([
            *self.generation.routes(),
            *self.openai.routes(),
            *self.sessions.routes(),
            web.get("/health", self.health),
            web.get("/health_generate", self.health_generate),
            web.get("/flush_cache", self.flush_cache),
            web.post("/flush_cache", self.flush_cache),
            web.get("/get_model_info", self.get_model_info),
            *WeightRoutes(self.weights).routes(),
            *self.lora.routes(),
            web.post("/release_memory_occupation", self.release_memory_occupation),
            web.post("/resume_memory_occupation", self.resume_memory_occupation),
        ])
        app.on_cleanup.append(self._shutdown)
        return app

    def app_runner(self) -> web.AppRunner:
        """The app for a `web.TCPSite`, with `main`'s behaviour: a client that disconnects
        aborts its requests (as with SGLang)."""
        return web.AppRunner(self.build_app(), handler_cancellation=True)

    async def _shutdown(self, app: web.Application) -> None:
        self.weights.drop_groups()
        await self.engine.close()

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if await self.engine.health() else 503)

    async def health_generate(self, request: web.Request) -> web.Response:
        """200 when a one-token greedy generation finishes within the timeout, else 503."""
        try:
            await asyncio.wait_for(self.engine.generate(
                [0], SamplingParams(temperature=0.0, max_new_tokens=1)), self.health_timeout_s)
        except Exception as error:  # any failure means unhealthy
            logger.warning("/health_generate failed: %r", error)
            return web.json_response({"error": repr(error)}, status=503)
        return web.Response(status=200)

    async def flush_cache(self, request: web.Request) -> web.Response:
        await self.engine.flush_cache()
        return web.json_response({"success": True, "message": "Cache flushed."})

    async def get_model_info(self, request: web.Request) -> web.Response:
        return web.json_response({"model_path": self.weights.model_path,
                                  "tokenizer_path": self.tokenizer_path, "is_generation": True,
                                  "weight_version": str(self.weight_version)})

    async def release_memory_occupation(self, request: web.Request) -> web.Response:
        """Every tag at once: the Engine protocol releases all or nothing."""
        _check_tags(await json_body(request))
        await self.engine.release_memory()
        return web.json_response({"success": True})

    async def resume_memory_occupation(self, request: web.Request) -> web.Response:
        _check_tags(await json_body(request))
        await self.engine.resume_memory()
        return web.json_response({"success": True})


def _check_tags(body: dict) -> None:
    tags = field(body, "tags", list, [])
    if not all(isinstance(tag, str) for tag in tags):
        bad_request(f"tags must be a list of strings, got {tags!r}")
