"""Miles' standard layout on CPU: `--colocate` with engines of 2, 4 or 8 devices over 8
trainer ranks.

- placement: which devices (and trainer bundles) each engine takes, and which trainer
  ranks feed each of its TP ranks; an engine never straddles nodes;
- the exact server command line and devices of an engine of N GPUs;
- the weight fan-out: spawned gloo ranks run the real sender and `EngineFeed` against
  furlong's weight routes standing in for SGLang (TP rank 0 of an engine of N): each
  engine gets one request per bucket holding one payload per TP rank, each from the rank
  on that device (the ranks send distinguishable tensors, so the server's record shows
  who sent what); a refusal stops every rank at that bucket;
- --colocate turns the offload flags on, as in Miles;
- one Ray run (CPU processes): two ranks feed one engine of 2 devices, which serves the
  trainer's weights after every push.
"""
from __future__ import annotations

import asyncio
import threading

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from aiohttp import web

from furlong.config import ConfigError
from furlong.engine.server.weight_routes import WeightRoutes
from furlong.engine.weights.receive import WeightReceiver
from furlong.engine.weights.wire import (deserialize_ipc_tensors, deserialize_named_tensors,
                                         is_ipc_payload, serialize_named_tensors)
from furlong.ports import free_port

# Spawned ranks import this module: what the placement and launch tests need (the trainer's
# modules, the tiny task's helpers) is imported in them.
EIGHT_RANKS = ("--actor-num-nodes", "1", "--actor-num-gpus-per-node", "8", "--colocate")


def config_of(tiny, *flags: str, **named):
    from conftest import train_argv
    from furlong.config import load_config
    return load_config(train_argv(tiny, *flags, **named))[0]


def colocated(tiny, per_engine: int, *extra: str):
    return config_of(tiny, *EIGHT_RANKS, "--rollout-num-gpus-per-engine", str(per_engine),
                     *extra, rollout_batch_size=8)


def placed(config, gpus: int):
    from furlong.cluster.placement import plan_placement
    return plan_placement(config, gpus)


# ---- placement -------------------------------------------------------------------------------

@pytest.mark.parametrize("per_engine, devices", [
    (2, [[0, 1], [2, 3], [4, 5], [6, 7]]),
    (4, [[0, 1, 2, 3], [4, 5, 6, 7]]),
    (8, [[0, 1, 2, 3, 4, 5, 6, 7]]),
])
def test_engines_take_the_devices_of_trainer_ranks(tiny, per_engine, devices):
    from furlong.cluster.placement import check_engine_devices
    placement = placed(colocated(tiny, per_engine), 8)
    assert (placement.trainer_ranks, placement.num_engines) == (8, len(devices))
    assert placement.engine_devices == devices
    assert placement.engine_feeders == devices  # rank i sits on device i
    # each engine's actor on the bundle of its first device (trainer rank e*N's)
    assert [placement.engine_bundle(e) for e in range(len(devices))] == \
        [group[0] for group in devices]
    check_engine_devices(placement, "sglang")
    assert placement.describe_engines().startswith(f"engines: {len(devices)} x tp {per_engine} "
                                                   "on devices [")


def test_engines_apart_are_fed_by_broadcast(tiny):
    config = config_of(tiny, "--actor-num-gpus-per-node", "4", "--rollout-num-gpus", "4",
                       "--rollout-num-gpus-per-engine", "2")
    placement = placed(config, 8)
    assert placement.engine_devices == [[4, 5], [6, 7]]
    assert placement.engine_feeders == []
    assert [placement.engine_bundle(e) for e in range(2)] == [4, 5]


