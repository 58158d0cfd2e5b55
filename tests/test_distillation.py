"""On-policy distillation (--use-opd): each token's advantage less --opd-kl-coef x the
student's minus the teacher's log-prob, with the teacher in the trainer (--opd-type
megatron) or brought by the samples (--opd-type sglang)."""
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import random_batch, reference_log_probs, train_argv, write_teacher
from test_e2e import run, series
from test_serve import ServerThread
from transformers import AutoTokenizer

from furlong import checkpoint
from furlong.algo import advantages as adv
from furlong.config import load_config
from furlong.config.parser import ConfigError
from furlong.loop import load_rollout
from furlong.model.loading import load_hf_model
from furlong.rollout.manager import read_post_processed
from furlong.rollout.teacher import post_process_rewards, scoring_request, teacher_for
from furlong.sample import Sample
from furlong.train.actor import RankInfo, TrainActor
from furlong.train.advantage_estimator import compute_advantages
from furlong.train.rl_step import OldLogProbs, RLStep


@pytest.fixture(scope="module")
def teacher(tiny, tmp_path_factory) -> Path:
    return write_teacher(tiny, tmp_path_factory.mktemp("teacher"))


def opd_config(tiny, *flags, **given):
    return load_config(train_argv(tiny, "--use-opd", *flags, **given))[0]


