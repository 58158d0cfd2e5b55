"""LoRA checkpoints are PEFT's files: PEFT loads what the trainer saves (same outputs), the
trainer resumes its own save to the bit and warm-starts from PEFT's save, and --save-hf
writes the merged model that plain transformers loads."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from furlong.model import lora
from furlong.model.lora_files import CONFIG_FILE, WEIGHTS_FILE, read_adapter
from furlong.train.actor import RankInfo, TrainActor
from furlong.train.lora_adapter import ADAPTER_DIR, adapter_source

from conftest import policy_config, reference_log_probs, trainer_batch

LORA = ["--lora-rank", "4", "--lora-alpha", "8", "--target-modules", "all-linear",
        "--lr", "1e-2"]


def make_actor(tiny, init, extra=()) -> TrainActor:
    return TrainActor(policy_config(tiny, [*LORA, *extra]), RankInfo(), str(init),
                      total_steps=3)


def adapter_of(actor: TrainActor) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in actor.named_adapter_weights()}


def adam_state(actor: TrainActor) -> list[dict]:
    return [actor.optimizer.state[p] for group in actor.optimizer.param_groups
            for p in group["params"]]


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    """(actor after one step and a save, its batch, the iteration directory, the adapter
    and Adam state at the save, the adapter after one more step)."""
    torch.manual_seed(0)
    actor = make_actor(tiny, tiny / "model")
    batch = trainer_batch(actor, 6, seed=4)
    batch.old_log_probs, _ = actor.compute_log_probs(batch)
    actor.train(batch)
    directory = tmp_path_factory.mktemp("lora_ckpt") / "iter_0000000"
    actor.save(directory, save_optimizer=True)
    at_save = adapter_of(actor), [{key: value.clone() for key, value in s.items()}
                                  for s in adam_state(actor)]
    actor.train(batch)
    return actor, batch, directory, at_save, adapter_of(actor)


def test_a_save_is_peft_files_and_no_model(saved):
    _, _, directory, (adapter, _), _ = saved
    assert sorted(p.name for p in (directory / ADAPTER_DIR).iterdir()) == \
        sorted([CONFIG_FILE, WEIGHTS_FILE])
    assert not (directory / "model").exists()
    config, tensors = read_adapter(directory / ADAPTER_DIR)
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 8, "LORA")
    assert sorted(config["target_modules"]) == sorted(lora.STANDARD_TARGETS)
    assert tensors.keys() == adapter.keys()
    assert all(torch.equal(tensors[n], t) and t.dtype == torch.float32
               for n, t in adapter.items())


def test_peft_loads_the_save_and_computes_what_the_trainer_computed(tiny, saved):
    from peft import PeftModel
    _, batch, directory, (adapter, _), _ = saved
    resumed = make_actor(tiny, directory)  # the trainer's policy as saved
    expected = resumed.compute_log_probs(batch)[0]
    base = AutoModelForCausalLM.from_pretrained(tiny / "model")
    peft_model = PeftModel.from_pretrained(base, directory / ADAPTER_DIR).eval()
    with torch.no_grad():
        for i, want in enumerate(expected):
            got = reference_log_probs(peft_model, batch.tokens[i], batch.response_lengths[i],
                                      1.0)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_resume_restores_adapter_and_adam_to_the_bit_and_takes_the_same_step(tiny, saved):
    _, batch, directory, (adapter, state), next_adapter = saved
    resumed = make_actor(tiny, directory)
    resumed.restore(directory)
    assert all(torch.equal(t, adapter[n]) for n, t in adapter_of(resumed).items())
    for got, want in zip(adam_state(resumed), state, strict=True):
        assert got.keys() == want.keys()
        assert all(torch.equal(got[key], want[key]) for key in want)
    resumed.train(batch)
    assert all(torch.equal(t, next_adapter[n]) for n, t in adapter_of(resumed).items())


def test_an_adapter_saved_by_peft_warm_starts_the_trainer(tiny, tmp_path):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny / "model")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(lora.STANDARD_TARGETS),
                        init_lora_weights=False)  # B random too: not the base
    peft_model = get_peft_model(base, config)
    peft_model.save_pretrained(tmp_path)
    actor = make_actor(tiny, tiny / "model", ["--lora-adapter-path", str(tmp_path)])
    peft_state = {n.removeprefix("base_model.model.").replace(".default.", "."): p
                  for n, p in peft_model.named_parameters() if lora.is_adapter_name(n)}
    adapter = adapter_of(actor)
    assert adapter.keys() == peft_state.keys()
    assert all(torch.equal(t, peft_state[n]) for n, t in adapter.items())


def test_save_hf_writes_the_merged_model_as_peft_merges_it(tiny, saved, tmp_path):
    from peft import PeftModel
    actor, _, directory, _, _ = saved
    resumed = make_actor(tiny, directory)
    resumed.export_hf(tmp_path)
    assert not (tmp_path / CONFIG_FILE).exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path)  # plain transformers
    base = AutoModelForCausalLM.from_pretrained(tiny / "model")
    expected = PeftModel.from_pretrained(base, directory / ADAPTER_DIR).merge_and_unload()
    want = dict(expected.named_parameters())
    for name, param in merged.named_parameters():
        torch.testing.assert_close(param, want[name], rtol=1e-6, atol=1e-7)
    changed = "model.layers.0.self_attn.q_proj.weight"  # PEFT merged into `base` in place
    original = AutoModelForCausalLM.from_pretrained(tiny / "model").get_parameter(changed)
    assert not torch.equal(merged.get_parameter(changed), original)


def test_a_checkpoint_of_all_weights_does_not_resume_under_lora(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="saved without --lora-rank"):
        adapter_source(str(tmp_path), None)
