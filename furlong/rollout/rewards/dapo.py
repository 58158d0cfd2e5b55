"""The `dapo` reward: the last `Answer: X` line near the end of the response.

As in DAPO, only the last 300 characters of the response are searched, the answer is
the rest of the last `Answer:` line, and prediction and label are compared as strings
after normalisation (no symbolic equivalence). Use with `--reward-key score`.
"""
from __future__ import annotations

import re

from furlong.rollout.rewards.math import last_boxed, normalize_answer

WINDOW_CHARS = 300
_ANSWER = re.compile(r"Answer\s*:\s*(.*)", re.IGNORECASE)


def normalize_dapo(answer: str) -> str:
    """`normalize_answer` of the part after the last `=`, with `\\boxed{}` unwrapped."""
    answer = answer.rpartition("=")[2]
    boxed = last_boxed(answer)
    return normalize_answer(answer if boxed is None else boxed)


def score_dapo(response: str, label) -> dict:
    """{"score": 1.0 if correct else -1.0, "acc": correct, "pred": normalised prediction}.

    No `Answer:` in the last 300 characters: pred is "" and the score is -1.0.
    """
    matches = _ANSWER.findall(response[-WINDOW_CHARS:])
    predicted = normalize_dapo(matches[-1]) if matches else ""
    correct = bool(predicted) and predicted == normalize_dapo(str(label))
    return {"score": 1.0 if correct else -1.0, "acc": correct, "pred": predicted}
