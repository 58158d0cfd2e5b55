"""The engine server and HTTPEngine on the tiny model (CPU): SGLang's HTTP API end to end.

Servers run in-process (the aiohttp app on its own event loop in a thread), except one test
that starts `python -m furlong.engine.serve` from an SGLang-style launch line. Expected
outputs come from an in-process HFEngine on the same weights, never from the server. The
checkpoints are tiny models with seeded noise on every matrix (as in test_engine.py), so
greedy continuations vary between prompts and stop at different steps.
"""
from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import io
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import torch
from aiohttp import web
from conftest import slowed
from transformers import AutoTokenizer

from furlong.engine import scoring
from furlong.engine.adapter import AdapterEngine
from furlong.engine.base import SamplingParams
from furlong.engine.client import EngineHTTPError, HTTPEngine
from furlong.engine.fast import FastEngine
from furlong.engine.hf_engine import HFEngine
from furlong.engine.server.app import EngineServer
from furlong.engine.server.cli import parse_args
from furlong.engine.weights.send import BroadcastSender, Servers
from furlong.engine.weights.wire import (deserialize_named_tensors, iter_buckets,
                                         serialize_named_tensors)
from furlong.model.loading import load_hf_model, load_named_tensors
from furlong.ports import free_port
from furlong.tiny import write_tiny

pytestmark = pytest.mark.timeout(600)
# Generous limits: these requests must succeed, also on a loaded machine. Nothing waits
# for a fixed time; a test waits for an event or polls a condition up to a deadline.
REQUEST_TIMEOUT_S = 120
START_STOP_TIMEOUT_S = 120
REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["1+2=", "37+48=", "99+11=12", "5", "10+10=", "42+17="]


# ---- fixtures and helpers -------------------------------------------------------------------

def sharpened(model_dir, noise_seed: int) -> dict[str, torch.Tensor]:
    """The weights of `model_dir` with seeded noise on every matrix (4 x its std)."""
    model = load_hf_model(str(model_dir))
    generator = torch.Generator().manual_seed(noise_seed)
    state = {}
    for name, param in model.named_parameters():
        if param.dim() > 1:
            param = param + torch.randn(param.shape, generator=generator) * param.std() * 4
        state[name] = param.detach().clone()
    return state


def write_checkpoint(out_dir, base_dir, state, tokenizer):
    model = load_hf_model(str(base_dir))
    load_named_tensors(model, state.items())
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return AutoTokenizer.from_pretrained(tiny / "model")


@pytest.fixture(scope="module")
def states(tiny, tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    """base: the served checkpoint; other: another model (tiny seed 1); perturbed: base
    plus noise, sent as tensors."""
    other_dir = write_tiny(tmp_path_factory.mktemp("tiny_seed1"), seed=1) / "model"
    base = sharpened(tiny / "model", noise_seed=2)
    perturbed = {name: t + torch.randn(t.shape, generator=torch.Generator().manual_seed(i)) * 0.05
                 for i, (name, t) in enumerate(base.items())}
    return {"base": base, "other": sharpened(other_dir, noise_seed=3), "perturbed": perturbed}


@pytest.fixture(scope="module")
def checkpoints(tiny, tmp_path_factory, states, tokenizer):
    root = tmp_path_factory.mktemp("checkpoints")
    return {name: write_checkpoint(root / name, tiny / "model", states[name], tokenizer)
            for name in ("base", "other")}


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> list[list[int]]:
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True) for text in PROMPTS]
    return [tokenizer(chat, add_special_tokens=False)["input_ids"] for chat in chats]


class ServerThread:
    """An EngineServer at 127.0.0.1 on a free port; its event loop runs in a daemon thread.
    `engine`: "hf" (HFEngine) or "fast" (FastEngine, its CPU path), served as `wrap` makes
    it; `server_kwargs` go to EngineServer (e.g. api_key)."""

    def __init__(self, model_dir, tokenizer, engine: str = "hf", wrap=lambda engine: engine,
                 **server_kwargs):
        model = load_hf_model(str(model_dir))
        engine = HFEngine(model, tokenizer) if engine == "hf" else FastEngine(
            model, tokenizer, kv_cache_tokens=4096, block_size=4, window=3, max_num_seqs=16)
        self.server = EngineServer(wrap(engine), tokenizer, str(model_dir),
                                   health_timeout_s=REQUEST_TIMEOUT_S,
                                   weights_group_timeout_s=REQUEST_TIMEOUT_S, **server_kwargs)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runner = self.server.app_runner()
        self.call(self._start())
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def _start(self) -> None:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()

    def call(self, coroutine, timeout: float = START_STOP_TIMEOUT_S):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self) -> None:
        self.call(self.runner.cleanup())
        self.call(self.loop.shutdown_default_executor())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(START_STOP_TIMEOUT_S)
        self.loop.close()


