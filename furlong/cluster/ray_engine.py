"""Engines as Ray actors: EngineActor hosts an engine; RayEngine is the driver's handle.

RayEngine implements the `Engine` protocol by remote calls, so the rollout manager
cannot tell it from an in-process engine. Weights reach an EngineActor three ways:
by value through Ray's object store (CPU, and the fallback), as CUDA IPC handles from
a trainer rank on the same GPU (colocated), or by broadcast from trainer rank 0 over a
weight-update process group (disaggregated).
"""
from __future__ import annotations

import asyncio
from typing import Iterable

import ray
import torch

from furlong.engine.base import GenerateOutput, SamplingParams
from furlong.engine.factory import EngineOptions, create_engine
from furlong.engine.weight_transfer import WeightUpdateGroup


@ray.remote
class EngineActor:
    """One engine in its own process, on the devices Ray gave it."""

    def __init__(self, model_path: str, tokenizer_path: str, options: EngineOptions,
                 device_type: str):
        from transformers import AutoTokenizer
        device = torch.device("cuda", 0) if device_type == "cuda" else torch.device("cpu")
        dtype = torch.bfloat16 if device_type == "cuda" else torch.float32
        self.engine = create_engine(model_path, AutoTokenizer.from_pretrained(tokenizer_path),
                                    device, dtype, options)
        self.group: WeightUpdateGroup | None = None

    async def generate(self, input_ids: list[int], params: SamplingParams) -> GenerateOutput:
        return await self.engine.generate(input_ids, params)

    async def update_weights(self, named_tensors: list, version: int) -> int:
        await self.engine.update_weights(named_tensors, version)
        return len(named_tensors)

    async def update_weights_from_ipc(self, handles: list, version: int) -> int:
        """Rebuild tensors from CUDA IPC handles (a trainer rank's memory) and load them."""
        named = [(name, rebuild(*args)) for name, (rebuild, args) in handles]
        await self.engine.update_weights(named, version)
        return len(named)

    def join_weight_group(self, master_address: str, master_port: int, rank: int,
                          world_size: int, backend: str) -> None:
        # Blocks until every member joined: the driver calls all members together.
        self.group = WeightUpdateGroup(master_address, master_port, rank, world_size,
                                       backend=backend)

    async def receive_weights(self, names: list[str], dtypes: list, shapes: list,
                              version: int) -> int:
        device = next(self.engine.model.parameters()).device
        tensors = await asyncio.to_thread(self.group.receive, dtypes, shapes, device)
        await self.engine.update_weights(list(zip(names, tensors, strict=True)), version)
        return len(names)

    async def abort_all(self) -> None:
        await self.engine.abort_all()

    async def release_memory(self) -> None:
        await self.engine.release_memory()

    async def resume_memory(self) -> None:
        await self.engine.resume_memory()

    async def flush_cache(self) -> None:
        await self.engine.flush_cache()

    async def health(self) -> bool:
        return await self.engine.health()

    async def close(self) -> None:
        await self.engine.close()
        if self.group is not None:
            self.group.destroy()


class RayEngine:
    """The driver's side of one EngineActor: the `Engine` protocol by remote calls."""

    def __init__(self, actor, name: str):
        self.actor = actor
        self.name = name

    async def _call(self, method: str, *args):
        try:
            return await getattr(self.actor, method).remote(*args)
        except ray.exceptions.RayActorError as error:
            raise RuntimeError(f"{self.name} died: {error}") from None

    async def generate(self, input_ids: list[int], params: SamplingParams) -> GenerateOutput:
        return await self._call("generate", input_ids, params)

    async def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
                             version: int) -> None:
        await self._call("update_weights", [(n, t.cpu()) for n, t in named_tensors], version)

    async def abort_all(self) -> None:
        await self._call("abort_all")

    async def release_memory(self) -> None:
        await self._call("release_memory")

    async def resume_memory(self) -> None:
        await self._call("resume_memory")

    async def flush_cache(self) -> None:
        await self._call("flush_cache")

    async def health(self) -> bool:
        try:
            return await self._call("health")
        except RuntimeError:
            return False

    async def close(self) -> None:
        try:
            await self._call("close")
        finally:
            ray.kill(self.actor)
