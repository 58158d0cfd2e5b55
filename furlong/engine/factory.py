"""Which engine runs, and with what settings: `--rollout-backend` and the SGLang-style flags.

auto: SGLang when it is importable and the run is on a GPU; else the fast engine on a
GPU for the families it supports (Qwen2, Qwen3, Llama, Qwen3-MoE), the HF engine otherwise.
The fast engine's KV cache takes `--sglang-mem-fraction-static` of the GPU (default 0.85
alone; 0.3 when the trainer shares the device in this process, leaving room for its
optimizer and activations).

sglang: one `python -m sglang.launch_server` per entry of `device_groups` (one server on
the inherited devices when None), behind an `EngineRouter`. `--rollout-external` puts the
router in front of the servers at `--rollout-external-engine-addrs` instead, of either
kind. Weights reach servers launched here on the trainer's GPU through
/update_weights_from_tensor (CUDA IPC, engines of one GPU; under Ray colocated engines of
any size get one payload per TP rank: docs/sglang.md), and every other server by
broadcast (/update_weights_from_distributed).
"""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field

import torch

from furlong.config.groups import MIB, Config, SglangArgs
from furlong.config.model_check import read_hf_config
from furlong.config.sglang import LoraServing, lora_serving
from furlong.engine.base import Engine
from furlong.engine.fast import FastEngine, supports
from furlong.engine.hf_engine import HFEngine
from furlong.engine.launcher import SGLANG_SERVER, ServerLauncher, ServerSpec
from furlong.engine.router import EngineRouter, RouterOptions
from furlong.engine.weights.send import address_towards
from furlong.model.loading import hf_model_over, load_hf_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineOptions:
    backend: str = "auto"                    # auto | hf | fast | sglang
    max_context_len: int | None = None
    mem_fraction_static: float | None = None
    max_num_seqs: int = 256
    seed: int = 0
    cuda_graphs: bool = True
    shares_device: bool = False              # the trainer runs on the engine's device
    sglang: SglangArgs = field(default_factory=SglangArgs)
    # Server engines: CUDA device ids per engine (from placement); None: one server.
    device_groups: list[list[int]] | None = None
    external_engine_addrs: tuple[str, ...] = ()  # HOST:PORT of running servers
    server_module: str = SGLANG_SERVER       # furlong.engine.serve stands in for tests
    return_routed_experts: bool = False      # --use-rollout-routing-replay: servers send them
    routed_experts_top_k: int | None = None  # to decode them (SGLang sends no shape)
    update_weight_buffer_size: int = 512 * MIB
    offload: bool = False                    # --offload-rollout: engines release memory
    api_key: str | None = None               # the servers' --api-key (--sglang-api-key)
    lora: LoraServing | None = None          # --lora-rank: the adapter the engines serve


def engine_options(config: Config, shares_device: bool,
                   device_groups: list[list[int]] | None = None) -> EngineOptions:
    """EngineOptions from the flags of a training run."""
    r, sglang = config.rollout, config.sglang
    fraction = sglang.passthrough_value("mem-fraction-static")
    context = r.rollout_max_context_len or sglang.passthrough_value("context-length")
    in_flight = r.over_sampling_batch_size * r.n_samples_per_prompt
    replay = config.grpo.use_rollout_routing_replay
    return EngineOptions(
        backend=r.rollout_backend,
        max_context_len=int(context) if context else None,
        mem_fraction_static=float(fraction) if fraction else None,
        max_num_seqs=max(64, min(1024, in_flight)), seed=r.rollout_seed,
        shares_device=shares_device, sglang=sglang, device_groups=device_groups,
        external_engine_addrs=tuple(r.rollout_external_engine_addrs or ()) if r.rollout_external
        else (), update_weight_buffer_size=r.update_weight_buffer_size,
        offload=config.cluster.offload_rollout, api_key=sglang.api_key,
        lora=lora_serving(config),
        return_routed_experts=replay, routed_experts_top_k=read_hf_config(
            config.ckpt.hf_checkpoint).get("num_experts_per_tok") if replay else None)


def resolve_backend(options: EngineOptions, device: torch.device) -> str:
    """auto -> sglang if importable on a GPU (not under --lora-rank: SGLang takes the
    adapter with --rollout-backend sglang, a path not yet run against real SGLang, while
    furlong's engines' LoRA path has been); the in-process choice is made later."""
    if options.backend not in ("auto", "hf", "fast", "sglang"):
        raise ValueError(f"--rollout-backend {options.backend}: use auto, sglang, fast or hf")
    if options.backend == "auto" and device.type == "cuda" and not options.lora \
            and importlib.util.find_spec("sglang") is not None:
        return "sglang"
    return options.backend


def in_process_backend(backend: str, device: torch.device, model_config) -> str:
    """fast or hf: the fast engine when asked for, or under auto on a GPU for the model
    families it supports; the HF engine otherwise."""
    if backend == "fast" or (backend == "auto" and device.type == "cuda"
                             and supports(model_config)):
        return "fast"
    return "hf"


