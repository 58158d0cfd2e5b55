"""SFT samples: a conversation's tokens with the loss mask on the assistant turns.

With --loss-type sft_loss the "rollout" reads responses from the data instead of an
engine: the input column holds chat messages that include the assistant's replies.
The mask is found by rendering the conversation up to each assistant turn: the tokens
that the turn adds are the ones the model must learn to produce.
"""
from __future__ import annotations

from furlong.data import PromptRow
from furlong.sample import Sample, Status


def _encode(tokenizer, messages: list, tools, add_generation_prompt: bool, kwargs: dict):
    text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                         add_generation_prompt=add_generation_prompt, **kwargs)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def conversation_tokens(tokenizer, messages: list, tools=None, template_kwargs=None
                        ) -> tuple[list[int], int, list[int]]:
    """(tokens, prompt length, loss mask over the tokens after the prompt).

    The prompt is everything before the first assistant turn (with the generation
    prompt); the mask is 1 on tokens of assistant turns, 0 on other turns.
    """
    kwargs = template_kwargs or {}
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise ValueError("an SFT conversation needs at least one assistant message")
    tokens = _encode(tokenizer, messages, tools, False, kwargs)
    prompt_length = len(_encode(tokenizer, messages[:turns[0]], tools, True, kwargs))
    mask = [0] * (len(tokens) - prompt_length)
    for turn in turns:
        start = len(_encode(tokenizer, messages[:turn], tools, True, kwargs))
        end = len(_encode(tokenizer, messages[:turn + 1], tools, False, kwargs))
        for position in range(start, end):
            mask[position - prompt_length] = 1
    return tokens, prompt_length, mask


def sft_sample(tokenizer, row: PromptRow, group_index: int, template_kwargs=None) -> Sample:
    if not isinstance(row.prompt, list):
        raise ValueError(f"{row.where}: --loss-type sft_loss needs the input column to hold chat "
                         "messages ending with the assistant's reply")
    try:
        tokens, prompt_length, mask = conversation_tokens(
            tokenizer, row.prompt, row.tools, template_kwargs)
    except ValueError as error:
        raise ValueError(f"{row.where}: {error}") from None
    return Sample(group_index=group_index, index=0, prompt=row.prompt, tokens=tokens,
                  response_length=len(tokens) - prompt_length, label=row.label,
                  loss_mask=mask, status=Status.COMPLETED, metadata=dict(row.metadata),
                  response=tokenizer.decode(tokens[prompt_length:]))