@pytest.fixture
def server(checkpoints, tokenizer):
    thread = ServerThread(checkpoints["base"], tokenizer)
    try:
        yield thread
    finally:
        thread.stop()


@pytest.fixture
def fast_server(checkpoints, tokenizer):
    thread = ServerThread(checkpoints["base"], tokenizer, engine="fast")
    try:
        yield thread
    finally:
        thread.stop()


@contextlib.contextmanager
def counted_steps(engine):
    """A list that gets one entry per step of `engine` (each made 10 ms longer)."""
    steps = []
    with slowed(engine, lambda: steps.append(1)):
        yield steps


def wait_for(condition, timeout: float = REQUEST_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def reference(state, tiny, tokenizer) -> HFEngine:
    """An in-process HFEngine with `state`: what the server must answer."""
    model = load_hf_model(str(tiny / "model"))
    load_named_tensors(model, state.items())
    return HFEngine(model, tokenizer)


def generate_all(engine, requests_):
    """Every (ids, params) of `requests_` through `engine`, concurrently; one event loop."""
    async def main():
        try:
            return await asyncio.gather(*(engine.generate(ids, p) for ids, p in requests_))
        finally:
            if isinstance(engine, HTTPEngine):
                await engine.close()
    return asyncio.run(main())


def with_client(url: str, action, **client_kwargs):
    """`await action(HTTPEngine(url))` in a fresh event loop, closing the client after."""
    async def main():
        client = HTTPEngine(url, **client_kwargs)
        try:
            return await action(client)
        finally:
            await client.close()
    return asyncio.run(main())


def greedy(max_new_tokens: int = 16, **extra) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, **extra)


def assert_same_outputs(actual, expected) -> None:
    for got, want in zip(actual, expected, strict=True):
        assert (got.output_ids, got.finish_reason, got.text, got.prompt_tokens) == (
            want.output_ids, want.finish_reason, want.text, want.prompt_tokens)
        torch.testing.assert_close(torch.tensor(got.output_log_probs),
                                   torch.tensor(want.output_log_probs), rtol=0, atol=1e-4)


def post(url: str, path: str, body) -> requests.Response:
    return requests.post(url + path, json=body, timeout=REQUEST_TIMEOUT_S)


# ---- generation -----------------------------------------------------------------------------

def test_greedy_outputs_and_log_probs_match_the_in_process_engine(server, states, tiny,
                                                                  tokenizer, prompt_ids):
    requests_ = [(ids, greedy(20)) for ids in prompt_ids]
    remote = generate_all(HTTPEngine(server.url), requests_)
    assert_same_outputs(remote, generate_all(reference(states["base"], tiny, tokenizer),
                                             requests_))
    # The fixture is meant to be interesting: some rows stop early, outputs are varied.
    assert {o.finish_reason for o in remote} == {"stop", "length"}
    assert len({tuple(o.output_ids) for o in remote}) == len(remote)
    assert {o.weight_version for o in remote} == {0}


def test_sampling_params_round_trip(server, states, tiny, tokenizer, prompt_ids):
    """Each SGLang sampling field reaches the engine: outputs equal the in-process engine's."""
    ids = prompt_ids[5]
    engine = reference(states["base"], tiny, tokenizer)
    plain = generate_all(engine, [(ids, greedy(20, ignore_eos=True))])[0].output_ids
    stop_id = next(t for i, t in enumerate(plain) if i >= 2 and t not in plain[:i])
    stop_text = tokenizer.decode(plain[6:8])
    params = [greedy(3, ignore_eos=True), greedy(20, stop=("never", stop_text)),
              greedy(20, stop_token_ids=(stop_id,), ignore_eos=True),
              greedy(20, stop_token_ids=(stop_id,), ignore_eos=True, no_stop_trim=True),
              greedy(20, skip_special_tokens=False),
              SamplingParams(temperature=0.8, top_k=5, top_p=0.9, max_new_tokens=12,
                             sampling_seed=11, ignore_eos=True),
              SamplingParams(temperature=1.0, max_new_tokens=12, sampling_seed=12)]
    requests_ = [(ids, p) for p in params]
    remote = generate_all(HTTPEngine(server.url), requests_)
    assert_same_outputs(remote, generate_all(engine, requests_))
    assert (remote[0].finish_reason, len(remote[0].output_ids)) == ("length", 3)
    assert remote[0].meta["finish_reason"] == {"type": "length", "length": 3}
    assert remote[1].finish_reason == "stop" and stop_text not in remote[1].text
    assert remote[2].output_ids[-1] == stop_id and remote[2].finish_reason == "stop"


