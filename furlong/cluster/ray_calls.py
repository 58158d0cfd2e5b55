"""Ray calls every role of a Ray run makes: waiting on actors, placing them, rendezvous.

- `wait_all`: ray.get of many refs that fails at the first error, naming the role and index.
- `check_engines`: Ray's word on whether the engine actors are alive.
- `node_rendezvous`: an address of this node and a port free on it (rank 0 of a group here).
- `in_bundle`: the scheduling strategy that puts an actor on one bundle of a placement group.
- `bundle_gpus`: the node and GPU ids of each bundle of a placement group.
"""
from __future__ import annotations

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from furlong.ports import free_port


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


def check_engines(actors: list) -> None:
    """Raises the failure of the first engine actor that died (index and Ray's cause);
    returns if every one answers."""
    wait_all([actor.ready.remote() for actor in actors], "engine")


def node_rendezvous() -> tuple[str, int]:
    """This node's address and a port free on it, for a group whose rank 0 runs here."""
    host = ray.util.get_node_ip_address()
    return host, free_port(host)


def in_bundle(group, bundle: int) -> PlacementGroupSchedulingStrategy:
    return PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=bundle)


def _node_and_gpus() -> tuple[str, list[int]]:
    return ray.util.get_node_ip_address(), [int(gpu) for gpu in ray.get_gpu_ids()]


def bundle_gpus(group, gpus_per_bundle: list[int]) -> list[tuple[str, list[int]]]:
    """(node address, GPU ids) of each bundle, asked by a task that takes the bundle's
    GPUs: before anything else is placed in the group."""
    probe = ray.remote(num_cpus=0)(_node_and_gpus)
    return wait_all([probe.options(num_gpus=gpus, scheduling_strategy=in_bundle(group, bundle))
                     .remote() for bundle, gpus in enumerate(gpus_per_bundle)], "bundle probe")