def batch_with_log_probs(group_ids: list[int], seed: int):
    batch = random_batch(len(group_ids), vocab=50, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    batch.old_log_probs = [-torch.rand(len(m), generator=generator) for m in batch.loss_masks]
    batch.teacher_log_probs = [-torch.rand(len(m), generator=generator) for m in batch.loss_masks]
    return batch


@pytest.mark.parametrize("normalize", [False, True])
def test_advantages_lose_the_reverse_kl_before_whitening(tiny, normalize):
    group_ids = [0, 0, 0, 1, 1, 1]
    batch = batch_with_log_probs(group_ids, seed=3)
    config = opd_config(tiny, "--opd-type", "sglang", "--opd-kl-coef", "0.5").grpo
    plain = load_config(train_argv(tiny))[0].grpo
    base, _ = compute_advantages(plain, batch, group_ids)
    expected = torch.cat([a - 0.5 * (old - teacher) for a, old, teacher
                          in zip(base, batch.old_log_probs, batch.teacher_log_probs)])
    if normalize:
        config = load_config(train_argv(tiny, "--use-opd", "--opd-type", "sglang",
                                        "--opd-kl-coef", "0.5", "--normalize-advantages"))[0].grpo
        expected = adv.whiten(expected, torch.cat(batch.loss_masks))
    got, _ = compute_advantages(config, batch, group_ids)
    torch.testing.assert_close(torch.cat(got), expected)
    assert not torch.allclose(torch.cat(got), torch.cat(base))


def test_teacher_log_probs_of_another_length_are_refused_naming_the_sample(tiny):
    batch = batch_with_log_probs([0, 0], seed=1)
    batch.teacher_log_probs[1] = batch.teacher_log_probs[1][:-1]
    config = opd_config(tiny, "--opd-type", "sglang").grpo
    with pytest.raises(ValueError, match="sample 1 has .* teacher log-probs for"):
        compute_advantages(config, batch, [0, 0])


@pytest.mark.parametrize("flags, message", [
    (["--use-opd"], "--use-opd needs --opd-type"),
    (["--use-opd", "--opd-type", "megatron"], "--opd-type megatron needs --opd-teacher-load"),
    (["--use-opd", "--opd-type", "sglang", "--loss-type", "sft_loss"], "--loss-type sft_loss"),
    (["--use-opd", "--opd-type", "sglang", "--opd-teacher-load", "t"],
     "--opd-teacher-load t: --opd-type sglang takes"),
    (["--use-opd", "--opd-type", "sglang", "--opd-kl-coef", "-1"], "--opd-kl-coef"),
    (["--use-opd", "--opd-type", "sglang", "--opd-log-prob-top-k", "8"],
     "--opd-log-prob-top-k 8: .* top-k distillation is not built"),
    (["--opd-type", "sglang", "--opd-kl-coef", "2"],
     "--opd-type, --opd-kl-coef has no effect without --use-opd"),
])
def test_incomplete_distillation_flags_are_refused(tiny, flags, message):
    with pytest.raises(ConfigError, match=message):
        load_config(train_argv(tiny, *flags))


def test_distillation_flags_act_and_the_top_k_ones_warn(tiny, teacher):
    config, warnings = load_config(train_argv(
        tiny, "--use-opd", "--opd-type", "megatron", "--opd-teacher-load", str(teacher),
        "--opd-kl-coef", "2", "--opd-log-prob-top-k", "0", "--opd-top-k-strategy", "union"))
    assert config.grpo.needs_teacher and config.grpo.opd_kl_coef == 2.0
    assert [w for w in warnings if "opd" in w] == [
        "--opd-top-k-strategy has no effect in furlong: furlong's on-policy distillation "
        "(--use-opd) uses the log-probs of the sampled tokens (--opd-log-prob-top-k 0); "
        "ignored"]
    assert RLStep(config.grpo, config.rollout, None).old_log_probs is OldLogProbs.RECOMPUTED


def test_the_trainers_teacher_scores_the_students_tokens(tiny, teacher):
    config = opd_config(tiny, "--opd-type", "megatron", "--opd-teacher-load", str(teacher))
    actor = TrainActor(config, RankInfo(), str(tiny / "model"), total_steps=1)
    batch = random_batch(5, actor.model_config.vocab_size, seed=4)
    got = actor.compute_teacher_log_probs(batch)
    model = load_hf_model(str(teacher))
    for tokens, response, values in zip(batch.tokens, batch.response_lengths, got):
        with torch.no_grad():
            expected = reference_log_probs(model, tokens, response,
                                           config.rollout.rollout_temperature)
        torch.testing.assert_close(values, expected, rtol=1e-4, atol=1e-4)


def test_a_teacher_of_another_vocabulary_is_refused(tiny, tmp_path):
    model = load_hf_model(str(tiny / "model"))
    model.resize_token_embeddings(model.config.vocab_size + 8)
    model.save_pretrained(tmp_path / "wide")
    with pytest.raises(ConfigError, match="--opd-teacher-load .*wide: the teacher's vocabulary "
                                          "has .* same tokenizer"):
        opd_config(tiny, "--opd-type", "megatron", "--opd-teacher-load", str(tmp_path / "wide"))
    with pytest.raises(ConfigError, match="--opd-teacher-load .*absent: "):
        opd_config(tiny, "--opd-type", "megatron", "--opd-teacher-load", str(tmp_path / "absent"))


def samples_of(batch, teacher: bool) -> list[list[Sample]]:
    samples = [Sample(group_index=i // 2, index=i, tokens=t.tolist(), response_length=r,
                      loss_mask=m.int().tolist(), reward=float(reward),
                      teacher_log_probs=lp.tolist() if teacher else None)
               for i, (t, r, m, reward, lp) in enumerate(zip(
                   batch.tokens, batch.response_lengths, batch.loss_masks, batch.rewards,
                   batch.teacher_log_probs))]
    return [samples[i:i + 2] for i in range(0, len(samples), 2)]


def test_samples_bring_the_teacher_log_probs_with_sglang(tiny):
    """--opd-type sglang: the step distills from each sample's teacher_log_probs and logs
    rollout/opd_reverse_kl, the masked mean of old minus teacher log-probs."""
    config = opd_config(tiny, "--opd-type", "sglang", apply_chat_template=False,
                        rollout_batch_size=2, num_rollout=1)
    actor = TrainActor(config, RankInfo(), str(tiny / "model"), total_steps=1)
    batch = random_batch(4, actor.model_config.vocab_size, seed=6)
    generator = torch.Generator().manual_seed(6)
    batch.teacher_log_probs = [-torch.rand(len(m), generator=generator) for m in batch.loss_masks]
    step = RLStep(config.grpo, config.rollout, actor)
    result = step(0, samples_of(batch, teacher=True))
    old, _ = actor.compute_log_probs(result.batch)  # weights after the step: recompute before
    mask = torch.cat(batch.loss_masks)
    expected = (torch.cat(result.batch.old_log_probs) - torch.cat(batch.teacher_log_probs))
    assert result.metrics["rollout/opd_reverse_kl"] == pytest.approx(
        (expected * mask).sum().item() / mask.sum().item(), rel=1e-5)
    assert not torch.allclose(torch.cat(old), torch.cat(result.batch.old_log_probs))
    with pytest.raises(ValueError, match=r"4 samples \(group, index\) carry no "
                                         r"teacher_log_probs, e.g. \[\(0, 0\), \(0, 1\)"):
        step(1, samples_of(batch, teacher=False))
    batch = replace(result.batch, old_log_probs=None)  # --use-rollout-logprobs, none given
    with pytest.raises(ValueError, match="sample.rollout_log_probs"):
        compute_advantages(config.grpo, batch, [0, 0, 1, 1])


def test_distillation_brings_the_student_to_the_teacher(tiny, teacher, tmp_path,
                                                       monkeypatch):
    """Pure distillation (every reward 0): the reverse KL to a peaked teacher falls."""
    (tmp_path / "zero_reward_hook.py").write_text(
        "def zero(args, sample, **kwargs):\n    return 0.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = run(train_argv(tiny, "--use-opd", "--opd-type", "megatron", "--opd-teacher-load",
                          str(teacher), "--opd-kl-coef", "1", rm_type=None,
                          custom_rm_path="zero_reward_hook.zero", lr="1e-2", num_rollout=12,
                          n_samples_per_prompt=4, rollout_batch_size=16,
                          rollout_max_response_len=8, run_dir=tmp_path / "run"))
    kl = series(rows, "rollout/opd_reverse_kl")
    assert len(kl) == 12 and all(v > 0 for v in kl.values())
    first, last = sum(list(kl.values())[:3]) / 3, sum(list(kl.values())[-3:]) / 3
    assert last < 0.85 * first, list(kl.values())  # 0.435 -> 0.335 here