def test_a_sampling_seed_is_reproducible_and_matters(server, prompt_ids):
    def sample(seed: int) -> list[int]:
        params = SamplingParams(temperature=1.0, max_new_tokens=12, sampling_seed=seed,
                                ignore_eos=True)
        return generate_all(HTTPEngine(server.url), [(prompt_ids[1], params)])[0].output_ids
    assert sample(5) == sample(5)
    assert len({tuple(sample(seed)) for seed in range(4)}) > 2


def test_batches_text_and_the_raw_response_shape(server, tokenizer, prompt_ids):
    params = [{"temperature": 0, "max_new_tokens": 4, "ignore_eos": True},
              {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}]
    batch = post(server.url, "/generate", {"input_ids": prompt_ids[:2], "sampling_params": params,
                                           "return_logprob": True, "rid": ["a", "b"]}).json()
    assert [len(item["output_ids"]) for item in batch] == [4, 6]
    for item, ids in zip(batch, prompt_ids[:2], strict=True):
        meta = item["meta_info"]
        assert meta["finish_reason"]["type"] == "length"
        assert (meta["prompt_tokens"], meta["completion_tokens"]) == (len(ids), len(item["output_ids"]))
        assert meta["weight_version"] == "0"
        assert [entry[1] for entry in meta["output_token_logprobs"]] == item["output_ids"]
        assert all(entry[0] <= 0 and entry[2] is None for entry in meta["output_token_logprobs"])
    assert [item["meta_info"]["id"] for item in batch] == ["a", "b"]

    text = tokenizer.decode(prompt_ids[2])
    one = post(server.url, "/generate", {"text": text, "sampling_params": params[0]}).json()
    by_ids = post(server.url, "/generate", {"input_ids": tokenizer.encode(text),
                                            "sampling_params": params[0]}).json()
    assert one["output_ids"] == by_ids["output_ids"] and one["text"] == by_ids["text"]
    assert "output_token_logprobs" not in one["meta_info"]  # return_logprob defaults to false
    texts = post(server.url, "/generate", {"text": [text, "5"], "sampling_params": params[0]}).json()
    assert isinstance(texts, list) and texts[0]["output_ids"] == one["output_ids"]


@pytest.mark.parametrize("engine", ["hf", "fast"])
def test_input_log_probs_score_the_prompt_as_a_teacher_server_does(checkpoints, tokenizer,
                                                                    prompt_ids, engine,
                                                                    monkeypatch):
    """SGLang's scoring request (what on-policy distillation sends a teacher): no new tokens,
    input_token_logprobs from logprob_start_len, equal to a plain HF forward's log-softmax
    (the output projection in several chunks of positions)."""
    monkeypatch.setattr(scoring, "CHUNK_POSITIONS", 7)
    ids = prompt_ids[1] + prompt_ids[4][3:]
    assert len(ids) > 2 * scoring.CHUNK_POSITIONS
    model = load_hf_model(str(checkpoints["base"]))
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
    expected = expected.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    thread = ServerThread(checkpoints["base"], tokenizer, engine=engine)
    try:
        body = {"input_ids": ids, "return_logprob": True, "logprob_start_len": 0,
                "sampling_params": {"temperature": 0, "max_new_tokens": 0,
                                    "skip_special_tokens": False}}
        item = post(thread.url, "/generate", body).json()
        tail = post(thread.url, "/generate", {**body, "logprob_start_len": 5}).json()
    finally:
        thread.stop()
    scored = item["meta_info"]["input_token_logprobs"]
    assert item["output_ids"] == [] and item["meta_info"]["output_token_logprobs"] == []
    assert [entry[1] for entry in scored] == ids and scored[0][0] is None
    torch.testing.assert_close(torch.tensor([entry[0] for entry in scored[1:]]), expected,
                               rtol=0, atol=1e-5)
    assert tail["meta_info"]["input_token_logprobs"] == scored[5:]


class WithoutScoring:
    """An engine that cannot score prompts (as HTTPEngine and the router)."""

    def __init__(self, engine):
        self.engine = engine

    def __getattr__(self, name: str):
        if name == "score":
            raise AttributeError(name)
        return getattr(self.engine, name)


