"""--optimizer-cpu-offload (with --overlap-cpu-optimizer-d2h-h2d and
--use-precision-aware-optimizer) acts with Megatron's meaning: the float32 masters and
Adam's moments live in host memory and AdamW steps there, to the weights the device
path reaches.

Where it runs, each against the same run without the flags:
- one CPU process: the plain float32 model, stepped by torch's fused CPU AdamW;
- the one-GPU path, run on the CPU in bfloat16 as in tests/test_master_weights.py:
  masters in host memory, stepped by `HostStep`;
- 2 gloo ranks: FSDP2's CPUOffloadPolicy on every FSDP module of the trained policy.
Checkpoints saved with the flag resume without it, and the other way round.
Tolerances, float32: weights after the same steps to 1e-6 (measured: 2e-7 between
torch's fused and foreach CPU AdamW, 1e-7 over 2 ranks); a resume under another
layout as tests/test_parallel.py's. GPU tests (marked, `pytest -m gpu
tests/test_optimizer_offload.py` on a CUDA machine): pinned memory, copy streams and
buckets on one GPU; NCCL collectives of host shards on 2 GPUs.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from filelock import FileLock
from torch.distributed.tensor import DTensor

from furlong.config import load_config
from furlong.ports import free_port
from furlong.train import actor as actor_module
from furlong.train import cpu_optimizer, parallel
from furlong.train.actor import RankInfo, TrainActor
from furlong.train.cpu_optimizer import HostStep, buckets

from conftest import policy_config, trainer_batch

OFFLOAD = ["--optimizer-cpu-offload", "--overlap-cpu-optimizer-d2h-h2d",
           "--use-precision-aware-optimizer"]
WORLD = 2


def offload_config(tiny: Path, offload: bool):
    return policy_config(tiny, ["--lr", "1e-3", *(OFFLOAD if offload else [])])


def build(tiny: Path, offload: bool, rank: RankInfo = RankInfo(),
          init: Path | None = None) -> TrainActor:
    return TrainActor(offload_config(tiny, offload), rank, str(init or tiny / "model"), 4)


def weights(actor: TrainActor) -> dict[str, torch.Tensor]:
    """The float32 weights (one GPU's masters), whole, on the CPU."""
    return {name: tensor.detach().cpu().clone() for name, tensor in actor.named_weights()}


def state_devices(actor: TrainActor) -> set[str]:
    """Where this rank's AdamW state lives (a DTensor's local shard)."""
    return {(value.to_local() if isinstance(value, DTensor) else value).device.type
            for state in actor.optimizer.state.values() for value in state.values()}


def assert_same_weights(actual: dict, expected: dict, rtol: float = 0.0,
                        atol: float = 1e-6) -> None:
    assert actual.keys() == expected.keys()
    for name, tensor in actual.items():
        torch.testing.assert_close(tensor, expected[name], rtol=rtol, atol=atol, msg=name)


@pytest.fixture(scope="module")
def batch(tiny):
    return trainer_batch(build(tiny, False), 6, seed=7)


# ---- flags --------------------------------------------------------------------------------
def test_the_flags_act_and_do_not_warn(grpo_argv):
    config, warnings = load_config(grpo_argv + OFFLOAD)
    optimizer = config.optimizer
    assert optimizer.optimizer_cpu_offload and optimizer.overlap_cpu_optimizer_d2h_h2d
    assert optimizer.use_precision_aware_optimizer
    assert [w for w in warnings if any(flag in w for flag in OFFLOAD)] == []


def test_overlap_without_offload_warns_once(grpo_argv):
    _, warnings = load_config(grpo_argv + ["--overlap-cpu-optimizer-d2h-h2d"])
    mine = [w for w in warnings if "--overlap-cpu-optimizer-d2h-h2d" in w]
    assert len(mine) == 1 and "--optimizer-cpu-offload" in mine[0]


# ---- the host step ------------------------------------------------------------------------
def test_buckets_keep_model_order_within_the_budget():
    assert buckets([3, 4, 2, 9, 1], 6) == [range(0, 1), range(1, 3), range(3, 4), range(4, 5)]
    assert buckets([3, 4], 100) == [range(0, 2)]
    assert buckets([], 6) == []


def test_a_step_bucket_by_bucket_is_one_adamw_step():
    """Per-parameter state makes stepping the buckets in turn one AdamW step: the masters
    follow torch's AdamW on the scaled gradients, and the model gets them rounded."""
    torch.manual_seed(0)
    shapes = [(2, 2), (5,), (2, 4), (3,), (11,)]
    masters = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
    reference = [torch.nn.Parameter(m.detach().clone()) for m in masters]
    params = [torch.zeros(shape, dtype=torch.bfloat16) for shape in shapes]
    host_optimizer = torch.optim.AdamW(masters, lr=1e-2, fused=True)
    optimizer = torch.optim.AdamW(reference, lr=1e-2, foreach=True)
    step, calls = HostStep(overlap=True, bucket_numel=10), []
    host_optimizer.step = lambda step=host_optimizer.step: calls.append(1) or step()
    for _ in range(3):
        grads = [torch.randn(shape).to(torch.bfloat16) for shape in shapes]
        scale = torch.tensor(0.5)
        step.step(host_optimizer, masters, grads, params, scale)
        for param, grad in zip(reference, grads, strict=True):
            param.grad = grad.float() * scale
        optimizer.step()
        for master, expected, param in zip(masters, reference, params, strict=True):
            torch.testing.assert_close(master, expected, rtol=0, atol=1e-6)
            assert torch.equal(param, master.detach().to(torch.bfloat16))
    assert len(calls) == 3 * len(buckets([4, 5, 8, 3, 11], 10)) == 3 * 4
    assert all(m.grad is None for m in masters)


# ---- one process ---------------------------------------------------------------------------
def test_one_process_steps_fused_adamw_on_the_cpu_to_the_same_weights(tiny, batch):
    trained = {}
    for offload in (False, True):
        actor = build(tiny, offload)
        for _ in range(2):
            actor.train(batch)
        trained[offload] = weights(actor)
    assert all(group["fused"] for group in actor.optimizer.param_groups)
    assert state_devices(actor) == {"cpu"}
    assert_same_weights(trained[True], trained[False])


@pytest.fixture
def one_gpu_path(monkeypatch):
    """TrainActor as on one GPU (bfloat16 model, float32 masters), run on the CPU."""
    monkeypatch.setattr(actor_module.TrainActor, "_one_gpu",
                        property(lambda self: self.mesh is None))
    monkeypatch.setattr(actor_module, "compile_decoder_layers", lambda layers: None)


def test_one_gpu_path_steps_masters_on_the_host_and_resumes_either_way(
        tiny, batch, one_gpu_path, monkeypatch, tmp_path):
    """Masters and moments in host memory, stepped by `HostStep`, give the device path's
    weights; a save of either resumes in the other to the next step's weights."""
    host_steps = []
    original = HostStep.step
    monkeypatch.setattr(HostStep, "step",
                        lambda self, *args: host_steps.append(1) or original(self, *args))
    next_weights = {}
    for offload in (False, True):
        actor = build(tiny, offload)
        actor.train(batch)
        actor.save(tmp_path / str(offload), save_optimizer=True)
        actor.train(batch)
        next_weights[offload] = weights(actor)
    assert len(host_steps) == 2 and actor.masters is not None
    assert {m.device.type for m in actor.masters.parameters()} == {"cpu"}
    assert {p.dtype for p in actor.policy.parameters()} == {torch.bfloat16}
    assert state_devices(actor) == {"cpu"}
    assert all(group["fused"] for group in actor.optimizer.param_groups)
    assert_same_weights(next_weights[True], next_weights[False])
    for saved_with in (False, True):
        resumed = build(tiny, not saved_with, init=tmp_path / str(saved_with) / "model")
        resumed.restore(tmp_path / str(saved_with))
        resumed.train(batch)
        assert_same_weights(weights(resumed), next_weights[saved_with])
    assert len(host_steps) == 3  # the resumed offloaded run's step


# ---- two gloo ranks -----------------------------------------------------------------------
def _worker(rank: int, port: int, tiny: Path, batch, out: Path, device_type: str) -> None:
    torch.set_num_threads(1)
    policies = []
    original = parallel.fully_shard

    def recorded(module, **kwargs):
        policies.append(kwargs["offload_policy"])
        return original(module, **kwargs)
    parallel.fully_shard = recorded

    def actor_for(offload: bool, init: Path | None = None) -> TrainActor:
        info = parallel.rank_info(rank, WORLD, 1, device_type, master_port=port)
        return build(tiny, offload, info, init)

    results = {}
    for offload in (False, True):
        policies.clear()
        actor = actor_for(offload)
        actor.train(batch)
        actor.save(out / f"saved_{offload}", save_optimizer=True)
        actor.train(batch)
        results[offload] = {
            "weights": weights(actor), "state": state_devices(actor),
            "fused": [group["fused"] for group in actor.optimizer.param_groups],
            "policies": [(type(p).__name__, getattr(p, "pin_memory", None)) for p in policies]}
    actor.update_reference()  # host shards into the reference's, which stay on the device
    results["reference_updated"] = all(torch.equal(a, b) for a, b in zip(
        actor.compute_log_probs(batch)[0], actor.compute_log_probs(batch, reference=True)[0],
        strict=True))
    resumed = actor_for(True, init=out / "saved_False" / "model")
    resumed.restore(out / "saved_False")
    resumed.train(batch)
    results["resumed"] = weights(resumed)
    if rank == 0:
        torch.save(results, out / "results.pt")


def spawn_ranks(tiny: Path, batch, out: Path, device_type: str) -> dict:
    mp.spawn(_worker, args=(free_port(), tiny, batch, out, device_type), nprocs=WORLD)
    return torch.load(out / "results.pt", weights_only=True)


@pytest.fixture(scope="module")
def ranks(tiny, batch, tmp_path_factory):
    """(results of the 2-rank spawn, its output directory); one spawn per session, shared
    by pytest-xdist workers as in tests/test_parallel.py."""
    root = tmp_path_factory.getbasetemp()
    out = (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / "offload_ranks"
    with FileLock(f"{out}.lock"):
        if not (out / "results.pt").is_file():
            out.mkdir(exist_ok=True)
            spawn_ranks(tiny, batch, out, "cpu")
    return torch.load(out / "results.pt", weights_only=True), out


def test_two_ranks_shard_into_host_memory_to_the_same_weights(ranks):
    results, _ = ranks
    trained, plain = results[True], results[False]
    policy_count = len(trained["policies"]) // 2  # the trained policy's, then the reference's
    assert set(trained["policies"][:policy_count]) == {("CPUOffloadPolicy", False)}
    assert set(trained["policies"][policy_count:]) == {("OffloadPolicy", None)}
    assert set(plain["policies"]) == {("OffloadPolicy", None)}
    assert trained["state"] == {"cpu"} and all(trained["fused"])
    assert_same_weights(trained["weights"], plain["weights"])
    assert results["reference_updated"]


def test_two_ranks_resume_a_save_without_offload_with_it(ranks):
    results, _ = ranks
    assert_same_weights(results["resumed"], results[False]["weights"])


def test_a_two_rank_offloaded_save_resumes_in_one_process_without_it(tiny, batch, ranks):
    results, out = ranks
    actor = build(tiny, False, init=out / "saved_True" / "model")
    actor.restore(out / "saved_True")
    actor.train(batch)
    assert_same_weights(weights(actor), results[True]["weights"], rtol=1e-5)


# ---- GPU ------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_one_gpu_copies_buckets_through_pinned_memory_on_streams(tiny, batch, monkeypatch):
    """The overlapped path: gradients arrive in pinned memory bucket by bucket, the
    masters and moments stay in host memory (--offload-train leaves them there), and one
    step gives the device path's masters to float32 rounding."""
    arrivals = []
    original = cpu_optimizer._StreamCopies.to_host

    def to_host(self, tensors):
        host, event = original(self, tensors)
        arrivals.append(all(t.is_pinned() for t in host))
        return host, event
    monkeypatch.setattr(cpu_optimizer._StreamCopies, "to_host", to_host)
    cuda = RankInfo(device=torch.device("cuda"))
    stepped = {}
    for offload in (False, True):
        actor = build(tiny, offload, cuda)
        if offload:
            actor.masters._host_step.bucket_numel = 1 << 14  # several buckets in flight
        actor.train(batch)
        stepped[offload] = weights(actor)
    assert len(arrivals) > 2 and all(arrivals)
    assert {m.device.type for m in actor.masters.parameters()} == {"cpu"}
    assert {p.device.type for p in actor.policy.parameters()} == {"cuda"}
    assert state_devices(actor) == {"cpu"}
    assert_same_weights(stepped[True], stepped[False], rtol=1e-5)
    for param, master in zip(actor.policy.parameters(), actor.masters.parameters(), strict=True):
        assert torch.equal(param.cpu(), master.detach().to(torch.bfloat16))
    actor.offload()
    actor.reload()
    assert state_devices(actor) == {"cpu"}
    actor.train(batch)  # a second step after the copies of the first


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < WORLD, reason="needs 2 GPUs")
def test_two_gpus_shard_into_pinned_host_memory(tiny, batch, tmp_path):
    """NCCL with shards in host memory: the gradient norm, checkpoint gathers and the
    weights pushed all travel through the device; weights as without offload to bf16
    accuracy, and a save without offload resumes with it."""
    results = spawn_ranks(tiny, batch, tmp_path, "cuda")
    trained, plain = results[True], results[False]
    policy_count = len(trained["policies"]) // 2
    assert set(trained["policies"][:policy_count]) == {("CPUOffloadPolicy", True)}
    assert trained["state"] == {"cpu"} and all(trained["fused"]) and results["reference_updated"]
    assert_same_weights(trained["weights"], plain["weights"], rtol=1e-2, atol=1e-3)
    assert_same_weights(results["resumed"], plain["weights"], rtol=1e-2, atol=1e-3)