def create_engine(model_path: str, tokenizer, device: torch.device, dtype: torch.dtype,
                  options: EngineOptions, base: dict[str, torch.Tensor] | None = None
                  ) -> Engine:
    """The run's engine. `base`: a trainer's frozen weights in this process (HF name ->
    tensor, a LoRA run's base), which an in-process engine computes with instead of
    loading its own copy."""
    if options.external_engine_addrs:
        return connect_external(options, device)
    if resolve_backend(options, device) == "sglang":
        return launch_servers(model_path, options, device)
    return create_in_process_engine(model_path, tokenizer, device, dtype, options, base)


def create_in_process_engine(model_path: str, tokenizer, device: torch.device,
                             dtype: torch.dtype, options: EngineOptions,
                             base: dict[str, torch.Tensor] | None = None) -> Engine:
    if base is None:
        model = load_hf_model(model_path, dtype, device)
    else:
        model = hf_model_over(model_path, base)
        log.info("rollout engine: computes with the trainer's base weights (no copy)")
    if in_process_backend(options.backend, device, model.config) == "fast":
        fraction = options.mem_fraction_static or (0.3 if options.shares_device else 0.85)
        log.info("rollout engine: fast (%s, KV cache %.0f%% of the GPU)", device, 100 * fraction)
        return FastEngine(model, tokenizer, max_context_len=options.max_context_len,
                          mem_fraction_static=fraction, max_num_seqs=options.max_num_seqs,
                          default_seed=options.seed, cuda_graphs=options.cuda_graphs,
                          shared_weights=base is not None)
    log.info("rollout engine: hf (%s)", device)
    if options.mem_fraction_static is not None:
        log.warning("--mem-fraction-static has no effect on the HF engine: it allocates its "
                    "KV cache per batch")
    return HFEngine(model, tokenizer, options.max_context_len, default_seed=options.seed)


def server_spec(model_path: str, options: EngineOptions, device: torch.device) -> ServerSpec:
    """How to start each server: module, flags, and what sharing the trainer's GPU implies."""
    colocated = options.shares_device and device.type == "cuda"
    if options.server_module == SGLANG_SERVER and importlib.util.find_spec("sglang") is None:
        raise ValueError("--rollout-backend sglang needs the sglang package (pip install "
                         "sglang) in this environment; or use --rollout-backend fast or hf")
    return ServerSpec(model_path, options.sglang, options.seed, module=options.server_module,
                      mem_fraction_static=(options.mem_fraction_static or 0.3) if colocated
                      else None, accept_ipc_weights=colocated, memory_saver=options.offload,
                      api_key=options.api_key, return_routed_experts=options.return_routed_experts,
                      lora=options.lora)


def launch_servers(model_path: str, options: EngineOptions, device: torch.device) -> Engine:
    """One server per device group, started and healthy, behind a router that owns them."""
    colocated = options.shares_device and device.type == "cuda"
    spec = server_spec(model_path, options, device)
    launcher = ServerLauncher(spec, options.device_groups or [None])
    log.info("rollout engine: sglang (%d x python -m %s, devices %s, logs in %s)",
             len(launcher.device_groups), spec.module,
             options.device_groups or "inherited", launcher.log_dir)
    urls = launcher.start()
    router_options = _router_options(options, device, "auto" if colocated else "broadcast",
                                      spec.host)
    return EngineRouter(urls, router_options, launcher)


def connect_external(options: EngineOptions, device: torch.device) -> Engine:
    """A router over running servers (--rollout-external-engine-addrs); they must answer
    /health now. They are never restarted or stopped from here."""
    import requests

    urls = [f"http://{address}" for address in options.external_engine_addrs]
    for url in urls:
        try:
            requests.get(url + "/health", timeout=30).raise_for_status()
        except requests.RequestException as error:
            raise ValueError(f"--rollout-external-engine-addrs: {url}/health failed ({error}); "
                             "start that server first or fix the address") from None
    host = options.external_engine_addrs[0].rpartition(":")[0]
    log.info("rollout engine: external servers %s", " ".join(urls))
    return EngineRouter(urls, _router_options(options, device, "broadcast",
                                              address_towards(host)))


def router_for(urls: list[str], options: EngineOptions, device: torch.device) -> EngineRouter:
    """A router over servers another layer started (and feeds weights to)."""
    return EngineRouter(urls, _router_options(options, device, "broadcast", "127.0.0.1"))


def _router_options(options: EngineOptions, device: torch.device, weight_sync: str,
                    master_address: str) -> RouterOptions:
    return RouterOptions(
        max_concurrency=options.sglang.sglang_server_concurrency, weight_sync=weight_sync,
        weight_sync_backend="nccl" if device.type == "cuda" else "gloo",
        master_address=master_address, tp_size=options.sglang.rollout_num_gpus_per_engine,
        bucket_bytes=options.update_weight_buffer_size, api_key=options.api_key,
        routed_experts_top_k=options.routed_experts_top_k)
