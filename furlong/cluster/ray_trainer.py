"""Trainer ranks as Ray actors: TrainRank hosts a TrainActor; RayTrainGroup drives them.

RayTrainGroup offers the loop what an in-process TrainActor offers (compute_log_probs,
train, save, restore, export_hf, push_weights, ...) by calling every rank and taking
rank 0's answer. Calls wait with `ray.wait`, so a rank that dies surfaces at once as
an error naming the rank and the cause, even while the others block in a collective.
Weight pushes: every rank gathers the full weights (with pipeline stages, each stage
gathers its layers and broadcasts them one at a time) and hands them to one sender of
furlong/engine/weights/send.py (the router's own). Colocated engines are fed by the ranks
on their devices (cluster/engine_feed.py): each bucket, one request per engine whose
`serialized_named_tensors` holds one payload per TP rank, each from the trainer rank on
that rank's device (CUDA IPC handles on GPUs, bytes between CPU processes), posted by the
engine's first rank. Engines apart get a broadcast from rank 0. Under --lora-rank the
adapter alone goes, gathered to the driver and loaded by the router (`adapter_transport`:
by value on furlong's servers, from disk on SGLang's). A weight push that fails
asks the engine actors first, so that an engine that died is named as such rather than as
the trainer rank whose connection it refused.
"""
from __future__ import annotations

import asyncio
from pathlib import Path

import ray
import torch

from furlong.cluster.engine_feed import EngineFeed
from furlong.cluster.ray_calls import check_engines, in_bundle, node_rendezvous, wait_all
from furlong.config import Config
from furlong.config.groups import SglangArgs
from furlong.engine.weights.send import Servers, make_sender
from furlong.model.lora import ADAPTER_NAME
from furlong.train.actor import TrainActor
from furlong.train.parallel import rank_info
from furlong.train.process_env import prepare_trainer_process, train_env_vars


def engine_servers(urls: list[str], sglang: SglangArgs, api_key: str | None = None) -> Servers:
    """The engine servers at `urls` as the target of a push. An SGLang server has one rank
    per GPU (--rollout-num-gpus-per-engine), in a broadcast group and for tensor payloads;
    with fewer ranks counted, its extra ranks would wait for a group that never forms."""
    return Servers(tuple(urls), api_key, sglang.rollout_num_gpus_per_engine)


def adapter_transport(config: Config) -> str:
    """How the driver's copy of the adapter (CPU tensors) reaches the Ray engines: by value
    when they are furlong's, else from disk, which SGLang's servers read (under --lora-rank
    auto never picks SGLang, so they are SGLang's only with --rollout-backend sglang;
    --rollout-external servers may be either)."""
    rollout = config.rollout
    return "disk" if rollout.rollout_backend == "sglang" or rollout.rollout_external \
        else "value"


def rank_options(config: Config, placement_group, bundle: int, gpus_per_rank: float) -> dict:
    """Ray options of the trainer rank in `bundle`: its resources, its place, and
    --train-env-vars in its environment from the start (some libraries read theirs at
    import); Ray merges them with the job's environment variables."""
    options = {"num_cpus": 1, "num_gpus": gpus_per_rank,
               "scheduling_strategy": in_bundle(placement_group, bundle)}
    env_vars = train_env_vars(config)
    if env_vars:
        options["runtime_env"] = {"env_vars": env_vars}
    return options


