"""The reward hub: from --rm-type / --custom-rm-path to one reward per sample.

Where each reward runs:
- built-in text rewards (math, deepscaler, dapo, f1, gpqa and their boxed_ forms) run in
  a spawn-context process pool, so a runaway sympy simplification can time out without
  stalling the event loop (math-verify's own signal timeouts are off, see math.py);
- remote_rm runs in the event loop with aiohttp (per-attempt timeout, retries);
- random draws 0.0 or 1.0 from a generator seeded by (seed, group_index, index);
- a custom hook runs in the event loop if async, in the hook pool (furlong.hooks.call_hook) if sync
  (furlong.hooks.call_hook).
A reward that raises or times out is a RewardError naming the sample, or, with
on_error="zero", a logged warning and 0.0. A hook that breaks its contract (wrong type,
wrong number of rewards) is always a RewardError: that is a bug, not a flaky reward.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import numbers
import os
import random
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable

import aiohttp

from furlong.config.reward_types import split_rm_type
from furlong.hooks import call_hook
from furlong.rollout.rewards.dapo import score_dapo
from furlong.rollout.rewards.f1 import score_f1
from furlong.rollout.rewards.gpqa import score_gpqa
from furlong.rollout.rewards.math import last_boxed, score_deepscaler, score_math
from furlong.rollout.rewards.remote import remote_rm
from furlong.sample import Sample

logger = logging.getLogger(__name__)

TEXT_REWARDS: dict[str, Callable[[str, Any], float | dict]] = {
    "math": score_math, "deepscaler": score_deepscaler, "dapo": score_dapo,
    "f1": score_f1, "gpqa": score_gpqa,
}
_CLOSE_GRACE_SECONDS = 1.0


class RewardError(RuntimeError):
    """A reward failed; the message names the sample (group, index, prompt) and the cause."""


def builtin_score(rm_type: str, response: str, label) -> float | dict:
    """Score one response with a built-in text reward (a boxed_ prefix scores the content
    of the last `\\boxed{}`, "" if none). remote_rm and random need a RewardModel."""
    boxed, base = split_rm_type(rm_type)
    if base not in TEXT_REWARDS:
        raise ValueError(f"--rm-type {rm_type} needs a URL or a seed: score it with "
                         f"RewardModel; builtin_score takes {', '.join(TEXT_REWARDS)}")
    if label is None:
        raise ValueError(f"--rm-type {rm_type} compares with a label, and this sample has none")
    if boxed:
        response = last_boxed(response) or ""
    return TEXT_REWARDS[base](response, label)


class RewardModel:
    """Scores groups of samples with the configured reward. Use it from one event loop at
    a time, and call close() when done (it stops the worker processes)."""

    def __init__(self, rm_type: str | None, custom_rm: Callable | None, group_rm: bool,
                 rm_url: str | None, timeout: float, on_error: str, hook_args: Any, seed: int):
        if on_error not in ("raise", "zero"):
            raise ValueError(f"--rm-on-error {on_error}: choose raise or zero")
        if group_rm and custom_rm is None:
            raise ValueError("--group-rm needs --custom-rm-path module:function(args, samples)")
        if custom_rm is None and rm_type is None:
            raise ValueError("no reward: set --rm-type or --custom-rm-path")
        # A custom hook takes precedence over --rm-type.
        self._hook = custom_rm
        self._boxed, self._base = (False, "custom") if self._hook else split_rm_type(rm_type)
        if self._base == "remote_rm" and not rm_url:
            raise ValueError("--rm-type remote_rm needs --rm-url http://HOST:PORT/PATH")
        self._rm_type, self._group_rm, self._rm_url = rm_type, group_rm, rm_url
        self._timeout, self._on_error = timeout, on_error
        self._hook_args, self._seed = hook_args, seed
        self._num_workers = min(4, os.cpu_count() or 1)
        self._pool: ProcessPoolExecutor | None = None
        # The current pool's warm-up, and the event loop it runs in.
        self._pool_started: tuple[asyncio.AbstractEventLoop, asyncio.Future] | None = None
        self._retired_workers: list[multiprocessing.Process] = []
        self._slots: tuple[asyncio.AbstractEventLoop, asyncio.Semaphore] | None = None

    async def score_group(self, samples: list[Sample]) -> list[float | dict]:
        """One reward per sample, in order; the samples are scored concurrently."""
        if not samples:
            return []
        if self._group_rm:
            return await self._score_whole_group(samples)
        remote = self._base == "remote_rm"
        async with aiohttp.ClientSession() if remote else contextlib.nullcontext() as session:
            return list(await asyncio.gather(*(self._guarded(sample, session)
                                               for sample in samples)))

    def close(self) -> None:
        """Stop the worker processes, killing any still busy (e.g. timed out) after a grace."""
        if self._pool is not None:
            self._retire(self._pool)
        deadline = time.monotonic() + _CLOSE_GRACE_SECONDS
        for process in self._retired_workers:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.terminate()
                process.join()
        self._retired_workers = []

    async def _guarded(self, sample: Sample, session: aiohttp.ClientSession | None):
        try:
            reward = await self._score(sample, session)
        except Exception as error:
            return self._failed(_describe_sample(sample), error, 0.0)
        return _checked(reward, _describe_sample(sample))

    async def _score(self, sample: Sample, session: aiohttp.ClientSession | None):
        if self._base == "custom":
            return await asyncio.wait_for(self._call_hook(sample), self._timeout)
        if self._base == "random":
            # A string seed: hash() of a tuple holding None differs between runs.
            rng = random.Random(f"{self._seed}/{sample.group_index}/{sample.index}")
            return rng.choice([0.0, 1.0])
        if self._base == "remote_rm":
            response = (last_boxed(sample.response) or "") if self._boxed else sample.response
            payload = {"prompt": sample.prompt, "response": response, "label": sample.label}
            return await remote_rm(session, self._rm_url, payload, self._timeout)
        return await self._score_in_pool(sample)

    async def _score_whole_group(self, samples: list[Sample]) -> list[float | dict]:
        where = _describe_group(samples)
        try:
            rewards = await asyncio.wait_for(self._call_hook(samples), self._timeout)
        except Exception as error:
            return self._failed(where, error, [0.0] * len(samples))
        if not isinstance(rewards, (list, tuple)) or len(rewards) != len(samples):
            count = len(rewards) if isinstance(rewards, (list, tuple)) else type(rewards).__name__
            raise RewardError(f"reward for {where}: the group hook returned {count} rewards "
                              f"for {len(samples)} samples; return a list with one per sample")
        return [_checked(reward, where) for reward in rewards]

    async def _call_hook(self, subject: Sample | list[Sample]):
        return await call_hook(self._hook, self._hook_args, subject)

    async def _score_in_pool(self, sample: Sample) -> float | dict:
        # The timeout starts once a started worker is free, so neither a long queue nor
        # a slow worker start (a loaded machine) times a sample out.
        loop = asyncio.get_running_loop()
        async with self._worker_slots(loop):
            pool = await self._started_pool(loop)
            try:
                return await asyncio.wait_for(loop.run_in_executor(
                    pool, builtin_score, self._rm_type, sample.response, sample.label),
                    self._timeout)
            except (TimeoutError, BrokenProcessPool):
                self._retire(pool)
                raise

    def _worker_slots(self, loop: asyncio.AbstractEventLoop) -> asyncio.Semaphore:
        if self._slots is None or self._slots[0] is not loop:
            self._slots = (loop, asyncio.Semaphore(self._num_workers))
        return self._slots[1]

    async def _started_pool(self, loop: asyncio.AbstractEventLoop) -> ProcessPoolExecutor:
        """The live pool once its workers have started and scored a first answer, so that
        starting a process and importing math-verify is not charged to a sample."""
        while True:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    self._num_workers, mp_context=multiprocessing.get_context("spawn"),
                    initializer=_quiet_math_verify)
                self._pool_started = None
            pool = self._pool
            if self._pool_started is None or (self._pool_started[0] is not loop
                                              and not self._pool_started[1].done()):
                # Submitted together, the warm-ups start every worker (spawned on demand).
                self._pool_started = (loop, asyncio.gather(*(
                    loop.run_in_executor(pool, builtin_score, "math", r"\boxed{1}", "1")
                    for _ in range(self._num_workers))))
            try:
                await asyncio.shield(self._pool_started[1])
            except BrokenProcessPool:
                self._retire(pool)
                raise
            if self._pool is pool:  # not retired by a sibling sample meanwhile
                return pool

    def _retire(self, pool: ProcessPoolExecutor) -> None:
        """Send no more work to `pool`: its idle workers exit, busy ones finish or are
        killed by close(). A timed-out worker may stay busy, so it gets a fresh pool."""
        if self._pool is not pool:
            return  # a sibling sample already retired it
        self._pool = None
        # Private, but Python 3.11 has no public way to kill a pool's workers.
        workers = list((pool._processes or {}).values())
        pool.shutdown(wait=False)
        self._retired_workers = [p for p in self._retired_workers if p.is_alive()] + workers

    def _failed(self, where: str, error: Exception, zero):
        cause = (f"timed out after {self._timeout}s" if isinstance(error, TimeoutError)
                 else f"{type(error).__name__}: {error}")
        message = f"reward for {where}: {cause}"
        if self._on_error == "raise":
            raise RewardError(message) from error
        logger.warning("%s; scoring it 0 (--rm-on-error zero)", message)
        return zero


def _checked(reward, where: str) -> float | dict:
    if isinstance(reward, dict):
        return reward
    if isinstance(reward, numbers.Real):
        return float(reward)
    raise RewardError(f"reward for {where}: got {type(reward).__name__} {reward!r}; a reward "
                      "is a number or a dict")


def _describe_sample(sample: Sample) -> str:
    return (f"sample group {sample.group_index} index {sample.index} "
            f"(prompt {_prompt_start(sample.prompt)})")


def _describe_group(samples: list[Sample]) -> str:
    return f"sample group {samples[0].group_index} (prompt {_prompt_start(samples[0].prompt)})"


def _prompt_start(prompt: str | list, num_chars: int = 60) -> str:
    text = prompt if isinstance(prompt, str) else str(prompt)
    return repr(text[:num_chars] + ("..." if len(text) > num_chars else ""))


def _quiet_math_verify() -> None:
    """Worker initializer: math-verify warns once per process that its timeouts are off;
    the hub times workers out itself, so the warning is noise."""
    logging.getLogger("math_verify").setLevel(logging.ERROR)
