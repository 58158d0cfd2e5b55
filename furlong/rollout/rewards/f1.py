"""The `f1` reward: token-level F1 between response and label, as in SQuAD.

Both sides are lowercased, stripped of punctuation and of the articles a/an/the, and
split on whitespace. With common = the multiset intersection of the two token lists,
precision = |common| / |response tokens|, recall = |common| / |label tokens| and
F1 = 2 * precision * recall / (precision + recall); 0.0 when nothing is shared.
"""
from __future__ import annotations

import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def answer_tokens(text: str) -> list[str]:
    """Lowercase, drop punctuation, drop articles, split on whitespace."""
    return _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split()


def token_f1(predicted: str, label: str) -> float:
    """SQuAD F1 of two strings; two empty token lists count as a match (1.0)."""
    predicted_tokens, label_tokens = answer_tokens(predicted), answer_tokens(label)
    if not predicted_tokens or not label_tokens:
        return float(predicted_tokens == label_tokens)
    num_common = sum((Counter(predicted_tokens) & Counter(label_tokens)).values())
    if num_common == 0:
        return 0.0
    precision = num_common / len(predicted_tokens)
    recall = num_common / len(label_tokens)
    return 2 * precision * recall / (precision + recall)


def score_f1(response: str, label) -> float:
    """F1 against the label; a list of acceptable labels scores the best of them."""
    labels = label if isinstance(label, (list, tuple)) else [label]
    return max(token_f1(response, str(one)) for one in labels)
