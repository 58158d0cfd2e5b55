"""LoRA in the engines (CPU; GPU checks marked gpu): adapters by name, applied un-merged.

The references are independent of the engines' LoRA code: PEFT wrapping a fresh HF model
(furlong.model.lora's attach, the trainer's path) scores the engines' tokens with one
full forward, and a per-token loop checks LoraSlots' batched GEMMs. Then the same
adapters through furlong's server, HTTPEngine and the router.
"""
from __future__ import annotations

import asyncio

import pytest
import requests
import torch
from test_serve import ServerThread
from transformers import AutoTokenizer

from furlong.engine.base import SamplingParams
from furlong.engine.client import HTTPEngine
from furlong.engine.fast import FastEngine
from furlong.engine.fast.block_manager import BlockManager
from furlong.engine.fast.lora import LoraAdapters, LoraGroup, LoraSlots, adapter_scaling
from furlong.engine.fast.scheduler import Scheduler
from furlong.engine.fast.sequence import Sequence
from furlong.engine.hf_engine import HFEngine
from furlong.engine.router import EngineRouter, EngineState, RouterOptions
from furlong.engine.weights.wire import serialize_named_tensors
from furlong.model.loading import load_hf_model
from furlong.model.logits import output_logits
from furlong.model.lora import (STANDARD_TARGETS, LoraSpec, attach, load_adapter_tensors,
                                merged)
from furlong.model.lora_files import save_adapter

TIMEOUT_S = 120
RANK, ALPHA = 4, 8
PROMPTS = ("1+2=", "37+48=", "99+11=", "5")


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return AutoTokenizer.from_pretrained(tiny / "model")


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    return [tokenizer(text)["input_ids"] for text in PROMPTS]


def config(targets=STANDARD_TARGETS, **extra) -> dict:
    return LoraSpec(RANK, ALPHA, targets=tuple(targets)).sglang_config() | extra


