"""The fields of SGLang HTTP requests: parsing, checking, and the 400 that names the field.

Used by the engine server's routes (this package); every bad value raises
`bad_request` with a message naming the field and what it must be.
"""
from __future__ import annotations

import base64
import json
import uuid
from typing import NoReturn

import torch
from aiohttp import web

from furlong.engine.base import GenerateOutput, SamplingParams
from furlong.engine.weights.receive import LoadOptions

GENERATE_FIELDS = {"input_ids", "text", "sampling_params", "return_logprob", "rid", "stream",
                   "return_routed_experts", "lora_path", "logprob_start_len"}
_REQUIRED = object()
_KIND_NAMES = {bool: "true or false", int: "an integer", str: "a string", list: "a list",
               dict: "an object"}


def bad_request(message: str) -> NoReturn:
    raise web.HTTPBadRequest(text=json.dumps({"error": message}), content_type="application/json")


async def json_body(request: web.Request) -> dict:
    if not request.body_exists:
        return {}
    try:
        body = await request.json()
    except json.JSONDecodeError as error:
        bad_request(f"the body is not JSON: {error}")
    if not isinstance(body, dict):
        bad_request("the body must be a JSON object")
    return body


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def field(body: dict, name: str, kind: type, default=_REQUIRED):
    """body[name], checked to be of `kind`; `default` when absent or null."""
    value = body.get(name)
    if value is None:
        if default is _REQUIRED:
            bad_request(f"field {name!r} is required")
        return default
    if not (is_int(value) if kind is int else isinstance(value, kind)):
        bad_request(f"field {name!r} must be {_KIND_NAMES[kind]}, got {value!r}")
    return value


def token_ids(ids, name: str, vocab_size: int) -> list[int]:
    """A prompt's ids, checked to be a non-empty list of ids in the vocabulary."""
    if not isinstance(ids, list) or not ids:
        bad_request(f"{name} must be a non-empty list of token ids, got {ids!r}")
    for i, token in enumerate(ids):
        if not (is_int(token) and 0 <= token < vocab_size):
            bad_request(f"{name}[{i}] = {token!r} is not a token id in [0, {vocab_size})")
    return ids


def version_field(body: dict, name: str) -> int | None:
    """A weight version: SGLang sends a string, furlong engines number them."""
    value = body.get(name)
    if value is None:
        return None
    try:
        if is_int(value) or isinstance(value, str):
            return int(value)
    except ValueError:
        pass
    bad_request(f"field {name!r} must be an integer (or its string), got {value!r}")


def load_options(body: dict) -> LoadOptions:
    """How to load: the fields of SGLang's weight-update requests that say it."""
    return LoadOptions(version_field(body, "weight_version"),
                        field(body, "flush_cache", bool, True),
                        field(body, "abort_all_requests", bool, False))


def check_load_format(body: dict) -> None:
    if body.get("load_format") not in (None, "auto"):
        bad_request(f"load_format {body['load_format']!r} is not supported; leave it out")


def parse_dtype(name, field: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        bad_request(f"{field} = {name!r} is not a torch dtype (e.g. 'bfloat16')")
    return dtype


def parse_shape(value, field: str) -> list[int]:
    if not isinstance(value, list) or not all(is_int(size) and size >= 0 for size in value):
        bad_request(f"{field} must be a list of sizes, got {value!r}")
    return value


def parse_sampling_params(value: dict, field: str) -> SamplingParams:
    try:
        return SamplingParams.from_dict(value).validate()
    except (ValueError, TypeError) as error:
        bad_request(f"{field}: {error}")


def parse_batch_sampling_params(value, count: int, batched: bool) -> list[SamplingParams]:
    """One SamplingParams per prompt: a dict is shared, a list gives one per prompt."""
    if value is None or isinstance(value, dict):
        return [parse_sampling_params(value or {}, "sampling_params")] * count
    if not (batched and isinstance(value, list) and len(value) == count
            and all(isinstance(item, dict) for item in value)):
        bad_request(f"sampling_params must be a dict, or in a batch of {count} a list of "
                    f"{count} dicts, got {value!r}")
    return [parse_sampling_params(item, f"sampling_params[{i}]") for i, item in enumerate(value)]


def lora_paths(value, count: int, batched: bool) -> list[str | None]:
    """Each prompt's adapter name (SGLang's lora_path): one for all, or in a batch one per
    prompt (null: the base model)."""
    if value is None or isinstance(value, str):
        return [value] * count
    if batched and isinstance(value, list) and len(value) == count \
            and all(item is None or isinstance(item, str) for item in value):
        return value
    bad_request(f"lora_path must be an adapter's name, or in a batch of {count} a list of "
                f"{count} names or nulls, got {value!r}")


def request_ids(value, count: int, batched: bool) -> list[str]:
    if value is None:
        return [uuid.uuid4().hex for _ in range(count)]
    if not batched and isinstance(value, str):
        return [value]
    if batched and isinstance(value, list) and len(value) == count:
        return [str(rid) for rid in value]
    bad_request(f"rid must be a string, or in a batch of {count} a list of {count}")


def generate_item(output: GenerateOutput, rid: str, return_logprob: bool,
                  input_logprobs: list | None = None) -> dict:
    """One /generate result in SGLang's shape; `input_logprobs`: the prompt's
    input_token_logprobs, when asked for."""
    finish: dict = {"type": output.finish_reason}
    if output.finish_reason == "length":
        finish["length"] = len(output.output_ids)
    elif output.finish_reason == "abort":
        finish["message"] = "the request was aborted"
    meta = {"id": rid, "finish_reason": finish, "prompt_tokens": output.prompt_tokens,
            "completion_tokens": len(output.output_ids),
            "weight_version": str(output.weight_version)}
    if return_logprob:
        meta["output_token_logprobs"] = [
            [log_prob, token, None]
            for log_prob, token in zip(output.output_log_probs, output.output_ids, strict=True)]
    if input_logprobs is not None:
        meta["input_token_logprobs"] = input_logprobs
    if output.routed_experts is not None:
        meta["routed_experts"] = encode_routed_experts(output.routed_experts)
    return {"text": output.text, "output_ids": output.output_ids, "meta_info": meta}


def encode_routed_experts(routes: torch.Tensor) -> str:
    """SGLang's meta_info.routed_experts: base64 of the int32 array's bytes (tokens - 1,
    layers, top-k), in C order; the reader knows the shape."""
    return base64.b64encode(routes.to(torch.int32).contiguous().numpy().tobytes()).decode()
