"""End-to-end runs of train.py on the tiny task: learning, resume, replay, sinks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from furlong import cli, loop
from furlong.output.metrics import read_metrics

from conftest import SFT_FLAGS, train_argv

EVAL = ["--eval-input-key", "prompt", "--eval-label-key", "label", "--eval-temperature", "0",
        "--eval-max-response-len", "8", "--rm-type", "math"]


def run(argv: list[str]) -> list[dict]:
    """Run train.py in this process; returns the metrics rows of the run directory."""
    assert cli.main(argv) == 0
    run_dir = argv[argv.index("--save") + 1] if "--save" in argv else \
        argv[argv.index("--run-dir") + 1]
    return read_metrics(Path(run_dir) / "metrics.jsonl")


def series(rows: list[dict], name: str) -> dict[int, float]:
    return {row["step"]: row[name] for row in rows if name in row}


def sft_argv(tiny: Path, save: Path, steps: int) -> list[str]:
    return train_argv(tiny, **SFT_FLAGS, prompt_data=tiny / "data/sft.jsonl", save=save,
                      rollout_max_response_len=None, rollout_batch_size=128,
                      micro_batch_size=128, num_rollout=steps, lr="2e-3", weight_decay=0)


@pytest.fixture(scope="session")
def sft_model(tiny, tmp_path_factory) -> tuple[Path, list[dict]]:
    """The tiny model after an SFT warm-up (also the SFT learning test's run)."""
    save = tmp_path_factory.mktemp("sft")
    rows = run(sft_argv(tiny, save, 120) + [
        "--eval-prompt-data", "addition", f"{tiny}/data/eval.jsonl@[0:200]",
        "--eval-interval", "120", *EVAL])
    return save, rows


def grpo_run_argv(tiny: Path, init: Path, save: Path, rollouts: int, prompts: int = 16,
                  steps_per_rollout: int = 2) -> list[str]:
    return train_argv(tiny, ref_load=init, save=save, rollout_shuffle=True,
                      num_rollout=rollouts, rollout_batch_size=prompts, n_samples_per_prompt=8,
                      num_steps_per_rollout=steps_per_rollout, micro_batch_size=64, lr="1e-4",
                      weight_decay=0)


@pytest.mark.slow
def test_sft_loss_falls_and_accuracy_rises(sft_model):
    _, rows = sft_model
    losses = series(rows, "train/loss")
    accuracy = series(rows, "eval/addition")
    assert losses[119] < 0.75 * losses[0]
    assert accuracy[0] < 0.05 and accuracy[120] > accuracy[0] + 0.1


@pytest.mark.slow
def test_grpo_reward_rises(tiny, sft_model, tmp_path):
    rows = run(grpo_run_argv(tiny, sft_model[0], tmp_path / "grpo", 30, prompts=32) + [
        "--eval-prompt-data", "addition", f"{tiny}/data/eval.jsonl@[0:200]",
        "--eval-interval", "30", *EVAL])
    rewards = series(rows, "rollout/raw_reward")
    first, last = [rewards[i] for i in range(10)], [rewards[i] for i in range(20, 30)]
    assert sum(last) / 10 > sum(first) / 10
    accuracy = series(rows, "eval/addition")
    assert accuracy[30] > accuracy[0] + 0.05
    row = next(r for r in rows if "rollout/raw_reward" in r)
    for name in ("rollout/rewards", "rollout/response_len/mean", "rollout/truncated_ratio",
                 "rollout/zero_std/count", "rollout/log_probs", "rollout/advantages",
                 "rollout/entropy", "train/loss", "train/pg_loss", "train/pg_clipfrac",
                 "train/ppo_kl", "train/entropy_loss", "train/grad_norm", "train/lr",
                 "train/train_rollout_logprob_abs_diff", "perf/rollout_time",
                 "perf/actor_train_time", "perf/log_probs_time", "perf/update_weights_time",
                 "perf/step_time", "perf/tokens_per_gpu_per_sec", "perf/actor_train_tflops"):
        assert name in row, name
    # Engine and trainer share weights: their log-probs agree (float32 on CPU).
    assert max(series(rows, "train/train_rollout_logprob_abs_diff").values()) < 1e-4
    assert (tmp_path / "grpo/reward_curve.png").stat().st_size > 0


def crash_after(monkeypatch, rollout_id: int) -> None:
    """Make the run die right after it saved the checkpoint of `rollout_id`."""
    original = loop.save

    def save(run_, saved_id, *args):
        original(run_, saved_id, *args)
        if saved_id == rollout_id:
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(loop, "save", save)


def test_sft_resume_gives_same_losses(tiny, tmp_path, monkeypatch):
    argv = sft_argv(tiny, tmp_path / "full", 6) + ["--rollout-shuffle", "--save-interval", "3",
                                                   "--save-retain-interval", "4"]
    full = series(run(argv), "train/loss")
    # saves after rollouts 2 and 5; 2 is not a multiple of 4, so only the latest stays
    assert sorted(p.name for p in (tmp_path / "full").glob("iter_*")) == ["iter_0000005"]
    resumed_argv = sft_argv(tiny, tmp_path / "cut", 6) + [
        "--rollout-shuffle", "--save-interval", "3", "--load", str(tmp_path / "cut")]
    crash_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        cli.main(resumed_argv)
    monkeypatch.undo()
    resumed = series(run(resumed_argv), "train/loss")
    assert [resumed[i] for i in (3, 4, 5)] == pytest.approx([full[i] for i in (3, 4, 5)],
                                                             rel=1e-6)


def test_grpo_resume_repeats_rollouts_and_buffer(tiny, sft_model, tmp_path, monkeypatch):
    """Resume restores data order, group counter and the partial-rollout buffer exactly."""
    extra = ["--over-sampling-batch-size", "32", "--partial-rollout", "--save-interval", "2",
             "--dynamic-sampling-filter-path",
             "miles.rollout.filter_hub.dynamic_sampling_filters.check_reward_nonzero_std"]
    full = run(grpo_run_argv(tiny, sft_model[0], tmp_path / "full", 4) + extra)
    cut_argv = grpo_run_argv(tiny, sft_model[0], tmp_path / "cut", 4) + extra + [
        "--load", str(tmp_path / "cut")]
    crash_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        cli.main(cut_argv)
    monkeypatch.undo()
    state = json.loads((tmp_path / "cut/iter_0000001/rollout.json").read_text())
    assert state["buffer"], "the surplus groups should be in the checkpoint"
    resumed = run(cut_argv)
    for name in ("rollout/raw_reward", "rollout/response_len/mean", "train/loss"):
        expected, got = series(full, name), series(resumed, name)
        assert [got.get(i) for i in (2, 3)] == pytest.approx([expected.get(i) for i in (2, 3)],
                                                             rel=1e-6), name
    # The filter named each drop zero_std_<reward>; the resumed run drops the same groups.
    assert sum(sum(drops.values()) for drops in zero_std_drops(full).values()) > 0
    assert [zero_std_drops(resumed).get(i) for i in (2, 3)] == [
        zero_std_drops(full).get(i) for i in (2, 3)]


def zero_std_drops(rows: list[dict]) -> dict[int, dict[str, float]]:
    """Per rollout, the zero-std drop counts by reason (`drop_zero_std_<reward>`)."""
    prefix = "rollout/dynamic_filter/drop_zero_std"
    return {row["step"]: {k: v for k, v in row.items() if k.startswith(prefix)}
            for row in rows if any(k.startswith(prefix) for k in row)}


def test_saved_rollout_replays_to_the_same_loss(tiny, tmp_path):
    data = str(tmp_path / "rollout_{rollout_id}.pt")
    argv = grpo_run_argv(tiny, tiny / "model", tmp_path / "a", 1)
    first = series(run(argv + ["--save-debug-rollout-data", data]), "train/loss")
    replay = grpo_run_argv(tiny, tiny / "model", tmp_path / "b", 1) + [
        "--load-debug-rollout-data", data, "--debug-train-only"]
    assert series(run(replay), "train/loss") == pytest.approx(first, rel=1e-6)


def test_eval_only_run(tiny, tmp_path):
    no_train_data = dict(prompt_data=None, input_key=None, label_key=None,
                         apply_chat_template=False, rm_type=None, n_samples_per_prompt=None,
                         rollout_max_response_len=None)
    rows = run(train_argv(tiny, "--eval-prompt-data", f"{tiny}/data/eval.jsonl@[0:8]", *EVAL,
                          **no_train_data, run_dir=tmp_path, rollout_batch_size=1,
                          num_rollout=0, log_passrate=True, n_samples_per_eval_prompt=4))
    (row,) = rows
    assert {"eval/eval", "eval/eval/pass@1", "eval/eval/pass@4",
            "eval/eval/truncated_ratio"} <= set(row)


def test_sinks_and_hf_export(tiny, tmp_path):
    pytest.importorskip("wandb")
    export = tmp_path / "hf_{rollout_id}"
    run(grpo_run_argv(tiny, tiny / "model", tmp_path / "run", 1) + [
        "--use-tensorboard", "--use-wandb", "--wandb-mode", "offline",
        "--wandb-project", "furlong-test", "--save-hf", str(export)])
    assert list((tmp_path / "run/tensorboard").rglob("events.out.tfevents.*"))
    assert list((tmp_path / "run/wandb").glob("offline-run-*"))
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_0")
    saved = torch.load(tmp_path / "run/iter_0000000/optimizer/part0.pt", weights_only=True)
    assert saved["scheduler"]["step_count"] == 2
    assert model.config.num_hidden_layers == 2


def test_load_without_tracker_warm_starts_from_ref_load(tiny, tmp_path):
    """--load without a tracker is a fresh run from --ref-load's weights: another model
    there gives other first-step numbers (same seeds, same data)."""
    from furlong.tiny import write_tiny
    other = write_tiny(tmp_path / "other", seed=1) / "model"
    empty = tmp_path / "empty"
    empty.mkdir()
    entropy = {init.parent.name: series(run(
        grpo_run_argv(tiny, init, tmp_path / init.parent.name, 1) + ["--load", str(empty)]),
        "train/entropy_loss")[0] for init in (tiny / "model", other)}
    assert entropy[tiny.name] != entropy["other"]


def test_one_step_rollouts_report_the_rollout_metrics_of_the_training_forward(tiny, tmp_path):
    """One optimizer step per rollout skips the old log-prob forward; rollout/log_probs
    and rollout/entropy then come from the training forward, not from the engine."""
    argv = grpo_run_argv(tiny, tiny / "model", tmp_path, 2, steps_per_rollout=1)
    row = next(r for r in run(argv) if "rollout/raw_reward" in r)
    assert "perf/log_probs_time" not in row  # the forward was skipped
    assert row["rollout/log_probs"] < 0 < row["rollout/entropy"]
    assert row["rollout/entropy"] == row["train/entropy_loss"]
    assert "train/old_log_probs" not in row  # reported under its rollout/ name only


def test_debug_rollout_only_generates_without_training(tiny, tmp_path):
    rows = run(grpo_run_argv(tiny, tiny / "model", tmp_path / "r", 2) + ["--debug-rollout-only"])
    assert set(series(rows, "rollout/raw_reward")) == {0, 1}
    assert not series(rows, "train/loss")
    assert not (tmp_path / "r/latest_checkpointed_iteration.txt").exists()


def run_async(argv: list[str]) -> list[dict]:
    assert cli.main(argv, prog="train_async.py", overlap=True) == 0
    return read_metrics(Path(argv[argv.index("--save") + 1]) / "metrics.jsonl")


def test_train_async_refuses_colocate(tiny, tmp_path, capsys):
    code = cli.main(grpo_run_argv(tiny, tiny / "model", tmp_path, 1) + ["--colocate"],
                    prog="train_async.py", overlap=True)
    assert code == 2 and "--colocate" in capsys.readouterr().err


@pytest.mark.slow
def test_async_run_overlaps_and_learns(tiny, sft_model, tmp_path):
    """Generation of rollout k+1 runs while rollout k trains; samples are one version
    behind; the reward still rises."""
    rows = run_async(grpo_run_argv(tiny, sft_model[0], tmp_path / "async", 30, prompts=32) + [
        "--eval-prompt-data", "addition", f"{tiny}/data/eval.jsonl@[0:200]",
        "--eval-interval", "30", *EVAL])
    rollouts = {r["step"]: r for r in rows if "perf/rollout_start" in r}
    overlaps = 0
    for k in range(29):
        train_start, train_end = rollouts[k]["perf/train_start"], rollouts[k]["perf/train_end"]
        next_start, next_end = (rollouts[k + 1]["perf/rollout_start"],
                                rollouts[k + 1]["perf/rollout_end"])
        # It started running inside training k (had training held the event loop, it
        # could only start after), and whether it also ended inside it is timing.
        assert train_start <= next_start < train_end
        overlaps += next_end < train_end
    assert overlaps >= 10
    assert rollouts[0]["rollout/staleness"] == 0
    assert all(rollouts[k]["rollout/staleness"] == 1 for k in range(1, 30))
    accuracy = series(rows, "eval/addition")
    assert accuracy[30] > accuracy[0] + 0.05


def test_weight_interval_two_staleness_and_eval_between_rollouts(tiny, tmp_path):
    """--update-weights-interval 2: staleness counts the rollouts the trainer is ahead
    (sync 0,1,0,1; async 0,1,2,1,2,1), and an eval every rollout waits for the
    generation in flight, whose over-sampling abort would otherwise cut the eval short."""
    base = grpo_run_argv(tiny, tiny / "model", tmp_path, 6, prompts=4) + [
        "--update-weights-interval", "2", "--over-sampling-batch-size", "8",
        "--eval-prompt-data", "addition", f"{tiny}/data/eval.jsonl@[0:16]",
        "--eval-interval", "1", *EVAL]
    for overlap, expected in ((False, [0, 1, 0, 1, 0, 1]), (True, [0, 1, 2, 1, 2, 1])):
        argv = [str(tmp_path / str(overlap)) if a == str(tmp_path) else a for a in base]
        assert cli.main(argv, prog="train_async.py", overlap=overlap) == 0
        rows = read_metrics(tmp_path / str(overlap) / "metrics.jsonl")
        assert list(series(rows, "rollout/staleness").values()) == expected, overlap
        assert sorted(series(rows, "eval/addition")) == list(range(7))


def test_async_resume_regenerates_the_rollout_in_flight(tiny, tmp_path, monkeypatch):
    """A checkpoint taken while rollout k+1 is generating resumes by generating k+1 again
    from the same prompts; no prompt is skipped or repeated."""
    data = str(tmp_path / "{name}_{{rollout_id}}.pt")
    extra = ["--save-interval", "2", "--rollout-shuffle"]
    full = grpo_run_argv(tiny, tiny / "model", tmp_path / "full", 4) + extra + [
        "--save-debug-rollout-data", data.format(name="full")]
    run_async(full)
    cut = grpo_run_argv(tiny, tiny / "model", tmp_path / "cut", 4) + extra + [
        "--save-debug-rollout-data", data.format(name="cut"), "--load", str(tmp_path / "cut")]
    crash_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        cli.main(cut, prog="train_async.py", overlap=True)
    monkeypatch.undo()
    run_async(cut)
    prompts = lambda name, k: [g[0]["prompt"] for g in torch.load(  # noqa: E731
        tmp_path / f"{name}_{k}.pt", weights_only=True)["groups"]]
    for k in range(4):
        assert prompts("cut", k) == prompts("full", k), k


def test_offload_frees_the_idle_side(tiny, tmp_path, monkeypatch):
    from furlong.engine.hf_engine import HFEngine
    calls = []

    async def release(self):
        calls.append("release")

    async def resume(self):
        calls.append("resume")

    monkeypatch.setattr(HFEngine, "release_memory", release)
    monkeypatch.setattr(HFEngine, "resume_memory", resume)
    from furlong.train.actor import TrainActor
    monkeypatch.setattr(TrainActor, "offload", lambda self: calls.append("offload"))
    monkeypatch.setattr(TrainActor, "reload", lambda self: calls.append("reload"))
    rows = run(grpo_run_argv(tiny, tiny / "model", tmp_path / "o", 2) + [
        "--offload", "--update-weights-interval", "2"])
    # the trainer's state comes back for training once the engines released their memory,
    # and leaves before they take it back (one GPU may hold only one of the two)
    assert calls == ["release", "reload", "offload", "resume"] * 2
    # released engines get the weights again after every rollout, whatever the interval
    assert [r["step"] for r in rows if "perf/update_weights_time" in r] == [0, 1]


def test_async_off_policy_corrections(tiny, sft_model, tmp_path, monkeypatch):
    """Samples trained one version late: --keep-old-actor computes their old log-probs
    with the weights that generated them (they then match the engine's), and --use-tis
    reweights by the ratio to the engine's log-probs: each training micro-batch's
    policy-gradient loss is also computed without TIS, on the same inputs, and TIS
    changes it on the stale steps."""
    from dataclasses import replace

    from furlong.train import actor
    objective = actor.policy_objective
    pg_losses = []  # (with TIS, without) per micro-batch of the run with --use-tis

    def with_and_without_tis(config, inputs, hook_args=None):
        loss, metrics = objective(config, inputs, hook_args)
        if config.use_tis and inputs.log_probs.requires_grad:  # a training forward
            _, plain = objective(replace(config, use_tis=False), inputs, hook_args)
            pg_losses.append((float(metrics["pg_loss"]), float(plain["pg_loss"])))
        return loss, metrics

    monkeypatch.setattr(actor, "policy_objective", with_and_without_tis)

    def mean_diff(*extra):
        rows = run_async(grpo_run_argv(tiny, sft_model[0], tmp_path / "_".join(extra), 4)
                         + ["--lr", "1e-3", *extra])
        return [r["train/train_rollout_logprob_abs_diff"] for r in rows
                if "train/loss" in r and r["step"] >= 2]
    stale = mean_diff("--use-tis")
    kept = mean_diff("--keep-old-actor")
    assert max(kept) < 1e-4 < min(stale)
    # 4 rollouts of 2 steps, one micro-batch each. TIS weights differ from 1 where the
    # engine's log-probs are not the old policy's, on every step trained one version late
    # (rollouts 1 to 3); they change every policy-gradient loss that is not 0 (a batch
    # whose groups all have equal rewards has zero advantages and a zero loss).
    assert len(pg_losses) == 8
    late = [(with_tis, without) for with_tis, without in pg_losses[2:] if without != 0]
    assert late and all(with_tis != without for with_tis, without in late), pg_losses