def adapter(model, seed: int, targets=STANDARD_TARGETS, fresh: bool = False,
            rank: int = RANK) -> dict[str, torch.Tensor]:
    """An adapter for `model`'s `targets`, by PEFT's names: A as PEFT draws it, B zero
    (`fresh`) or large enough to move the log-probs by ~0.1 (a trained-looking one)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets:
            scale_a, scale_b = module.in_features ** -0.5, 0.0 if fresh else 0.4
            tensors[f"{name}.lora_A.weight"] = torch.randn(
                rank, module.in_features, generator=generator) * scale_a
            tensors[f"{name}.lora_B.weight"] = torch.randn(
                module.out_features, rank, generator=generator) * scale_b
    return tensors


def make_engine(kind: str, tiny, tokenizer):
    model = load_hf_model(str(tiny / "model"))
    if kind == "hf":
        return HFEngine(model, tokenizer)
    return FastEngine(model, tokenizer, kv_cache_tokens=2048, block_size=4, window=3,
                      max_num_seqs=16)


def sampled(seed: int, max_new_tokens: int = 8) -> SamplingParams:
    """Temperature 1: the engine's log-probs are the model's own log-softmax."""
    return SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, sampling_seed=seed,
                          ignore_eos=True)


def run(coroutine):
    return asyncio.run(coroutine)


async def generate_all(engine, requests_):
    """Every (ids, params, lora_path) at once (one batch for the HF engine)."""
    return await asyncio.gather(*(engine.generate(ids, params, lora_path=lora)
                                  for ids, params, lora in requests_))


def reference_log_probs(tiny, tensors, targets, prompt, output_ids) -> torch.Tensor:
    """log p(output_ids | prompt) from a fresh HF model, with the adapter through PEFT
    (tensors None: the base model), in one forward over prompt + output."""
    model = load_hf_model(str(tiny / "model"))
    if tensors is not None:
        attach(model, LoraSpec(RANK, ALPHA, targets=tuple(targets)), seed=0)
        load_adapter_tensors(model, tensors, "the test adapter")
    ids = torch.tensor([prompt + output_ids])
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids).last_hidden_state[0]
        logits = output_logits(hidden, model.get_output_embeddings().weight)
    log_probs = logits[len(prompt) - 1:-1].log_softmax(-1)
    return log_probs.gather(-1, torch.tensor(output_ids)[:, None]).squeeze(-1)


# ---- both engines -------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["hf", "fast"])
def test_a_fresh_adapter_samples_exactly_the_base_model(kind, tiny, tokenizer, prompts):
    """B = 0: tokens and log-probs bit-equal to the base (each request alone)."""
    engine = make_engine(kind, tiny, tokenizer)
    model = engine.model

    async def main():
        base = [await engine.generate(ids, sampled(i)) for i, ids in enumerate(prompts)]
        await engine.load_lora_adapter("fresh", config(), adapter(model, 1, fresh=True).items())
        adapted = [await engine.generate(ids, sampled(i), lora_path="fresh")
                   for i, ids in enumerate(prompts)]
        await engine.close()
        return base, adapted
    base, adapted = run(main())
    for want, got in zip(base, adapted, strict=True):
        assert got.output_ids == want.output_ids
        assert got.output_log_probs == want.output_log_probs


@pytest.mark.parametrize("targets", [STANDARD_TARGETS, ("q_proj", "v_proj", "down_proj")])
@pytest.mark.parametrize("kind", ["hf", "fast"])
def test_adapter_and_base_rows_in_one_batch_match_peft(kind, targets, tiny, tokenizer,
                                                       prompts, monkeypatch):
    """Base rows, rows of two adapters and the same prompt under each (the fast engine
    must not share a prefill between adapters) in one batch: each row's log-probs are
    those of PEFT on a fresh model with its adapter (float32, 1e-5)."""
    engine = make_engine(kind, tiny, tokenizer)
    batch_sizes = []
    if kind == "hf":
        decode = engine._decode
        monkeypatch.setattr(engine, "_decode",
                            lambda rows: (batch_sizes.append(len(rows)), decode(rows))[1])
    tensors = {"a": adapter(engine.model, 1, targets), "b": adapter(engine.model, 2, targets)}
    same = prompts[0]
    requests_ = [(same, sampled(0), None), (same, sampled(0), "a"), (same, sampled(0), "b"),
                 (prompts[1], sampled(1), "a"), (prompts[2], sampled(2), None),
                 (prompts[3], sampled(3), "b")]

    async def main():
        for name, named in tensors.items():
            await engine.load_lora_adapter(name, config(targets), named.items())
        outputs = await generate_all(engine, requests_)
        await engine.close()
        return outputs
    outputs = run(main())
    if kind == "hf":
        assert batch_sizes == [len(requests_)]
    for (prompt, _, name), output in zip(requests_, outputs, strict=True):
        want = reference_log_probs(tiny, tensors.get(name), targets, prompt, output.output_ids)
        torch.testing.assert_close(torch.tensor(output.output_log_probs), want,
                                   atol=1e-5, rtol=0)
        if name is not None:  # the adapter matters at this size
            base = reference_log_probs(tiny, None, targets, prompt, output.output_ids)
            assert (want - base).abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["hf", "fast"])
def test_unknown_unloaded_and_refused_adapters_are_errors_naming_them(kind, tiny, tokenizer,
                                                                      prompts):
    engine = make_engine(kind, tiny, tokenizer)
    model = engine.model
    good = adapter(model, 1)

    async def main():
        with pytest.raises(ValueError, match="'nope'"):
            await engine.generate(prompts[0], sampled(0), lora_path="nope")
        await engine.load_lora_adapter("a", config(), good.items())
        expected = await engine.generate(prompts[0], sampled(0), lora_path="a")
        refused = [
            (config(use_rslora=True), good, "use_rslora"),
            (config(), good | {"model.layers.0.mlp.gate.lora_A.weight": torch.zeros(4, 8)},
             "mlp.gate"),
            (config(), {k: v[:-1] if k.endswith("lora_B.weight") else v
                        for k, v in good.items()}, "has shape"),
            (config(), {k: v for k, v in good.items() if "q_proj.lora_B" not in k},
             "lora_A .* and lora_B"),
        ]
        for bad_config, tensors, message in refused:
            with pytest.raises(ValueError, match=message):
                await engine.load_lora_adapter("a", bad_config, tensors.items())
        # a refused replacement left "a" as it was
        again = await engine.generate(prompts[0], sampled(0), lora_path="a")
        assert again.output_log_probs == expected.output_log_probs
        await engine.unload_lora_adapter("a")
        with pytest.raises(ValueError, match="'a'"):
            await engine.generate(prompts[0], sampled(0), lora_path="a")
        with pytest.raises(ValueError, match="'a'"):
            await engine.unload_lora_adapter("a")
        await engine.close()
    run(main())


@pytest.mark.parametrize("kind", ["hf", "fast"])
def test_loading_a_name_again_replaces_it_in_its_slot(kind, tiny, tokenizer, prompts):
    """A push reloads the run's adapter under its name: the same slot, the new tensors; a
    higher rank grows the slots and keeps the other adapters, and so does an offload."""
    engine = make_engine(kind, tiny, tokenizer)
    model = engine.model

    async def main():
        base = await engine.generate(prompts[1], sampled(5))
        await engine.load_lora_adapter("other", config(), adapter(model, 3).items())
        other = await engine.generate(prompts[1], sampled(5), lora_path="other")
        await engine.load_lora_adapter("run", config(), adapter(model, 1).items())
        await engine.load_lora_adapter("run", config(), adapter(model, 1, fresh=True).items(),
                                       version=7)
        fresh = await engine.generate(prompts[1], sampled(5), lora_path="run")
        assert engine.lora.names == {"other": 0, "run": 1}
        assert (fresh.output_log_probs, fresh.weight_version) == (base.output_log_probs, 7)
        await engine.load_lora_adapter("run", config() | {"r": 8},
                                       adapter(model, 1, fresh=True, rank=8).items())
        assert engine.lora.slots.rank == 8
        assert (await engine.generate(prompts[1], sampled(5), lora_path="run")
                ).output_log_probs == base.output_log_probs
        await engine.release_memory()  # the adapters survive an offload
        await engine.resume_memory()
        kept = await engine.generate(prompts[1], sampled(5), lora_path="other")
        torch.testing.assert_close(torch.tensor(kept.output_log_probs),
                                   torch.tensor(other.output_log_probs), atol=1e-6, rtol=0)
        await engine.close()
    run(main())


def test_requests_of_other_adapters_never_share_a_prefill():
    scheduler = Scheduler(BlockManager(100, 4), max_num_seqs=8, max_prefill_tokens=100)
    members = [Sequence([1, 2, 3], SamplingParams(), 0, 4, lambda s: None, lora_slot=slot)
               for slot in (-1, 0, 0, 1)]
    for seq in members:
        scheduler.add(seq)
    assert scheduler.admit() == [[members[0]], members[1:3], [members[3]]]


# ---- LoraSlots against a per-token reference ------------------------------------------------

GROUPS = {"qkv": LoraGroup(("q", "k", "v"), 16, (16, 8, 8)), "o": LoraGroup(("o",), 12, (16,))}


def slot_tensors(seed: int, rank: int, paths, fresh: bool = False) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    sizes = {path: (group.in_features, out) for group in GROUPS.values()
             for path, out in zip(group.projections, group.out_features, strict=True)}
    tensors = {}
    for path in paths:
        width, out = sizes[path]
        tensors[f"{path}.lora_A.weight"] = torch.randn(rank, width, generator=generator)
        tensors[f"{path}.lora_B.weight"] = torch.zeros(out, rank) if fresh else \
            torch.randn(out, rank, generator=generator)
    return tensors


def per_token_reference(key, x, out, slot_ids, adapters) -> torch.Tensor:
    """out + scaling * B_p @ (A_p @ x_t) for each token t's adapter, projection by
    projection (adapters: slot -> (tensors, scaling))."""
    result = out.clone()
    group = GROUPS[key]
    for t, slot in enumerate(slot_ids.tolist()):
        if slot < 0:
            continue
        tensors, scaling = adapters[slot]
        start = 0
        for path, width in zip(group.projections, group.out_features, strict=True):
            if f"{path}.lora_A.weight" in tensors:
                A, B = tensors[f"{path}.lora_A.weight"], tensors[f"{path}.lora_B.weight"]
                result[t, start:start + width] += scaling * (B @ (A @ x[t]))
            start += width
    return result


@pytest.mark.parametrize("num_slots", [3, 1])
def test_lora_slots_apply_each_tokens_own_adapter(num_slots):
    """Slots of different ranks and targets, base tokens between them (one slot: the
    scale alone keeps base tokens out)."""
    slots = LoraSlots(GROUPS, GROUPS, num_slots, rank=4, dtype=torch.float32, device="cpu")
    adapters = {0: (slot_tensors(0, 4, ("q", "v", "o")), 2.0),
                1: (slot_tensors(1, 2, ("k",)), 0.5),
                2: (slot_tensors(2, 3, ("q", "k", "v", "o")), 1.5)}
    adapters = {slot: adapters[slot] for slot in range(num_slots)}
    for slot, (tensors, scaling) in adapters.items():
        slots.load(slot, tensors, scaling, "test")
    slot_ids = torch.tensor([-1, 0, 1, 2, 0, -1, 2, 1, 1]) % (num_slots + 1) - 1
    mask = slots.token_mask(slot_ids)
    generator = torch.Generator().manual_seed(9)
    for key in GROUPS:
        x = torch.randn(len(slot_ids), GROUPS[key].in_features, generator=generator)
        out = torch.randn(len(slot_ids), sum(GROUPS[key].out_features), generator=generator)
        expected = per_token_reference(key, x, out, slot_ids, adapters)
        got = slots.apply(key, x, out.clone(), mask)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(got[slot_ids == -1], out[slot_ids == -1])


@pytest.mark.parametrize("num_slots", [2, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_fresh_adapter_leaves_the_gemm_output_bit_unchanged(dtype, num_slots):
    """Rows of a B = 0 adapter and base rows keep the GEMM's output; another adapter's
    row beside them changes."""
    slots = LoraSlots(GROUPS, GROUPS, num_slots, rank=4, dtype=dtype, device="cpu")
    slots.load(0, slot_tensors(0, 4, ("q", "k", "v", "o"), fresh=True), 2.0, "test")
    if num_slots == 2:
        slots.load(1, slot_tensors(1, 4, ("q", "o")), 2.0, "test")
    slot_ids = torch.tensor([0, -1, 0, num_slots - 1])
    x = torch.randn(4, 16, dtype=dtype)
    out = torch.randn(4, 32, dtype=dtype)
    got = slots.apply("qkv", x, out.clone(), slots.token_mask(slot_ids))
    assert torch.equal(got[:3], out[:3])
    assert torch.equal(got[3], out[3]) == (num_slots == 1)


def test_grown_slots_keep_their_adapters_and_refuse_unknown_modules():
    slots = LoraSlots(GROUPS, ["o"], num_slots=1, rank=2, dtype=torch.float32, device="cpu")
    tensors = slot_tensors(0, 2, ("o",))
    slots.load(0, tensors, 1.0, "test")
    grown = slots.fitted({"o", "qkv"}, num_slots=3, rank=4)
    assert grown is not slots and slots.fitted({"o"}, 1, 2) is slots
    x, out = torch.randn(5, 12), torch.randn(5, 16)
    slot_ids = torch.tensor([0, 0, -1, 0, 0])
    torch.testing.assert_close(grown.apply("o", x, out.clone(), grown.token_mask(slot_ids)),
                               per_token_reference("o", x, out, slot_ids, {0: (tensors, 1.0)}))
    with pytest.raises(ValueError, match="'up'"):
        slots.group_keys(["o", "up"])


def test_the_scaling_multiplies_in_bf16_only_while_exact_there():
    """An alpha / r that bf16 cannot hold switches the scale to float32, and the fast
    engine's captured graphs (built for the other dtype) must go."""
    adapters = LoraAdapters(GROUPS, torch.bfloat16, "cpu")
    tensors = slot_tensors(0, 4, ("q", "o"))
    assert adapters.load("a", config(), tensors)  # new slots: graphs go
    assert adapters.slots.scale_dtype == torch.bfloat16
    assert not adapters.load("a", config(), tensors)  # in place, same dtype: graphs stay
    assert adapters.load("b", config(lora_alpha=4.1), tensors)  # 1.025: not a bf16 number
    assert adapters.slots.scale_dtype == torch.float32
    mask = adapters.mask(torch.tensor([1, -1]))
    assert mask.scale.dtype == torch.float32
    assert mask.scale[:, 0].tolist() == [pytest.approx(1.025), 0.0]
    # unloading the inexact one switches back to bf16: graphs go again; unloading another
    # keeps the dtype, and the graphs
    assert adapters.unload("b") == (1, True)
    assert adapters.slots.scale_dtype == torch.bfloat16
    assert adapters.load("b", config(lora_alpha=4.1), tensors)
    assert adapters.unload("a") == (0, False)