MILES_TEACHER_SERVER_FLAGS = (
    "--use-opd", "--opd-type", "sglang", "--opd-kl-coef", "1",
    "--custom-rm-path", "miles.rollout.on_policy_distillation.reward_func",
    "--custom-reward-post-process-path",
    "miles.rollout.on_policy_distillation.post_process_rewards")


@pytest.mark.parametrize("route", ["rm_url", "teacher_urls"])
def test_miles_teacher_server_hooks_distill_from_a_served_teacher(tiny, teacher, tmp_path,
                                                                  route):
    """Miles' --opd-type sglang recipe, unchanged: its reward_func asks the teacher server
    (--rm-url, or the `default` of --opd-teacher-urls; here furlong's engine server over the
    teacher) to score each sample, and its post_process_rewards keeps the response's
    teacher log-probs (equal to an independent forward of the teacher) and gives every
    sample the reward 0."""
    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    server = ServerThread(teacher, tokenizer)
    url = f"{server.url}/generate"
    where = ["--rm-url", url] if route == "rm_url" else ["--opd-teacher-urls", f"default={url}"]
    saved = str(tmp_path / "rollout_{rollout_id}.pt")
    try:
        rows = run(train_argv(tiny, *MILES_TEACHER_SERVER_FLAGS, *where, rm_type=None,
                              run_dir=tmp_path / "run", save_debug_rollout_data=saved,
                              dump_details=tmp_path / "dump"))
    finally:
        server.stop()
    assert series(rows, "rollout/raw_reward") == {0: 0.0, 1: 0.0}
    assert series(rows, "rollout/rewards") == {0: 0.0, 1: 0.0}
    assert all(v > 0 for v in series(rows, "rollout/opd_reverse_kl").values())
    model = load_hf_model(str(teacher))
    samples = checkpoint.load_state(str(tmp_path / "dump/rollout_data/1.pt"))["samples"]
    assert len(samples) == 16
    for sample in samples:
        with torch.no_grad():
            expected = reference_log_probs(model, torch.tensor(sample["tokens"]),
                                           sample["response_length"], temperature=1.0)
        torch.testing.assert_close(torch.tensor(sample["teacher_log_probs"]), expected,
                                   rtol=0, atol=1e-5)
    # Saved as Miles saves them, before post-processing (the rewards are the teacher's
    # replies), and post-processed again when loaded: the same steps, no server needed.
    assert load_rollout(saved.format(rollout_id=1)).groups[0][0].teacher_log_probs is None
    again = run(train_argv(tiny, *MILES_TEACHER_SERVER_FLAGS, *where, rm_type=None,
                           run_dir=tmp_path / "again", load_debug_rollout_data=saved))
    assert series(again, "rollout/opd_reverse_kl") == pytest.approx(
        series(rows, "rollout/opd_reverse_kl"), rel=1e-6)


