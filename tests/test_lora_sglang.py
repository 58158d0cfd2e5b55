"""LoRA with SGLang engines (CPU; the CUDA IPC push marked gpu): launch flags, pushes.

No SGLang here. A stand-in server module (STAND_IN) answers SGLang's LoRA endpoints as
SGLang does (unloading a name not loaded is a 400; a load reads exactly SGLang's fields;
a tensor payload is unpickled as SGLang unpickles it, and must hold a dict name ->
tensor) and records every request; it is launched by furlong's ServerLauncher with the
argv an SGLang server gets, and driven through the router, as a run drives SGLang.
"""
from __future__ import annotations

import asyncio
import os
import sys

import pytest
import requests
import torch

from conftest import REPO, policy_config, train_argv
from furlong.config.lora_check import check_lora
from furlong.config.parser import parse_config
from furlong.config.sglang import LoraServing, launch_server_args, lora_serving
from furlong.engine.adapter import AdapterEngine
from furlong.engine.base import SamplingParams
from furlong.engine.launcher import ServerLauncher, ServerSpec, server_command
from furlong.engine.router import EngineRouter, RouterOptions
from furlong.engine.weights.wire import lora_tensors_body, serialize_named_tensors
from furlong.model import lora
from furlong.model.lora_files import PEFT_PREFIX
from furlong.train.actor import RankInfo, TrainActor

pytestmark = pytest.mark.timeout(300)
LORA = ["--lora-rank", "4", "--lora-alpha", "8", "--target-modules", "all-linear"]
LORA_FLAGS = ["--enable-lora", "--max-lora-rank", "4", "--lora-target-modules",
              *lora.STANDARD_TARGETS, "--max-loras-per-batch", "1"]
STAND_IN_MODULE = "sglang_lora_stand_in"

STAND_IN = '''
"""SGLang's LoRA endpoints as SGLang answers them; every request recorded."""
import base64, io, os, sys
import torch
from aiohttp import web
from safetensors.torch import load_file
from furlong.engine.weights import wire

port = int(sys.argv[sys.argv.index("--port") + 1])
LOAD = {"lora_name", "lora_path", "pinned"}
TENSORS = {"lora_name", "config_dict", "serialized_named_tensors", "serialized_tensors",
           "pinned", "added_tokens_config", "load_format"}
loaded, log = {}, []


def answer(ok, message=""):
    return web.json_response({"success": ok, "error_message": message,
                              "loaded_adapters": sorted(loaded)}, status=200 if ok else 400)


async def unload(request):
    body = await request.json()
    log.append(["/unload_lora_adapter", body])
    if body["lora_name"] not in loaded:
        return answer(False, f"LoRA adapter {body['lora_name']} is not loaded")
    del loaded[body["lora_name"]]
    return answer(True)


async def load_path(request):
    body = await request.json()
    log.append(["/load_lora_adapter", body])
    if set(body) - LOAD or body["lora_name"] in loaded:
        return answer(False, "unknown fields or loaded already")
    tensors = load_file(os.path.join(body["lora_path"], "adapter_model.safetensors"))
    loaded[body["lora_name"]] = {k.removeprefix("base_model.model."): v
                                 for k, v in tensors.items()}
    return answer(True)


async def load_tensors(request):
    body = await request.json()
    payload = (body.get("serialized_named_tensors") or [body["serialized_tensors"]])[0]
    data = base64.b64decode(payload)
    if data.startswith(b"PK"):  # furlong's by-value archive
        kind, tensors = "value", wire.deserialize_named_tensors(payload)
    else:  # SGLang's MultiprocessingSerializer format
        kind, tensors = "ipc", wire._IpcUnpickler(io.BytesIO(data)).load()
    log.append(["/load_lora_adapter_from_tensors",
                {"fields": sorted(body), "lora_name": body["lora_name"],
                 "config_dict": body["config_dict"], "kind": kind,
                 "payloads": len(body.get("serialized_named_tensors", [])),
                 "same_single": body.get("serialized_tensors") == payload,
                 "is_dict": isinstance(tensors, dict)}])
    if set(body) - TENSORS or body["lora_name"] in loaded:
        return answer(False, "unknown fields or loaded already")
    loaded[body["lora_name"]] = {k: v.cpu().clone() for k, v in dict(tensors).items()}
    return answer(True)


async def record(request):
    body = await request.json()
    log.append([request.path, body])
    if request.path == "/generate":
        return web.json_response({"text": "", "output_ids": [0], "meta_info": {
            "finish_reason": {"type": "length"}, "prompt_tokens": len(body["input_ids"]),
            "output_token_logprobs": [[-1.0, 0, None]]}})
    return web.json_response({"success": True, "message": ""})


async def records(request):
    return web.json_response({"argv": sys.argv[1:], "log": log})


async def dump(request):
    body = await request.json()
    torch.save(loaded[body["lora_name"]], body["path"])
    return web.json_response({})


async def health(request):
    return web.Response(text="ok")


app = web.Application(client_max_size=1 << 30)
app.add_routes([web.post("/unload_lora_adapter", unload),
                web.post("/load_lora_adapter", load_path),
                web.post("/load_lora_adapter_from_tensors", load_tensors),
                web.post("/update_weight_version", record), web.post("/generate", record),
                web.get("/records", records), web.post("/dump", dump),
                web.get("/health", health)])
web.run_app(app, host="127.0.0.1", port=port, print=None)
'''


