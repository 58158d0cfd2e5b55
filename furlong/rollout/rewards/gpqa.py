"""The `gpqa` reward: the multiple-choice letter (A-D) the response chose.

The letter is looked for first inside the last `\\boxed{}` (`\\boxed{B}`, `\\boxed{(B)}`,
`\\boxed{\\text{B}}`), then in the whole response; in each, these patterns are tried in
order and the last match of the first that matches wins: an `Answer: B` /
`answer is (B)` phrase, a parenthesised `(B)`, a standalone capital A-D.
The label is a letter (`"B"`, `"(b)"`) or a 0-based option index (`1` or `"1"` is B).
"""
from __future__ import annotations

import re

from furlong.rollout.rewards.math import last_boxed

LETTERS = "ABCD"
_PATTERNS = (
    re.compile(r"(?i:\banswer)(?:\s+is)?\s*:?\s*\(?([A-D])\b"),
    re.compile(r"\(([A-D])\)"),
    re.compile(r"\b([A-D])\b"),
)


def chosen_letter(response: str) -> str | None:
    """The option letter the response chose, or None."""
    boxed = last_boxed(response)
    for text in ([boxed] if boxed is not None else []) + [response]:
        for pattern in _PATTERNS:
            matches = pattern.findall(text)
            if matches:
                return matches[-1]
    return None


def label_letter(label) -> str:
    """The correct letter from a letter label or a 0-based option index."""
    text = str(label).strip().strip("()").upper()
    if text.isdigit() and int(text) < len(LETTERS):
        return LETTERS[int(text)]
    if len(text) != 1 or text not in LETTERS:
        raise ValueError(f"gpqa label {label!r}: expected a letter A-D or an index 0-3")
    return text


def score_gpqa(response: str, label) -> float:
    """1.0 if the chosen letter is the label's, else 0.0 (no letter found scores 0.0)."""
    return 1.0 if chosen_letter(response) == label_letter(label) else 0.0
