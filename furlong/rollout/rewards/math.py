"""Math answers: the last `\\boxed{}`, answer normalisation, and the `math` and
`deepscaler` rewards.

An answer is right when its normalised string equals the label's, or else when
math-verify finds the two symbolically equal (`\\frac{1}{2}` and `0.5`). math-verify's own
timeouts use `signal.alarm`, which works only on the main thread, so they are turned
off here; the reward hub enforces the timeout by scoring in worker processes.
"""
from __future__ import annotations

import re

import math_verify

_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|mathrm|mbox)\{([^{}]*)\}")
_DROPPED = (r"\left", r"\right", r"\displaystyle", r"\!", r"\,", r"\;", r"\:", "^{\\circ}",
            "^\\circ", r"\%", "%", r"\$", "$")
_THOUSANDS = re.compile(r"^-?\d{1,3}(,\d{3})+(\.\d+)?$")
_INTEGER = re.compile(r"-?\d+")


def last_boxed(text: str) -> str | None:
    """Content of the last well-formed `\\boxed{...}` or `\\fbox{...}` (braces balanced)."""
    for match in reversed(list(_BOX_OPEN.finditer(text))):
        content = _braced(text, match.end())
        if content is not None:
            return content
    return None


def _braced(text: str, start: int) -> str | None:
    """Text from `start` up to the `}` that closes the `{` just before it, or None."""
    depth = 1
    for position in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[position], 0)
        if depth == 0:
            return text[start:position]
    return None


def normalize_answer(answer: str) -> str:
    """Canonical string form of an answer, for exact comparison.

    Unwraps `\\text{}`-like wrappers; drops `\\left`/`\\right`, spacing commands, degree
    and percent signs and `$` (also escaped); maps `\\dfrac`/`\\tfrac` to `\\frac`; removes
    whitespace, a trailing `.`, and thousands separators in plain numbers (`1,000` -> `1000`).
    """
    answer = _TEXT_WRAPPER.sub(r"\1", answer)
    for token in _DROPPED:
        answer = answer.replace(token, "")
    answer = answer.replace(r"\dfrac", r"\frac").replace(r"\tfrac", r"\frac")
    answer = "".join(answer.split()).rstrip(".")
    if _THOUSANDS.match(answer):
        answer = answer.replace(",", "")
    return answer


def answers_match(predicted: str, label: str) -> bool:
    """Normalised strings equal, integers equal in value, or math-verify's symbolic
    equivalence (label as gold)."""
    predicted, label = normalize_answer(predicted), normalize_answer(label)
    if predicted == label:
        return True
    if not predicted or not label:
        return False
    if _INTEGER.fullmatch(predicted) and _INTEGER.fullmatch(label):
        # Two integers (`007` and `7` too) need no symbolic check, which costs ~1000x more.
        return int(predicted) == int(label)
    # Wrapping both in \boxed{} makes math-verify read them as LaTeX answers.
    gold = math_verify.parse(f"\\boxed{{{label}}}", parsing_timeout=None)
    target = math_verify.parse(f"\\boxed{{{predicted}}}", parsing_timeout=None)
    return math_verify.verify(gold, target, timeout_seconds=None)


def score_math(response: str, label) -> float:
    """1.0 if the last `\\boxed{}` of the response matches the label, else 0.0."""
    predicted = last_boxed(response)
    if predicted is None:
        return 0.0
    return 1.0 if answers_match(predicted, str(label)) else 0.0


def score_deepscaler(response: str, label) -> float:
    """`score_math` on the text after the last `</think>`; no `</think>` scores 0.0.

    A correct `\\boxed{}` inside the thinking alone does not count, so a model that never
    closes its thinking (or has no thinking template) always scores 0.
    """
    _, closed, answer = response.rpartition("</think>")
    return score_math(answer, label) if closed else 0.0