def test_an_engine_never_straddles_two_nodes(tiny):
    config = config_of(tiny, "--actor-num-nodes", "2", "--actor-num-gpus-per-node", "4",
                       "--colocate", "--rollout-num-gpus-per-engine", "8", rollout_batch_size=8)
    with pytest.raises(ConfigError, match="--rollout-num-gpus-per-engine 8 does not divide "
                                          "--actor-num-gpus-per-node 4"):
        placed(config, 0)
    config = config_of(tiny, "--actor-num-nodes", "2", "--actor-num-gpus-per-node", "4",
                       "--colocate", "--rollout-num-gpus-per-engine", "4", rollout_batch_size=8)
    assert placed(config, 0).engine_devices == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_the_built_in_engine_stands_in_only_without_gpus(tiny):
    """On GPUs an engine of several devices needs SGLang; on the CPU furlong's server
    stands in for a colocated one (its TP rank 0), not for one apart (whose N ranks a
    broadcast group would wait for)."""
    from furlong.cluster.placement import check_engine_devices
    check_engine_devices(placed(colocated(tiny, 2), 0), "auto")
    with pytest.raises(ConfigError, match="--rollout-num-gpus-per-engine 2 with "
                                          "--rollout-backend auto"):
        check_engine_devices(placed(colocated(tiny, 2), 8), "auto")
    apart = config_of(tiny, "--actor-num-gpus-per-node", "2", "--rollout-num-gpus", "2",
                      "--rollout-num-gpus-per-engine", "2")
    with pytest.raises(ConfigError, match="only colocated engines of several devices"):
        check_engine_devices(placed(apart, 0), "hf")


def test_server_gpus_follow_the_bundles_ray_gave(tiny):
    """Each engine's server runs on the GPUs Ray gave the trainer bundles of its devices
    (here shuffled), in TP order; bundles of one engine on two nodes are an error."""
    pytest.importorskip("ray")
    from furlong.cluster.ray_cluster import engine_actor_gpus, engine_gpu_ids
    placement = placed(colocated(tiny, 4), 8)
    gpus = [3, 2, 1, 0, 7, 6, 5, 4]
    assert engine_gpu_ids(placement, [("10.0.0.1", [gpu]) for gpu in gpus]) == \
        [[3, 2, 1, 0], [7, 6, 5, 4]]
    assert engine_actor_gpus(placement) == 0.5  # the half its first bundle's rank leaves
    split = [("10.0.0.1", [0])] * 3 + [("10.0.0.2", [0])] * 5
    with pytest.raises(RuntimeError, match="engine 0 would span nodes"):
        engine_gpu_ids(placement, split)


# ---- the server command line -----------------------------------------------------------------

class RecordedServer:
    """A ServerProcess that records its command and devices instead of starting."""
    started: list = []
    pid = 0

    def __init__(self, command, env, url, log_path):
        self.command, self.url = command, url
        RecordedServer.started.append((command, env.get("CUDA_VISIBLE_DEVICES")))

    def wait_healthy(self, timeout_s):
        pass

    def stop(self, timeout_s=15.0):
        pass


@pytest.mark.parametrize("per_engine", [2, 4, 8])
def test_each_engine_runs_sglang_with_tp_size_on_exactly_its_devices(tiny, tmp_path,
                                                                     monkeypatch, per_engine):
    import sys

    from furlong.engine import launcher
    from furlong.engine.launcher import ServerLauncher, ServerSpec
    monkeypatch.setattr(launcher, "ServerProcess", RecordedServer)
    monkeypatch.setattr(RecordedServer, "started", [])
    config = colocated(tiny, per_engine, "--sglang-mem-fraction-static", "0.7")
    placement = placed(config, 8)
    spec = ServerSpec("/models/Qwen3-4B", config.sglang, 42, log_dir=str(tmp_path))
    urls = ServerLauncher(spec, placement.engine_devices).start()
    ports = [int(url.rsplit(":", 1)[1]) for url in urls]
    nccl_ports = [int(command[command.index("--nccl-port") + 1])
                  for command, _ in RecordedServer.started]
    assert len(set(ports + nccl_ports)) == 2 * len(ports)  # every port its own
    assert RecordedServer.started == [
        ([sys.executable, "-m", "sglang.launch_server", "--model-path", "/models/Qwen3-4B",
          "--host", "127.0.0.1", "--port", str(port), "--tp-size", str(per_engine),
          "--random-seed", "42", "--nccl-port", str(nccl_port), "--mem-fraction-static", "0.7"],
         ",".join(map(str, devices)))
        for port, nccl_port, devices in zip(ports, nccl_ports, placement.engine_devices,
                                            strict=True)]


