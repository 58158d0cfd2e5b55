"""The engine server: a furlong `Engine` behind SGLang's HTTP API (SPEC.md section 7).

`python -m furlong.engine.serve --model-path DIR [--host H] [--port P] [--dtype D]
[--device cpu|cuda] [--random-seed N] [--context-length N] [--tp-size 1] [--api-key KEY]`
loads the HF model and serves it. SGLang launch_server flags that this server does not implement are ignored
with one warning each, so an SGLang command line starts it too. `build_engine` is the one
place that picks the engine; the server reaches the engine only through the `Engine`
protocol plus `engine.model` (vocabulary size, device, `/get_weights_by_name`).

Requests are served concurrently: each /generate prompt is one `engine.generate` call, and
the engine batches the calls in flight. Weight updates hold one lock, so the buckets of a
distributed update never interleave with another update. Bad requests get HTTP 400 and
`{"error": message}` naming the field; failures inside the server get 500. With
`--api-key`, requests without `Authorization: Bearer KEY` get 401, as from SGLang
(furlong/engine/api_key.py); the health checks stay open.
"""
from __future__ import annotations

import argparse
import asyncio
import logging

import torch
from aiohttp import web

from furlong.engine.api_key import api_key_middleware
from furlong.engine.base import Engine, GenerateOutput, SamplingParams
from furlong.engine.request_fields import (GENERATE_FIELDS, LoadOptions, bad_request,
                                           check_load_format, field, generate_item, is_int,
                                           json_body, load_options, parse_batch_sampling_params,
                                           parse_dtype, parse_shape, request_ids, version_field)
from furlong.engine.weight_transfer import (DEVICE_OF_BACKEND, WeightUpdateGroup,
                                            deserialize_ipc_tensors, deserialize_named_tensors,
                                            is_ipc_payload, read_hf_weights)

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16, "half": torch.float16}
MAX_BODY_BYTES = 1 << 40  # serialized weights travel in request bodies


