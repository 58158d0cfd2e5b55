"""The `remote_rm` reward: POST `{prompt, response, label}` as JSON to `--rm-url`.

The reply body is JSON: a number (the reward) or an object (a dict reward, read with
`--reward-key`). Each attempt has its own timeout; connection errors, timeouts, 429 and
5xx replies are retried `retries` times, waiting `backoff * 2**attempt` seconds before
retry `attempt` (0-based). Other 4xx replies fail at once: resending will not help.
"""
from __future__ import annotations

import asyncio
import json
import numbers

import aiohttp

RETRIED_STATUSES = frozenset({429}) | frozenset(range(500, 600))


class RemoteRewardError(RuntimeError):
    """The reward server could not be reached or gave an unusable reply."""


class _RetryableReply(Exception):
    """A 429 or 5xx reply, worth sending again."""


async def remote_rm(session: aiohttp.ClientSession, url: str, payload: dict, timeout: float,
                    retries: int = 3, backoff: float = 0.5) -> float | dict:
    """POST `payload` to `url` and return the reward from the JSON reply."""
    last_error = None
    for attempt in range(retries + 1):
        if attempt:
            await asyncio.sleep(backoff * 2 ** (attempt - 1))
        try:
            return await _post(session, url, payload, timeout)
        except (aiohttp.ClientError, asyncio.TimeoutError, _RetryableReply) as error:
            last_error = error
    raise RemoteRewardError(f"reward server {url} failed {retries + 1} attempts; last: "
                            f"{_describe(last_error, timeout)}") from last_error


async def _post(session: aiohttp.ClientSession, url: str, payload: dict,
                timeout: float) -> float | dict:
    async with session.post(url, json=payload,
                            timeout=aiohttp.ClientTimeout(total=timeout)) as reply:
        body = await reply.text()
        if reply.status in RETRIED_STATUSES:
            raise _RetryableReply(f"HTTP {reply.status}: {body[:200]}")
        if not 200 <= reply.status < 300:
            raise RemoteRewardError(f"reward server {url} replied HTTP {reply.status}: "
                                    f"{body[:200]}")
    return _reward_from(url, body)


def _reward_from(url: str, body: str) -> float | dict:
    try:
        reward = json.loads(body)
    except json.JSONDecodeError as error:
        message = f"reward server {url} replied with non-JSON {body[:200]!r}"
        raise RemoteRewardError(message) from error
    if isinstance(reward, dict):
        return reward
    if isinstance(reward, numbers.Real) and not isinstance(reward, bool):
        return float(reward)
    raise RemoteRewardError(f"reward server {url} replied {body[:200]!r}; expected a number "
                            "or a JSON object")


def _describe(error: BaseException | None, timeout: float) -> str:
    if isinstance(error, asyncio.TimeoutError):
        return f"timed out after {timeout}s"
    return f"{type(error).__name__}: {error}"