# ---- the weight fan-out ----------------------------------------------------------------------

NAMES = ("w0", "w1", "w2")
BUCKET_BYTES = 128  # two 4x4 float32 tensors: buckets [w0, w1], [w2]


def rank_tensors(rank: int, device: str = "cpu") -> list[tuple[str, torch.Tensor]]:
    """What rank `rank` pushes: the same names and shapes everywhere, values that say who
    sent them (a real push sends the same weights from every rank)."""
    return [(name, torch.full((4, 4), 10.0 * rank + index, device=device))
            for index, name in enumerate(NAMES)]


def _feed_worker(rank: int, port: int, world: int, feeders: list[list[int]],
                 urls: list[str], out, transport: str = "value") -> None:
    """One trainer rank: joins its engine's group and pushes rank_tensors by `transport`
    (ipc: its own CUDA memory); saves the outcome."""
    from furlong.cluster.engine_feed import EngineFeed
    from furlong.engine.weights.send import Servers, make_sender
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    feed = EngineFeed(feeders, rank)
    engine = next(index for index, ranks in enumerate(feeders) if rank in ranks)
    servers = Servers((urls[engine],) if feed.is_source else (), None, len(feeders[engine]))
    tensors = rank_tensors(rank, "cuda" if transport == "ipc" else "cpu")
    try:
        outcome = ("sent", make_sender(transport, BUCKET_BYTES, tp_gather=feed).send(
            tensors, servers, 5))
    except Exception as error:  # noqa: BLE001 - the outcome is what the test checks
        outcome = (type(error).__name__, str(error))
    torch.save(outcome, out / f"rank{rank}.pt")
    dist.destroy_process_group()


def decoded(payload: str) -> list[tuple[str, torch.Tensor]] | None:
    """A payload's tensors, on the CPU (CUDA IPC ones mapped from their sender, which
    must still hold them); None for what is no payload (the server refuses it)."""
    try:
        pairs = (deserialize_ipc_tensors if is_ipc_payload(payload) else
                 deserialize_named_tensors)(payload)
    except (ValueError, TypeError):
        return None
    return [(name, tensor.cpu()) for name, tensor in pairs]


class RecordingEngine:
    """The engine behind a weight route: records every load (names -> tensors)."""

    def __init__(self):
        self.loads: list[dict[str, torch.Tensor]] = []

    async def update_weights(self, named_tensors, version):
        self.loads.append({name: tensor.cpu().clone() for name, tensor in named_tensors})

    async def flush_cache(self):
        pass

    async def abort_all(self):
        pass


class WeightServers:
    """furlong's weight routes over RecordingEngines, one server per engine, each TP rank
    0 of an engine of `tp_sizes[i]`, in one event loop on a daemon thread. `requests[i]`:
    the payload lists server i received, in order, each payload decoded on arrival."""

    def __init__(self, tp_sizes: list[int], accept_ipc_weights: bool = False):
        self.accept_ipc_weights = accept_ipc_weights
        self.engines = [RecordingEngine() for _ in tp_sizes]
        self.requests: list[list[list]] = [[] for _ in tp_sizes]
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.runners = [self._call(self._start(index, tp_size))
                        for index, tp_size in enumerate(tp_sizes)]
        self.urls = [f"http://127.0.0.1:{runner.addresses[0][1]}" for runner in self.runners]

    async def _start(self, index: int, tp_size: int) -> web.AppRunner:
        receiver = WeightReceiver(self.engines[index], "/boot", self.accept_ipc_weights,
                                  tp_size=tp_size)
        original = receiver.from_tensor

        async def recorded(payloads, options):
            self.requests[index].append([decoded(payload) for payload in payloads])
            return await original(payloads, options)
        receiver.from_tensor = recorded
        app = web.Application(client_max_size=1 << 30)
        app.add_routes(WeightRoutes(receiver).routes())
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(60)

    def stop(self) -> None:
        for runner in self.runners:
            self._call(runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)