@pytest.mark.parametrize("wrap, words", [
    (WithoutScoring, "this engine does not score prompts"),
    (lambda engine: AdapterEngine(engine, "furlong_lora"), "base model with its LoRA adapter"),
])
def test_scoring_is_refused_where_the_engine_cannot_score_the_policy(checkpoints, tokenizer,
                                                                     prompt_ids, wrap, words):
    thread = ServerThread(checkpoints["base"], tokenizer, wrap=wrap)
    try:
        response = post(thread.url, "/generate", {
            "input_ids": prompt_ids[0], "return_logprob": True, "logprob_start_len": 0,
            "sampling_params": {"max_new_tokens": 0}})
    finally:
        thread.stop()
    assert response.status_code == 400 and words in response.json()["error"]


@pytest.mark.parametrize("path, body, field", [
    ("/generate", {"input_ids": [1, 2], "sampling_params": {"temperature": -1}}, "temperature"),
    ("/generate", {"input_ids": [1, 2], "sampling_params": {"max_tokens": 5}}, "max_tokens"),
    ("/generate", {"input_ids": [1, 99999]}, "input_ids[1]"),
    ("/generate", {"input_ids": []}, "input_ids"),
    ("/generate", {"sampling_params": {}}, "input_ids"),
    ("/generate", {"input_ids": [[1], [2]], "sampling_params": [{}]}, "sampling_params"),
    ("/generate", {"input_ids": [1], "return_logprob": "yes"}, "return_logprob"),
    ("/generate", {"input_ids": [1], "return_logprob": True, "logprob_start_len": 1},
     "logprob_start_len"),
    ("/generate", {"input_ids": [1, 2], "return_logprob": True, "logprob_start_len": "0"},
     "logprob_start_len"),
    ("/generate", {"input_ids": [1, 2], "return_logprob": True, "logprob_start_len": 0,
                   "lora_path": "a"}, "lora_path"),
    ("/generate", "[1, 2]", "JSON object"),
    ("/abort_request", {}, "abort_all"),
    ("/abort_request", {"rid": 7}, "rid"),
    ("/update_weights_from_disk", {"model_path": "/nonexistent"}, "model_path"),
    ("/update_weights_from_tensor", {"serialized_named_tensors": ["@@"]},
     "serialized_named_tensors"),
    ("/update_weights_from_distributed",
     {"names": ["a"], "dtypes": ["float32"], "shapes": [[1]], "group_name": "g"}, "group_name"),
    ("/update_weights_from_distributed", {"names": ["a"], "dtypes": ["f32"], "shapes": [[1]]},
     "dtypes[0]"),
    ("/init_weights_update_group", {"master_address": "127.0.0.1", "master_port": 1,
                                    "rank_offset": 1, "world_size": 2, "backend": "nccl"}, "nccl"),
    ("/update_weight_version", {"new_version": "v2"}, "new_version"),
])
def test_bad_requests_get_400_naming_the_field(server, path, body, field):
    response = post(server.url, path, body)
    assert response.status_code == 400
    assert field in response.json()["error"]


def test_the_client_reads_sglangs_answer_for_a_request_aborted_before_prefill():
    """SGLang (2025 releases) answers such a request without output_ids."""
    from furlong.engine.client import _generate_output
    output = _generate_output({"text": "", "meta_info": {
        "id": "x", "finish_reason": {"type": "abort", "message": "Abort before prefill"},
        "prompt_tokens": 7, "completion_tokens": 0}})
    assert (output.output_ids, output.output_log_probs, output.finish_reason,
            output.prompt_tokens) == ([], [], "abort", 7)


def test_client_errors_name_the_url_and_the_field(server, prompt_ids):
    with pytest.raises(EngineHTTPError, match=rf"{server.url}/generate.*400.*top_p") as error:
        generate_all(HTTPEngine(server.url), [(prompt_ids[0], SamplingParams(top_p=0.0))])
    assert error.value.status == 400
    with pytest.raises(EngineHTTPError, match="model.layers.9.mlp.up_proj.weight"):
        with_client(server.url, lambda client: client.update_weights(
            [("model.layers.9.mlp.up_proj.weight", torch.zeros(2))], version=1))
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConnectionError, match=f"{dead}/generate"):
        generate_all(HTTPEngine(dead), [(prompt_ids[0], greedy(2))])
    assert with_client(dead, lambda client: client.health()) is False


