"""CUDA IPC weight transfer, on a GPU: the trainer hands an engine server on its device
handles to its tensors (`serialize_named_tensors_ipc`) instead of their bytes.

Both callers of the IPC sender are driven: the router's /update_weights_from_tensor for
CUDA tensors (a trainer in this process with colocated servers) and a Ray trainer rank's
`send_weights` (colocated ranks on Ray). CUDA IPC opens a handle only in another
process, so the server (furlong's, `--accept-ipc-weights`) runs as a subprocess on the
same GPU. After each push its weights are read back (/get_weights_by_name) and compared
exactly with the pushed ones, which differ from the boot checkpoint's.
"""
from __future__ import annotations

import asyncio
import sys
from types import SimpleNamespace

import pytest
import requests
import torch

from furlong.engine.launcher import BUILTIN_SERVER, ServerProcess
from furlong.engine.router import EngineRouter, RouterOptions
from furlong.engine.weights.receive import read_hf_weights
from furlong.engine.weights.send import Servers
from furlong.ports import free_port

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def ipc_server(tiny, tmp_path_factory):
    """The URL of a furlong server on GPU 0 that accepts CUDA IPC payloads."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", BUILTIN_SERVER, "--model-path", str(tiny / "model"),
               "--port", str(port), "--device", "cuda", "--dtype", "float32",
               "--accept-ipc-weights", "--log-level", "warning"]
    server = ServerProcess(command, None, url, tmp_path_factory.mktemp("ipc") / "server.log")
    try:
        server.wait_healthy(600)
        yield url
    finally:
        server.stop()


def pushed_weights(tiny, seed: int) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors plus noise, on the GPU (what a trainer would hold); the
    noise has a floor, so constant tensors (norm weights of 1) change too."""
    generator = torch.Generator().manual_seed(seed)
    return {name: (tensor.float() + torch.randn(tensor.shape, generator=generator)
                   * (tensor.float().std() + 0.01)).cuda()
            for name, tensor in read_hf_weights(tiny / "model")}


def served(url: str, name: str, rows: int) -> torch.Tensor:
    response = requests.post(f"{url}/get_weights_by_name", timeout=120,
                             json={"name": name, "truncate_size": rows})
    response.raise_for_status()
    return torch.tensor(response.json())


def assert_served(url: str, weights: dict[str, torch.Tensor], version: int) -> None:
    for name, tensor in weights.items():
        torch.testing.assert_close(served(url, name, len(tensor)), tensor.cpu(), rtol=0, atol=0,
                                   msg=lambda message: f"{name}: {message}")
    info = requests.get(f"{url}/get_model_info", timeout=120).json()
    assert info["weight_version"] == str(version)


def test_router_pushes_cuda_tensors_by_ipc(tiny, ipc_server):
    weights = pushed_weights(tiny, seed=1)
    boot = dict(read_hf_weights(tiny / "model"))
    assert not any(torch.equal(weights[name].cpu(), boot[name]) for name in weights)

    async def push():
        # Small buckets: several IPC requests, the last one carrying the version.
        router = EngineRouter([ipc_server], RouterOptions(health_check_interval_s=None,
                                                          weight_sync="auto",
                                                          bucket_bytes=64 << 10))
        try:
            await router.update_weights(weights.items(), version=3)
        finally:
            await router.close()

    asyncio.run(push())
    assert_served(ipc_server, weights, version=3)


def test_ray_rank_sends_by_ipc(tiny, ipc_server):
    """TrainRank.send_weights by CUDA IPC, run here on a stand-in rank whose actor holds
    `weights`."""
    pytest.importorskip("ray")
    from furlong.cluster.ray_trainer import TrainRank
    from furlong.engine.weights.send import make_sender
    weights = pushed_weights(tiny, seed=2)
    rank = SimpleNamespace(actor=SimpleNamespace(named_weights=weights.items),
                           senders={"colocated": make_sender("ipc", 64 << 10)})
    # The class under Ray's actor wrapper (its methods as plain functions).
    send_weights = TrainRank.__ray_metadata__.modified_class.send_weights
    send_weights(rank, "colocated", Servers((ipc_server,)), 4)
    assert_served(ipc_server, weights, version=4)
