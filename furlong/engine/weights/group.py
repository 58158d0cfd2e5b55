"""The weight-update process group: the trainer is rank 0, the engine servers the others.

Both ends hold a `WeightUpdateGroup`: the sender's `BroadcastSender` (send.py) as rank 0,
each server (receive.py) as the ranks it joined with /init_weights_update_group.

The group is built from public c10d parts (TCPStore, PrefixStore, ProcessGroupGloo/NCCL) and
is never registered with torch.distributed: a trainer that already runs a default group
(FSDP) keeps it, and both ends can live in one process (the tests do). Its store keys are
the ones SGLang's and Miles' `init_custom_process_group` produce, so the other end may be
an SGLang server or a Miles trainer.
"""
from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

# gloo moves CPU tensors, nccl CUDA tensors; torch keys a backend's store by that device.
DEVICE_OF_BACKEND = {"gloo": "cpu", "nccl": "cuda"}
DEFAULT_GROUP_NAME = "weight_update_group"  # SGLang's default group_name


class WeightUpdateGroup:
    """One member of a weight-update process group; rank 0 (the trainer) sends.

    Construction blocks until all `world_size` members have joined, so every member must
    be constructed concurrently (another thread, process or host).
    """

    def __init__(self, master_address: str, master_port: int, rank: int, world_size: int,
                 group_name: str = DEFAULT_GROUP_NAME, backend: str = "nccl",
                 timeout_s: float = 600.0):
        if backend not in DEVICE_OF_BACKEND:
            raise ValueError(f"backend {backend!r}: use gloo (CPU tensors) or nccl (CUDA tensors)")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.rank, self.world_size = rank, world_size
        self.group_name, self.backend = group_name, backend
        self.device_type = DEVICE_OF_BACKEND[backend]
        timeout = timedelta(seconds=timeout_s)
        # As torch's tcp:// rendezvous: rank 0 hosts the store.
        self._store = dist.TCPStore(master_address, master_port, world_size, is_master=rank == 0,
                                    timeout=timeout, multi_tenant=True)
        # init_custom_process_group prefixes the group name, then torch's group helper
        # prefixes "<group>/" and the backend's device: the same keys meet the same peers.
        store = dist.PrefixStore(f"{self.device_type}/", dist.PrefixStore(
            f"{group_name}/", dist.PrefixStore(group_name, self._store)))
        self._backend = _make_backend(backend, store, rank, world_size, timeout)
        # torch's helper does this too; its members wait for rank 0's sequence number.
        self._backend._set_sequence_number_for_group()

    def broadcast(self, tensors: list[torch.Tensor]) -> None:
        """Broadcast each tensor in place from rank 0, in order (rank 0 sends, others fill)."""
        options = dist.BroadcastOptions()
        options.rootRank, options.rootTensor = 0, 0
        works = [self._backend.broadcast([tensor], options) for tensor in tensors]
        for work in works:
            work.wait()

    def receive(self, dtypes: list[torch.dtype], shapes: list[list[int]],
                device: torch.device) -> list[torch.Tensor]:
        """The next tensors rank 0 broadcasts, allocated on `device`."""
        tensors = [torch.empty(shape, dtype=dtype, device=device)
                   for dtype, shape in zip(dtypes, shapes, strict=True)]
        self.broadcast(tensors)
        return tensors

    def destroy(self) -> None:
        self._backend.shutdown()


def _make_backend(backend: str, store, rank: int, world_size: int, timeout: timedelta):
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    if not dist.is_nccl_available():
        raise ValueError("backend nccl: this torch build has no NCCL; use gloo")
    options = dist.ProcessGroupNCCL.Options()
    options.is_high_priority_stream = False
    options._timeout = timeout
    return dist.ProcessGroupNCCL(store, rank, world_size, options)
