"""RouterFront: the SGLang router that hooks written for Miles post to, over the run's engine.

Miles' hooks generate by posting SGLang requests to
`http://{args.sglang_router_ip}:{args.sglang_router_port}/generate`. In a furlong run the
rollout's engine is an `Engine` object (in this process, or the EngineRouter over engine
servers under Ray), so the run serves SGLang's generation routes over that same engine on
127.0.0.1: /generate and /abort_request (engine/server/generation.py, as furlong's engine
server answers them), OpenAI's /v1 routes and the agent sessions of exact tokens
(/sessions..., engine/server/openai_routes.py and sessions.py: what a custom agent talks
to) and /health. Requests through it share the engine with the
manager's own: batched together, counted by the same limits, and reached by the abort
that ends a rollout. Weight updates and memory release are not served: the loop owns
them, and a hook must not change the engine behind it.

Event loops: an engine serves the event loop that calls it first (the HF engine's
batching task, the EngineRouter's semaphores and health monitor, the futures of the
fast engine's thread), which is the loop the run's `loop.train` runs in. The front is
served by that loop (`start` and `stop` are awaited in it), so the engine is called from
its own loop whatever the client: a coroutine of the loop, a sync hook in its own thread
(furlong.hooks.call_hook), or a loop of the hook's own.

The listening socket is bound when the front is made, before hooks learn the port: no
other process can take the port between choosing and serving it.

--sglang-router-ip/--sglang-router-port (Miles: a router it then does not start) name a
router of the user's: hooks get that address and no front is served (`given_router`).
"""
from __future__ import annotations

import socket

from aiohttp import web

from furlong.config.groups import SglangArgs
from furlong.engine.base import Engine
from furlong.engine.server.app import errors_as_json
from furlong.engine.server.generation import GenerationRoutes
from furlong.engine.server.openai_routes import OpenAIRoutes, openai_errors
from furlong.engine.server.sessions import SessionRoutes

HOST = "127.0.0.1"  # hooks run in the process of the rollout manager


def given_router(sglang: SglangArgs) -> tuple[str, int] | None:
    """(ip, port) of --sglang-router-ip/--sglang-router-port, None when neither is given."""
    ip, port = sglang.passthrough_value("router-ip"), sglang.passthrough_value("router-port")
    if ip is None and port is None:
        return None
    if ip is None or port is None or not port.isdigit():
        raise ValueError(f"--sglang-router-ip {ip} --sglang-router-port {port}: give both, an "
                         "address and a port number, to have hooks use your router; or "
                         "neither, and furlong serves one over the run's engine")
    return ip, int(port)


class RouterFront:
    """SGLang's /generate, /abort_request and /health, OpenAI's /v1 routes and sessions
    over `engine`, on 127.0.0.1 at `port`. `vocab_size` bounds the token ids of requests
    (given: an EngineRouter has no model in this process); `model_name` is the id /v1/models
    lists, `max_context_len` bounds prompt plus response on the /v1 routes;
    `return_routed_experts`: requests may ask for the routes, and sessions record them."""

    def __init__(self, engine: Engine, tokenizer, vocab_size: int, model_name: str,
                 max_context_len: int, return_routed_experts: bool = False):
        self.engine = engine
        self._socket = socket.create_server((HOST, 0))
        self.host, self.port = HOST, self._socket.getsockname()[1]
        self.generation = GenerationRoutes(
            engine, tokenizer, vocab_size, lambda: getattr(engine, "weight_version", None) or 0,
            return_routed_experts)
        self.openai = OpenAIRoutes(engine, tokenizer, vocab_size, model_name, max_context_len)
        self.sessions = SessionRoutes(self.openai, return_routed_experts)
        self._runner: web.AppRunner | None = None

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    async def start(self) -> None:
        """Serve, from the running event loop (the one that calls the engine)."""
        app = web.Application(middlewares=[openai_errors, errors_as_json])
        app.add_routes([*self.generation.routes(), *self.openai.routes(),
                        *self.sessions.routes(), web.get("/health", self.health)])
        # A client that disconnects cancels its /generate: the engine aborts the request.
        # No access log: a line per hook request would drown the run's own.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        await web.SockSite(self._runner, self._socket).start()

    async def stop(self) -> None:
        """Stop serving (requests in flight are cancelled) and free the port."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._socket.close()

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if await self.engine.health() else 503)

