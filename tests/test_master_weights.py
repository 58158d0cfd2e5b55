"""MasterWeights: bfloat16 model, float32 masters, gradients accumulated in float32."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from furlong.train import actor as actor_module
from furlong.train.actor import RankInfo, TrainActor
from furlong.train.master_weights import MasterWeights
from conftest import policy_config, trainer_batch


class TiedModel(nn.Module):
    """Embedding and output projection share one weight, as in small Qwen3 models."""

    def __init__(self, vocab: int = 13, width: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, vocab, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.embed(ids))).float().log_softmax(-1)[:, 0].sum()


def _models(seed: int = 0) -> tuple[TiedModel, TiedModel, MasterWeights]:
    """(a plain bfloat16 copy, the model under MasterWeights, its masters)."""
    torch.manual_seed(seed)
    model = TiedModel()
    plain = copy.deepcopy(model).to(torch.bfloat16)
    return plain, model, MasterWeights(model)


def test_the_model_is_cast_and_the_masters_keep_the_float32_values():
    torch.manual_seed(0)
    original = TiedModel()
    model = copy.deepcopy(original)
    masters = MasterWeights(model)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    names = [name for name, _ in original.named_parameters()]
    assert [name for name, _ in masters.named_masters()] == names  # tied weight once
    for (name, master), expected in zip(masters.named_masters(), original.parameters(),
                                       strict=True):
        assert master.dtype == torch.float32 and torch.equal(master, expected), name


def test_micro_batch_gradients_accumulate_in_float32_on_the_masters():
    plain, model, masters = _models()
    batches = [torch.tensor([1, 2, 3]), torch.tensor([4, 5, 12, 0])]
    expected = {name: torch.zeros_like(p, dtype=torch.float32)
                for name, p in plain.named_parameters()}
    for ids in batches:  # each micro-batch's bfloat16 gradient, summed in float32
        plain.zero_grad()
        plain(ids).backward()
        for name, p in plain.named_parameters():
            expected[name] += p.grad.float()
    model(batches[0]).backward()
    first = masters.gradients()  # one micro-batch: its bfloat16 gradients, not converted
    assert all(g.dtype == torch.bfloat16 for g in first)
    model(batches[1]).backward()
    assert all(p.grad is None for p in model.parameters())  # taken after each backward
    for (name, _), grad in zip(masters.named_masters(), masters.gradients(), strict=True):
        assert grad.dtype == torch.float32
        assert torch.equal(grad, expected[name]), name


def test_updates_below_bfloat16_resolution_accumulate_in_the_masters():
    """A step too small to move a bfloat16 weight still moves its master; the model gets
    the masters rounded after every step, so many small steps add up."""
    _, model, masters = _models()
    optimizer = torch.optim.SGD(masters.parameters(), lr=1.0)
    before = model.norm.weight.detach().clone()
    for _ in range(64):
        for master in masters.parameters():
            master.grad = torch.full_like(master, -1e-4)  # +1e-4 per step
        optimizer.step()
        masters.copy_to_model()
        expected = [master.to(torch.bfloat16) for master in masters.parameters()]
        assert all(torch.equal(p, e) for p, e in zip(model.parameters(), expected, strict=True))
    moved = model.norm.weight.detach() - before  # 64 steps of 1e-4, each below 1/256
    torch.testing.assert_close(moved.float(), torch.full_like(moved, 6.4e-3).float(),
                               atol=4e-3, rtol=0)
    assert moved.abs().min() > 0


def test_state_dict_puts_the_float32_masters_under_every_name():
    _, model, masters = _models()
    state = masters.state_dict()
    assert state.keys() == model.state_dict().keys()
    assert all(value.dtype == torch.float32 for value in state.values())
    assert state["embed.weight"] is state["out.weight"]  # still tied
    assert torch.equal(state["norm.bias"], dict(masters.named_masters())["norm.bias"])


def test_frozen_parameters_keep_float32_values_outside_the_optimizer():
    torch.manual_seed(0)
    model = TiedModel()
    original = model.norm.weight.detach().clone()
    model.norm.requires_grad_(False)
    masters = MasterWeights(model)
    assert model.norm.weight.dtype == torch.bfloat16
    assert len(masters.parameters()) == 1  # the tied embedding only
    assert torch.equal(dict(masters.named_masters())["norm.weight"], original)
    assert torch.equal(masters.state_dict()["norm.weight"], original)
    model(torch.tensor([1, 2])).backward()
    assert model.norm.weight.grad is None


# ---- the trainer with masters (one GPU's path, run on the CPU in bf16) ------------------
@pytest.fixture
def masters_actor(tiny, monkeypatch):
    """TrainActor as on one GPU (bf16 model, float32 masters; layers not compiled)."""
    monkeypatch.setattr(actor_module.TrainActor, "_one_gpu", property(lambda self: True))
    monkeypatch.setattr(actor_module, "compile_decoder_layers", lambda layers: None)

    def build(init: Path | None = None) -> TrainActor:
        return TrainActor(policy_config(tiny, ["--lr", "1e-3"]), RankInfo(),
                          str(init or tiny / "model"), 4)
    return build


def test_a_checkpoint_of_masters_resumes_to_the_same_next_step(masters_actor, tmp_path):
    actor = masters_actor()
    assert actor.masters is not None
    assert {p.dtype for p in actor.ref_policy.parameters()} == {torch.bfloat16}
    batch = trainer_batch(actor, 6, seed=7)
    actor.train(batch)
    actor.save(tmp_path, save_optimizer=True)
    (expected,) = actor.train(batch)
    resumed = masters_actor(tmp_path / "model")
    resumed.restore(tmp_path)
    saved = dict(resumed.masters.named_masters())
    (metrics,) = resumed.train(batch)
    assert metrics == expected
    assert all(t.dtype == torch.float32 for t in saved.values())


def test_reference_snapshots_and_offload_keep_the_masters(masters_actor):
    actor = masters_actor()
    batch = trainer_batch(actor, 6, seed=7)
    actor.snapshot_weights(0)
    actor.train(batch)
    masters = {name: t.clone() for name, t in actor.masters.named_masters()}
    actor.compute_log_probs(batch, weights_version=0)  # the old bf16 weights, then back
    assert all(torch.equal(t, masters[n]) for n, t in actor.masters.named_masters())
    actor.update_reference()
    for param, master in zip(actor.ref_policy.parameters(), actor.masters.parameters(),
                             strict=True):
        assert torch.equal(param, master.to(torch.bfloat16))
    objects = actor.masters.parameters()
    actor.offload()
    actor.reload()
    assert all(a is b for a, b in zip(actor.masters.parameters(), objects, strict=True))
    assert all(torch.equal(t, masters[n]) for n, t in actor.masters.named_masters())
