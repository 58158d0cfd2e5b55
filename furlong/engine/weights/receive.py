"""The engine server's end of weight updates: what it does with each kind.

One `WeightReceiver` per server holds the engine's weight version, the weight-update
groups the server joined and one lock, so the buckets of a distributed update never
interleave with another update. Each kind of update becomes (name, tensor) pairs:
- from disk: the tensors of an HF directory's safetensors files (`read_hf_weights`);
- from tensor payloads, one per tensor-parallel rank of the engine (SGLang's format: TP
  rank i loads entry i): bytes loaded weights-only, or CUDA IPC handles (only for a
  server started next to its trainer, `accept_ipc_weights`) unpickled through wire.py's
  allowlist. This server is the engine's TP rank 0 (`tp_size` 1 on a GPU; on the CPU it
  stands in for an engine of several devices): it loads entry 0 and refuses a request
  unless it holds `tp_size` entries, each loadable, all with entry 0's names, shapes and
  dtypes (what SGLang's other ranks would load and shard);
- from a broadcast: tensors allocated here and filled by rank 0 of a joined group;
and every one ends in `_load`: abort (if asked), `engine.update_weights` by parameter
name, the new version, the cache flush. An update this end refuses raises `UpdateRefused`
with a message naming the field (the server answers 400); the server's HTTP handlers
(server/weight_routes.py) parse the request fields and call in here.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from furlong.engine.base import Engine
from furlong.engine.weights.group import DEVICE_OF_BACKEND, WeightUpdateGroup
from furlong.engine.weights.wire import (NamedTensors, deserialize_ipc_tensors,
                                         deserialize_named_tensors, is_ipc_payload)


class UpdateRefused(ValueError):
    """A weight update this server will not do; the message names the field."""


@dataclass(frozen=True)
class LoadOptions:
    """The fields of SGLang's weight-update requests that say how to load."""
    weight_version: int | None
    flush_cache: bool
    abort_all_requests: bool


def read_hf_weights(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of `model_dir/*.safetensors`, one at a time, by its HF name."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} holds no *.safetensors file; give an HF model "
                                "directory saved with safetensors")

    def tensors():
        for file in files:
            with safe_open(file, framework="pt") as handle:
                for name in handle.keys():
                    yield name, handle.get_tensor(name)
    return tensors()


