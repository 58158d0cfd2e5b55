"""The tokenizer's chat template as the OpenAI routes and sessions use it.

Pure functions of a HF tokenizer: a conversation rendered and tokenised; the token that
closed a response's turn; the tokens the template adds after a recorded response (the
appended messages of the next turn); and how far a recorded token sequence has drifted
from a fresh rendering of its messages. The session routes (sessions.py) and the
multi-turn generate function (rollout/multi_turn.py) share them.

The tokens after a response: the model's last sampled token `end_token` (its end-of-turn
token, e.g. `<|im_end|>`) closed its turn. The template may write more after it (Qwen:
a newline) and then the appended messages and the generation prompt. To find where that
text starts without trusting the template to render earlier turns as they were recorded
(Qwen3 drops the `<think>` blocks of turns before the last user message), the whole
conversation is rendered twice, the second time with one character added to the
response's content; the renderings first differ at the end of that content, and the
first `end_token` after it is the one the model sampled. Everything after it is tokenised.
Templates whose end-of-turn token opens the next message (GLM's `<|observation|>`) work
the same way: the recorded token is the opener.
"""
from __future__ import annotations

import difflib

import jinja2

_MARK = "!"  # appended to a response's content to find where the content ends


def render(tokenizer, messages: list[dict], tools: list | None, add_generation_prompt: bool,
           template_kwargs: dict) -> str:
    """The template's text of `messages`; a ValueError says why it could not render."""
    try:
        return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                             add_generation_prompt=add_generation_prompt,
                                             **template_kwargs)
    except (jinja2.TemplateError, ValueError, TypeError, KeyError, AttributeError) as error:
        raise ValueError(f"the chat template cannot render these messages: "
                         f"{type(error).__name__}: {error}") from None


def encode_text(tokenizer, text: str) -> list[int]:
    """Rendered text -> ids; the template writes any BOS itself."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer, messages: list[dict], tools: list | None,
               template_kwargs: dict) -> list[int]:
    """The ids of a conversation ending with the generation prompt."""
    return encode_text(tokenizer, render(tokenizer, messages, tools, True, template_kwargs))


def closing_token(tokenizer, output_ids: list[int], finish_reason: str) -> int | None:
    """The last sampled token when it ended the turn (a special token that stopped the
    response, e.g. `<|im_end|>`): only after it can a conversation go on in the same
    tokens (`continuation_ids`). None after a limit, an abort or a stop string."""
    if finish_reason == "stop" and output_ids and output_ids[-1] in tokenizer.all_special_ids:
        return output_ids[-1]
    return None


def continuation_ids(tokenizer, history: list[dict], appended: list[dict], end_token: int,
                     tools: list | None, template_kwargs: dict,
                     add_generation_prompt: bool = True) -> list[int] | None:
    """The ids the template writes after `end_token`, the last token the model sampled for
    `history[-1]` (a response): the rest of that turn, the `appended` messages and, if
    asked, the generation prompt (see the module docstring). None when the template does
    not render that token after the response's content."""
    end_text = tokenizer.decode([end_token], skip_special_tokens=False)
    response = history[-1]
    marked = {**response, "content": (response.get("content") or "") + _MARK}
    text = render(tokenizer, history + appended, tools, add_generation_prompt, template_kwargs)
    other = render(tokenizer, history[:-1] + [marked] + appended, tools, add_generation_prompt,
                   template_kwargs)
    content_end = _first_difference(text, other)
    if content_end is None:
        return None
    end = text.find(end_text, content_end)
    if end == -1:
        return None
    return encode_text(tokenizer, text[end + len(end_text):])


def _first_difference(a: str, b: str) -> int | None:
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return index
    return None if len(a) == len(b) else min(len(a), len(b))


def differing_tokens(recorded: list[int], rendered: list[int]) -> int:
    """How many tokens differ between two sequences: the longer length minus the tokens
    an alignment (difflib's longest matching blocks) pairs up. 0 when equal; a token
    replaced, inserted or removed counts once."""
    start = 0
    while start < min(len(recorded), len(rendered)) and recorded[start] == rendered[start]:
        start += 1
    end = 0  # common suffix, not overlapping the common prefix
    while end < min(len(recorded), len(rendered)) - start and \
            recorded[-1 - end] == rendered[-1 - end]:
        end += 1
    a, b = recorded[start:len(recorded) - end], rendered[start:len(rendered) - end]
    matched = sum(block.size for block in
                  difflib.SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks())
    return max(len(a), len(b)) - matched