def test_adapter_configs_the_engines_do_not_compute_are_refused():
    assert adapter_scaling(config(), "x") == ALPHA / RANK
    for extra, name in (({"use_dora": True}, "use_dora"), ({"bias": "all"}, "bias"),
                        ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
                        ({"peft_type": "IA3"}, "peft_type"), ({"r": 0}, "r=0")):
        with pytest.raises(ValueError, match=name):
            adapter_scaling(config() | extra, "adapter 'x'")


# ---- through the server, HTTPEngine and the router ------------------------------------------

def post(url: str, path: str, body: dict) -> requests.Response:
    return requests.post(url + path, json=body, timeout=TIMEOUT_S)


def tensors_body(name: str, tensors: dict, **extra) -> dict:
    return {"lora_name": name, "config_dict": config(),
            "serialized_tensors": serialize_named_tensors(tensors.items())} | extra


def greedy_ids(url: str, prompt: list[int], **extra) -> list[int]:
    answer = post(url, "/generate", {"input_ids": prompt, "sampling_params": {
        "temperature": 0, "max_new_tokens": 8, "ignore_eos": True}} | extra)
    assert answer.status_code == 200, answer.text
    return answer.json()["output_ids"]


def test_server_routes_load_generate_and_unload(tiny, tokenizer, prompts, tmp_path):
    server = ServerThread(tiny / "model", tokenizer)
    url = server.url
    try:
        model = server.server.engine.model
        fresh, trained = adapter(model, 1, fresh=True), adapter(model, 1)
        base = [greedy_ids(url, ids) for ids in prompts]
        answer = post(url, "/load_lora_adapter_from_tensors", tensors_body("a", fresh))
        assert answer.json()["loaded_adapters"] == {"a": "tensors"}
        assert [greedy_ids(url, ids, lora_path="a") for ids in prompts] == base
        assert "upsert" in post(url, "/load_lora_adapter_from_tensors",
                                tensors_body("a", trained)).json()["error"]
        assert post(url, "/load_lora_adapter_from_tensors",
                    tensors_body("a", trained, upsert=True)).status_code == 200
        adapted = [greedy_ids(url, ids, lora_path="a") for ids in prompts]
        assert adapted != base
        save_adapter(tmp_path / "adapter", trained.items(), LoraSpec(RANK, ALPHA), "base")
        answer = post(url, "/load_lora_adapter", {"lora_name": "b",
                                                  "lora_path": str(tmp_path / "adapter")})
        assert answer.json()["loaded_adapters"] == {"a": "tensors", "b": str(tmp_path / "adapter")}
        batch = post(url, "/generate", {"input_ids": prompts, "lora_path": ["b", None, "a", "b"],
                                        "sampling_params": {"temperature": 0, "max_new_tokens": 8,
                                                            "ignore_eos": True}}).json()
        assert [item["output_ids"] for item in batch] == [adapted[0], base[1], *adapted[2:]]
        # OpenAI's clients name the adapter as the model
        assert [m["id"] for m in requests.get(url + "/v1/models").json()["data"]][1:] == ["a", "b"]
        completion = post(url, "/v1/completions", {"model": "a", "prompt": prompts[1],
                                                   "max_tokens": 8, "temperature": 0,
                                                   "ignore_eos": True, "return_token_ids": True})
        assert completion.json()["choices"][0]["token_ids"] == adapted[1]
        for path, body, message in (
                ("/generate", {"input_ids": prompts[0], "lora_path": "nope"}, "'nope'"),
                ("/load_lora_adapter_from_tensors", tensors_body("c", trained, checksum=1),
                 "checksum"),
                ("/load_lora_adapter_from_tensors", {"lora_name": "c", "config_dict": config()},
                 "give serialized_named_tensors"),
                ("/load_lora_adapter", {"lora_name": "c", "lora_path": str(tmp_path)},
                 "adapter_config.json"),
                ("/unload_lora_adapter", {"lora_name": "c"}, "'c'")):
            answer = post(url, path, body)
            assert answer.status_code == 400 and message in answer.json()["error"], answer.text
        assert post(url, "/unload_lora_adapter", {"lora_name": "a"}).json()[
            "loaded_adapters"] == {"b": str(tmp_path / "adapter")}
        assert post(url, "/generate", {"input_ids": prompts[0], "lora_path": "a"}
                    ).status_code == 400
    finally:
        server.stop()