def test_post_processed_rewards_replace_the_normalised_ones(tiny):
    """--custom-reward-post-process-path's (raw, rewards): raw rewards are the batch's,
    the rewards are each sample's advantage as they are (no group statistics)."""
    config = load_config(train_argv(tiny, apply_chat_template=False))[0]
    actor = TrainActor(config, RankInfo(), str(tiny / "model"), total_steps=1)
    batch = random_batch(4, actor.model_config.vocab_size, seed=2)
    raw, rewards = [1.0, 0.0, 0.5, 0.25], [3.0, -1.0, 0.0, 2.0]
    result = RLStep(config.grpo, config.rollout, actor)(
        0, samples_of(replace(batch, teacher_log_probs=batch.loss_masks), teacher=False),
        (raw, rewards))
    assert result.batch.rewards.tolist() == raw
    for advantage, reward, mask in zip(result.batch.advantages, rewards, batch.loss_masks,
                                       strict=True):
        assert advantage.tolist() == [reward] * len(mask)
    assert result.metrics["rollout/rewards"] == pytest.approx(1.0)


@pytest.mark.parametrize("returned, message", [
    ([1.0, 2.0, 3.0], "returned list; return"),
    (([0.0], [0.0, 0.0]), "returned 1 raw_rewards for 2 samples"),
    (([0.0, 0.0], ["a", 0.0]), "rewards must be numbers"),
])
def test_a_post_process_hook_breaking_its_contract_is_named(returned, message):
    with pytest.raises(ValueError, match=f"--custom-reward-post-process-path.*{message}"):
        read_post_processed(returned, 2)


@pytest.mark.parametrize("project", ["miles", "slime"])
def test_the_teacher_reward_without_a_teacher_url_is_refused(tiny, project):
    flags = [flag.replace("miles.", f"{project}.") for flag in MILES_TEACHER_SERVER_FLAGS]
    with pytest.raises(ConfigError, match=f"--custom-rm-path {project}.rollout.on_policy_"
                                          "distillation.reward_func scores each sample on the "
                                          "teacher server: set --rm-url"):
        load_config(train_argv(tiny, *flags, rm_type=None))


POST_PROCESS = MILES_TEACHER_SERVER_FLAGS[-2:]


@pytest.mark.parametrize("flags, given, message", [
    (MILES_TEACHER_SERVER_FLAGS[:7], {}, "its reward is the teacher server's reply, which "
     "--custom-reward-post-process-path miles.rollout.on_policy_distillation."
     "post_process_rewards turns into teacher_log_probs"),
    (POST_PROCESS, {}, "gives each sample the teacher's log-probs and the reward 0, which only "
     "--use-opd --opd-type sglang trains on"),
    (MILES_TEACHER_SERVER_FLAGS, {"eval_prompt_data": "data.jsonl"},
     "--eval-prompt-data: eval would score answers with --custom-rm-path"),
    (["--custom-reward-post-process-path", "hooks.post", "--loss-type", "sft_loss"], {},
     "sft_loss has no rewards to post-process"),
])
def test_the_teacher_hooks_go_together_and_with_teacher_distillation(tiny, flags, given,
                                                                     message):
    with pytest.raises(ConfigError, match=message):
        load_config(train_argv(tiny, *flags, rm_url="http://teacher/generate", **given))


