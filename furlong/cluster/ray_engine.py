"""Engines as Ray actors, each serving SGLang's HTTP API from its own process.

Two kinds: an EngineActor runs the built-in engine and its server in the actor; a
ServerHost starts an SGLang (or furlong) server process on the engine's GPUs (all of
them: a colocated engine of N GPUs sits on the trainer bundle of its first one, and its
server sees exactly its N devices).

An EngineActor builds the built-in engine on the devices Ray gave it and runs the
furlong engine server (furlong/engine/server/) in its event loop; the driver talks to
all of them through one EngineRouter, exactly as it would to SGLang servers. On a
machine without GPUs it stands in for a colocated engine of N devices as its TP rank 0
(one payload per TP rank in each tensor request). Trainer ranks push weights to the
same URLs with the router's senders (engine/weights/send.py): one payload per TP rank
from the ranks on the engine's devices (colocated; CUDA IPC on GPUs, bytes on the CPU),
or a broadcast from rank 0 (apart). RayEngineGroup
is that router as the loop sees it, with Ray's word on an engine that died. Servers
listen on node addresses, so they require the run's API key (`run_api_key`), which the
driver hands to the router and the trainer ranks.
"""
from __future__ import annotations

import asyncio

import ray
import torch

from furlong.cluster.ray_calls import check_engines
from furlong.engine.base import GenerateOutput, SamplingParams
from furlong.engine.factory import EngineOptions, create_engine
from furlong.engine.launcher import ServerLauncher, ServerSpec
from furlong.engine.router import EngineRouter, EngineState
from furlong.ports import free_port


@ray.remote
class EngineActor:
    """One engine and its HTTP server, on the devices Ray gave this actor."""

    def __init__(self, model_path: str, options: EngineOptions, device_type: str,
                 accept_ipc_weights: bool, tp_size: int = 1):
        from transformers import AutoTokenizer
        device = torch.device("cuda", 0) if device_type == "cuda" else torch.device("cpu")
        dtype = torch.bfloat16 if device_type == "cuda" else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.engine = create_engine(model_path, self.tokenizer, device, dtype, options)
        self.model_path = model_path
        self.accept_ipc_weights = accept_ipc_weights
        self.tp_size = tp_size  # the TP ranks of the engine it stands in for
        self.api_key = options.api_key  # the server listens on the node's address
        self.runner = None

    async def ready(self) -> bool:
        return True

    async def serve(self) -> str:
        """Start the HTTP server on a free port of this node; returns its URL."""
        from aiohttp import web

        from furlong.engine.server.app import EngineServer
        server = EngineServer(self.engine, self.tokenizer, self.model_path,
                              accept_ipc_weights=self.accept_ipc_weights, api_key=self.api_key,
                              tp_size=self.tp_size)
        self.runner = server.app_runner()
        await self.runner.setup()
        host = ray.util.get_node_ip_address()
        port = free_port(host)
        await web.TCPSite(self.runner, host, port).start()
        return f"http://{host}:{port}"

    async def stop(self) -> None:
        await self.engine.close()
        if self.runner is not None:
            await self.runner.cleanup()


@ray.remote
class ServerHost:
    """One server process (`python -m sglang.launch_server ...`) on `devices` (GPU ids of
    this node; None: the devices this actor sees), reachable from other nodes; stopped
    with the actor's `stop`."""

    def __init__(self, spec: ServerSpec, devices: list[int] | None):
        from dataclasses import replace
        self.launcher = ServerLauncher(replace(spec, host=ray.util.get_node_ip_address()),
                                       [devices])

    def ready(self) -> bool:
        return True

    def start(self) -> str:
        return self.launcher.start()[0]

    def stop(self) -> None:
        self.launcher.stop()


class RayEngineGroup:
    """The loop's engine when the engines are Ray actors: the router over their servers
    (every Engine method and attribute is the router's), except that a request that
    fails asks the actors first: when an actor died, its index and Ray's cause are the
    error, not the refused connection the router saw."""

    def __init__(self, router: EngineRouter, actors: list):
        self.router = router
        self.actors = actors

    def __getattr__(self, name: str):
        return getattr(self.router, name)

    @property
    def weight_source(self):
        """The router's `weight_source`: set on this group, it is set on the router, which
        alone asks for it (__getattr__ would only read it)."""
        return self.router.weight_source

    @weight_source.setter
    def weight_source(self, source) -> None:
        self.router.weight_source = source

    async def generate(self, input_ids: list[int], params: SamplingParams,
                       **options) -> GenerateOutput:
        """The router's generate (`options`: return_routed_experts, lora_path)."""
        dropped = {slot.index for slot in self.router.engines
                   if slot.state is EngineState.DROPPED}  # known dead, not this failure
        try:
            return await self.router.generate(input_ids, params, **options)
        except Exception:
            await asyncio.to_thread(check_engines, [actor for i, actor in enumerate(self.actors)
                                                    if i not in dropped])
            raise