# ---- launch ----------------------------------------------------------------------------------

def lora_config(tiny, *extra: str):
    return parse_config(train_argv(tiny, *LORA, *extra))


@pytest.mark.parametrize("extra, tail", [
    ([], LORA_FLAGS),
    (["--lora-adapter-path", "/adapters/a"],
     [*LORA_FLAGS, "--lora-paths", f"{lora.ADAPTER_NAME}=/adapters/a"]),
    # what the launch script passes itself wins, in its place among the passthrough flags
    (["--sglang-max-loras-per-batch", "4", "--sglang-lora-target-modules", "all"],
     ["--enable-lora", "--max-lora-rank", "4", "--max-loras-per-batch", "4",
      "--lora-target-modules", "all"]),
    (["--sglang-enable-lora", "--sglang-max-lora-rank", "64", "--lora-adapter-path", "/a",
      "--sglang-lora-paths", "x=/b"],
     ["--lora-target-modules", *lora.STANDARD_TARGETS, "--max-loras-per-batch", "1",
      "--enable-lora", "--max-lora-rank", "64", "--lora-paths", "x=/b"]),
])
def test_sglang_servers_start_with_the_lora_flags(tiny, extra, tail):
    config = lora_config(tiny, *extra)
    argv = launch_server_args(config.sglang, "/m", "h", 1, 7, lora=lora_serving(config))
    assert argv == [sys.executable, "-m", "sglang.launch_server", "--model-path", "/m",
                    "--host", "h", "--port", "1", "--tp-size", "1", "--random-seed", "7", *tail]


def test_the_servers_adapt_the_modules_the_trainer_adapts(tiny):
    """Miles' vocabulary in, SGLang's leaf names out; no flags without --lora-rank."""
    megatron = lora_serving(parse_config(train_argv(
        tiny, "--lora-rank", "8", "--target-modules", "linear_qkv,linear_fc2",
        "--exclude-modules", "k_proj")))
    assert megatron == LoraServing(8, ("q_proj", "v_proj", "down_proj"), lora.ADAPTER_NAME)
    assert lora_serving(parse_config(train_argv(tiny))) is None
    spec = ServerSpec("/m", parse_config([]).sglang, 7, lora=megatron)
    assert server_command(spec, 30001)[-9:] == [
        "--enable-lora", "--max-lora-rank", "8", "--lora-target-modules", "q_proj", "v_proj",
        "down_proj", "--max-loras-per-batch", "1"]


def test_a_runs_launched_servers_get_its_adapter_flags(tiny):
    """The path of a real run: the flags become EngineOptions, then the servers' spec."""
    from dataclasses import replace

    from furlong.config import load_config
    from furlong.engine import factory
    config, _ = load_config(train_argv(tiny, *LORA, "--rollout-backend", "sglang"))
    options = replace(factory.engine_options(config, shares_device=False),
                      server_module="furlong.engine.serve")
    spec = factory.server_spec(str(tiny / "model"), options, torch.device("cpu"))
    assert spec.lora == lora_serving(config)
    argv = server_command(spec, 30001)
    assert argv[argv.index("--max-lora-rank") + 1] == "4"
    assert "--enable-lora" in argv


def test_sglang_engines_take_adapters_and_only_a_run_without_trainer_is_refused(tiny):
    """The refusal of SGLang engines under --lora-rank is gone; --debug-rollout-only
    (nothing would push the adapter) is still refused."""
    assert check_lora(lora_config(tiny, "--rollout-backend", "sglang")) == []
    assert check_lora(lora_config(tiny, "--rollout-external",
                                  "--rollout-external-engine-addrs", "h:1")) == []
    with pytest.raises(Exception, match="--debug-rollout-only with --lora-rank"):
        check_lora(lora_config(tiny, "--rollout-backend", "sglang", "--debug-rollout-only"))


