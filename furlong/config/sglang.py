"""The `python -m sglang.launch_server` argument list built from SGLANG_ARGS.

Every `--sglang-X ...` flag is forwarded as `--X ...` in the order given, except
the server settings that furlong owns because it places and addresses the engines, and
Miles' router flags (`--sglang-router-*`: its router, not the servers, takes them; in
furlong they name the router hooks post to, furlong/rollout/router_front.py).
With --use-rollout-routing-replay the servers are started with
`--enable-return-routed-experts` (SGLang returns routes only then). With --lora-rank they
serve the run's adapter (`LoraServing`): `--enable-lora --max-lora-rank R
--lora-target-modules <HF leaf names> --max-loras-per-batch 1` (one adapter, the policy's),
and `--lora-paths NAME=PATH` with --lora-adapter-path (the servers boot with it); each of
these that the launch script gives as `--sglang-X` is left to it.

An engine of N GPUs (`--rollout-num-gpus-per-engine N`) is `--tp-size N` on exactly its
devices (the launcher sets CUDA_VISIBLE_DEVICES to them), so SGLang's default
`--base-gpu-id 0` is TP rank 0's device; it gets an `--nccl-port` of its own for its TP
group, so engines that start together on one node never race for one.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from types import SimpleNamespace

from furlong.config.groups import Config, SglangArgs
from furlong.config.model_check import read_hf_config
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
    "nccl-port": "the engine's placement",
}


def check_passthrough(sglang: SglangArgs) -> None:
    for name, _ in sglang.passthrough:
        if name in OWNED:
            raise ConfigError(f"--sglang-{name} is set by furlong from {OWNED[name]}; "
                              "remove it from the launch script")


def is_router_flag(name: str) -> bool:
    """--sglang-router-ip, --sglang-router-port, --sglang-router-policy, ...: Miles'
    settings of its router, which SGLang's launch_server would refuse."""
    return name.startswith("router-")


@dataclass(frozen=True)
class LoraServing:
    """What the servers need to serve the run's adapter (--lora-rank): its rank, the HF
    leaf names it adapts, the name requests give as `lora_path`, and the adapter the run
    starts from (--lora-adapter-path), if any."""
    rank: int
    target_modules: tuple[str, ...]
    adapter_name: str
    adapter_path: str | None = None

    def server_args(self, sglang: SglangArgs) -> list[str]:
        """SGLang's LoRA flags, less those the launch script passes itself."""
        flags = [("enable-lora", []), ("max-lora-rank", [str(self.rank)]),
                 ("lora-target-modules", list(self.target_modules)),
                 ("max-loras-per-batch", ["1"])]
        if self.adapter_path is not None:
            flags.append(("lora-paths", [f"{self.adapter_name}={self.adapter_path}"]))
        return [token for name, values in flags if sglang.passthrough_value(name) is None
                for token in (f"--{name}", *values)]


def lora_serving(config: Config) -> LoraServing | None:
    """The run's adapter as its servers see it; None without --lora-rank. The targets are
    the trainer's (Miles' --target-modules read against --hf-checkpoint's config)."""
    if not config.lora.enabled:
        return None
    from furlong.model import lora  # torch and PEFT's vocabulary: runs with an adapter only
    model_config = SimpleNamespace(**read_hf_config(config.ckpt.hf_checkpoint))
    targets, excludes = lora.resolve_targets(config.lora.target_modules,
                                             config.lora.exclude_modules, model_config)
    spec = lora.LoraSpec(config.lora.lora_rank, config.lora.lora_alpha, targets=targets,
                         excludes=excludes)
    return LoraServing(spec.rank, spec.target_leaves(), lora.ADAPTER_NAME,
                       config.lora.lora_adapter_path)


def launch_server_args(sglang: SglangArgs, model_path: str, host: str, port: int,
                       seed: int, nnodes: int = 1, node_rank: int = 0,
                       dist_init_addr: str | None = None,
                       return_routed_experts: bool = False,
                       nccl_port: int | None = None,
                       lora: LoraServing | None = None) -> list[str]:
    """The exact argv of one SGLang server (the passthrough flags last, in order).
    `return_routed_experts`: --use-rollout-routing-replay is on. `nccl_port`: where the
    engine's TP ranks meet (engines of several GPUs). `lora`: the run's adapter."""
    check_passthrough(sglang)
    tp_size = sglang.rollout_num_gpus_per_engine
    argv = [sys.executable, "-m", "sglang.launch_server", "--model-path", model_path,
            "--host", host, "--port", str(port), "--tp-size", str(tp_size),
            "--random-seed", str(seed)]
    if nccl_port is not None:
        argv += ["--nccl-port", str(nccl_port)]
    if nnodes > 1:
        argv += ["--nnodes", str(nnodes), "--node-rank", str(node_rank),
                 "--dist-init-addr", dist_init_addr or ""]
    if return_routed_experts and sglang.passthrough_value("enable-return-routed-experts") is None:
        argv.append("--enable-return-routed-experts")
    if lora is not None:
        argv += lora.server_args(sglang)
    for name, values in sglang.passthrough:
        if not is_router_flag(name):
            argv += [f"--{name}", *values]
    return argv
