"""HookArgs: the `args` object user hooks receive, read-only.

Hooks written for Miles/slime read flags as attributes (`args.rollout_max_response_len`);
HookArgs offers every flag that way (flattened over the groups) plus the objects a hook
needs to act: `engine` (async `generate(input_ids, SamplingParams)`, called from the
run's event loop), `tokenizer`, `config` (the typed tree), the keys of
--custom-config-path's YAML, and Miles' `sglang_router_ip` / `sglang_router_port`: the
address of an SGLang router over the run's engine (rollout/router_front.py; None where
the run has no engine), and each --sglang-X flag forwarded to the servers as Miles'
`args.sglang_X`. It cannot be changed, so a hook cannot alter the run's
configuration behind the loop's back.
"""
from __future__ import annotations

from typing import Any

from furlong.config.groups import GROUPS, Config, flag_fields
from furlong.hooks import read_custom_config


class HookArgs:
    def __init__(self, config: Config, engine: Any = None, tokenizer: Any = None,
                 router: tuple[str, int] | None = None):
        ip, port = router or (None, None)
        values = {"config": config, "engine": engine, "tokenizer": tokenizer,
                  "sglang_router_ip": ip, "sglang_router_port": port}
        for _, attr, cls in GROUPS:
            group = getattr(config, attr)
            values.update({f.name: getattr(group, f.name) for f in flag_fields(cls)})
        # Miles' name (its argparse dest) for --disable-rollout-global-dataset, which its
        # rollout function asserts.
        values["rollout_global_dataset"] = not values["disable_rollout_global_dataset"]
        # --sglang-X flags furlong forwards to the servers: Miles' args.sglang_X
        for name, tokens in config.sglang.passthrough:
            values.setdefault("sglang_" + name.replace("-", "_"), forwarded_value(tokens))
        # --custom-config-path: its keys that name no flag become attributes, as in Miles
        values.update(read_custom_config(config.rollout.custom_config_path))
        object.__setattr__(self, "_values", values)

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"args has no flag or attribute {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"args is read-only (tried to set {name!r})")


def forwarded_value(tokens: tuple[str, ...]) -> Any:
    """A forwarded flag's value as argparse would have typed it: True for a bare switch,
    numbers as numbers, several values as a list."""
    if not tokens:
        return True
    values = [_number(token) for token in tokens]
    return values[0] if len(values) == 1 else values


def _number(token: str) -> Any:
    for kind in (int, float):
        try:
            return kind(token)
        except ValueError:
            pass
    return token