class WeightReceiver:
    """Weight updates into `engine`, booted from `model_path`. Each update returns the
    message of its success."""

    def __init__(self, engine: Engine, model_path: str, accept_ipc_weights: bool = False,
                 group_timeout_s: float = 600.0, tp_size: int = 1):
        self.engine = engine
        self.tp_size = tp_size  # the engine's TP ranks: one tensor payload each
        self.model_path = model_path  # where the weights came from: boot, then each disk update
        # CUDA IPC payloads name memory on this GPU: only a server placed next to its
        # trainer takes them.
        self.accept_ipc_weights = accept_ipc_weights
        self.group_timeout_s = group_timeout_s
        self.weight_version = 0
        self.groups: dict[str, WeightUpdateGroup] = {}
        self._lock = asyncio.Lock()

    @property
    def device(self) -> torch.device:
        return next(self.engine.model.parameters()).device

    async def from_disk(self, model_dir: str, options: LoadOptions) -> str:
        from furlong.model.loading import resolve_hf_dir
        try:
            named_tensors = read_hf_weights(resolve_hf_dir(model_dir))
        except FileNotFoundError as error:
            raise UpdateRefused(f"model_path: {error}") from None
        async with self._lock:
            message = await self._load(named_tensors, options)
        self.model_path = model_dir
        return message

    async def from_tensor(self, payloads: list[str], options: LoadOptions) -> str:
        """One bucket: `payloads[i]` for TP rank i. Loads entry 0 once every entry has
        been checked (see the module docstring)."""
        if len(payloads) != self.tp_size:
            raise UpdateRefused(f"serialized_named_tensors has {len(payloads)} entries; this "
                                f"engine has {self.tp_size} tensor-parallel rank(s), one entry "
                                "each")
        named_tensors = await self._deserialize(payloads[0], 0)
        expected = _signature(named_tensors)
        for index in range(1, len(payloads)):
            if _signature(await self._deserialize(payloads[index], index)) != expected:
                raise UpdateRefused(f"serialized_named_tensors[{index}] does not hold the "
                                    "names, shapes and dtypes of entry 0")
        async with self._lock:
            return await self._load(named_tensors, options)

    async def _deserialize(self, payload: str, index: int) -> list[tuple[str, torch.Tensor]]:
        ipc = is_ipc_payload(payload)
        if ipc and not self.accept_ipc_weights:
            raise UpdateRefused(f"serialized_named_tensors[{index}]: CUDA IPC payloads are "
                                "accepted only by a server started next to its trainer "
                                "(accept_ipc_weights)")
        try:
            return await asyncio.to_thread(
                deserialize_ipc_tensors if ipc else deserialize_named_tensors, payload)
        except ValueError as error:  # wire.py's messages name the field
            message = str(error).removeprefix("serialized_named_tensors: ")
            raise UpdateRefused(f"serialized_named_tensors[{index}]: {message}") from None

    async def join_group(self, address: str, port: int, rank: int, world_size: int,
                         group_name: str, backend: str) -> str:
        """Join the trainer's group as `rank`; returns once every rank joined."""
        if backend not in DEVICE_OF_BACKEND:
            raise UpdateRefused(f"backend {backend!r}: use gloo (CPU) or nccl (CUDA)")
        if DEVICE_OF_BACKEND[backend] == "cuda" and self.device.type != "cuda":
            raise UpdateRefused(f"backend nccl needs the engine on CUDA, this one is on "
                                f"{self.device}; use gloo")
        async with self._lock:
            if group_name in self.groups:
                raise UpdateRefused(f"group_name {group_name!r} exists; destroy it first "
                                    "(/destroy_weights_update_group)")
            try:
                self.groups[group_name] = await asyncio.to_thread(
                    WeightUpdateGroup, address, port, rank, world_size, group_name, backend,
                    self.group_timeout_s)
            except ValueError as error:
                raise UpdateRefused(str(error)) from None
        return f"joined {group_name} as rank {rank} of {world_size}"

    async def from_distributed(self, names: list[str], dtypes: list[torch.dtype],
                               shapes: list[list[int]], group_name: str,
                               options: LoadOptions) -> str:
        """Receive the listed tensors, in order, by broadcast from rank 0; then load them."""
        group = self._group(group_name)
        device = self.device if group.device_type == "cuda" else torch.device("cpu")
        async with self._lock:
            tensors = await asyncio.to_thread(group.receive, dtypes, shapes, device)
            return await self._load(zip(names, tensors, strict=True), options)

    async def leave_group(self, group_name: str) -> str:
        async with self._lock:
            await asyncio.to_thread(self._group(group_name).destroy)  # waits for the others
            del self.groups[group_name]
        return f"left {group_name}"

    def drop_groups(self) -> None:
        """At shutdown: dropped, not destroyed (a member's shutdown would wait for a
        trainer that may be gone)."""
        self.groups.clear()

    async def set_version(self, version: int, abort_all_requests: bool) -> str:
        async with self._lock:
            return await self._load([], LoadOptions(version, False, abort_all_requests))

    def _group(self, name: str) -> WeightUpdateGroup:
        if name not in self.groups:
            raise UpdateRefused(f"group_name {name!r} is unknown; call "
                                "/init_weights_update_group first")
        return self.groups[name]

    async def _load(self, named_tensors: NamedTensors, options: LoadOptions) -> str:
        """Load by parameter name, under the lock (which the caller holds)."""
        if options.abort_all_requests:
            await self.engine.abort_all()
        version = self.weight_version if options.weight_version is None else options.weight_version
        try:
            await self.engine.update_weights(named_tensors, version)
        except (KeyError, ValueError) as error:
            raise UpdateRefused(f"cannot load the weights: "
                                f"{error.args[0] if error.args else error}") from None
        self.weight_version = version
        if options.flush_cache:
            await self.engine.flush_cache()
        return f"Succeeded to update model weights (version {version})."


def _signature(named_tensors: list[tuple[str, torch.Tensor]]) -> list[tuple]:
    return [(name, tuple(tensor.shape), tensor.dtype) for name, tensor in named_tensors]