FEEDERS = [[0, 1], [2, 3]]  # two engines of 2 devices over 4 trainer ranks


@pytest.fixture(scope="module")
def fan_out(tmp_path_factory) -> tuple[WeightServers, list]:
    """One spawn of 4 gloo ranks pushing to two servers: the first TP rank 0 of an engine
    of 2; the second declares 3 TP ranks, so it refuses the 2 payloads it gets. The
    servers and each rank's outcome."""
    out = tmp_path_factory.mktemp("fan_out")
    servers = WeightServers([2, 3])
    world = sum(len(ranks) for ranks in FEEDERS)
    try:
        mp.spawn(_feed_worker, args=(free_port(), world, FEEDERS, servers.urls, out),
                 nprocs=world)
    finally:
        servers.stop()
    return servers, [torch.load(out / f"rank{rank}.pt") for rank in range(world)]


def sender_of(entry: list[tuple[str, torch.Tensor]]) -> int:
    """The rank whose tensors a decoded payload holds (rank_tensors' values)."""
    return int(entry[0][1][0, 0].item()) // 10


def test_each_tp_rank_gets_the_payload_of_the_trainer_rank_on_its_device(fan_out):
    """Per bucket one request per engine, posted by its first rank, whose list holds rank
    2e's payload for TP rank 0 and rank 2e+1's for TP rank 1; the engine loads its own
    entry (TP rank 0's). (The second engine refuses the first bucket, so the push stops
    there: next test.)"""
    servers, outcomes = fan_out
    requests = servers.requests[0]
    assert [[sender_of(entry) for entry in request] for request in requests] == [[0, 1]]
    assert [name for name, _ in requests[0][1]] == ["w0", "w1"]
    loads = servers.engines[0].loads
    assert [sorted(load) for load in loads] == [["w0", "w1"]]
    expected = dict(rank_tensors(0))
    for load in loads:
        for name, tensor in load.items():
            torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0)
    # the second engine's one request came from its own ranks, in TP order
    assert [[sender_of(entry) for entry in request]
            for request in servers.requests[1]] == [[2, 3]]


def test_an_engine_that_refuses_stops_every_rank_at_that_bucket(fan_out):
    """The second engine answers 400 (2 payloads for 3 TP ranks): its source raises the
    server's error at the first bucket and its other rank learns it; the first engine's
    ranks, whose engine loaded the bucket, stop there too, naming the refusing engine
    (in a real push the next bucket's weights are gathered by all ranks together: they
    would wait for the stopped ones until a timeout)."""
    servers, outcomes = fan_out
    assert outcomes[2][0] == "EngineHTTPError"
    assert "serialized_named_tensors has 2 entries" in outcomes[2][1]
    assert "3 tensor-parallel rank(s)" in outcomes[2][1]
    assert outcomes[3][0] == "RuntimeError"
    assert "was not loaded" in outcomes[3][1] and "2 entries" in outcomes[3][1]
    for rank in (0, 1):
        assert outcomes[rank][0] == "RuntimeError"
        assert "the engine fed from trainer rank 2 did not load it" in outcomes[rank][1]
    assert servers.engines[1].loads == []


@pytest.mark.gpu
def test_cuda_ipc_handles_from_each_rank_reach_their_tp_entry(tmp_path):
    """The GPU path of the same code: two ranks on one GPU (standing for the two devices
    of an engine) send handles to their own CUDA memory, named by the GPU's UUID; the
    server (another process, as SGLang's TP ranks are) maps each rank's memory from its
    entry, and loads rank 0's."""
    servers = WeightServers([2], accept_ipc_weights=True)
    try:
        mp.spawn(_feed_worker, args=(free_port(), 2, [[0, 1]], servers.urls, tmp_path, "ipc"),
                 nprocs=2)
    finally:
        servers.stop()
    assert [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)] == [("sent", 2)] * 2
    assert [[sender_of(entry) for entry in request] for request in servers.requests[0]] == \
        [[0, 1], [0, 1]]
    loads = servers.engines[0].loads
    assert [sorted(load) for load in loads] == [["w0", "w1"], ["w2"]]
    expected = dict(rank_tensors(0))
    for load in loads:
        for name, tensor in load.items():
            torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0)


