"""Flags in, typed config out: parse, resolve, check against the model's config.json."""
from __future__ import annotations

from furlong.config.groups import GROUPS, Config, flag_fields
from furlong.config.model_check import (check_model_args, check_routing_replay,
                                        check_tensor_parallel, read_hf_config)
from furlong.config.parser import ConfigError, build_parser, parse_config
from furlong.config.sglang import check_passthrough
from furlong.config.validate import eval_datasets, resolve

__all__ = ["GROUPS", "Config", "ConfigError", "build_parser", "eval_datasets", "load_config"]


def load_config(argv: list[str], prog: str = "train.py") -> tuple[Config, list[str]]:
    """Parse and validate argv; returns the resolved Config and warnings to log once each."""
    config, custom_warnings = apply_custom_config(parse_config(argv, prog))
    config, warnings = resolve(config)
    warnings = custom_warnings + warnings
    check_passthrough(config.sglang)
    given_model_args = {key.split(".", 1)[1] for key, source in config.sources.items()
                        if key.startswith("model.") and source == "flag"}
    directory = config.ckpt.hf_checkpoint
    hf = read_hf_config(directory)
    check_model_args(config.model, given_model_args, hf, directory)
    check_tensor_parallel(config.perf.tensor_model_parallel_size, hf, directory)
    check_routing_replay(config.grpo, hf, directory)
    check_checkpoint_paths(config)
    return config, warnings


def check_checkpoint_paths(config: Config) -> None:
    """--load's tracker and --ref-load's model resolve now, not after the data and the
    policy have loaded (and under --dry-run). A --load without a tracker is a fresh run."""
    from furlong.checkpoint import latest_iteration
    from furlong.model.loading import resolve_hf_dir
    ckpt = config.ckpt
    try:
        latest_iteration(ckpt.load)
    except (OSError, ValueError) as error:
        raise ConfigError(f"--load {ckpt.load}: {error}") from None
    if ckpt.ref_load is not None:
        try:
            resolve_hf_dir(ckpt.ref_load)
        except (OSError, ValueError) as error:
            raise ConfigError(f"--ref-load {ckpt.ref_load}: {error}") from None


def apply_custom_config(config: Config) -> tuple[Config, list[str]]:
    """--custom-config-path as Miles applies it: each key that names a flag overrides the
    flag's value (source "custom-config", with a warning), before any cross-flag rule runs.
    Keys that name no flag reach hooks only, through their `args` (rollout/context.py)."""
    from furlong.hooks import read_custom_config
    try:
        values = read_custom_config(config.rollout.custom_config_path)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    warnings = []
    for _, attr, cls in GROUPS:
        names = {f.name for f in flag_fields(cls)}
        given = {k: tuple(v) if isinstance(v, list) else v
                 for k, v in values.items() if k in names}
        for name, value in given.items():
            warnings.append(f"--custom-config-path sets {name} to {value!r} (the flag "
                            f"gave {getattr(getattr(config, attr), name)!r})")
        if given:
            config = config.replace(attr, "custom-config", **given)
    return config, warnings