def test_abort_all_returns_in_flight_requests_with_abort(server, prompt_ids):
    decoding = threading.Event()
    forward_calls = []

    def slow_forward(module, args, kwargs):
        forward_calls.append(1)
        if len(forward_calls) >= 3:
            decoding.set()
        time.sleep(0.01)

    handle = server.server.engine.model.register_forward_pre_hook(slow_forward, with_kwargs=True)
    params = greedy(100, ignore_eos=True)

    async def action(client):
        running = [asyncio.ensure_future(client.generate(ids, params)) for ids in prompt_ids[:2]]
        assert await asyncio.to_thread(decoding.wait, REQUEST_TIMEOUT_S)
        await client.abort_all()
        results = await asyncio.wait_for(asyncio.gather(*running), REQUEST_TIMEOUT_S)
        return results, await client.generate(prompt_ids[3], greedy(3, ignore_eos=True))

    try:
        results, after = with_client(server.url, action)
    finally:
        handle.remove()
    # The request that reached the engine first was decoding; the other may have been queued.
    assert 0 < len(results[0].output_ids) < 100 or 0 < len(results[1].output_ids) < 100
    for output in results:
        assert output.finish_reason == "abort" and len(output.output_ids) < 100
        assert len(output.output_log_probs) == len(output.output_ids)
    assert after.finish_reason == "length" and len(after.output_ids) == 3


def test_abort_by_rid_ends_that_request_alone(server, prompt_ids):
    """SGLang's {"rid": ...}: the request with that id returns at once with 'abort'; the
    other one runs to its end."""
    body = lambda rid, ids: {"input_ids": ids, "rid": rid, "sampling_params": {  # noqa: E731
        "temperature": 0, "max_new_tokens": 60, "ignore_eos": True}}
    with counted_steps(server.server.engine) as steps, \
            concurrent.futures.ThreadPoolExecutor(2) as pool:
        dropped = pool.submit(post, server.url, "/generate", body("dropped", prompt_ids[0]))
        kept = pool.submit(post, server.url, "/generate", body("kept", prompt_ids[1]))
        wait_for(lambda: len(steps) >= 3)
        assert post(server.url, "/abort_request", {"rid": "dropped"}).json() == {"success": True}
        dropped = dropped.result(REQUEST_TIMEOUT_S).json()
        kept = kept.result(REQUEST_TIMEOUT_S).json()
    assert dropped["meta_info"]["id"] == "dropped"
    assert dropped["meta_info"]["finish_reason"]["type"] == "abort"
    assert kept["meta_info"]["finish_reason"]["type"] == "length"
    assert len(kept["output_ids"]) == 60
    assert server.server.in_flight == {}
    # An unknown or finished rid aborts nothing.
    assert post(server.url, "/abort_request", {"rid": "kept"}).json() == {"success": True}


def test_a_client_that_disconnects_aborts_its_request(server, prompt_ids):
    """As SGLang does: the engine stops generating for a client that went away. The engine
    is held at its third step until the server has seen the client go; the request, which
    would otherwise run to the context limit (~100 steps), must end at that step."""
    disconnected = threading.Event()
    steps = []

    def hold_at_third_step(*_, **__):
        steps.append(1)
        if len(steps) == 3:
            disconnected.wait(REQUEST_TIMEOUT_S)

    handle = server.server.engine.model.register_forward_pre_hook(hold_at_third_step,
                                                                  with_kwargs=True)
    body = {"input_ids": prompt_ids[0],
            "sampling_params": {"max_new_tokens": 10_000, "ignore_eos": True}}
    try:
        with pytest.raises(requests.Timeout):  # no answer can come while the engine is held
            requests.post(server.url + "/generate", json=body, timeout=1)
        wait_for(lambda: server.server.in_flight == {})  # the server saw the client go
        disconnected.set()
        # The HF engine batches statically: this request runs after the aborted one ended.
        after = post(server.url, "/generate", {"input_ids": prompt_ids[1], "sampling_params": {
            "temperature": 0, "max_new_tokens": 2, "ignore_eos": True}}).json()
    finally:
        disconnected.set()
        handle.remove()
    assert after["meta_info"]["finish_reason"]["type"] == "length"
    assert len(steps) <= 3 + 2  # the aborted request's 3 steps, then the new one's 2


def test_only_generate_handlers_stop_when_their_client_goes():
    """A weight update must finish even if its client timed out (group state stays
    consistent); a generation may stop."""
    from types import SimpleNamespace

    from furlong.engine.server.app import only_generate_cancels
    outcome = {}

    async def main():
        for path in ("/update_weights_from_distributed", "/generate"):
            started, release, done = asyncio.Event(), asyncio.Event(), asyncio.Event()

            async def handler(request):
                started.set()
                try:
                    await release.wait()
                    outcome[request.path] = "finished"
                except asyncio.CancelledError:
                    outcome[request.path] = "cancelled"
                    raise
                finally:
                    done.set()

            task = asyncio.ensure_future(only_generate_cancels(SimpleNamespace(path=path),
                                                                handler))
            await started.wait()
            task.cancel()  # what aiohttp does when the client disconnects
            release.set()
            await asyncio.wait_for(done.wait(), REQUEST_TIMEOUT_S)
            with contextlib.suppress(asyncio.CancelledError):
                await task
    asyncio.run(main())
    assert outcome == {"/update_weights_from_distributed": "finished", "/generate": "cancelled"}