@ray.remote
class TrainRank:
    """One trainer rank: joins the trainers' process group and builds its TrainActor."""

    def __init__(self, config: Config, rank: int, world_size: int, master_address: str,
                 master_port: int, init_weights: str, total_steps: int):
        from furlong.hooks import load_hooks
        from furlong.rollout.context import HookArgs
        from furlong.train import parallel
        prepare_trainer_process(config)  # before CUDA's libraries and the process group
        cuda = torch.cuda.is_available()
        parallel.init_distributed(rank, world_size, master_address, master_port,
                                  "nccl" if cuda else "gloo")
        info = parallel.rank_info(rank, world_size, config.perf.tensor_model_parallel_size,
                                  "cuda" if cuda else "cpu",
                                  cp_size=config.perf.context_parallel_size,
                                  pp_size=config.perf.pipeline_model_parallel_size)
        self.actor = TrainActor(config, info, init_weights, total_steps,
                                load_hooks(config).custom_loss, HookArgs(config))
        self.rank = rank
        self.bucket_bytes = config.rollout.update_weight_buffer_size
        # By RayTrainGroup.sync_mode; "colocated" joins when the engines are placed. Rank 0
        # of a broadcast group meets the servers on this rank's node.
        self.senders = {"broadcast": make_sender(
            "broadcast", self.bucket_bytes, backend="nccl" if cuda else "gloo",
            rendezvous=node_rendezvous)}

    def ready(self) -> bool:
        return True

    def compute_log_probs(self, batch, reference: bool, weights_version: int | None):
        return self.actor.compute_log_probs(batch, reference, weights_version)

    def compute_teacher_log_probs(self, batch):
        return self.actor.compute_teacher_log_probs(batch)

    def snapshot_weights(self, version: int) -> None:
        self.actor.snapshot_weights(version)

    def offload(self) -> None:
        self.actor.offload()

    def reload(self) -> None:
        self.actor.reload()

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

    def join_engine_group(self, engine_feeders: list[list[int]], transport: str) -> None:
        """Colocated engines: join the group of the ranks that feed this rank's engine
        (collective over every rank); pushes then go through it by `transport`."""
        self.senders["colocated"] = make_sender(
            transport, self.bucket_bytes, tp_gather=EngineFeed(engine_feeders, self.rank))

    def adapter(self, send: bool) -> tuple[dict, list] | None:
        """LoRA: (engine config, the adapter's full tensors on the CPU) from the rank that
        `send`s; every rank takes part in the gathers."""
        named = [(name, tensor.cpu()) for name, tensor in self.actor.named_adapter_weights()]
        return (self.actor.lora.sglang_config(), named) if send else None

    def send_weights(self, sync_mode: str, servers: Servers, version: int) -> None:
        """This rank's part of a push: every rank takes part in gathering the full weights,
        and sends them on to `servers`; outside a broadcast's rank 0 a rank without
        servers only gathers, while every colocated rank feeds its engine's request."""
        weights = self.actor.named_weights()
        if sync_mode == "broadcast" and not servers.urls:
            for _ in weights:  # take part in the gathers
                pass
            return
        self.senders[sync_mode].send(weights, servers, version)