def test_ray_engines_get_the_adapter_by_value_only_when_they_are_furlongs(tiny):
    pytest.importorskip("ray")  # the GPU machine has none
    from furlong.cluster.ray_trainer import adapter_transport
    assert adapter_transport(lora_config(tiny)) == "value"
    assert adapter_transport(lora_config(tiny, "--rollout-backend", "sglang")) == "disk"
    assert adapter_transport(lora_config(tiny, "--rollout-external",
                                         "--rollout-external-engine-addrs", "h:1")) == "disk"


# ---- pushes to the stand-in --------------------------------------------------------------

@pytest.fixture
def stand_in(tiny, tmp_path, monkeypatch):
    """A launcher of one stand-in server, started with an SGLang server's LoRA argv."""
    (tmp_path / f"{STAND_IN_MODULE}.py").write_text(STAND_IN)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), str(REPO)]))
    config = lora_config(tiny)
    spec = ServerSpec(str(tiny / "model"), config.sglang, 7, module=STAND_IN_MODULE,
                      lora=lora_serving(config), startup_timeout_s=120)
    launcher = ServerLauncher(spec, [None])
    launcher.start()
    try:
        yield launcher
    finally:
        launcher.stop()


def records(url: str) -> dict:
    return requests.get(url + "/records", timeout=30).json()


def served_adapter(url: str, path) -> dict[str, torch.Tensor]:
    requests.post(url + "/dump", json={"lora_name": lora.ADAPTER_NAME, "path": str(path)},
                  timeout=30).raise_for_status()
    return torch.load(path, weights_only=True)


def trainer(tiny) -> TrainActor:
    """A LoRA trainer whose adapter is not the fresh one (B = 0 would hide a mix-up)."""
    torch.manual_seed(0)
    actor = TrainActor(policy_config(tiny, LORA), RankInfo(), str(tiny / "model"),
                       total_steps=1)
    with torch.no_grad():
        for name, param in actor.policy.hf_model.named_parameters():
            if lora.is_adapter_name(name):
                param.normal_()
    return actor


def test_pushes_unload_and_load_the_adapter_from_peft_files_and_requests_name_it(
        tiny, stand_in, tmp_path):
    """Servers not on the trainer's GPU (here: the CPU): each push writes the adapter in
    PEFT's format, then unloads and loads it under its name with SGLang's fields, then
    sets the version; requests through the run's engine carry lora_path. The server holds
    the trainer's tensors, PEFT reads the files, and only the latest push's are kept."""
    from peft import PeftConfig
    from peft.utils import load_peft_weights
    actor = trainer(tiny)
    adapter_dir = tmp_path / "pushed"
    router = EngineRouter(stand_in.urls, RouterOptions(health_check_interval_s=None,
                                                       adapter_dir=str(adapter_dir)), stand_in)
    url = stand_in.urls[0]

    async def main():
        engine = AdapterEngine(router, lora.ADAPTER_NAME)  # as build.py wraps it
        await actor.push_weights(engine, 1)
        first = list(adapter_dir.iterdir())
        await actor.push_weights(engine, 2)
        output = await engine.generate([1, 2, 3], SamplingParams(max_new_tokens=1))
        return first, output
    try:
        (first,), output = asyncio.run(main())
        assert output.output_ids == [0]
        log = records(url)
        assert log["argv"][-len(LORA_FLAGS):] == LORA_FLAGS
        (latest,) = adapter_dir.iterdir()
        assert latest != first and latest.name.startswith(lora.ADAPTER_NAME + ".")
        pushes = [[path, body] for path, body in log["log"]]
        push = [["/unload_lora_adapter", {"lora_name": lora.ADAPTER_NAME}],
                ["/load_lora_adapter", {"lora_name": lora.ADAPTER_NAME,
                                        "lora_path": str(first)}],
                ["/update_weight_version", {"new_version": "1"}]]
        assert pushes[:3] == push
        assert pushes[3:6] == [push[0], [push[1][0], push[1][1] | {"lora_path": str(latest)}],
                               ["/update_weight_version", {"new_version": "2"}]]
        assert pushes[6][0] == "/generate" and pushes[6][1]["lora_path"] == lora.ADAPTER_NAME
        expected = dict(actor.named_adapter_weights())
        served = served_adapter(url, tmp_path / "served.pt")
        assert served.keys() == expected.keys()
        assert all(torch.equal(served[name], expected[name]) for name in expected)
        config = PeftConfig.from_pretrained(str(latest))
        assert (config.r, config.lora_alpha, sorted(config.target_modules)) == \
            (4, 8, sorted(lora.STANDARD_TARGETS))
        weights = load_peft_weights(str(latest), device="cpu")  # PeftModel's own reader
        assert weights.keys() == {PEFT_PREFIX + name for name in expected}
        assert all(torch.equal(weights[PEFT_PREFIX + name], tensor)
                   for name, tensor in expected.items())
    finally:
        asyncio.run(router.close())