def test_health_model_info_cache_and_memory_endpoints(server, checkpoints, prompt_ids):
    def get(path: str) -> requests.Response:
        return requests.get(server.url + path, timeout=REQUEST_TIMEOUT_S)
    assert get("/health").status_code == 200
    assert get("/health_generate").status_code == 200
    info = get("/get_model_info").json()
    assert info == {"model_path": str(checkpoints["base"]),
                    "tokenizer_path": str(checkpoints["base"]), "is_generation": True,
                    "weight_version": "0"}

    async def round_trip(client):
        before = await client.generate(prompt_ids[0], greedy(8))
        await client.flush_cache()
        await client.release_memory()
        await client.resume_memory()
        return before, await client.generate(prompt_ids[0], greedy(8)), await client.health()
    before, after, healthy = with_client(server.url, round_trip)
    assert after.output_ids == before.output_ids and healthy

    def fail(module, args, kwargs):
        raise RuntimeError("the model broke")
    handle = server.server.engine.model.register_forward_pre_hook(fail, with_kwargs=True)
    try:
        response = get("/health_generate")
        assert response.status_code == 503 and "the model broke" in response.json()["error"]
        assert with_client(server.url, lambda client: client.health()) is False
    finally:
        handle.remove()


# ---- weights --------------------------------------------------------------------------------

def test_update_weights_from_disk_serves_the_other_checkpoint(server, checkpoints, states, tiny,
                                                              tokenizer, prompt_ids):
    requests_ = [(ids, greedy(12)) for ids in prompt_ids]
    before = generate_all(HTTPEngine(server.url), requests_)
    with_client(server.url, lambda c: c.update_weights_from_disk(checkpoints["other"], version=3))
    after = generate_all(HTTPEngine(server.url), requests_)
    assert_same_outputs(after, generate_all(reference(states["other"], tiny, tokenizer),
                                            requests_))
    assert [o.output_ids for o in after] != [o.output_ids for o in before]
    assert {o.weight_version for o in after} == {3}
    info = requests.get(server.url + "/get_model_info", timeout=REQUEST_TIMEOUT_S).json()
    assert (info["model_path"], info["weight_version"]) == (str(checkpoints["other"]), "3")


def test_update_weights_from_tensor_serves_the_sent_weights(server, states, tiny, tokenizer,
                                                            prompt_ids):
    """bfloat16 tensors, several requests (small buckets): the engine casts them to float32."""
    sent = {name: tensor.bfloat16() for name, tensor in states["perturbed"].items()}
    with_client(server.url, lambda client: client.update_weights(sent.items(), version=5),
                bucket_bytes=256 << 10)
    requests_ = [(ids, greedy(12)) for ids in prompt_ids]
    after = generate_all(HTTPEngine(server.url), requests_)
    assert_same_outputs(after, generate_all(reference(sent, tiny, tokenizer), requests_))
    assert {o.weight_version for o in after} == {5}
    assert all(p.dtype == torch.float32 for p in server.server.engine.model.parameters())


def test_distributed_update_in_buckets_over_gloo(server, states, tiny, tokenizer, prompt_ids):
    """Rank 0 here, the server rank 1; two updates over one group, many buckets each."""
    broadcaster = BroadcastSender("gloo", lambda: ("127.0.0.1", free_port()), 64 << 10,
                                  timeout_s=REQUEST_TIMEOUT_S)
    servers = Servers((server.url,))
    requests_ = [(ids, greedy(12)) for ids in prompt_ids]
    try:
        assert broadcaster.send(states["perturbed"].items(), servers, version=4) > 5
        name = "model.layers.1.mlp.up_proj.weight"
        rows = post(server.url, "/get_weights_by_name", {"name": name, "truncate_size": 3}).json()
        torch.testing.assert_close(torch.tensor(rows), states["perturbed"][name][:3],
                                   rtol=0, atol=0)
        perturbed = generate_all(HTTPEngine(server.url), requests_)
        assert_same_outputs(perturbed, generate_all(
            reference(states["perturbed"], tiny, tokenizer), requests_))
        assert {o.weight_version for o in perturbed} == {4}

        broadcaster.send(states["base"].items(), servers, version=6)
        base = generate_all(HTTPEngine(server.url), requests_)
        assert_same_outputs(base, generate_all(reference(states["base"], tiny, tokenizer),
                                               requests_))
        assert {o.weight_version for o in base} == {6}
    finally:
        broadcaster.close()
    assert server.server.groups == {}


