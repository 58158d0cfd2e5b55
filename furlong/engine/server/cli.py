"""The engine server's command line: SGLang's launch flags in, a serving EngineServer out.

`python -m furlong.engine.serve --model-path DIR [--host H] [--port P] [--dtype D]
[--device cpu|cuda] [--random-seed N] [--context-length N] [--tp-size 1] [--api-key KEY]
[--enable-return-routed-experts] [--served-model-name NAME]`
loads the HF model and serves it. SGLang launch_server flags that this server does not
implement are ignored with one warning each, so an SGLang command line starts it too.
`build_engine` is the one place that picks the engine.
"""
from __future__ import annotations

import argparse
import logging

import torch
from aiohttp import web

from furlong.engine.base import Engine
from furlong.engine.server.app import EngineServer

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16, "half": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """SGLang's launch_server flags that this server implements; `ignored_flags` lists
    the other flags given (to warn about once each)."""
    parser = argparse.ArgumentParser(prog="python -m furlong.engine.serve", allow_abbrev=False,
                                     description="The engine server: a furlong Engine behind "
                                                 "SGLang's HTTP API (docs/sglang.md).")
    parser.add_argument("--model-path", required=True, help="HF model directory")
    parser.add_argument("--tokenizer-path", help="[--model-path]")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="[auto: the checkpoint's dtype]")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--base-gpu-id", type=int, default=0, help="the CUDA device index")
    parser.add_argument("--random-seed", type=int, default=0,
                        help="seed of the requests that give no sampling_seed")
    parser.add_argument("--context-length", type=int, help="[max_position_embeddings]")
    parser.add_argument("--max-running-requests", type=int, default=512,
                        help="the most requests decoded in one batch")
    parser.add_argument("--mem-fraction-static", type=float)
    parser.add_argument("--tp-size", "--tp", "--tensor-parallel-size", dest="tp_size", type=int,
                        default=1)
    parser.add_argument("--log-level", default="info",
                        choices=("debug", "info", "warning", "error", "critical"))
    parser.add_argument("--accept-ipc-weights", action="store_true",
                        help="take CUDA IPC weight payloads (a trainer on the same GPU)")
    parser.add_argument("--enable-return-routed-experts", action="store_true",
                        help="/generate may ask for each token's experts (MoE routing replay)")
    parser.add_argument("--served-model-name",
                        help="the model's name in /v1/models and OpenAI responses [--model-path]")
    parser.add_argument("--api-key", help="requests need the header 'Authorization: Bearer "
                                          "API_KEY' (the health checks excepted)")
    args, unknown = parser.parse_known_args(argv)
    if args.tp_size != 1:
        parser.error(f"--tp-size {args.tp_size}: this server runs one device per engine; use "
                     "--tp-size 1 and start one server per device (or SGLang for tensor "
                     "parallelism)")
    args.ignored_flags = [token.split("=")[0] for token in unknown if token.startswith("--")]
    return args


def resolve_dtype(name: str, model_path: str) -> torch.dtype:
    """`--dtype`; auto is the dtype of the checkpoint's config (float32 if it names none)."""
    if name != "auto":
        return DTYPES[name]
    from transformers import AutoConfig

    from furlong.model.loading import resolve_hf_dir
    dtype = getattr(AutoConfig.from_pretrained(resolve_hf_dir(model_path)), "dtype", None)
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype or torch.float32


def build_engine(args: argparse.Namespace, tokenizer) -> Engine:
    """The engine this server runs: the fast engine on a GPU for the families it
    supports, the HF engine otherwise (furlong.engine.factory decides)."""
    from furlong.engine.factory import EngineOptions, create_engine

    device = torch.device("cuda", args.base_gpu_id) if args.device == "cuda" \
        else torch.device("cpu")
    options = EngineOptions(max_context_len=args.context_length,
                            mem_fraction_static=args.mem_fraction_static,
                            max_num_seqs=args.max_running_requests, seed=args.random_seed)
    return create_engine(args.model_path, tokenizer, device,
                         resolve_dtype(args.dtype, args.model_path), options)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for flag in dict.fromkeys(args.ignored_flags):
        logger.warning("ignoring %s: this server does not implement that SGLang flag", flag)
    from transformers import AutoTokenizer

    tokenizer_path = args.tokenizer_path or args.model_path
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    server = EngineServer(build_engine(args, tokenizer), tokenizer, args.model_path,
                          tokenizer_path, accept_ipc_weights=args.accept_ipc_weights,
                          api_key=args.api_key,
                          return_routed_experts=args.enable_return_routed_experts,
                          served_model_name=args.served_model_name,
                          max_context_len=args.context_length)
    # handler_cancellation: a client that disconnects aborts its requests, as in SGLang.
    web.run_app(server.build_app(), host=args.host, port=args.port, handler_cancellation=True,
                access_log=logger if args.log_level == "debug" else None)
