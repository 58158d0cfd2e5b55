"""Trainer ranks as Ray actors: TrainRank hosts a TrainActor; RayTrainGroup drives them.

RayTrainGroup offers the loop what an in-process TrainActor offers (compute_log_probs,
train, save, restore, export_hf, push_weights, ...) by calling every rank and taking
rank 0's answer. Calls wait with `ray.wait`, so a rank that dies surfaces at once as
an error naming the rank and the cause, even while the others block in a collective.
"""
from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import ray
import torch
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from furlong.config import Config
from furlong.engine.weight_transfer import iter_buckets
from furlong.train.actor import RankInfo, TrainActor


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def wait_all(refs: list, role: str) -> list:
    """ray.get of every ref, failing at the first error with `role` and the index."""
    index = {ref: i for i, ref in enumerate(refs)}
    results: list = [None] * len(refs)
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        try:
            results[index[ready[0]]] = ray.get(ready[0])
        except ray.exceptions.RayError as error:
            raise RuntimeError(f"{role} {index[ready[0]]} failed: {error}") from None
    return results


@ray.remote
class TrainRank:
    """One trainer rank: joins the trainers' process group and builds its TrainActor."""

    def __init__(self, config: Config, rank: int, world_size: int, master_address: str,
                 master_port: int, init_weights: str, total_steps: int):
        from furlong.hooks import load_function
        from furlong.rollout.context import HookArgs
        from furlong.train import parallel
        cuda = torch.cuda.is_available()
        parallel.init_distributed(rank, world_size, master_address, master_port,
                                  "nccl" if cuda else "gloo")
        info = parallel.rank_info(rank, world_size, config.perf.tensor_model_parallel_size,
                                  "cuda" if cuda else "cpu")
        path = config.grpo.custom_loss_function_path
        hook = load_function(path, "--custom-loss-function-path") if path else None
        self.rank = rank
        self.actor = TrainActor(config, info, init_weights, total_steps, hook, HookArgs(config))
        self.group = None

    def ready(self) -> bool:
        return True

    def compute_log_probs(self, batch, reference: bool):
        return self.actor.compute_log_probs(batch, reference)

    def train(self, batch) -> list[dict]:
        return self.actor.train(batch)

    def update_reference(self) -> None:
        self.actor.update_reference()

    def save(self, directory: str, save_optimizer: bool) -> None:
        self.actor.save(Path(directory), save_optimizer)

    def restore(self, directory: str) -> None:
        self.actor.restore(Path(directory))

    def export_hf(self, path: str) -> None:
        self.actor.export_hf(path)

    def model_config(self):
        return self.actor.model_config

    # ---- weight sync (every rank takes part in gathering full weights) -------------------
    def send_by_value(self, engines: list, version: int, bucket_bytes: int) -> int:
        sent = 0
        for bucket, _ in iter_buckets(self.actor.named_weights(), bucket_bytes):
            if self.rank == 0:
                payload = ray.put([(name, tensor.cpu()) for name, tensor in bucket])
                wait_all([e.update_weights.remote(payload, version) for e in engines], "engine")
                sent += len(bucket)
        return sent

    def send_by_ipc(self, engines: list, version: int, bucket_bytes: int) -> int:
        """Colocated on one GPU: engines map this rank's tensors through CUDA IPC."""
        from torch.multiprocessing.reductions import reduce_tensor
        sent = 0
        for bucket, _ in iter_buckets(self.actor.named_weights(), bucket_bytes):
            if engines:
                kept = [(name, tensor.contiguous()) for name, tensor in bucket]
                handles = [(name, reduce_tensor(tensor)) for name, tensor in kept]
                wait_all([e.update_weights_from_ipc.remote(handles, version) for e in engines],
                         "engine")
                torch.cuda.synchronize()
                sent += len(kept)
        return sent

    def join_weight_group(self, master_address: str, master_port: int, world_size: int,
                          backend: str) -> None:
        from furlong.engine.weight_transfer import WeightUpdateGroup
        self.group = WeightUpdateGroup(master_address, master_port, 0, world_size,
                                       backend=backend)

    def send_by_broadcast(self, engines: list, version: int, bucket_bytes: int) -> int:
        sent = 0
        for bucket, _ in iter_buckets(self.actor.named_weights(), bucket_bytes):
            if self.rank != 0:
                continue
            names = [name for name, _ in bucket]
            tensors = [tensor.contiguous() for _, tensor in bucket]
            receiving = [e.receive_weights.remote(names, [t.dtype for t in tensors],
                                                  [list(t.shape) for t in tensors], version)
                         for e in engines]
            self.group.broadcast(tensors)
            wait_all(receiving, "engine")
            sent += len(bucket)
        return sent


