"""The training loop of train.py, step by step as in SPEC.md section 1.

    push the actor's weights to the engines
    for rollout_id in [start, num_rollout):
        eval first (rollout 0, unless --skip-eval-before-train)
        generate a rollout; score it                       (RolloutManager)
        old / ref log-probs, advantages, optimizer steps   (TrainActor)
        save every --save-interval rollouts and at the last one
        push weights to the engines
        eval every --eval-interval rollouts
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from statistics import mean

import torch

from furlong.build import Run
from furlong.plot import plot_rewards
from furlong.progress import Progress
from furlong.rollout.manager import RolloutResult
from furlong.train import checkpoint
from furlong.train.advantages import compute_advantages
from furlong.train.batch import TrainBatch
from furlong.train.flops import forward_flops, peak_flops
from furlong.types import Sample

log = logging.getLogger("furlong")


@contextmanager
def timed(metrics: dict, name: str):
    start = time.perf_counter()
    yield
    metrics[name] = metrics.get(name, 0.0) + time.perf_counter() - start


async def run_loop(run: Run) -> dict:
    """Run rollouts [start, num_rollout); returns the last eval metrics (if any)."""
    config = run.config
    last_eval: dict = {}
    if run.engine is not None and run.trainer is not None:
        await push_weights(run, version=run.start_rollout)
    if run.num_rollout == 0 and run.manager.eval_datasets:
        return await evaluate(run, 0)
    progress = Progress(run.start_rollout, run.num_rollout)
    for rollout_id in range(run.start_rollout, run.num_rollout):
        metrics: dict = {}
        if (rollout_id == 0 and config.eval.eval_interval is not None
                and not config.eval.skip_eval_before_train):
            last_eval = await evaluate(run, rollout_id)
        with timed(metrics, "perf/step_time"):
            with timed(metrics, "perf/rollout_time"):
                rollout = await generate_rollout(run, rollout_id)
            metrics.update(rollout.metrics)
            if run.trainer is not None:
                metrics.update(train_on_rollout(run, rollout_id, rollout.groups))
            if should_save(run, rollout_id):
                save(run, rollout_id)
            if run.engine is not None and run.trainer is not None:
                with timed(metrics, "perf/update_weights_time"):
                    await push_weights(run, version=rollout_id + 1)
        run.logger.log(rollout_id, metrics)
        progress.update(rollout_id, metrics)
        if should_eval(run, rollout_id):
            last_eval = await evaluate(run, rollout_id + 1)
    progress.close()
    return last_eval


async def generate_rollout(run: Run, rollout_id: int) -> RolloutResult:
    debug = run.config.debug
    if debug.load_debug_rollout_data:
        return load_rollout(debug.load_debug_rollout_data.format(rollout_id=rollout_id))
    result = await run.manager.generate(rollout_id)
    if debug.save_debug_rollout_data:
        save_rollout(debug.save_debug_rollout_data.format(rollout_id=rollout_id), result)
    return result


def train_on_rollout(run: Run, rollout_id: int, groups: list[list[Sample]]) -> dict:
    """Log-probs, advantages and the optimizer steps of one rollout; returns its metrics."""
    config, trainer = run.config, run.trainer
    samples = [s for group in groups for s in group]
    batch = TrainBatch.from_samples(samples, config.rollout.reward_key)
    metrics: dict = {}
    if config.grpo.loss_type != "sft_loss":
        metrics.update(prepare_policy_batch(run, batch, [s.group_index for s in samples]))
    with timed(metrics, "perf/actor_train_time"):
        steps = trainer.train(batch)
    for step, step_metrics in enumerate(steps):
        run.logger.log(rollout_id, {**step_metrics, "train/step":
                                    rollout_id * len(steps) + step})
    metrics.update({name: mean(s[name] for s in steps) for name in steps[0]})
    metrics.update(throughput(run, batch, metrics["perf/actor_train_time"]))
    ref_interval = config.grpo.ref_update_interval
    if ref_interval and trainer.has_reference and (rollout_id + 1) % ref_interval == 0:
        trainer.update_reference()
    return metrics


def prepare_policy_batch(run: Run, batch: TrainBatch, group_ids: list[int]) -> dict:
    """Fill old/ref log-probs and advantages into `batch`; returns rollout/* metrics."""
    config, trainer = run.config, run.trainer
    metrics: dict = {}
    entropy = None
    if config.grpo.use_rollout_logprobs:
        batch.old_log_probs = batch.rollout_log_probs
    elif needs_old_log_probs(config):
        with timed(metrics, "perf/log_probs_time"):
            batch.old_log_probs, entropy = trainer.compute_log_probs(batch)
    if trainer.has_reference:
        with timed(metrics, "perf/ref_log_probs_time"):
            batch.ref_log_probs, _ = trainer.compute_log_probs(batch, reference=True)
    batch.advantages, normalized = compute_advantages(config.grpo, batch, group_ids)
    metrics["rollout/rewards"] = normalized.mean().item()
    per_token = {"rollout/log_probs": batch.old_log_probs or batch.rollout_log_probs,
                 "rollout/advantages": batch.advantages,
                 "rollout/ref_log_probs": batch.ref_log_probs, "rollout/entropy": entropy}
    for name, values in per_token.items():
        if values is not None:
            metrics[name] = masked_mean(values, batch.loss_masks)
    return metrics


def needs_old_log_probs(config) -> bool:
    """Whether old log-probs must be recomputed before training.

    With one optimizer step per rollout the policy being improved is the current one:
    its log-probs are the training forward's own (detached), identical to a
    recomputation with the same weights, so the extra forward is skipped, unless
    REINFORCE++ shapes rewards with a KL that needs them before the step.
    """
    g = config.grpo
    return config.rollout.num_steps_per_rollout > 1 or bool(g.kl_coef) or \
        g.loss_type == "custom_loss"


def masked_mean(per_sample: list[torch.Tensor], masks: list[torch.Tensor]) -> float:
    values, mask = torch.cat(per_sample), torch.cat(masks)
    return float((values * mask).sum() / mask.sum().clamp(min=1))


def throughput(run: Run, batch: TrainBatch, seconds: float) -> dict:
    """perf/tokens_per_gpu_per_sec, perf/actor_train_tflops and (on known GPUs) MFU."""
    trainer = run.trainer
    lengths = [len(t) for t in batch.tokens]
    world = trainer.rank.dp_size
    flops = 3 * forward_flops(trainer.model_config, lengths, batch.response_lengths)
    metrics = {"perf/tokens_per_gpu_per_sec": sum(lengths) / seconds / world,
               "perf/actor_train_tflops": flops / seconds / world / 1e12}
    if trainer.rank.device.type == "cuda":
        peak = peak_flops(torch.cuda.get_device_name(trainer.rank.device))
        if peak:
            metrics["perf/actor_train_mfu"] = flops / seconds / world / peak
    return metrics


async def push_weights(run: Run, version: int) -> None:
    await run.trainer.push_weights(run.engine, version)


def should_save(run: Run, rollout_id: int) -> bool:
    ckpt = run.config.ckpt
    if ckpt.save is None or run.trainer is None:
        return False
    last = rollout_id == run.num_rollout - 1
    return last or (ckpt.save_interval is not None and (rollout_id + 1) % ckpt.save_interval == 0)


def should_eval(run: Run, rollout_id: int) -> bool:
    """Every --eval-interval rollouts, and after the last one."""
    interval = run.config.eval.eval_interval
    last = rollout_id == run.num_rollout - 1
    return interval is not None and ((rollout_id + 1) % interval == 0 or last)


def save(run: Run, rollout_id: int) -> None:
    config, trainer = run.config, run.trainer

    def write(directory):
        trainer.save(directory, save_optimizer=not config.ckpt.no_save_optim)
        run.tokenizer.save_pretrained(directory / "model")
        checkpoint.write_json(directory / "rollout.json", run.manager.state_dict())
        checkpoint.write_json(directory / "args.json",
                              {"argv": run.argv, "sources": run.config.sources})

    path = checkpoint.save_checkpoint(config.ckpt.save, rollout_id, write)
    log.info("saved %s", path)
    if config.ckpt.save_hf:
        target = config.ckpt.save_hf.format(rollout_id=rollout_id)
        trainer.export_hf(target)
        run.tokenizer.save_pretrained(target)


async def evaluate(run: Run, step: int) -> dict:
    start = time.perf_counter()
    metrics = await run.manager.evaluate()
    metrics["perf/eval_time"] = time.perf_counter() - start
    run.logger.log(step, metrics)
    log.info("eval at rollout %d: %s", step, "  ".join(
        f"{k}={v:.4g}" for k, v in metrics.items() if k.count("/") == 1 or "pass@" in k))
    return metrics


def save_rollout(path: str, result: RolloutResult) -> None:
    torch.save({"groups": [[s.to_dict() for s in g] for g in result.groups],
                "metrics": result.metrics}, path)


def load_rollout(path: str) -> RolloutResult:
    data = torch.load(path, weights_only=False)
    groups = [[Sample.from_dict(s) for s in g] for g in data["groups"]]
    return RolloutResult(groups, data["metrics"])


async def train(run: Run) -> dict:
    """The loop, then shutdown of the engine and reward workers whatever happened."""
    try:
        return await run_loop(run)
    finally:
        await finish(run)


async def finish(run: Run) -> None:
    if run.engine is not None:
        await run.engine.close()
    if run.manager.reward_model is not None:
        run.manager.reward_model.close()
    run.logger.close()
    if run.logger.path.stat().st_size:
        path = plot_rewards(run.logger.path, run.run_dir / "reward_curve.png")
        log.info("reward curve: %s", path)