def test_update_weight_version_changes_the_reported_version(server, prompt_ids):
    assert post(server.url, "/update_weight_version", {"new_version": "9"}).json()["success"]
    output = generate_all(HTTPEngine(server.url), [(prompt_ids[0], greedy(2))])[0]
    assert output.weight_version == 9


def test_serialized_tensors_round_trip_with_dtype_and_only_their_own_bytes():
    big = torch.arange(100_000, dtype=torch.float32)
    named = [("view", big[:10]), ("bf16", torch.randn(3, 4).bfloat16()), ("int", torch.arange(5))]
    payload = serialize_named_tensors(named)
    assert len(payload) < 20_000  # the view's 400 kB storage is not sent
    loaded = deserialize_named_tensors(payload)
    assert [name for name, _ in loaded] == ["view", "bf16", "int"]
    for (_, want), (_, got) in zip(named, loaded, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)
    with pytest.raises(ValueError, match="not a torch.save archive"):
        deserialize_named_tensors("gASVAAAAAAAAAAA=")  # a pickle, as SGLang's serializer sends


class CallsPrint:
    def __reduce__(self):
        return print, ("this ran on the server",)


def test_a_serialized_payload_cannot_carry_code(capsys):
    buffer = io.BytesIO()
    torch.save([("weight", CallsPrint())], buffer)
    with pytest.raises(ValueError, match="does not load"):
        deserialize_named_tensors(base64.b64encode(buffer.getvalue()).decode())
    assert "this ran" not in capsys.readouterr().out


def test_buckets_keep_order_and_the_byte_budget():
    tensors = [(f"t{i}", torch.zeros(n)) for i, n in enumerate([10, 10, 30, 5, 5, 5])]  # float32
    buckets = list(iter_buckets(tensors, bucket_bytes=80))
    assert [[name for name, _ in bucket] for bucket, _ in buckets] == [
        ["t0", "t1"], ["t2"], ["t3", "t4", "t5"]]  # t2 (120 bytes) travels alone
    assert [is_last for _, is_last in buckets] == [False, False, True]
    assert list(iter_buckets([], 80)) == [([], True)]


# ---- command line ---------------------------------------------------------------------------

def test_parse_args_ignores_unknown_sglang_flags_and_rejects_tensor_parallel(capsys):
    args = parse_args(["--model-path", "m", "--trust-remote-code", "--attention-backend",
                       "flash", "--chunked-prefill-size=4096", "--tp", "1"])
    assert args.ignored_flags == ["--trust-remote-code", "--attention-backend",
                                  "--chunked-prefill-size"]
    with pytest.raises(SystemExit):
        parse_args(["--model-path", "m", "--tp-size", "2"])
    assert "--tp-size 2" in capsys.readouterr().err