def test_a_tensor_push_carries_sglangs_fields_for_every_release(stand_in, tiny):
    """/load_lora_adapter_from_tensors: an IPC payload once per TP rank in
    serialized_named_tensors and once more in serialized_tensors (SGLang before July
    2026); a by-value payload (furlong's servers) once, in serialized_tensors."""
    from furlong.engine.weights.lora_send import send_adapter
    from furlong.engine.weights.send import Servers
    url = stand_in.urls[0]
    tensors = {"model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 8),
               "model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(8, 4)}
    config = lora.LoraSpec(4, 8, targets=("q_proj",)).sglang_config()
    send_adapter(lora.ADAPTER_NAME, config, tensors.items(), Servers((url,)), 5, "value")
    (entry,) = [body for path, body in records(url)["log"]
                if path == "/load_lora_adapter_from_tensors"]
    assert entry == {"fields": ["config_dict", "lora_name", "serialized_tensors"],
                     "lora_name": lora.ADAPTER_NAME, "config_dict": config, "kind": "value",
                     "payloads": 0, "same_single": True, "is_dict": False}
    body = lora_tensors_body("a", config, "P", 2)
    assert body == {"lora_name": "a", "config_dict": config,
                    "serialized_named_tensors": ["P", "P"], "serialized_tensors": "P"}


def test_furlongs_server_reads_the_per_rank_field_when_given_both(tiny):
    """Given both fields (what an IPC push sends), furlong's server reads the per-rank
    one, as SGLang since July 2026 does."""
    from test_serve import ServerThread
    from transformers import AutoTokenizer
    server = ServerThread(tiny / "model", AutoTokenizer.from_pretrained(tiny / "model"))
    try:
        named = [(lora.peft_name(n), torch.zeros_like(p)) for n, p in
                 _adapter_params(tiny)]
        config = lora.LoraSpec(4, 8).sglang_config()
        body = lora_tensors_body("a", config, serialize_named_tensors(named), 1) | {
            "serialized_tensors": "not read when serialized_named_tensors is given"}
        answer = requests.post(server.url + "/load_lora_adapter_from_tensors", json=body,
                               timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()["loaded_adapters"] == {"a": "tensors"}
    finally:
        server.stop()


def _adapter_params(tiny):
    from furlong.model.loading import load_hf_model
    model = load_hf_model(str(tiny / "model"))
    lora.attach(model, lora.LoraSpec(4, 8), seed=0)
    return [(n, p) for n, p in model.named_parameters() if lora.is_adapter_name(n)]


@pytest.mark.gpu
def test_gpu_a_colocated_push_sends_cuda_ipc_handles_of_a_dict(tiny, stand_in, tmp_path):
    """On the trainer's GPU (weight_sync auto): /load_lora_adapter_from_tensors with CUDA
    IPC handles of a dict name -> tensor (SGLang's LoRA loader iterates its items), in
    both SGLang fields; the server process maps the trainer's tensors and holds them."""
    tensors = {name: tensor.cuda() for name, tensor in
               [(lora.peft_name(n), torch.randn(p.shape)) for n, p in _adapter_params(tiny)]}
    router = EngineRouter(stand_in.urls, RouterOptions(health_check_interval_s=None,
                                                       weight_sync="auto"), stand_in)
    url = stand_in.urls[0]
    try:
        asyncio.run(router.load_lora_adapter(lora.ADAPTER_NAME, lora.LoraSpec(4, 8)
                                             .sglang_config(), tensors.items(), 3))
        (entry,) = [body for path, body in records(url)["log"]
                    if path == "/load_lora_adapter_from_tensors"]
        assert entry["kind"] == "ipc" and entry["is_dict"] and entry["same_single"]
        assert entry["fields"] == ["config_dict", "lora_name", "serialized_named_tensors",
                                   "serialized_tensors"]
        served = served_adapter(url, tmp_path / "served.pt")
        assert all(torch.equal(served[name], tensor.cpu()) for name, tensor in tensors.items())
    finally:
        asyncio.run(router.close())
