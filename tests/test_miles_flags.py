"""Every flag Miles accepts is known here: each one of Miles' `arguments.py` and each
Megatron (or sglang-router) flag that Miles' launch scripts pass to train.py, listed by
name in tests/miles_flags.txt, parses in train.py's and train_async.py's parser, shows
in `--help` under a group, and either acts or, given, warns once saying why it does not.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from furlong.config import GROUPS, build_parser, load_config
from furlong.config.flag import has_no_effect
from furlong.config.groups import flag_fields
from furlong.config.parser import option_name, parse_config

MILES_FLAGS = Path(__file__).with_name("miles_flags.txt").read_text().split()
PROGS = ["train.py", "train_async.py"]
GROUP_TITLES = {title for title, _, _ in GROUPS}
FIELDS = {option_name(f.name): f for _, _, cls in GROUPS for f in flag_fields(cls)}
NO_EFFECT = [name for name in MILES_FLAGS if name in FIELDS and has_no_effect(FIELDS[name])]


def _actions(parser: argparse.ArgumentParser) -> dict[str, tuple[str, argparse.Action]]:
    """Option string -> (title of its --help group, its action)."""
    return {option: (group.title, action) for group in parser._action_groups
            for action in group._group_actions for option in action.option_strings}


ACTIONS = _actions(build_parser())


def sample(name: str) -> list[str]:
    """`name` on a command line with a value of its type, if it takes one."""
    action = ACTIONS[name][1]
    if action.nargs == 0:
        return [name]
    if action.choices:
        one = str(list(action.choices)[0])
    elif isinstance(action.default, (int, float, str)):
        one = str(action.default)  # a valid value of its own format, as --moe-layer-freq's
    else:
        kind = getattr(action.type, "__name__", "")
        one = {"int": "1", "float": "0.5", "json_object": "{}"}.get(kind, "x")
    return [name] + [one] * (action.nargs if isinstance(action.nargs, int) else 1)


def test_the_list_holds_miles_flags():
    assert len(MILES_FLAGS) == len(set(MILES_FLAGS)) > 400
    assert all(name.startswith("--") and not name.startswith("--sglang-")
               for name in MILES_FLAGS)


@pytest.mark.parametrize("prog", PROGS)
def test_every_miles_flag_parses_and_sits_in_a_group(prog):
    """One command line with all of them: none is unknown and each reads its value."""
    parser = build_parser(prog)
    assert [name for name in MILES_FLAGS if name not in ACTIONS] == []
    assert {name: ACTIONS[name][0] for name in MILES_FLAGS
            if ACTIONS[name][0] not in GROUP_TITLES} == {}
    usage = parser.format_help()
    assert [name for name in MILES_FLAGS if name not in usage] == []
    parse_config([token for name in MILES_FLAGS for token in sample(name)], prog)


@pytest.mark.parametrize("prog", PROGS)
def test_flags_without_effect_load_and_each_warns_once(grpo_argv, prog):
    """Given all together (and twice), each names itself in exactly one warning."""
    given = [token for name in NO_EFFECT for token in sample(name)]
    _, warnings = load_config(grpo_argv + given + given, prog)
    named = [w.split()[0] for w in warnings if " has no effect " in w]
    assert sorted(named) == sorted(NO_EFFECT)


@pytest.mark.parametrize("name", NO_EFFECT)
def test_a_flag_without_effect_warns_once_saying_why(grpo_argv, name):
    f = FIELDS[name]
    _, warnings = load_config(grpo_argv + sample(name))
    mine = [w for w in warnings if w.startswith(name + " ")]
    assert len(mine) == 1 and f.metadata["why"] and f.metadata["why"] in mine[0]


def test_no_warning_without_them(grpo_argv):
    _, warnings = load_config(grpo_argv)
    assert [w for w in warnings if w.split()[0] in MILES_FLAGS] == []


def test_flags_that_act_are_listed_before_those_that_do_not():
    for _, _, cls in GROUPS:
        kinds = [has_no_effect(f) for f in flag_fields(cls)]
        assert kinds == sorted(kinds), cls.__name__


def test_miles_switch_pairs_read_both_ways(grpo_argv):
    """--offload-train / --no-offload-train, as Miles' BooleanOptionalAction."""
    config, _ = load_config(grpo_argv + ["--offload-train", "--no-offload-train",
                                         "--offload-rollout"])
    assert (config.cluster.offload_train, config.cluster.offload_rollout) == (False, True)