def test_http_engine_and_router_carry_adapters_to_every_server(tiny, tokenizer, prompts):
    servers = [ServerThread(tiny / "model", tokenizer) for _ in range(2)]
    local = make_engine("hf", tiny, tokenizer)
    trained = adapter(local.model, 1)
    requests_ = [(ids, sampled(i), "run") for i, ids in enumerate(prompts)]
    try:
        async def main():
            await local.load_lora_adapter("run", config(), trained.items())
            expected = await generate_all(local, requests_)
            router = EngineRouter([s.url for s in servers],
                                  RouterOptions(health_check_interval_s=None))
            router._bind()
            router.engines[1].state = EngineState.AWAITING_WEIGHTS  # as after a restart
            await router.load_lora_adapter("run", config(), trained.items(), version=4)
            assert [slot.state for slot in router.engines] == [EngineState.SERVING] * 2
            routed = await generate_all(router, requests_)
            client = HTTPEngine(servers[1].url)
            direct = await generate_all(client, requests_)
            await router.unload_lora_adapter("run")
            await client.close()
            await router.close()
            await local.close()
            return expected, routed, direct
        expected, routed, direct = run(main())
        for outputs in (routed, direct):
            for got, want in zip(outputs, expected, strict=True):
                assert got.output_ids == want.output_ids and got.weight_version == 4
                torch.testing.assert_close(torch.tensor(got.output_log_probs),
                                           torch.tensor(want.output_log_probs), atol=1e-5,
                                           rtol=0)
        for server in servers:
            assert server.server.lora.loaded == {} and server.server.weight_version == 4
    finally:
        for server in servers:
            server.stop()