@contextlib.contextmanager
def launched_server(model_dir, log, *flags: str, api_key: str | None = None):
    """`python -m furlong.engine.serve` on a free port, output to `log`; yields its URL once
    /health_generate answers (sent with `api_key`, also given to the server), terminates
    it after."""
    port = free_port()
    command = [sys.executable, "-m", "furlong.engine.serve", "--model-path", str(model_dir),
               "--host", "127.0.0.1", "--port", str(port), *flags,
               *(["--api-key", api_key] if api_key else [])]
    with open(log, "w") as stream:
        process = subprocess.Popen(command, cwd=REPO, stdout=stream, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONPATH": str(REPO)})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_STOP_TIMEOUT_S
        while not with_client(url, lambda client: client.health(), health_timeout_s=30,
                              api_key=api_key):
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(START_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_the_cli_serves_from_an_sglang_launch_line(checkpoints, states, tiny, tokenizer,
                                                   prompt_ids, tmp_path):
    log = tmp_path / "server.log"
    with launched_server(checkpoints["base"], log, "--device", "cpu", "--dtype", "float32",
                         "--random-seed", "3", "--trust-remote-code",
                         "--mem-fraction-static", "0.7", "--attention-backend", "flash") as url:
        requests_ = [(ids, greedy(12)) for ids in prompt_ids[:3]]
        assert_same_outputs(generate_all(HTTPEngine(url), requests_),
                            generate_all(reference(states["base"], tiny, tokenizer), requests_))
        info = with_client(url, lambda client: client.get_model_info())
        assert info["model_path"] == str(checkpoints["base"])
    text = log.read_text()
    assert "ignoring --trust-remote-code" in text and "ignoring --attention-backend" in text
    assert "--mem-fraction-static has no effect" in text


def server_weights(url: str, names) -> dict[str, torch.Tensor]:
    return {name: torch.tensor(post(url, "/get_weights_by_name",
                                    {"name": name, "truncate_size": 1 << 20}).json())
            for name in names}


@pytest.mark.gpu
def test_a_server_on_cuda_takes_weights_from_cuda_tensors(checkpoints, states, tiny, tokenizer,
                                                          prompt_ids, tmp_path):
    """HTTPEngine.update_weights copies CUDA tensors to the CPU for the by-value path."""
    with launched_server(checkpoints["base"], tmp_path / "server.log", "--device", "cuda",
                         "--dtype", "float32") as url:
        sent = {name: t.cuda() for name, t in states["perturbed"].items()}
        with_client(url, lambda client: client.update_weights(sent.items(), version=5))
        for name, tensor in server_weights(url, sent).items():
            torch.testing.assert_close(tensor, states["perturbed"][name], rtol=0, atol=0)
        outputs = generate_all(HTTPEngine(url), [(ids, greedy(12)) for ids in prompt_ids])
        assert {o.weight_version for o in outputs} == {5}


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_a_server_process_receives_weights_over_nccl(checkpoints, states, tmp_path):
    """The server on cuda:1 in its own process, rank 0 here on cuda:0; several buckets."""
    with launched_server(checkpoints["base"], tmp_path / "server.log", "--device", "cuda",
                         "--base-gpu-id", "1", "--dtype", "float32") as url:
        broadcaster = BroadcastSender("nccl", lambda: ("127.0.0.1", free_port()), 64 << 10,
                                      timeout_s=REQUEST_TIMEOUT_S)
        try:
            sent = {name: t.to("cuda:0") for name, t in states["perturbed"].items()}
            assert broadcaster.send(sent.items(), Servers((url,)), version=4) > 5
        finally:
            broadcaster.close()
        for name, tensor in server_weights(url, sent).items():
            torch.testing.assert_close(tensor, states["perturbed"][name], rtol=0, atol=0)
        assert with_client(url, lambda client: client.get_model_info())["weight_version"] == "4"



def test_ipc_payloads_need_the_servers_consent(server):
    """CUDA IPC payloads name memory on the sender's GPU: a server not started next to
    its trainer refuses one with a 400 instead of unpickling it."""
    import base64
    import pickle

    from furlong.engine.weights.wire import is_ipc_payload, serialize_named_tensors
    assert not is_ipc_payload(serialize_named_tensors([("w", torch.ones(2))]))
    payload = base64.b64encode(pickle.dumps([("model.norm.weight", 1)])).decode()
    assert is_ipc_payload(payload)
    response = post(server.url, "/update_weights_from_tensor",
                    {"serialized_named_tensors": [payload]})
    assert response.status_code == 400 and "CUDA IPC" in response.json()["error"]


# ---- the fast engine behind the server ------------------------------------------------------

def test_the_fast_engine_serves_the_same_api(fast_server, states, tiny, tokenizer, prompt_ids):
    """What a GPU machine runs, on the CPU: greedy outputs and log-probs as the reference
    engine's, weights by tensor, release and resume memory, abort."""
    requests_ = [(ids, greedy(20)) for ids in prompt_ids]
    assert_same_outputs(generate_all(HTTPEngine(fast_server.url), requests_),
                        generate_all(reference(states["base"], tiny, tokenizer), requests_))

    sent = {name: tensor.bfloat16() for name, tensor in states["perturbed"].items()}
    with_client(fast_server.url, lambda client: client.update_weights(sent.items(), version=5),
                bucket_bytes=256 << 10)
    after = generate_all(HTTPEngine(fast_server.url), requests_)
    assert_same_outputs(after, generate_all(reference(sent, tiny, tokenizer), requests_))
    assert {o.weight_version for o in after} == {5}

    async def release_and_resume(client):
        await client.release_memory()
        await client.resume_memory()
        return await asyncio.gather(*(client.generate(ids, p) for ids, p in requests_))
    assert_same_outputs(with_client(fast_server.url, release_and_resume), after)

    async def abort(client):
        running = asyncio.ensure_future(client.generate(prompt_ids[0],
                                                        greedy(100, ignore_eos=True)))
        await asyncio.to_thread(wait_for, lambda: len(steps) >= 3)
        await client.abort_all()
        return await asyncio.wait_for(running, REQUEST_TIMEOUT_S)
    with counted_steps(fast_server.server.engine) as steps:
        aborted = with_client(fast_server.url, abort)
    assert aborted.finish_reason == "abort" and 0 < len(aborted.output_ids) < 100