# ---- what the stand-in checks of the other entries ------------------------------------------

def post_tensor_update(url: str, payloads: list) -> tuple[int, str]:
    import requests
    response = requests.post(url + "/update_weights_from_tensor", timeout=60,
                             json={"serialized_named_tensors": payloads})
    return response.status_code, response.text


@pytest.mark.parametrize("payloads, message", [
    (lambda good, other: [good], "serialized_named_tensors has 1 entries"),
    (lambda good, other: [good, "@@"], "serialized_named_tensors[1]: not base64"),
    (lambda good, other: [good, other], "serialized_named_tensors[1] does not hold the names"),
    (lambda good, other: [good, 7], "a list of base64 strings, one per tensor-parallel rank "
                                    "(this engine has 2)"),
])
def test_the_stand_in_checks_every_entry_before_loading_its_own(payloads, message):
    """TP rank 0 of an engine of 2 loads entry 0 only if there is one entry per rank and
    each loads to entry 0's names, shapes and dtypes (what the other ranks would load)."""
    servers = WeightServers([2])
    good = serialize_named_tensors(rank_tensors(0))
    other = serialize_named_tensors([("w0", torch.zeros(2, 2))])
    try:
        status, text = post_tensor_update(servers.urls[0], payloads(good, other))
        assert (status, servers.engines[0].loads) == (400, [])
        assert message in text
        status, _ = post_tensor_update(servers.urls[0], [good, good])
        assert status == 200 and sorted(servers.engines[0].loads[0]) == list(NAMES)
    finally:
        servers.stop()


# ---- offload -----------------------------------------------------------------------------

def test_colocate_turns_offload_on_unless_the_flags_say_otherwise(tiny):
    config = colocated(tiny, 2)
    assert (config.cluster.offload_train, config.cluster.offload_rollout) == (True, True)
    assert config.sources["cluster.offload_train"] == "derived"
    config = colocated(tiny, 2, "--no-offload-rollout")
    assert (config.cluster.offload_train, config.cluster.offload_rollout) == (True, False)
    apart = config_of(tiny, "--actor-num-gpus-per-node", "2", "--rollout-num-gpus", "2")
    assert (apart.cluster.offload_train, apart.cluster.offload_rollout) == (False, False)


# ---- one Ray run -------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(900)  # a hang guard: Ray runs on 2 loaded cores are slow
def test_two_ranks_feed_one_colocated_engine_of_two_devices(grpo_argv, tmp_path, ray_cluster):
    """Ray on CPU: furlong's server stands in for an engine of 2 devices (TP rank 0 of 2,
    so it refuses any request without both ranks' payloads); after every push it serves
    the trainer's weights, so its log-probs equal the trainer's."""
    from furlong import cli
    from furlong.output.metrics import read_metrics
    argv = grpo_argv + ["--actor-num-gpus-per-node", "2", "--colocate",
                        "--rollout-num-gpus-per-engine", "2", "--lr", "1e-3", "--rm-type",
                        "random", "--weight-decay", "0", "--run-dir", str(tmp_path),
                        "--update-weight-buffer-size", "100000"]
    assert cli.main(argv) == 0
    rows = [row for row in read_metrics(tmp_path / "metrics.jsonl") if "train/loss" in row]
    assert len(rows) >= 2
    # engines that miss a push are off by 3e-6 or more (tests/ray_weights.py)
    assert max(row["train/train_rollout_logprob_abs_diff"] for row in rows) < 1e-6