# ---- on the GPU ----------------------------------------------------------------------------

def gpu_engine(tiny, tokenizer, dtype, cuda_graphs: bool) -> FastEngine:
    return FastEngine(load_hf_model(str(tiny / "model"), dtype, "cuda"), tokenizer,
                      cuda_graphs=cuda_graphs, max_num_seqs=32, kv_cache_tokens=8192)


@pytest.mark.gpu
def test_gpu_graphs_with_adapters_match_eager(tiny, tokenizer, prompts):
    """Captured decode steps read the adapter slots and masks like eager ones; a fresh
    adapter stays bit-equal to the base in bf16 under graphs."""
    outputs = []
    for graphs in (True, False):
        engine = gpu_engine(tiny, tokenizer, torch.float32, graphs)
        requests_ = [(ids, sampled(i, 24), lora) for i, ids in enumerate(prompts)
                     for lora in (None, "a", "b")]

        async def main():
            await engine.load_lora_adapter("a", config(), adapter(engine.model, 1).items())
            await engine.load_lora_adapter("b", config(), adapter(engine.model, 2).items())
            return await generate_all(engine, requests_)
        outputs.append([o.output_ids for o in run(main())])
        run(engine.close())
    assert outputs[0] == outputs[1]
    engine = gpu_engine(tiny, tokenizer, torch.bfloat16, True)

    async def fresh():
        base = await generate_all(engine, [(ids, sampled(i, 24), None)
                                           for i, ids in enumerate(prompts)])
        await engine.load_lora_adapter("f", config(), adapter(engine.model, 1, fresh=True).items())
        adapted = await generate_all(engine, [(ids, sampled(i, 24), "f")
                                              for i, ids in enumerate(prompts)])
        await engine.close()
        return base, adapted
    base, adapted = run(fresh())
    assert [(o.output_ids, o.output_log_probs) for o in base] == \
        [(o.output_ids, o.output_log_probs) for o in adapted]


