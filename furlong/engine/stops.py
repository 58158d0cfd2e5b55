"""Stop strings and response text as SGLang gives them, shared by the built-in engines.

Pure functions of the tokenizer, the generated ids and the request's SamplingParams.
"""
from __future__ import annotations

from furlong.engine.base import SamplingParams


def stop_string_end(tokenizer, ids: list[int], stops: tuple[str, ...], start: int) -> int | None:
    """Length of `ids` up to the token that completes one of `stops`, looking only at
    ends after `start` (ids before were searched already); None if none completes."""
    longest = max(len(stop) for stop in stops) + 8  # a token spells at least one char
    for end in range(start + 1, len(ids) + 1):
        tail = tokenizer.decode(ids[max(0, end - longest):end])
        if any(stop in tail for stop in stops):
            return end
    return None


def ended_on_stop_token(ids: list[int], params: SamplingParams, eos_ids: set[int]) -> bool:
    """Whether the last id is one that ends a response (a stop token id, or EOS)."""
    return bool(ids) and (ids[-1] in params.stop_token_ids
                          or (ids[-1] in eos_ids and not params.ignore_eos))


def response_text(tokenizer, ids: list[int], params: SamplingParams, finish_reason: str,
                  eos_ids: set[int]) -> str:
    """The text of a response as SGLang's detokenizer gives it: unless no_stop_trim, a
    response that stopped leaves out the stop token that ended it (the ids keep it), or
    everything from the stop string that ended it on."""
    trim = finish_reason == "stop" and not params.no_stop_trim
    on_token = trim and ended_on_stop_token(ids, params, eos_ids)
    text = tokenizer.decode(ids[:-1] if on_token else ids,
                            skip_special_tokens=params.skip_special_tokens)
    if trim and not on_token and params.stop:
        # -1: skip_special_tokens removed the stop string from the text; nothing is cut
        hits = [text.find(stop) for stop in params.stop if stop in text]
        if hits:
            text = text[:min(hits)]
    return text