class RayTrainGroup:
    """The loop's trainer when the ranks live in other processes."""

    def __init__(self, config: Config, placement_group, bundle_of_rank: list[int],
                 gpus_per_rank: float, init_weights: str, total_steps: int):
        self.config = config
        self.world_size = len(bundle_of_rank)
        # Rank 0 hosts the rendezvous, so its node (not the driver's: with several nodes
        # bundle 0 may be elsewhere) names the address and a port free there.
        address, port = ray.get(ray.remote(num_cpus=0)(node_rendezvous).options(
            scheduling_strategy=in_bundle(placement_group, bundle_of_rank[0])).remote())
        self.ranks = [
            TrainRank.options(**rank_options(config, placement_group, bundle, gpus_per_rank))
            .remote(config, rank, self.world_size, address, port, init_weights, total_steps)
            for rank, bundle in enumerate(bundle_of_rank)]
        self._all("ready")
        self.rank = rank_info(0, self.world_size, config.perf.tensor_model_parallel_size,
                              "cuda" if gpus_per_rank else "cpu",
                              cp_size=config.perf.context_parallel_size,
                              pp_size=config.perf.pipeline_model_parallel_size)
        self.model_config = ray.get(self.ranks[0].model_config.remote())
        self.urls: list[str] = []
        self.engine_actors: list = []
        self.engine_feeders: list[list[int]] = []
        self.sync_mode = "broadcast"
        self.api_key: str | None = None

    def _all(self, method: str, *args) -> list:
        return wait_all([getattr(r, method).remote(*args) for r in self.ranks], "trainer rank")

    @property
    def has_reference(self) -> bool:
        return self.config.grpo.needs_reference

    def compute_log_probs(self, batch, reference: bool = False,
                          weights_version: int | None = None):
        return self._all("compute_log_probs", ray.put(batch), reference, weights_version)[0]

    def compute_teacher_log_probs(self, batch):
        return self._all("compute_teacher_log_probs", ray.put(batch))[0]

    def snapshot_weights(self, version: int) -> None:
        self._all("snapshot_weights", version)

    def offload(self) -> None:
        self._all("offload")

    def reload(self) -> None:
        self._all("reload")

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
    def attach_engines(self, urls: list[str], engine_feeders: list[list[int]], actors: list,
                       api_key: str | None = None) -> None:
        """Choose how weights travel. `engine_feeders[e]`: for colocated engines, the
        trainer ranks on engine e's devices in its TP order (Placement.engine_feeders);
        each rank joins its engine's group, and each engine gets one payload per TP rank:
        CUDA IPC handles on GPUs, bytes by value between CPU processes. Empty (engines
        apart, or servers started elsewhere): rank 0 broadcasts. `actors` host the servers
        at `urls` (none for servers started elsewhere); `api_key` is the servers' key,
        sent with every weight push."""
        assert not engine_feeders or len(engine_feeders) == len(urls), (engine_feeders, urls)
        self.urls = urls
        self.api_key = api_key
        self.engine_feeders = engine_feeders
        self.engine_actors = actors
        if engine_feeders:
            transport = "ipc" if self.rank.device.type == "cuda" else "value"
            self._all("join_engine_group", engine_feeders, transport)
        self.sync_mode = "colocated" if engine_feeders else "broadcast"

    async def push_weights(self, engine, version: int) -> None:
        """To the engines still in `engine`'s rotation (the router drops one that died,
        and the broadcast group is then rebuilt without it); then the router learns of it,
        as of a push of its own."""
        if self.config.lora.lora_rank > 0:
            # The adapter alone, a few hundred MB at most: gathered on the ranks, handed to
            # the router, which loads it on every live engine as a push: by value on
            # furlong's servers, from disk on SGLang's (and on servers started elsewhere,
            # which may be either).
            adapters = await asyncio.to_thread(wait_all, [
                rank.adapter.remote(index == 0) for index, rank in enumerate(self.ranks)],
                "trainer rank")
            config, named = adapters[0]
            await engine.load_lora_adapter(ADAPTER_NAME, config, named, version,
                                           transport=adapter_transport(self.config))
            return
        targets = engine.push_targets()
        live = set(targets.urls)
        calls = [rank.send_weights.remote(self.sync_mode, self._servers_of_rank(index, live),
                                          version)
                 for index, rank in enumerate(self.ranks)]
        try:
            await asyncio.to_thread(wait_all, calls, "trainer rank")
        except RuntimeError:  # an engine this push went to may have died (none are
            if self.engine_actors:  # actors when the servers run elsewhere)
                await asyncio.to_thread(check_engines, [
                    actor for actor, url in zip(self.engine_actors, self.urls, strict=True)
                    if url in live])
            raise
        engine.weights_pushed(version, targets)

    def _servers_of_rank(self, index: int, live: set[str]) -> Servers:
        """Colocated, the first rank of each engine's feeders posts to it (if it is live)
        and the others only feed it; otherwise rank 0 broadcasts to every live engine and
        the other ranks only gather."""
        if self.sync_mode == "colocated":
            urls = [url for url, feeders in zip(self.urls, self.engine_feeders, strict=True)
                    if feeders[0] == index and url in live]
        else:
            urls = [url for url in self.urls if url in live] if index == 0 else []
        return engine_servers(urls, self.config.sglang, self.api_key)

    def close(self) -> None:
        for rank in self.ranks:
            ray.kill(rank)

