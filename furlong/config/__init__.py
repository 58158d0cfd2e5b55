"""Flags in, typed config out: parse, resolve, check against the model's config.json."""
from __future__ import annotations

import json
from pathlib import Path

from furlong.config.groups import GROUPS, Config, flag_fields
from furlong.config.model_check import (check_model_args, check_routing_replay,
                                        check_tensor_parallel, read_hf_config)
from furlong.config.parser import ConfigError, build_parser, option_name, parse_config
from furlong.config.sglang import check_passthrough
from furlong.config.validate import eval_datasets, resolve

__all__ = ["GROUPS", "Config", "ConfigError", "build_parser", "eval_datasets", "load_config"]


def load_config(argv: list[str], prog: str = "train.py") -> tuple[Config, list[str]]:
    """Parse and validate argv; returns the resolved Config and warnings to log once each."""
    config = parse_config(argv, prog)
    overrides, custom_warnings = custom_config_argv(config)
    if overrides:  # parsed after the command line, so they win, as in Miles
        try:
            config = parse_config(argv + overrides, prog)
        except ConfigError as error:
            raise ConfigError(f"--custom-config-path {config.rollout.custom_config_path}: "
                              f"{error}") from None
    config, warnings = resolve(config)
    warnings = custom_warnings + warnings
    check_passthrough(config.sglang)
    given_model_args = {key.split(".", 1)[1] for key in config.sources
                        if key.startswith("model.") and config.given(key)}
    directory = config.ckpt.hf_checkpoint
    hf = read_hf_config(directory)
    check_model_args(config.model, given_model_args, hf, directory)
    check_tensor_parallel(config.perf.tensor_model_parallel_size, hf, directory)
    check_routing_replay(config.grpo, hf, directory)
    check_checkpoint_paths(config)
    if config.grpo.needs_teacher:
        check_teacher(config, hf)
    return config, warnings


def check_checkpoint_paths(config: Config) -> None:
    """--load's tracker and --ref-load's model resolve now, not after the data and the
    policy have loaded (and under --dry-run). A --load without a tracker is a fresh run."""
    from furlong.checkpoint import latest_iteration
    ckpt = config.ckpt
    try:
        latest_iteration(ckpt.load)
    except (OSError, ValueError) as error:
        raise ConfigError(f"--load {ckpt.load}: {error}") from None
    if ckpt.ref_load is not None:
        model_dir("ref_load", ckpt.ref_load)


def model_dir(name: str, path: str) -> Path:
    """The HF directory that flag `name`'s `path` (an HF directory or a furlong
    checkpoint) loads; a ConfigError naming the flag if there is none."""
    from furlong.model.loading import resolve_hf_dir
    try:
        return resolve_hf_dir(path)
    except (OSError, ValueError) as error:
        raise ConfigError(f"{option_name(name)} {path}: {error}") from None


def check_teacher(config: Config, student: dict) -> None:
    """--opd-teacher-load: an HF directory (or furlong checkpoint) of a model that scores
    the student's tokens (the same vocabulary as `student`, the policy's HF config) under
    the run's tensor parallelism."""
    path = config.grpo.opd_teacher_load
    teacher = read_hf_config(model_dir("opd_teacher_load", path))
    if teacher.get("vocab_size") != student.get("vocab_size"):
        raise ConfigError(f"--opd-teacher-load {path}: the teacher's vocabulary has "
                          f"{teacher.get('vocab_size')} tokens and the student's "
                          f"{student.get('vocab_size')}; on-policy distillation scores the "
                          "student's tokens, so both models need the same tokenizer")
    check_tensor_parallel(config.perf.tensor_model_parallel_size, teacher, path)


def custom_config_argv(config: Config) -> tuple[list[str], list[str]]:
    """--custom-config-path as Miles applies it: each key that names a flag overrides the
    flag. The keys become command-line tokens, parsed after the command line, so they are
    typed, checked against the flag's choices and count as given, like any flag. Keys that
    name no flag reach hooks only, through their `args` (rollout/context.py). Returns the
    tokens and one warning per overridden flag."""
    from furlong.hooks import read_custom_config
    path = config.rollout.custom_config_path
    try:
        values = read_custom_config(path)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    tokens, warnings = [], []
    for _, attr, cls in GROUPS:
        for f in flag_fields(cls):
            if f.name in values:
                current = getattr(getattr(config, attr), f.name)
                tokens += _flag_tokens(f, values[f.name], current, path)
                warnings.append(f"--custom-config-path sets {option_name(f.name)} to "
                                f"{values[f.name]!r} (was {current!r})")
    return tokens, warnings


def _flag_tokens(f, value, current, path: str) -> list[str]:
    """The command-line tokens that give flag `f` the YAML `value`."""
    option = option_name(f.name)
    if value is None or (isinstance(f.default, bool) and value is False):
        if current in (None, False):
            return []
        if value is False and f.metadata.get("negatable"):
            return ["--no-" + option[2:]]
        raise ConfigError(f"--custom-config-path {path}: {f.name}: cannot unset {option}, "
                          "which the command line gives; drop it there instead")
    if isinstance(f.default, bool):
        if value is not True:
            raise ConfigError(f"--custom-config-path {path}: {f.name} is a switch: give "
                              f"true or false, not {value!r}")
        return [option]
    if isinstance(value, (list, tuple)):
        return [option, *map(str, value)]
    return [option, json.dumps(value) if isinstance(value, dict) else str(value)]
