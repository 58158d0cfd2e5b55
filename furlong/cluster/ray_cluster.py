"""Place the roles of a multi-process run on Ray: one placement group, bundles per device.

Colocated: bundle i holds trainer rank i (half of its GPU in Ray's accounting); engine e
of N GPUs sits on bundle e*N (the other half) and its server runs on the GPUs of bundles
e*N .. e*N+N-1, which it shares by turns with the trainer ranks there. Disaggregated: the
trainer ranks' bundles come first, then one bundle of N GPUs per engine. The GPU ids of
the bundles are asked of Ray before anything is placed (`bundle_gpus`), so each server
is started on exactly its devices. On a machine without GPUs the bundles are CPU-only,
so the same layout runs as CPU processes.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group

from furlong.cluster.placement import Placement, check_engine_devices
from furlong.cluster.ray_calls import bundle_gpus, in_bundle, wait_all
from furlong.cluster.ray_engine import EngineActor, RayEngineGroup, ServerHost
from furlong.cluster.ray_trainer import RayTrainGroup
from furlong.config import Config
from furlong.engine.api_key import run_api_key
from furlong.engine.base import Engine
from furlong.engine.factory import (EngineOptions, create_engine, resolve_backend, router_for,
                                    server_spec)

log = logging.getLogger(__name__)
READY_TIMEOUT_S = 120


@dataclass
class RayRoles:
    trainer: RayTrainGroup | None
    engine: Engine | None      # a router over the engine servers (RayEngineGroup if placed here)
    engine_actors: list
    group: object
    started_ray: bool

    def close(self) -> None:
        if self.trainer is not None:
            self.trainer.close()
        for actor in self.engine_actors:
            try:  # a ServerHost stops its server process; an EngineActor its engine
                ray.get(actor.stop.remote(), timeout=60)
            except ray.exceptions.RayError as error:
                log.warning("engine actor did not stop cleanly: %s", error)
            ray.kill(actor)
        remove_placement_group(self.group)
        if self.started_ray:
            ray.shutdown()


def start_ray(placement: Placement) -> bool:
    """Join the cluster of RAY_ADDRESS (multi-node), else start a local one. Returns
    whether this process started it."""
    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return False
    per_bundle = 2 if placement.colocate else 1
    bundles = placement.trainer_ranks + (0 if placement.colocate else
                                         placement.num_engines * placement.devices_per_engine)
    ray.init(num_cpus=max(bundles * per_bundle, os.cpu_count() or 1), include_dashboard=False,
             log_to_driver=True, runtime_env={"env_vars": {"PYTHONPATH": os.getcwd()}})
    return True


def build_ray_roles(config: Config, placement: Placement, init_weights: str,
                    total_steps: int, options: EngineOptions, trains: bool) -> RayRoles:
    """Check the engine devices, start Ray, reserve the bundles, then place the trainer
    ranks and the engines (with --rollout-external only the trainer: the servers run)."""
    device = torch.device(placement.device)
    backend = resolve_backend(options, device)
    external = bool(options.external_engine_addrs)
    if not external:  # running servers are not placed
        check_engine_devices(placement, backend)
    started = start_ray(placement)
    group = build_placement_group(placement, external)
    # Before anything takes a share of the bundles' GPUs.
    server_gpus = server_gpu_ids(placement, group) if backend == "sglang" and not external \
        else None
    trainer = build_trainer(config, placement, group, init_weights, total_steps) \
        if trains else None
    if external:
        return RayRoles(trainer, build_external_engine(config, options, device, trainer), [],
                        group, started)
    # The servers placed here listen on node addresses: unless the user gave a key, they
    # get one that only this run knows.
    options = replace(options, api_key=run_api_key(options.api_key,
                                                   ray.util.get_node_ip_address()))
    actors, urls = build_engine_actors(config, placement, group, options, backend,
                                       server_gpus)
    engine = RayEngineGroup(router_for(urls, options, device), actors) if urls else None
    if trainer is not None:
        trainer.attach_engines(urls, placement.engine_feeders if urls else [], actors,
                               options.api_key)
    return RayRoles(trainer, engine, actors, group, started)


def gpus_per_device(placement: Placement) -> float:
    """Ray's GPU count for a role on one device: colocated roles take turns on a GPU, so
    each counts half; none on a CPU machine."""
    if placement.device != "cuda":
        return 0.0
    return 0.5 if placement.colocate else 1.0


def engine_actor_gpus(placement: Placement) -> float:
    """Ray's GPU count for an engine's actor: colocated, the half of its first device's
    bundle that the trainer rank leaves; apart, its bundle's N GPUs; none on a CPU
    machine. (A colocated server also runs on its other devices, whose bundles Ray
    counts as the trainer ranks'.)"""
    if placement.device != "cuda":
        return 0.0
    return 0.5 if placement.colocate else float(placement.devices_per_engine)


def engine_gpu_ids(placement: Placement,
                   gpus_of_bundle: list[tuple[str, list[int]]]) -> list[list[int]]:
    """The GPU ids each engine's server runs on, in its TP order, from (node, GPU ids) of
    every bundle: colocated, those of the trainer bundles of its devices, which must be
    on one node; apart, its own bundle's."""
    engines = []
    for index, devices in enumerate(placement.engine_devices):
        bundles = devices if placement.colocate else [placement.engine_bundle(index)]
        nodes = {gpus_of_bundle[bundle][0] for bundle in bundles}
        if len(nodes) > 1:
            raise RuntimeError(f"engine {index} would span nodes {sorted(nodes)}: Ray placed "
                               f"the bundles of its devices {devices} on different nodes; "
                               "give each node a multiple of --rollout-num-gpus-per-engine "
                               "GPUs (--actor-num-gpus-per-node)")
        engines.append([gpu for bundle in bundles for gpu in gpus_of_bundle[bundle][1]])
    return engines


def server_gpu_ids(placement: Placement, group) -> list[list[int]] | None:
    """The GPU ids of each engine's server (None on a CPU machine: inherited devices)."""
    if placement.device != "cuda":
        return None
    per_bundle = [1] * placement.trainer_ranks + (
        [] if placement.colocate else [placement.devices_per_engine] * placement.num_engines)
    return engine_gpu_ids(placement, bundle_gpus(group, per_bundle))


def build_placement_group(placement: Placement, external: bool):
    """One bundle per trainer rank, then (apart, with servers placed here) one per engine;
    ready, or a RuntimeError saying what the cluster lacks."""
    gpu = placement.device == "cuda"
    trainer_bundle = {"CPU": 2 if placement.colocate else 1, **({"GPU": 1} if gpu else {})}
    engine_bundles = [] if placement.colocate or external else [
        {"CPU": 1, **({"GPU": placement.devices_per_engine} if gpu else {})}
        for _ in range(placement.num_engines)]
    group = placement_group([dict(trainer_bundle) for _ in range(placement.trainer_ranks)]
                            + engine_bundles, strategy="PACK")
    try:
        ray.get(group.ready(), timeout=READY_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        raise RuntimeError(f"Ray could not place {placement.describe()} within "
                           f"{READY_TIMEOUT_S}s: the cluster lacks CPUs/GPUs "
                           f"({ray.available_resources()} available)") from None
    log.info("placed %s", placement.describe())
    return group


def build_trainer(config: Config, placement: Placement, group, init_weights: str,
                  total_steps: int) -> RayTrainGroup:
    """Trainer rank i on bundle i."""
    return RayTrainGroup(config, group, list(range(placement.trainer_ranks)),
                         gpus_per_device(placement), init_weights, total_steps)


def build_external_engine(config: Config, options: EngineOptions, device: torch.device,
                          trainer: RayTrainGroup | None) -> Engine:
    """A router over servers someone else runs; the trainer pushes to them by broadcast."""
    engine = create_engine(config.ckpt.hf_checkpoint, None, device, torch.float32, options)
    if trainer is not None:
        trainer.attach_engines(engine.urls, [], actors=[], api_key=options.api_key)
    return engine


def build_engine_actors(config: Config, placement: Placement, group, options: EngineOptions,
                        backend: str, server_gpus: list[list[int]] | None
                        ) -> tuple[list, list[str]]:
    """One actor per engine on its bundle, serving: a ServerHost with an SGLang server
    process on the engine's GPUs (`server_gpus`), else an EngineActor with the built-in
    engine (on the CPU also standing in for an engine of several devices). Returns the
    actors and URLs."""
    def on_bundle(index: int) -> dict:
        return dict(num_cpus=1, num_gpus=engine_actor_gpus(placement),
                    scheduling_strategy=in_bundle(group, placement.engine_bundle(index)))

    engines = range(placement.num_engines)
    if backend == "sglang":
        spec = server_spec(config.ckpt.hf_checkpoint, options, torch.device(placement.device))
        actors = [ServerHost.options(**on_bundle(e)).remote(
            spec, server_gpus[e] if server_gpus else None) for e in engines]
        return actors, wait_all([actor.start.remote() for actor in actors], "engine server")
    accept_ipc_weights = placement.colocate and placement.device == "cuda"
    actors = [EngineActor.options(**on_bundle(e)).remote(
        config.ckpt.hf_checkpoint, options, placement.device, accept_ipc_weights,
        placement.devices_per_engine) for e in engines]
    return actors, wait_all([actor.serve.remote() for actor in actors], "engine")