def test_the_teacher_post_process_names_a_reply_without_input_log_probs():
    sample = Sample(group_index=3, index=1, tokens=[1, 2, 3], response_length=2,
                    reward={"text": "", "meta_info": {}})
    with pytest.raises(ValueError, match="sample 3/1: the teacher's reply has no "
                                         "meta_info.input_token_logprobs; --rm-url"):
        post_process_rewards(None, [sample])
    sample.reward = {"meta_info": {"input_token_logprobs": [[None, 1, None], [-0.5, 2, None],
                                                            [-0.25, 3, None]]}}
    assert post_process_rewards(None, [sample]) == ([0.0], [0.0])
    assert sample.teacher_log_probs == [-0.5, -0.25]


def teacher_args(**flags):
    given = {"rm_url": "http://main/generate", "opd_teacher_urls": None,
             "opd_teacher_adapters": None, "opd_teacher_key": "opd_teacher"}
    return SimpleNamespace(**{**given, **flags})


def tagged(name=None) -> Sample:
    return Sample(group_index=2, index=5, metadata={} if name is None else {"opd_teacher": name})


def test_samples_go_to_the_teacher_their_metadata_names():
    assert teacher_for(teacher_args(), tagged("math")) == ("http://main/generate", None)
    args = teacher_args(opd_teacher_urls=("math=http://math/generate",
                                          "default=http://any/generate"),
                        opd_teacher_adapters=("code=code_lora", "math=math_lora"))
    assert teacher_for(args, tagged("math")) == ("http://math/generate", "math_lora")
    assert teacher_for(args, tagged("code")) == ("http://main/generate", "code_lora")
    assert teacher_for(args, tagged("poetry")) == ("http://any/generate", None)
    assert teacher_for(args, tagged()) == ("http://any/generate", None)
    assert scoring_request([1, 2], "code_lora")["lora_path"] == "code_lora"
    assert "lora_path" not in scoring_request([1, 2])
    alone = teacher_args(opd_teacher_urls=("math=http://math/generate",))
    with pytest.raises(ValueError, match=r"sample 2/5: metadata\['opd_teacher'\] is 'poetry', "
                                         r"which names none of the teachers \['math'\]"):
        teacher_for(alone, tagged("poetry"))


@pytest.mark.parametrize("flags, message", [
    (["--opd-teacher-urls", "math"], "--opd-teacher-urls 'math': give NAME=VALUE"),
    (["--opd-teacher-urls", "a=http://x", "a=http://y"], "teacher 'a' is named twice"),
    (["--opd-teacher-urls", "b=http://x", "--opd-teacher-adapters", "a=lora_a"],
     r"teachers \['a'\] have no URL in --opd-teacher-urls and no --rm-url"),
])
def test_malformed_teacher_routes_are_refused(tiny, flags, message):
    with pytest.raises(ConfigError, match=message):
        load_config(train_argv(tiny, *MILES_TEACHER_SERVER_FLAGS, *flags, rm_type=None))


def test_teacher_routes_need_teacher_servers(tiny, teacher):
    with pytest.raises(ConfigError, match="--opd-teacher-urls routes samples to teacher servers, "
                                          "which --opd-type megatron does not query"):
        load_config(train_argv(tiny, "--use-opd", "--opd-type", "megatron", "--opd-teacher-load",
                               str(teacher), "--opd-teacher-urls", "a=http://x"))
    with pytest.raises(ConfigError, match="--opd-teacher-key has no effect without --use-opd"):
        load_config(train_argv(tiny, "--opd-teacher-key", "who"))
