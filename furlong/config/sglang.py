"""The `python -m sglang.launch_server` argument list built from SGLANG_ARGS.

Every `--sglang-X ...` flag is forwarded as `--X ...` in the order given, except
the server settings that furlong owns because it places and addresses the engines.
With --use-rollout-routing-replay the servers are started with
`--enable-return-routed-experts` (SGLang returns routes only then).
"""
from __future__ import annotations

import sys

from furlong.config.groups import SglangArgs
from furlong.config.parser import ConfigError

# Owned flag -> what the user sets instead.
OWNED = {
    "model-path": "--hf-checkpoint",
    "host": "the engine's placement",
    "port": "the engine's placement",
    "tp-size": "--rollout-num-gpus-per-engine",
    "tensor-parallel-size": "--rollout-num-gpus-per-engine",
    "random-seed": "--rollout-seed",
    "nnodes": "--rollout-num-gpus-per-engine and --num-gpus-per-node",
    "node-rank": "the engine's placement",
    "dist-init-addr": "the engine's placement",
    "base-gpu-id": "the engine's placement",
}


def check_passthrough(sglang: SglangArgs) -> None:
    for name, _ in sglang.passthrough:
        if name in OWNED:
            raise ConfigError(f"--sglang-{name} is set by furlong from {OWNED[name]}; "
                              "remove it from the launch script")


def launch_server_args(sglang: SglangArgs, model_path: str, host: str, port: int,
                       seed: int, nnodes: int = 1, node_rank: int = 0,
                       dist_init_addr: str | None = None,
                       return_routed_experts: bool = False) -> list[str]:
    """The exact argv of one SGLang server (the passthrough flags last, in order).
    `return_routed_experts`: --use-rollout-routing-replay is on."""
    check_passthrough(sglang)
    tp_size = sglang.rollout_num_gpus_per_engine
    argv = [sys.executable, "-m", "sglang.launch_server", "--model-path", model_path,
            "--host", host, "--port", str(port), "--tp-size", str(tp_size),
            "--random-seed", str(seed)]
    if nnodes > 1:
        argv += ["--nnodes", str(nnodes), "--node-rank", str(node_rank),
                 "--dist-init-addr", dist_init_addr or ""]
    if return_routed_experts and sglang.passthrough_value("enable-return-routed-experts") is None:
        argv.append("--enable-return-routed-experts")
    for name, values in sglang.passthrough:
        argv += [f"--{name}", *values]
    return argv