def merged_model(tiny, tensors):
    """The tiny model in bf16 with the adapter merged in (W + scaling * B @ A in float32):
    what full fine-tuning to the same function would push to the engine."""
    model = load_hf_model(str(tiny / "model"), torch.bfloat16, "cuda")
    with torch.no_grad():
        for name, module in model.named_modules():
            if f"{name}.lora_A.weight" in tensors:
                module.weight.copy_(merged(module.weight, tensors[f"{name}.lora_A.weight"].cuda(),
                                           tensors[f"{name}.lora_B.weight"].cuda(),
                                           ALPHA / RANK))
    return model


def bf16_gap(engine_outputs, model, prompts) -> float:
    """Mean |engine - trainer's forward| log-prob over every sampled token, the trainer
    being `model` (bf16) in one forward over prompt + output."""
    gaps = []
    for prompt, output in zip(prompts, engine_outputs, strict=True):
        ids = torch.tensor([prompt + output.output_ids], device="cuda")
        with torch.no_grad():
            hidden = model.base_model(input_ids=ids).last_hidden_state[0]
            logits = output_logits(hidden, model.get_output_embeddings().weight)
        log_probs = logits[len(prompt) - 1:-1].log_softmax(-1).gather(
            -1, ids[0, len(prompt):, None]).squeeze(-1)
        gaps.append((log_probs.cpu() - torch.tensor(output.output_log_probs)).abs())
    return torch.cat(gaps).mean().item()