# ---- command line and engine -----------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """SGLang's launch_server flags that this server implements; `ignored_flags` lists
    the other flags given (to warn about once each)."""
    parser = argparse.ArgumentParser(prog="python -m furlong.engine.serve", allow_abbrev=False,
                                     description=__doc__.splitlines()[0])
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
    parser.add_argument("--api-key", help="requests need the header 'Authorization: Bearer "
                                          "API_KEY' (the health checks excepted)")
    args, unknown = parser.parse_known_args(argv)
    if args.tp_size != 1:
        parser.error(f"--tp-size {args.tp_size}: this server runs one device per engine; use "
                     "--tp-size 1 and start one server per device (or SGLang for tensor parallelism)")
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

    device = torch.device("cuda", args.base_gpu_id) if args.device == "cuda" else torch.device("cpu")
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
                          api_key=args.api_key)
    # handler_cancellation: a client that disconnects aborts its requests, as in SGLang.
    web.run_app(server.build_app(), host=args.host, port=args.port, handler_cancellation=True,
                access_log=logger if args.log_level == "debug" else None)


@web.middleware
async def only_generate_cancels(request: web.Request, handler):
    """With handler cancellation on, a client that disconnects cancels its handler: right
    for /generate (the engine aborts the request), wrong for weight and memory calls,
    whose work (and group state) must finish whoever is still listening."""
    if request.path == "/generate":
        return await handler(request)
    return await asyncio.shield(handler(request))


@web.middleware
async def errors_as_json(request: web.Request, handler):
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception as error:
        logger.exception("%s %s failed", request.method, request.path)
        return web.json_response({"error": f"{type(error).__name__}: {error}"}, status=500)


# ---- the server ------------------------------------------------------------------------------

class EngineServer:
    """SGLang's HTTP API over one engine. `build_app` gives the aiohttp application.
    `api_key`: requests must carry it as a Bearer token (None: the server is open)."""

    def __init__(self, engine: Engine, tokenizer, model_path: str,
                 tokenizer_path: str | None = None, health_timeout_s: float = 20.0,
                 weights_group_timeout_s: float = 600.0, accept_ipc_weights: bool = False,
                 api_key: str | None = None):
        self.engine = engine
        self.api_key = api_key
        # CUDA IPC payloads name memory on this GPU: only a server placed next to its
        # trainer takes them.
        self.accept_ipc_weights = accept_ipc_weights
        self.tokenizer = tokenizer
        self.model_path = model_path
        self.tokenizer_path = tokenizer_path or model_path
        self.health_timeout_s = health_timeout_s
        self.weights_group_timeout_s = weights_group_timeout_s
        self.vocab_size: int = engine.model.config.vocab_size
        self.weight_version = 0
        self.groups: dict[str, WeightUpdateGroup] = {}
        self.in_flight: dict[str, asyncio.Task] = {}  # rid -> its engine call
        self._weights_lock = asyncio.Lock()

    @property
    def device(self) -> torch.device:
        return next(self.engine.model.parameters()).device

    def build_app(self) -> web.Application:
        # The key is checked first: a refused request reads no body and runs nothing.
        guard = [api_key_middleware(self.api_key)] if self.api_key else []
        app = web.Application(client_max_size=MAX_BODY_BYTES,
                              middlewares=[*guard, only_generate_cancels, errors_as_json])
        app.add_routes([
            web.post("/generate", self.generate),
            web.get("/health", self.health),
            web.get("/health_generate", self.health_generate),
            web.post("/abort_request", self.abort_request),
            web.get("/flush_cache", self.flush_cache),
            web.post("/flush_cache", self.flush_cache),
            web.get("/get_model_info", self.get_model_info),
            web.post("/get_weights_by_name", self.get_weights_by_name),
            web.post("/update_weights_from_disk", self.update_weights_from_disk),
            web.post("/update_weights_from_tensor", self.update_weights_from_tensor),
            web.post("/init_weights_update_group", self.init_weights_update_group),
            web.post("/update_weights_from_distributed", self.update_weights_from_distributed),
            web.post("/destroy_weights_update_group", self.destroy_weights_update_group),
            web.post("/update_weight_version", self.update_weight_version),
            web.post("/release_memory_occupation", self.release_memory_occupation),
            web.post("/resume_memory_occupation", self.resume_memory_occupation),
        ])
        app.on_cleanup.append(self._shutdown)
        return app

    def app_runner(self) -> web.AppRunner:
        """The app for a `web.TCPSite`, with `main`'s behaviour: a client that disconnects
        aborts its requests (as with SGLang)."""
        return web.AppRunner(self.build_app(), handler_cancellation=True)

    async def _shutdown(self, app: web.Application) -> None:
        # Groups are dropped, not destroyed: a member's shutdown would wait for a trainer
        # that may be gone.
        self.groups.clear()
        await self.engine.close()

    # -- generation

    async def generate(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        unknown = set(body) - GENERATE_FIELDS
        if unknown:
            bad_request(f"unknown fields {sorted(unknown)}; known: {sorted(GENERATE_FIELDS)}")
        if field(body, "stream", bool, False):
            bad_request("stream: streaming is not supported; leave it out")
        prompts, batched = self._prompts(body)
        params = parse_batch_sampling_params(body.get("sampling_params"), len(prompts), batched)
        rids = request_ids(body.get("rid"), len(prompts), batched)
        return_logprob = field(body, "return_logprob", bool, False)
        tasks = [asyncio.ensure_future(self.engine.generate(ids, p))
                 for ids, p in zip(prompts, params, strict=True)]
        self.in_flight.update(zip(rids, tasks, strict=True))
        try:
            await asyncio.wait(tasks)
        finally:  # also when the client went away: the engine aborts what is left
            for rid, task in zip(rids, tasks, strict=True):
                task.cancel()
                if self.in_flight.get(rid) is task:
                    del self.in_flight[rid]
        items = [generate_item(self._outcome(task, len(ids)), rid, return_logprob)
                 for task, ids, rid in zip(tasks, prompts, rids, strict=True)]
        return web.json_response(items if batched else items[0])

    def _outcome(self, task: asyncio.Task, prompt_tokens: int) -> GenerateOutput:
        """The engine's output, or an empty 'abort' one for a request aborted by rid."""
        if task.cancelled():
            return GenerateOutput([], [], "abort", "", prompt_tokens, self.weight_version)
        return task.result()

    def _prompts(self, body: dict) -> tuple[list[list[int]], bool]:
        """(token ids of each prompt, whether the request is a batch)."""
        if (body.get("input_ids") is None) == (body.get("text") is None):
            bad_request("give exactly one of input_ids (token ids) and text")
        text = body.get("text")
        if isinstance(text, str):
            return [self._token_ids(self.tokenizer.encode(text), "text")], False
        if text is not None:
            if not (isinstance(text, list) and text and all(isinstance(t, str) for t in text)):
                bad_request(f"text must be a string or a non-empty list of strings, got {text!r}")
            return [self._token_ids(self.tokenizer.encode(t), f"text[{i}]")
                    for i, t in enumerate(text)], True
        ids = body["input_ids"]
        if isinstance(ids, list) and ids and all(isinstance(row, list) for row in ids):
            return [self._token_ids(row, f"input_ids[{i}]") for i, row in enumerate(ids)], True
        return [self._token_ids(ids, "input_ids")], False

    def _token_ids(self, ids, field: str) -> list[int]:
        if not isinstance(ids, list) or not ids:
            bad_request(f"{field} must be a non-empty list of token ids, got {ids!r}")
        for i, token in enumerate(ids):
            if not (is_int(token) and 0 <= token < self.vocab_size):
                bad_request(f"{field}[{i}] = {token!r} is not a token id in [0, {self.vocab_size})")
        return ids

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if await self.engine.health() else 503)

    async def health_generate(self, request: web.Request) -> web.Response:
        """200 when a one-token greedy generation finishes within the timeout, else 503."""
        try:
            await asyncio.wait_for(self.engine.generate(
                [0], SamplingParams(temperature=0.0, max_new_tokens=1)), self.health_timeout_s)
        except Exception as error:  # any failure means unhealthy
            logger.warning("/health_generate failed: %r", error)
            return web.json_response({"error": repr(error)}, status=503)
        return web.Response(status=200)

    async def abort_request(self, request: web.Request) -> web.Response:
        """{"abort_all": true}: every request, with the tokens made so far. {"rid": ID}:
        that request (or none if it already finished), which returns 'abort' empty."""
        body = await json_body(request)
        if field(body, "abort_all", bool, False):
            await self.engine.abort_all()
        elif isinstance(body.get("rid"), str):
            task = self.in_flight.get(body["rid"])
            if task is not None:
                task.cancel()
        else:
            bad_request('send {"abort_all": true} or {"rid": "<id of a /generate request>"}')
        return web.json_response({"success": True})

    async def flush_cache(self, request: web.Request) -> web.Response:
        await self.engine.flush_cache()
        return web.json_response({"success": True, "message": "Cache flushed."})

    async def get_model_info(self, request: web.Request) -> web.Response:
        return web.json_response({"model_path": self.model_path,
                                  "tokenizer_path": self.tokenizer_path, "is_generation": True,
                                  "weight_version": str(self.weight_version)})

    async def release_memory_occupation(self, request: web.Request) -> web.Response:
        """Every tag at once: the Engine protocol releases all or nothing."""
        self._check_tags(await json_body(request))
        await self.engine.release_memory()
        return web.json_response({"success": True})

    async def resume_memory_occupation(self, request: web.Request) -> web.Response:
        self._check_tags(await json_body(request))
        await self.engine.resume_memory()
        return web.json_response({"success": True})

    @staticmethod
    def _check_tags(body: dict) -> None:
        tags = field(body, "tags", list, [])
        if not all(isinstance(tag, str) for tag in tags):
            bad_request(f"tags must be a list of strings, got {tags!r}")

    # -- weights

    async def get_weights_by_name(self, request: web.Request) -> web.Response:
        """The first `truncate_size` rows of a parameter, as floats (SGLang's debug aid)."""
        body = await json_body(request)
        name = field(body, "name", str)
        truncate_size = field(body, "truncate_size", int, 100)
        try:
            parameter = self.engine.model.get_parameter(name)
        except AttributeError:
            bad_request(f"name {name!r} is not a parameter of the model")
        return web.json_response(parameter.detach()[:truncate_size].float().cpu().tolist())

    async def update_weights_from_disk(self, request: web.Request) -> web.Response:
        from furlong.model.loading import resolve_hf_dir

        body = await json_body(request)
        model_path = field(body, "model_path", str)
        check_load_format(body)
        try:
            named_tensors = read_hf_weights(resolve_hf_dir(model_path))
        except FileNotFoundError as error:
            bad_request(f"model_path: {error}")
        async with self._weights_lock:
            response = await self._load_weights(named_tensors, load_options(body))
        self.model_path = model_path
        return response

    async def update_weights_from_tensor(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        payloads = field(body, "serialized_named_tensors", list)
        if not payloads or not isinstance(payloads[0], str):
            bad_request("serialized_named_tensors must be a list of base64 strings, one per "
                        "tensor-parallel rank (this server has one)")
        check_load_format(body)
        options = load_options(body)
        ipc = is_ipc_payload(payloads[0])
        if ipc and not self.accept_ipc_weights:
            bad_request("serialized_named_tensors: CUDA IPC payloads are accepted only by a "
                        "server started next to its trainer (accept_ipc_weights)")
        try:
            named_tensors = await asyncio.to_thread(
                deserialize_ipc_tensors if ipc else deserialize_named_tensors, payloads[0])
        except ValueError as error:
            bad_request(str(error))
        async with self._weights_lock:
            return await self._load_weights(named_tensors, options)

    async def init_weights_update_group(self, request: web.Request) -> web.Response:
        """Join the trainer's group as rank `rank_offset`; returns once every rank joined."""
        body = await json_body(request)
        address, port = field(body, "master_address", str), field(body, "master_port", int)
        rank, world_size = field(body, "rank_offset", int), field(body, "world_size", int)
        group_name = field(body, "group_name", str, "weight_update_group")
        backend = field(body, "backend", str, "nccl")
        if backend not in DEVICE_OF_BACKEND:
            bad_request(f"backend {backend!r}: use gloo (CPU) or nccl (CUDA)")
        if DEVICE_OF_BACKEND[backend] == "cuda" and self.device.type != "cuda":
            bad_request(f"backend nccl needs the engine on CUDA, this one is on {self.device}; "
                        "use gloo")
        async with self._weights_lock:
            if group_name in self.groups:
                bad_request(f"group_name {group_name!r} exists; destroy it first "
                            "(/destroy_weights_update_group)")
            try:
                self.groups[group_name] = await asyncio.to_thread(
                    WeightUpdateGroup, address, port, rank, world_size, group_name, backend,
                    self.weights_group_timeout_s)
            except ValueError as error:
                bad_request(str(error))
        return web.json_response({"success": True, "message": f"joined {group_name} as rank "
                                                              f"{rank} of {world_size}"})

    async def update_weights_from_distributed(self, request: web.Request) -> web.Response:
        """Receive the listed tensors, in order, by broadcast from rank 0; then load them."""
        body = await json_body(request)
        names, dtypes = field(body, "names", list), field(body, "dtypes", list)
        shapes = field(body, "shapes", list)
        if not len(names) == len(dtypes) == len(shapes):
            bad_request(f"names, dtypes and shapes need one entry per tensor; got {len(names)}, "
                        f"{len(dtypes)} and {len(shapes)}")
        if not all(isinstance(name, str) for name in names):
            bad_request("names must be a list of strings")
        dtypes = [parse_dtype(dtype, f"dtypes[{i}]") for i, dtype in enumerate(dtypes)]
        shapes = [parse_shape(shape, f"shapes[{i}]") for i, shape in enumerate(shapes)]
        group = self._group(field(body, "group_name", str, "weight_update_group"))
        options = load_options(body)
        device = self.device if group.device_type == "cuda" else torch.device("cpu")
        async with self._weights_lock:
            tensors = await asyncio.to_thread(group.receive, dtypes, shapes, device)
            return await self._load_weights(zip(names, tensors, strict=True), options)

    def _group(self, name: str) -> WeightUpdateGroup:
        if name not in self.groups:
            bad_request(f"group_name {name!r} is unknown; call /init_weights_update_group first")
        return self.groups[name]

    async def destroy_weights_update_group(self, request: web.Request) -> web.Response:
        name = field(await json_body(request), "group_name", str, "weight_update_group")
        async with self._weights_lock:
            await asyncio.to_thread(self._group(name).destroy)  # waits for the other members
            del self.groups[name]
        return web.json_response({"success": True, "message": f"left {name}"})

    async def update_weight_version(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        version = version_field(body, "new_version")
        if version is None:
            bad_request("field 'new_version' is required")
        options = LoadOptions(version, False, field(body, "abort_all_requests", bool, False))
        async with self._weights_lock:
            return await self._load_weights([], options)

    async def _load_weights(self, named_tensors, options: LoadOptions) -> web.Response:
        """Load by parameter name, under the weights lock (which the caller holds)."""
        if options.abort_all_requests:
            await self.engine.abort_all()
        version = self.weight_version if options.weight_version is None else options.weight_version
        try:
            await self.engine.update_weights(named_tensors, version)
        except (KeyError, ValueError) as error:
            bad_request(f"cannot load the weights: {error.args[0] if error.args else error}")
        self.weight_version = version
        if options.flush_cache:
            await self.engine.flush_cache()
        return web.json_response({"success": True, "message": f"Succeeded to update model "
                                                              f"weights (version {version})."})


if __name__ == "__main__":
    main()
