"""Which layers are MoE: Megatron's --moe-layer-freq, read, checked and written back.

The flag is either a step N (layers 0, N, 2N, ... are MoE) or a Python list expression
with 1 (MoE) or 0 (dense) per layer, such as "([0]*3+[1]*45)" in Miles' model scripts.
This module turns either form into one 0/1 list per layer (what model_check compares with
config.json) and a list back into the short form the scripts write.
"""
from __future__ import annotations

import argparse
import ast

# Longest --moe-layer-freq pattern accepted; guards `[0]*10**9` against filling memory.
MAX_PATTERN_LAYERS = 100_000


def parse_moe_layer_freq(text: str) -> int | list[int]:
    """Megatron's --moe-layer-freq: an int N (layers 0, N, 2N, ... are MoE) or a Python
    list expression with 1 (MoE) or 0 (dense) per layer, such as "([0]*3+[1]*45)".

    The expression is evaluated on its syntax tree (int and list literals, + and *),
    never by eval(); anything else raises ValueError.
    """
    if "[" not in text:
        every = int(text)
        if every < 1:
            raise ValueError(f"{every} < 1")
        return every
    try:
        pattern = _list_expression(ast.parse(text.strip(), mode="eval").body)
    except (SyntaxError, TypeError) as error:
        raise ValueError(str(error)) from None
    if not isinstance(pattern, list) or not pattern or any(bit not in (0, 1) for bit in pattern):
        raise ValueError("not a list of 0 and 1")
    return pattern


def _list_expression(node: ast.expr) -> int | list:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.List):
        return [_list_expression(element) for element in node.elts]
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
        left, right = _list_expression(node.left), _list_expression(node.right)
        if isinstance(node.op, ast.Add):
            return left + right
        items, count = (left, right) if isinstance(left, list) else (right, left)
        if isinstance(items, list) and len(items) * count > MAX_PATTERN_LAYERS:
            raise ValueError(f"longer than {MAX_PATTERN_LAYERS} layers")
        return left * right
    raise ValueError(f"{ast.unparse(node)!r} is not an int, a list, + or *")


def moe_layer_freq_argument(text: str) -> str:
    """argparse reader of --moe-layer-freq: checks the text, keeps it as given."""
    try:
        parse_moe_layer_freq(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"{text!r} ({error}): expected a layer step N or a list of 0/1 per layer such as "
            "'[0]*3+[1]*45'") from None
    return text


def layer_pattern(moe_layer_freq: str, num_layers: int) -> list[int]:
    """--moe-layer-freq as 1 (MoE) or 0 (dense) per layer; Megatron's step N makes layers
    0, N, 2N, ... MoE."""
    freq = parse_moe_layer_freq(moe_layer_freq)
    if isinstance(freq, int):
        return [int(i % freq == 0) for i in range(num_layers)]
    return freq


def pattern_text(pattern: list[int]) -> str:
    """[0, 0, 1, 1, 1] -> "[0]*2+[1]*3", the form Miles' model scripts write."""
    runs: list[list[int]] = []
    for bit in pattern:
        if runs and runs[-1][0] == bit:
            runs[-1][1] += 1
        else:
            runs.append([bit, 1])
    return "+".join(f"[{bit}]*{count}" for bit, count in runs)