@pytest.mark.gpu
def test_gpu_engine_trainer_gap_with_an_adapter_is_full_fine_tunings(tiny, tokenizer, prompts):
    """bf16 with graphs: the engine with the adapter un-merged is as far from the trainer
    (HF + PEFT, bf16) as an engine with the merged weights is from HF on them (the gap
    full fine-tuning to the same function shows)."""
    tensors = adapter(load_hf_model(str(tiny / "model")), 1)
    many = [ids for ids in prompts for _ in range(8)]
    requests_ = [(ids, sampled(i, 48), "a") for i, ids in enumerate(many)]

    async def sample(engine, requests_):
        outputs = await generate_all(engine, requests_)
        await engine.close()
        return outputs
    engine = gpu_engine(tiny, tokenizer, torch.bfloat16, True)
    run(engine.load_lora_adapter("a", config(), tensors.items()))
    adapted = run(sample(engine, requests_))
    trainer = load_hf_model(str(tiny / "model"), torch.bfloat16, "cuda")
    attach(trainer, LoraSpec(RANK, ALPHA), seed=0)
    load_adapter_tensors(trainer, tensors, "the test adapter")
    lora_gap = bf16_gap(adapted, trainer.to(torch.bfloat16), many)
    full = merged_model(tiny, tensors)
    engine = FastEngine(merged_model(tiny, tensors), tokenizer, max_num_seqs=32,
                        kv_cache_tokens=8192)
    full_gap = bf16_gap(run(sample(engine, [(ids, p, None) for ids, p, _ in requests_])),
                        full, many)
    print(f"mean |engine - trainer| log-prob: adapter {lora_gap:.2e}, merged {full_gap:.2e}")
    assert lora_gap <= 1.5 * full_gap + 2e-4


def test_the_rollouts_engine_samples_the_runs_adapter_unless_a_request_names_one():
    """build.py gives rollouts, the router front and hooks an AdapterEngine under
    --lora-rank: a request without lora_path (a hook ported from Miles) samples the
    policy, not the base; one that names an adapter keeps it; the rest is the engine's."""
    import asyncio
    from furlong.engine.adapter import AdapterEngine

    class Recording:
        calls: list = []
        loaded = ("furlong_lora", "other")

        async def generate(self, input_ids, params, **options):
            self.calls.append(options)
            return "output"

    engine = AdapterEngine(Recording(), "furlong_lora")
    asyncio.run(engine.generate([1], None))
    asyncio.run(engine.generate([1], None, lora_path=None, return_routed_experts=True))
    asyncio.run(engine.generate([1], None, lora_path="other"))
    assert Recording.calls == [{"lora_path": "furlong_lora"},
                               {"lora_path": "furlong_lora", "return_routed_experts": True},
                               {"lora_path": "other"}]
    assert engine.loaded == ("furlong_lora", "other")