class RayTrainGroup:
    """The loop's trainer when the ranks live in other processes."""

    def __init__(self, config: Config, placement_group, bundle_of_rank: list[int],
                 gpus_per_rank: float, init_weights: str, total_steps: int):
        self.config = config
        self.world_size = len(bundle_of_rank)
        address, port = ray.util.get_node_ip_address(), free_port()
        self.ranks = [
            TrainRank.options(
                num_cpus=1, num_gpus=gpus_per_rank,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group, placement_group_bundle_index=bundle)).remote(
                config, rank, self.world_size, address, port, init_weights, total_steps)
            for rank, bundle in enumerate(bundle_of_rank)]
        self._all("ready")
        device = "cuda" if gpus_per_rank else "cpu"
        self.rank = RankInfo(dp_size=self.world_size // config.perf.tensor_model_parallel_size,
                             device=torch.device(device))
        self.model_config = ray.get(self.ranks[0].model_config.remote())
        self.engines: list = []
        self.sync_mode = "value"

    def _all(self, method: str, *args) -> list:
        return wait_all([getattr(r, method).remote(*args) for r in self.ranks], "trainer rank")

    @property
    def has_reference(self) -> bool:
        g = self.config.grpo
        return g.use_kl_loss

    def compute_log_probs(self, batch, reference: bool = False):
        return self._all("compute_log_probs", ray.put(batch), reference)[0]

    def train(self, batch) -> list[dict]:
        return self._all("train", ray.put(batch))[0]

    def update_reference(self) -> None:
        self._all("update_reference")

    def save(self, directory: Path, save_optimizer: bool) -> None:
        self._all("save", str(directory), save_optimizer)

    def restore(self, directory: Path) -> None:
        self._all("restore", str(directory))

    def export_hf(self, path) -> None:
        self._all("export_hf", str(path))

    # ---- weight sync --------------------------------------------------------------------
    def attach_engines(self, engine_actors: list, colocate: bool, engine_devices: list) -> None:
        """Choose how weights travel: CUDA IPC (colocated GPUs), broadcast (GPUs apart,
        and CPU processes apart), or by value through the object store (CPU colocated)."""
        self.engines = engine_actors
        self.engine_devices = engine_devices
        cuda = self.rank.device.type == "cuda"
        self.sync_mode = "ipc" if cuda and colocate else "value" if colocate else "broadcast"
        if self.sync_mode == "broadcast":
            address, port = ray.util.get_node_ip_address(), free_port()
            world = 1 + len(engine_actors)
            backend = "nccl" if cuda else "gloo"
            joins = [e.join_weight_group.remote(address, port, i + 1, world, backend)
                     for i, e in enumerate(engine_actors)]
            joins.append(self.ranks[0].join_weight_group.remote(address, port, world, backend))
            wait_all(joins, "weight-group member")

    async def push_weights(self, engine, version: int) -> None:
        bucket = self.config.rollout.update_weight_buffer_size
        if self.sync_mode == "ipc":  # each rank feeds the engines on its own GPU
            calls = [rank.send_by_ipc.remote(
                [e for e, devices in zip(self.engines, self.engine_devices, strict=True)
                 if devices[0] == index], version, bucket)
                for index, rank in enumerate(self.ranks)]
        else:
            method = "send_by_value" if self.sync_mode == "value" else "send_by_broadcast"
            calls = [getattr(rank, method).remote(self.engines, version, bucket)
                     for rank in self.ranks]
        await asyncio.to_thread(wait_all, calls, "trainer rank")

    def close(self) -> None:
        for rank in self.ranks:
            ray.kill(rank)

